"""The deliverer: sends pending deliveries, retried with backoff within a retry window.

Once per delivery, with several deliverers (every console server runs one, and so does
``engine.run scheduler``): a deliverer claims a delivery under a lease (PostgreSQL: ``FOR
UPDATE SKIP LOCKED``, so two never claim one row), sends it outside any transaction, and
records the outcome only while its lease token still holds. The one gap no outbox closes:
a deliverer that dies after the receiver got the POST and before its commit leaves the
delivery pending; once the lease runs out another deliverer sends it again, with the same
body and ``id`` — a receiver that must never act twice dedupes on ``id``.

Backoff: ``backoff_s`` after the first failure, doubling up to ``backoff_max_s``; a delivery
still failing ``retry_window_s`` after its event is ``failed`` with its last error. A 4xx
answer (but 408/429) fails it at once: the URL or the hook is wrong.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.alerts import record
from engine.alerts.events import body
from engine.alerts.sweep import sweep
from engine.alerts.webhook import Sent, WebhookError, origin, post, resolve
from engine.settings import Settings
from storage import alerts as store
from storage.clock import utcnow
from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One send: the event, the alert, the receiver's status and what became of it."""

    event_id: int
    uid: str
    event: str
    alert: str
    status: str  # delivered, pending (retried later), failed, lost (lease taken over)
    http_status: int | None
    error: str | None


class Deliverer:
    """``now`` is injectable: a test runs an hour of backoff in a second."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        now: Callable[[], datetime] = utcnow,
        send: Callable[[str, dict, float], Sent] = post,
    ) -> None:
        self.db = db
        self.settings = settings
        self.now = now
        self.send = send
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._wake = threading.Event()

    @property
    def lease_s(self) -> float:
        return self.settings.alerts_timeout_s + 30.0

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones."""
        s = self.settings
        return float(min(s.alerts_backoff_s * 2 ** max(attempts - 1, 0), s.alerts_backoff_max_s))

    # --- one round -----------------------------------------------------------------------

    def run_once(self, do_sweep: bool = True) -> list[Outcome]:
        """Record the events the sweep finds, then send every due delivery."""
        if do_sweep:
            sweep(self.db, self.settings, self.now())
        out: list[Outcome] = []
        while True:
            batch = self.deliver_due()
            out.extend(batch)
            if not batch:
                return out

    def deliver_due(self, event_id: int | None = None, limit: int = 20) -> list[Outcome]:
        """Claim and send up to ``limit`` due deliveries (of one event, with ``event_id``)."""
        with self.db.begin() as conn:
            claimed = store.claim(conn, self.now(), self.lease_s, limit, event_id)
        if not claimed:
            return []
        with self.db.connect() as conn:
            targets = {a.name: a for a in store.list_all(conn)}
        return [self._send_one(c, targets.get(c.alert)) for c in claimed]

    def _send_one(self, c: store.Claimed, alert: store.AlertRow | None) -> Outcome:
        if alert is None:  # removed while its delivery was due
            return self._settle(c, Sent(None, "the alert was removed"), final=True)
        try:
            url = resolve(alert.url, alert.url_env)
        except WebhookError as exc:
            return self._settle(c, Sent(None, str(exc)))
        sent = self.send(
            url, body(c.uid, c.event, c.at, c.text, c.payload), self.settings.alerts_timeout_s
        )
        if sent.ok:
            log.info(
                "alert %s: %s %s delivered to %s (HTTP %s)",
                c.alert,
                c.event,
                c.uid,
                origin(url),
                sent.status,
            )
        else:
            log.warning("alert %s: %s %s not delivered: %s", c.alert, c.event, c.uid, sent.error)
        return self._settle(c, sent)

    def _settle(self, c: store.Claimed, sent: Sent, final: bool = False) -> Outcome:
        now = self.now()
        nxt = None
        if sent.ok:
            status = "delivered"
        elif final or sent.permanent:
            status = "failed"
        else:
            nxt = now + timedelta(seconds=self.backoff(c.attempts + 1))
            window_end = c.at + timedelta(seconds=self.settings.alerts_retry_window_s)
            status = "pending" if nxt <= window_end else "failed"
            if status == "failed":
                nxt = None
        error = sent.error
        if status == "failed" and not sent.ok and not final and not sent.permanent:
            error = f"gave up after the retry window ({self.settings.alerts_retry_window_s:g} s): {error}"
        with self.db.begin() as conn:
            kept = store.settle_delivery(conn, c, status, now, sent.status, error, nxt)
        if not kept:
            status = "lost"
            log.warning(
                "alert %s: %s %s: another deliverer took the lease over", c.alert, c.event, c.uid
            )
        return Outcome(c.event_id, c.uid, c.event, c.alert, status, sent.status, error)

    # --- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        """An event was recorded in this process: deliver now, not at the next poll."""
        self._wake.set()

    def run_forever(self, stop: threading.Event, poll_s: float | None = None) -> None:
        """Deliver until ``stop`` is set; a database outage is logged and waited out."""
        from storage.errors import is_transient

        poll = poll_s or self.settings.alerts_poll_s
        record.on_recorded(self.wake)
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                except Exception as exc:
                    if not is_transient(exc):
                        log.exception("alert deliverer round failed")
                    else:
                        log.warning("alerts: database unreachable (%s); retrying", exc)
                self._wake.wait(poll)
                self._wake.clear()
        finally:
            record.forget_waker(self.wake)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread until ``stop`` is set (the caller also calls ``wake``)."""
        stop_waker = threading.Thread(target=lambda: (stop.wait(), self.wake()), daemon=True)
        stop_waker.start()
        t = threading.Thread(target=self.run_forever, args=(stop,), name="alerts", daemon=True)
        t.start()
        return t


def deliver_now(
    db: Database, settings: Settings, run_ids: Iterable[int] = (), limit: int = 5
) -> list[Outcome]:
    """One short pass (a run by hand from the CLI just ended): record the runs' events (the
    coordinator's hook may still be at it: recording twice is one event), then send what is
    due, at most ``limit``; what fails stays pending for the next deliverer. Never raises."""
    try:
        record.runs_ended(db, settings, run_ids)
        return Deliverer(db, settings).deliver_due(limit=limit)
    except Exception as exc:
        log.warning("alerts: not delivered now (%s); a deliverer sends them later", exc)
        return []
