"""The one engine per console server, shared by every browser session.

The console's server process hosts the coordinator and its local worker pool, exactly like
the CLI does during a run. ``get_console(url)`` builds it once per database URL behind
``st.cache_resource`` (global scope: every session and rerun gets the same object; the
coordinator and the database are thread-safe: DuckDB writes of this process's threads are
serialised by ``Database.write_lock``, the pool by the coordinator's lock). With the DuckDB
default this process is then the only one holding the file; pages read through the same
``Database`` (``db.connect()``), and ``python -m engine.run status/stop`` in a terminal reach
the coordinator over its control socket.

Lifetime: closing a browser tab ends a *session*, not the engine: runs keep going. Stopping
the server (Ctrl-C, SIGTERM) runs the ``atexit`` hook: the pool stops gracefully, workers
finish their in-flight items and hand their tasks back, so every unfinished run is resumable.
Clearing the resource cache (tests, "Clear cache" in the menu) releases the engine the same
way through ``on_release``.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from engine.jobs import components
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from storage.db import Database, open_database, resolve_db_url
from storage.errors import StorageError

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0

_live: weakref.WeakSet[Console] = weakref.WeakSet()


@dataclass(eq=False)
class Console:
    """What the pages use: the database, the settings and the coordinator (with its pool)."""

    url: str
    db: Database
    coordinator: Coordinator
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    closed: bool = False
    _scheduler_stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _scheduler: threading.Thread | None = field(default=None, repr=False)
    _alerts: threading.Thread | None = field(default=None, repr=False)
    _metrics: Any = field(default=None, repr=False)
    metrics_port: int | None = None  # where /metrics is served, when it is

    def start_metrics(self, port: int) -> None:
        """Serve /metrics on 127.0.0.1 (``Settings.metrics_port``); a port in use is logged,
        not fatal: the console itself must still start."""
        from engine.metrics import serve

        try:
            self._metrics, _thread, self.metrics_port = serve(self.db, port)
        except OSError as exc:
            log.warning("console: cannot serve metrics on port %s: %s", port, exc)

    def start_scheduler(self) -> None:
        """Fire due schedules into this server's runs (``Settings.scheduler``)."""
        from engine.schedules.scheduler import Scheduler

        scheduler = Scheduler(self.db, self.settings, self.coordinator.name)
        self._scheduler = threading.Thread(
            target=scheduler.run_forever,
            args=(self._scheduler_stop, self.settings.scheduler_poll_s),
            name="scheduler",
            daemon=True,
        )
        self._scheduler.start()

    def start_alerts(self) -> None:
        """Deliver alerts from this server (``Settings.alerts``); stops with the scheduler."""
        from engine.alerts.deliver import Deliverer

        self._alerts = Deliverer(self.db, self.settings).start(self._scheduler_stop)

    @property
    def settings(self) -> Settings:
        """The engine's settings (the pool's concurrency can change while it runs)."""
        return self.coordinator.settings

    @property
    def uploads_dir(self) -> Path:
        return self.settings.data_dir / "uploads"

    @property
    def exports_dir(self) -> Path:
        return self.settings.data_dir / "exports"

    @property
    def display_url(self) -> str:
        return self.db.display_url

    def close(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the pool gracefully (runs stay resumable) and let go of the database."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        atexit.unregister(self.close)
        self._scheduler_stop.set()
        for thread in (self._scheduler, self._alerts):
            if thread is not None:
                thread.join(timeout)
        if self._metrics is not None:
            self._metrics.shutdown()
        try:
            self.coordinator.shutdown(timeout)
        except Exception:  # never let a failed shutdown keep the database open
            log.exception("console: coordinator shutdown failed")
        finally:
            self.db.dispose()


def _release(console: Console) -> None:
    console.close()


def start_console(url: str, settings: Settings | None = None) -> Console:
    """Open the database and start a coordinator with the local pool (no caching)."""
    settings = settings or Settings()
    db = open_database(url, wait_s=2, components=components())  # plugin kinds' tables too
    try:
        coordinator = Coordinator(db, settings).start()
    except BaseException:
        db.dispose()
        raise
    console = Console(url=url, db=db, coordinator=coordinator)
    if settings.scheduler:
        console.start_scheduler()
    if settings.metrics_port is not None:
        console.start_metrics(settings.metrics_port)
    if settings.alerts:
        console.start_alerts()
    atexit.register(console.close)
    _live.add(console)
    return console


@st.cache_resource(show_spinner="starting the engine…", on_release=_release)
def get_console(url: str) -> Console:
    """The console of this server for ``url``: built on first use, shared afterwards.

    A failure (the DuckDB file held by another process, PostgreSQL down) is not cached:
    the next rerun tries again.
    """
    return start_console(url)


def db_url() -> str:
    return resolve_db_url()


def console_or_stop() -> Console:
    """The shared console, or an error on the page saying what to do (and the page stops)."""
    try:
        return get_console(db_url())
    except StorageError as exc:
        st.error(str(exc))
        st.stop()
    except ValueError as exc:  # invalid FETCHFLEET_* settings (pydantic names the field)
        st.error(f"invalid settings: {exc}")
        st.stop()
    raise AssertionError("unreachable")


def shutdown_all() -> None:
    """Release every console of this process and clear the caches (tests, benchmarks)."""
    get_console.clear()
    st.cache_data.clear()
    for console in list(_live):
        console.close()
