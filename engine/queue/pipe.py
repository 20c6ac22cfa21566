"""The queue over multiprocessing pipes, for when the coordinator alone holds the database
(DuckDB): ``PipeQueue`` in each pool worker, ``PipeServer`` in the coordinator.

Each worker has a channel of its own to the coordinator (one duplex pipe): requests go up as
``(request id, op, args)``, answers come back as ``(request id, reply)``. Results,
completions, releases, failures and the goodbye are one-way messages: the server buffers
them and writes them in bulk, in each worker's order, so a completion is never stored before
the results that precede it. A worker killed mid-way loses at most what was still in its
pipe; its tasks were not completed, so they run again and nothing is lost.

Why a channel per worker and not one queue for all: a shared pipe needs a write lock across
processes, and a worker killed (``kill -9``) while writing a large message kept it for ever,
with half a message in the pipe that the coordinator's reader then waited on for ever. A
channel has one writer; when it dies the coordinator holds no copy of its end, so a half
message reads as end-of-file and the channel is dropped.

This module must stay cheap to import: pool workers import it and never import SQLAlchemy.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing.connection import wait as wait_ready
from typing import TYPE_CHECKING, Any

from engine.model import ItemResult, ResultBatch
from engine.queue.base import EXIT, Leases, QueueBackend, Reply, WorkerAction, flush_delay
from engine.queue.boot import WorkerBoot

if TYPE_CHECKING:
    from engine.queue.sql import SqlQueue
    from engine.ratelimit.base import RateLimiter
    from engine.settings import Settings

log = logging.getLogger(__name__)

FLUSH_AT = 5000  # results: flush early when this many are buffered
DRAIN_AT_ONCE = 64  # messages read from one channel before the next one gets its turn


class Op(IntEnum):
    """A request's operation. Sent as its int value (two bytes pickled, no class lookup on
    the way in); SUBMIT to UNREGISTER are one-way, the others round trips."""

    REGISTER = 0
    CLAIM = 1
    HEARTBEAT = 2
    SUBMIT = 3
    COMPLETE = 4
    RELEASE = 5
    FAIL = 6
    UNREGISTER = 7
    PROXY_POOL = 8


def _one_way(op: int) -> bool:
    return Op.SUBMIT <= op <= Op.UNREGISTER


class PipeQueue(QueueBackend):
    """A pool worker's backend: every call is a message to its coordinator's ``PipeServer``
    on the worker's own channel."""

    def __init__(self, channel: Any, timeout_s: float = 60.0) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        self._round_trip = threading.Lock()  # one request awaiting its answer at a time
        self._send = threading.Lock()  # one message on the wire at a time (any thread)

    def _call(self, worker_id: str, op: Op, *args: Any) -> Any:
        req_id = next(self._ids)
        if _one_way(op):
            with self._send:
                self.channel.send((req_id, op.value, args))
            return None
        with self._round_trip:
            with self._send:
                self.channel.send((req_id, op.value, args))
            deadline = time.monotonic() + self.timeout_s
            while True:
                if not self.channel.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(
                        f"no answer from the coordinator to {op.name.lower()} "
                        f"in {self.timeout_s:.0f}s"
                    )
                got_id, result = self.channel.recv()
                if got_id == req_id:
                    return result

    def register(
        self, worker_id: str, host: str, pid: int, kind: str, countries: Sequence[str] = ()
    ) -> None:
        self._call(worker_id, Op.REGISTER, host, pid, kind, tuple(countries))

    def claim(
        self,
        worker_id: str,
        max_tasks: int,
        run_id: int | None = None,
        countries: Sequence[str] = (),
    ) -> Reply:
        return self._call(worker_id, Op.CLAIM, max_tasks, run_id, tuple(countries))

    def heartbeat(
        self, worker_id: str, leases: Leases, status: str, done: int, failed: int
    ) -> Reply:
        return self._call(worker_id, Op.HEARTBEAT, dict(leases), status, done, failed)

    def submit(self, worker_id: str, results: list[ItemResult | ResultBatch]) -> None:
        self._call(worker_id, Op.SUBMIT, results)

    def complete(self, worker_id: str, leases: Leases) -> None:
        self._call(worker_id, Op.COMPLETE, dict(leases))

    def release(self, worker_id: str, leases: Leases) -> None:
        self._call(worker_id, Op.RELEASE, dict(leases))

    def fail(self, worker_id: str, leases: Leases, error: str) -> None:
        self._call(worker_id, Op.FAIL, dict(leases), error)

    def unregister(self, worker_id: str, reason: str) -> None:
        self._call(worker_id, Op.UNREGISTER, reason)

    def proxy_pool(self, worker_id: str, run_id: int) -> list[tuple[Any, ...]]:
        # the coordinator reads it from the DuckDB file this process cannot open
        return self._call(worker_id, Op.PROXY_POOL, run_id)


