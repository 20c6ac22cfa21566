"""The coordinator: supervises the local pool and keeps runs honest.

One per process that owns work: the CLI during a run, or the console's server. Its service
thread
1. with DuckDB, runs the pool's queue server (``engine.queue.pipe.PipeServer``: claims and
   heartbeats answered at once, results buffered and written in bulk every ``flush_s``);
   with PostgreSQL the workers reach the database themselves;
2. every second runs the watchdog: re-queues the tasks of dead worker processes (and starts
   replacements), re-queues expired leases (any worker, any machine), marks silent workers
   dead, and settles runs whose tasks are all finished;
3. with DuckDB, a control socket lets `engine.run status/stop/resume` in another terminal
   reach this process, since they cannot open the file it holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from engine import lifecycle
from engine.model import TERMINAL
from engine.queue import pool_link
from engine.queue.sql import SqlQueue
from engine.runtime.control import ControlServer, control_path
from engine.runtime.pool import LocalPool
from engine.settings import Settings
from engine.version import code_version
from storage import queue as q
from storage import runs
from storage.db import Database
from storage.errors import is_transient, outage_delay

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0


class Coordinator:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        workers: int | None = None,
        log_level: str = "WARNING",
    ) -> None:
        self.db = db
        self.settings = settings
        # The coordinator's own backend, with its code version: the one its runs record and
        # its pool workers inherit. Checked on PostgreSQL only: on DuckDB no other process
        # can claim, and the pool (over pipes) always runs this process's code.
        self.version = code_version()
        self.sql = SqlQueue(db, settings, self.version, check_version=not db.is_duckdb)
        self.pool_size = settings.workers if workers is None else workers
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        link = pool_link(
            db,
            self.sql,
            ctx,
            closing=lambda: self.pool.closing,
            on_completed=self._settle_now,
        )
        self.pipe = link.server  # None: the pool's workers connect to the database
        self.pool = LocalPool(settings, link.boot, ctx, log_level)
        self._stop = threading.Event()
        self._settled = threading.Event()  # set when a run reached its final status
        self._thread: threading.Thread | None = None
        self.control: ControlServer | None = None
        # The console calls resize/stop_worker from its session threads while the service
        # thread reaps and replaces processes: pool membership changes under this lock.
        self._pool_lock = threading.RLock()
        self.replaced: list[tuple[str, int | None, str]] = []  # (dead id, exit code, new id)
        self._dead: list[tuple[str, int | None]] = []  # died; their tasks not yet re-queued
        self._next_rules = 0.0  # monotonic time of the next stop-rule evaluation

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Coordinator:
        from engine.runtime.process import tune_gc

        tune_gc()
        if self.db.is_duckdb:
            self._take_over_orphans()
        if self.db.is_duckdb and self.db.engine.url.database not in (None, "", ":memory:"):
            self.control = ControlServer(control_path(self.db.engine.url.database), self)
            self.control.start()
        self.pool.resize(self.pool_size)
        self._thread = threading.Thread(target=self._serve, name="coordinator", daemon=True)
        self._thread.start()
        return self

    def _take_over_orphans(self) -> None:
        """With DuckDB this process alone holds the file, so every lease still in it belongs
        to a coordinator that was killed: re-queue those tasks now instead of waiting for
        their leases to expire, and mark the old workers dead."""
        with self.db.begin() as conn:
            leased = q.expired_leases(conn, include_live=True)
            q.requeue(conn, [t for t, _ in leased], "coordinator restarted")  # no attempt
            for worker_id in q.stale_workers(conn, older_than_s=0):
                q.end_worker(conn, worker_id, "dead", "its coordinator was killed")
        if leased:
            log.warning("re-queued %d task(s) left leased by a killed coordinator", len(leased))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Graceful: workers finish in-flight items and hand their tasks back."""
        self.pool.stop()
        self.pool.wait(timeout)
        self.pool.kill()
        self._stop.set()
        if self.pipe is not None:
            self.pipe.wake()  # wake the service thread now, not at its next poll
        if self._thread:
            self._thread.join(timeout)
        self._flush()
        self._watchdog(replace=False)
        if self.control:
            self.control.stop()

    def abort(self) -> None:
        """Second Ctrl-C: kill the pool now; leases expire and the work is re-queued later."""
        self.pool.kill()
        self._stop.set()
        if self.control:
            self.control.stop()

    def resize(self, n: int) -> None:
        with self._pool_lock:
            self.pool_size = n
            self.pool.resize(n)

    def set_concurrency(self, n: int) -> None:
        """Items in flight per worker, for the whole pool: each worker is replaced by one
        started with the new value; the old ones finish their in-flight items and hand their
        tasks back (as on a graceful stop), so no work is lost."""
        # model_validate checks the bounds of FETCHFLEET_CONCURRENCY (ValidationError).
        settings = type(self.settings).model_validate(
            {**self.settings.model_dump(), "concurrency": n}
        )
        with self._pool_lock:
            self.settings = settings
            self.pool.settings = settings
            for worker_id in self.pool.active():
                self._request_exit(worker_id)
                self.pool.terminate(worker_id)
            for _ in range(self.pool.target):
                self.pool.spawn()

    # --- the service thread ------------------------------------------------------------

    def _serve(self) -> None:
        next_watch = time.monotonic()
        failures = 0  # rounds failed in a row (the database restarting): backoff
        while not self._stop.is_set():
            try:
                if self.pipe is not None:
                    self.pipe.serve_until(next_watch, self._stop)
                else:
                    self._stop.wait(max(0.0, next_watch - time.monotonic()))
                if time.monotonic() >= next_watch:
                    backoff = outage_delay(failures + 1) if failures else 0.0
                    next_watch = time.monotonic() + max(WATCH_EVERY_S, backoff)
                    self._watchdog()
                    failures = 0
            except Exception as exc:  # keep serving: a failed flush is retried, leases protect
                failures += 1
                if not is_transient(exc):
                    log.exception("coordinator loop error")
                elif failures == 1 or failures % 10 == 0:
                    log.warning(
                        "cannot reach the database (%s: %s); still trying (%d)",
                        type(exc).__name__, exc, failures,
                    )  # fmt: skip
                # Short: the pool's requests are still answered; the flushes and the
                # watchdog back off on their own schedules.
                self._stop.wait(0.2)

    def _flush(self) -> None:
        """Store what the pool handed over and is still buffered (DuckDB)."""
        if self.pipe is not None:
            self.pipe.flush()

    def _settle_now(self) -> None:
        """Tasks were just completed: a run whose last task it was ends at once."""
        with self.db.begin() as conn:
            settled = runs.settle(conn)
        if settled:  # after the commit: a waiter woken earlier would read the old status
            self._ended(settled)

    def _request_exit(self, worker_id: str) -> None:
        if self.pipe is not None:
            self.pipe.request_exit(worker_id)

    def _watchdog(self, replace: bool = True) -> None:
        with self._pool_lock:
            ended = self.pool.reap()
            died = [(w, code) for w, code in ended if code != 0]
            # Replace first: it needs no database, and a database that is down now must not
            # leave the pool without workers once it is back.
            new_ids = self.pool.replace_missing() if replace and died else []
        for worker_id, _ in ended:
            if self.pipe is not None:
                self.pipe.forget(worker_id)
        for (worker_id, code), new in zip(died, new_ids, strict=False):
            self.replaced.append((worker_id, code, new))
        self._dead.extend(died)
        while self._dead:  # kept until stored: a failure here is retried next round
            worker_id, code = self._dead[0]
            self._flush()  # store what the worker handed over before it died
            reason = f"worker process died (exit code {code})"
            with self.db.begin() as conn:
                held = q.tasks_of_worker(conn, worker_id)
                q.fail(conn, held, reason, backoff_seconds=0)
                q.end_worker(conn, worker_id, "dead", reason)
            self._dead.pop(0)
            log.warning("%s: %s; re-queued tasks %s", worker_id, reason, held)
        with self.db.begin() as conn:
            if not q.watchdog_turn(conn):  # another coordinator's watchdog is at it
                return
            q.requeue_expired(conn, self.settings.retry_backoff_s, self.settings.max_lost_leases)
            for worker_id in q.stale_workers(conn, 3 * self.settings.lease_s):
                q.end_worker(conn, worker_id, "dead", "stopped heartbeating")
            settled = runs.settle(conn)
        for run_id, status in settled:
            log.info("run %s %s", run_id, status)
        if settled:
            self._ended(settled)
        if replace and time.monotonic() >= self._next_rules:
            self._next_rules = time.monotonic() + self.settings.stop_rules_every_s
            self._check_stop_rules()

    def _check_stop_rules(self) -> None:
        """Stop the running runs a stop rule fired for (``engine.stop_rules``): they settle
        as stopped once their in-flight tasks are handed back."""
        from engine.stop_rules import check_runs

        try:
            check_runs(self.db, self.settings)
        except Exception as exc:  # the watchdog's own work is done; try again next time
            if not is_transient(exc):
                log.exception("stop rules: evaluation failed")

    def _ended(self, settled: list[tuple[int, str]]) -> None:
        """Runs this coordinator settled: wake waiters, then what every run end does."""
        self._settled.set()
        lifecycle.ended(self.db, self.settings, [run_id for run_id, _ in settled])

    def wait_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` for this coordinator to settle a run (``wait_run``'s
        sleep: a finished run is seen at once instead of at the next poll)."""
        if self._settled.wait(timeout):
            self._settled.clear()

    # --- operator API ------------------------------------------------------------------

    def command(self, run_id: int, action: str, source: str = "cli") -> str:
        status = lifecycle.command(self.db, self.settings, run_id, action, source, settle=False)
        if status in TERMINAL:
            self._settled.set()
        return status

    def stop_worker(self, worker_id: str) -> None:
        """Stop one worker gracefully. A worker of this pool also leaves the pool: its size
        goes down by one (what the Workers page shows), so it is not replaced."""
        self._request_exit(worker_id)
        self.sql.request_exit(worker_id)
        with self._pool_lock:
            if worker_id in self.pool.active():
                self.pool_size = self.pool.target = max(0, self.pool.target - 1)
            self.pool.terminate(worker_id)
