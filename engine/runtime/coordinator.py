"""The coordinator: supervises the local pool, serves it (embedded mode), keeps runs honest.

One per process that owns work: the CLI during a run, or the console's server. Its service
thread
1. answers pool workers (embedded/DuckDB mode): claims and heartbeats at once; results,
   completions and releases buffered and written in bulk every ``flush_s``;
2. every second runs the watchdog: re-queues the tasks of dead worker processes (and starts
   replacements), re-queues expired leases (any worker, any machine), marks silent workers
   dead, and settles runs whose tasks are all finished;
3. with DuckDB, a control socket lets `engine.run status/stop/resume` in another terminal
   reach this process, since they cannot open the file it holds.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any

from engine.model import ItemResult, ResultBatch
from engine.queue.base import Reply
from engine.queue.sql import SqlQueue
from engine.runtime.control import ControlServer, control_path
from engine.runtime.pool import LocalPool
from engine.settings import Settings
from storage import queue as q
from storage import runs
from storage.db import Database

log = logging.getLogger(__name__)

FLUSH_AT = 5000  # results: flush early when this many are buffered
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
        self.sql = SqlQueue(db, settings)
        self.mode = "pipe" if db.is_duckdb else "sql"
        self.pool_size = settings.workers if workers is None else workers
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.requests = ctx.Queue() if self.mode == "pipe" else None
        self.pool = LocalPool(settings, self.mode, db.url, self.requests, ctx, log_level)
        self._stop = threading.Event()
        self._settled = threading.Event()  # set when a run reached its final status
        self._thread: threading.Thread | None = None
        self._results: list[ItemResult | ResultBatch] = []
        self._n_results = 0  # items in _results (a ResultBatch holds many)
        self._ops: list[tuple[str, str, tuple[Any, ...]]] = []
        self._exit: set[str] = set()
        self._dry = False  # the last claim found fewer tasks than it asked for
        self._flush_now = False
        self.control: ControlServer | None = None
        # The console calls resize/stop_worker from its session threads while the service
        # thread reaps and replaces processes: pool membership changes under this lock.
        self._pool_lock = threading.RLock()
        self.replaced: list[tuple[str, int | None, str]] = []  # (dead id, exit code, new id)

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
        if self.requests is not None:
            self.requests.put(None)  # wake the service thread now, not at its next poll
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
                self._exit.add(worker_id)
                self.pool.terminate(worker_id)
            for _ in range(self.pool.target):
                self.pool.spawn()

    # --- the service thread ------------------------------------------------------------

    def _serve(self) -> None:
        next_flush = time.monotonic() + self.settings.flush_s
        next_watch = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            until = min(next_flush, next_watch)
            try:
                if self.mode == "pipe":
                    self._serve_requests(until)
                else:
                    self._stop.wait(max(0.0, until - now))
                if self._flush_now or time.monotonic() >= next_flush or self._n_results >= FLUSH_AT:
                    self._flush_now = False
                    self._flush()
                    next_flush = time.monotonic() + self.settings.flush_s
                if time.monotonic() >= next_watch:
                    self._watchdog()
                    next_watch = time.monotonic() + WATCH_EVERY_S
            except Exception:  # keep serving: a failed flush is retried, leases protect work
                log.exception("coordinator loop error")
                time.sleep(0.5)

    def _serve_requests(self, until: float) -> None:
        assert self.requests is not None
        while True:
            timeout = until - time.monotonic()
            if timeout <= 0 or self._n_results >= FLUSH_AT:
                return
            try:
                request = self.requests.get(timeout=min(timeout, 0.1))
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if request is None:  # shutdown's wake-up call
                return
            worker_id, req_id, op, args = request
            reply = self._handle(worker_id, op, args)
            if op in ("register", "claim", "heartbeat"):
                replies = self.pool.replies(worker_id)
                if replies is not None:
                    replies.put((req_id, reply))
            if op == "complete" and self._dry:
                self._flush_now = True  # the queue ran dry: these may be a run's last tasks
                return

    def _handle(self, worker_id: str, op: str, args: tuple[Any, ...]) -> Any:
        if op == "register":
            return self.sql.register(worker_id, *args)
        if op == "claim":
            if worker_id in self._exit or self.pool.closing:
                return Reply(worker_action="exit")
            reply = self.sql.claim(worker_id, *args)
            # A claim that found fewer tasks than asked for means the queue is dry: from
            # now on completions are stored at once instead of at the next periodic flush.
            self._dry = len(reply.tasks) < args[0]
            return reply
        if op == "heartbeat":
            reply = self.sql.heartbeat(worker_id, *args)
            if worker_id in self._exit:
                reply.worker_action = "exit"
            return reply
        if op == "submit":
            self._results.extend(args[0])
            self._n_results += sum(len(r) if isinstance(r, ResultBatch) else 1 for r in args[0])
            return None
        self._ops.append((op, worker_id, args))  # complete, release, fail, unregister
        return None

    def _flush(self) -> None:
        results, self._results = self._results, []
        self._n_results = 0
        ops, self._ops = self._ops, []
        completes = [t for op, _, args in ops if op == "complete" for t in args[0]]
        if results or completes:
            self.sql.store(results, completes)
        if completes:  # settle now: a run whose last task just finished ends at once
            with self.db.begin() as conn:
                settled = runs.settle(conn)
            if settled:  # after the commit: a waiter woken earlier would read the old status
                self._settled.set()
        for op, worker_id, args in ops:
            if op == "release":
                self.sql.release(worker_id, *args)
            elif op == "fail":
                self.sql.fail(worker_id, *args)
            elif op == "unregister":
                self.sql.unregister(worker_id, *args)

    def _watchdog(self, replace: bool = True) -> None:
        with self._pool_lock:
            ended = self.pool.reap()
        for worker_id, code in ended:
            if code == 0:
                continue
            self._flush()  # store what the worker handed over before it died
            reason = f"worker process died (exit code {code})"
            with self.db.begin() as conn:
                held = q.tasks_of_worker(conn, worker_id)
                q.fail(conn, held, reason, backoff_seconds=0)
                q.end_worker(conn, worker_id, "dead", reason)
            log.warning("%s: %s; re-queued tasks %s", worker_id, reason, held)
            if replace:
                with self._pool_lock:
                    new_ids = self.pool.replace_missing()
                for new in new_ids:
                    self.replaced.append((worker_id, code, new))
        with self.db.begin() as conn:
            expired = q.expired_leases(conn)
            for task_id, worker_id in expired:
                q.fail(
                    conn,
                    [task_id],
                    f"lease expired (worker {worker_id} went silent)",
                    self.settings.retry_backoff_s,
                )
            for worker_id in q.stale_workers(conn, 3 * self.settings.lease_s):
                q.end_worker(conn, worker_id, "dead", "stopped heartbeating")
            settled = runs.settle(conn)
        for run_id, status in settled:
            log.info("run %s %s", run_id, status)
        if settled:
            self._settled.set()

    def wait_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` for this coordinator to settle a run (``wait_run``'s
        sleep: a finished run is seen at once instead of at the next poll)."""
        if self._settled.wait(timeout):
            self._settled.clear()

    # --- operator API ------------------------------------------------------------------

    def command(self, run_id: int, action: str, source: str = "cli") -> str:
        with self.db.begin() as conn:
            return runs.apply_command(conn, run_id, action, source)

    def stop_worker(self, worker_id: str) -> None:
        """Stop one worker gracefully. A worker of this pool also leaves the pool: its size
        goes down by one (what the Workers page shows), so it is not replaced."""
        self._exit.add(worker_id)
        self.sql.request_exit(worker_id)
        with self._pool_lock:
            if worker_id in self.pool.active():
                self.pool_size = self.pool.target = max(0, self.pool.target - 1)
            self.pool.terminate(worker_id)