class PipeServer:
    """The coordinator's half: answers its pool's requests from a ``SqlQueue`` on DuckDB.

    Claims and heartbeats are answered at once; results are buffered and stored in bulk every
    ``flush_s`` (sooner when ``FLUSH_AT`` results wait, or at once when the queue ran dry and a
    completion arrives: it may be a run's last task); completions, releases, failures and
    goodbyes are applied with the flush, after the results. A flush the database fails keeps
    all of it, in order, for the next one, after a backoff (``flush_delay``) during which
    requests are still answered. ``on_completed`` is called after
    a flush stored completions (the coordinator settles runs there). Single-threaded: one
    service thread calls ``serve_until`` and ``flush``; ``boot``, ``forget`` and
    ``request_exit`` may be called from any thread.
    """

    def __init__(
        self,
        sql: SqlQueue,
        ctx: Any,
        *,
        limits_path: str,
        flush_s: float,
        closing: Callable[[], bool] = lambda: False,
        on_completed: Callable[[], None] = lambda: None,
    ) -> None:
        self.sql = sql
        self.ctx = ctx
        self._lock = threading.Lock()  # _channels: the pool adds and forgets from any thread
        self._channels: dict[str, Any] = {}  # worker id → the coordinator's end of its channel
        self._forgotten: set[str] = set()  # closed by the service thread, which may be reading
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self.limits_path = limits_path
        self.flush_s = flush_s
        self.closing = closing  # the pool is shutting down: claims say EXIT
        self.on_completed = on_completed
        self._exit: set[str] = set()
        self._results: list[ItemResult | ResultBatch] = []
        self._n_results = 0  # items in _results (a ResultBatch holds many)
        self._ops: list[tuple[int, str, tuple[Any, ...]]] = []
        self._dry = False  # the last claim found fewer tasks than it asked for
        self._flush_now = False
        self._next_flush = time.monotonic() + flush_s
        self._failures = 0  # flushes failed in a row (the database): retried with backoff

    # --- the pool's side ---------------------------------------------------------------

    def boot(self, worker_id: str, settings: Settings, log_level: str) -> PipeBoot:
        """Open the channel of a new pool worker; a ``BootFactory``."""
        ours, theirs = self.ctx.Pipe(duplex=True)
        with self._lock:
            self._channels[worker_id] = ours
            self._forgotten.discard(worker_id)
        return PipeBoot(
            worker_id=worker_id,
            settings=settings.model_dump(mode="json"),
            log_level=log_level,
            channel=theirs,
            limits_path=self.limits_path,
        )

    def forget(self, worker_id: str) -> None:
        """The worker's process ended: drop its channel. (Its exit request stays: a request
        it sent before it ended must not lease it tasks.)"""
        with self._lock:
            if worker_id in self._channels:
                self._forgotten.add(worker_id)
        self.wake()

    def request_exit(self, worker_id: str) -> None:
        """The worker's next claim or heartbeat answers EXIT."""
        self._exit.add(worker_id)

    def wake(self) -> None:
        """Make ``serve_until`` return now (after its ``stop`` event was set)."""
        self._wake_w.send_bytes(b"w")

    # --- the service thread ------------------------------------------------------------

    def serve_until(self, until: float, stop: threading.Event) -> None:
        """Answer requests and flush on time until ``until`` (monotonic) or ``stop``."""
        while not stop.is_set():
            self._answer(min(until, self._next_flush), stop)
            early = self._flush_now or self._n_results >= FLUSH_AT
            # After a failed flush only the backoff's time brings the next one, and requests
            # are answered meanwhile however much is buffered.
            if time.monotonic() >= self._next_flush or (early and not self._failures):
                self._flush_now = False
                try:
                    self.flush()
                except BaseException:
                    self._failures += 1
                    delay = flush_delay(self.flush_s, self._failures)
                    self._next_flush = time.monotonic() + delay
                    raise
                self._failures = 0
                self._next_flush = time.monotonic() + self.flush_s
            if time.monotonic() >= until:
                return

    def _live_channels(self) -> dict[Any, str]:
        """The channels to read (their end → worker id), closing the forgotten ones."""
        with self._lock:
            for worker_id in self._forgotten:
                self._channels.pop(worker_id).close()
            self._forgotten.clear()
            return {conn: worker_id for worker_id, conn in self._channels.items()}

    def _drop(self, worker_id: str, why: str) -> None:
        """A channel whose worker is gone (end-of-file, half a message, a broken pipe)."""
        log.info("worker %s: channel closed (%s)", worker_id, why)
        with self._lock:
            if worker_id in self._channels:
                self._forgotten.add(worker_id)

    def _answer(self, until: float, stop: threading.Event) -> None:
        while True:
            timeout = until - time.monotonic()
            if timeout <= 0 or (self._n_results >= FLUSH_AT and not self._failures):
                return
            channels = self._live_channels()
            ready = wait_ready([self._wake_r, *channels], timeout=min(timeout, 0.1))
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                return
            if not ready and stop.is_set():
                return
            # Read what every ready channel holds before answering any round trip: whatever
            # a process sent before its request was in its pipe by then, so the answer comes
            # after it is buffered, whichever worker sent it.
            round_trips = []
            for conn in ready:
                worker_id = channels[conn]
                for _ in range(DRAIN_AT_ONCE):
                    try:
                        req_id, op, args = conn.recv()
                    except (EOFError, OSError) as e:  # the worker died, maybe mid-message
                        self._drop(worker_id, type(e).__name__)
                        break
                    if not _one_way(op):
                        round_trips.append((conn, worker_id, req_id, op, args))
                    else:
                        self._buffer(worker_id, op, args)
                    if not conn.poll(0):
                        break
            for conn, worker_id, req_id, op, args in round_trips:
                reply = self._reply(worker_id, op, args)
                try:
                    conn.send((req_id, reply))
                except OSError as e:
                    self._drop(worker_id, type(e).__name__)
            if self._flush_now:
                return

    def _buffer(self, worker_id: str, op: int, args: tuple[Any, ...]) -> None:
        if op == Op.SUBMIT:
            self._results.extend(args[0])
            self._n_results += sum(len(r) if isinstance(r, ResultBatch) else 1 for r in args[0])
        else:  # complete, release, fail, unregister: applied with the next flush
            self._ops.append((op, worker_id, args))
            if op == Op.COMPLETE and self._dry:
                self._flush_now = True  # the queue ran dry: maybe a run's last tasks

    def _reply(self, worker_id: str, op: int, args: tuple[Any, ...]) -> Any:
        if op == Op.CLAIM:
            if worker_id in self._exit or self.closing():
                return EXIT
            reply = self.sql.claim(worker_id, *args)
            # A claim that found fewer tasks than asked for means the queue is dry: from
            # now on completions are stored at once instead of at the next periodic flush.
            self._dry = len(reply.tasks) < args[0]
            return reply
        if op == Op.PROXY_POOL:
            return self.sql.proxy_pool(worker_id, *args)
        if op == Op.HEARTBEAT:
            reply = self.sql.heartbeat(worker_id, *args)
            if worker_id in self._exit:
                return Reply(directives=reply.directives, worker_action=WorkerAction.EXIT)
            return reply
        return self.sql.register(worker_id, *args)

    def flush(self) -> None:
        """Store buffered results with the completions, then apply the other one-way ops.

        Nothing is dropped when the database fails: what was not applied goes back to the
        buffers, ahead of what arrives meanwhile, and the exception propagates (the
        coordinator logs it and flushes again). A poison result cannot fail it: the store
        isolates it (``SqlQueue.store``)."""
        results, self._results = self._results, []
        n_results, self._n_results = self._n_results, 0
        ops, self._ops = self._ops, []
        completes = [pair for op, _, args in ops if op == Op.COMPLETE for pair in args[0].items()]
        try:
            if results or completes:
                self.sql.store(results, completes)
        except BaseException:
            self._results[:0] = results
            self._n_results += n_results
            self._ops[:0] = ops
            raise
        if completes:  # settle now: a run whose last task just finished ends at once
            try:
                self.on_completed()
            except Exception:  # the watchdog settles it on its next round
                log.exception("settling after a flush failed")
        for i, (op, worker_id, args) in enumerate(ops):
            try:
                if op == Op.RELEASE:
                    self.sql.release(worker_id, *args)
                elif op == Op.FAIL:
                    self.sql.fail(worker_id, *args)
                elif op == Op.UNREGISTER:
                    self.sql.unregister(worker_id, *args)
            except BaseException:
                rest = [o for o in ops[i:] if o[0] != Op.COMPLETE]  # completions are stored
                self._ops[:0] = rest
                raise


@dataclass(kw_only=True)
class PipeBoot(WorkerBoot):
    """A pool worker of a DuckDB coordinator: the queue through its pipes, rate limits
    through a file beside the database (it outlives the coordinator: see
    ``engine.ratelimit.shared``), opened when a job first needs a limit."""

    channel: Any  # this worker's end of its channel to the coordinator
    limits_path: str

    def started(self) -> None:
        # The parent must not keep the worker's end: if it did, a worker killed mid-message
        # would leave the coordinator waiting for the rest instead of reading end-of-file.
        self.channel.close()

    def open_backend(self) -> PipeQueue:
        from engine.runtime.process import exit_with_parent

        exit_with_parent()  # nothing we do can be stored once the coordinator is gone
        return PipeQueue(self.channel)

    def open_limiter(self) -> RateLimiter:
        from engine.ratelimit.base import LazyLimiter
        from engine.ratelimit.shared import SharedLimiter

        path = self.limits_path
        return LazyLimiter(lambda: SharedLimiter(path))

    def close(self) -> None:
        self.channel.close()  # every message was written whole when its send returned
        # No database here: skip the teardown the coordinator would wait for.
        from engine.runtime.process import exit_now

        exit_now(0)
