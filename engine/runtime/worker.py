"""The worker loop: claim tasks, execute their items concurrently, hand results back.

One asyncio loop per process runs up to ``concurrency`` items at once, across as many tasks
as it takes to fill that many slots. Results are flushed every ``flush_s``; a task is
reported complete only after all of its results were handed over. A stop (the run paused or
stopping, or the worker asked to exit) lets in-flight items finish and hands back the task so
its remaining items stay queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.jobs import get_kind
from engine.jobs.base import Executor, WorkerEnv
from engine.model import ItemResult, ResultBatch, TaskWork, item_ref
from engine.queue.base import Directive, QueueBackend, Reply, WorkerAction, flush_delay
from engine.settings import Settings
from storage.errors import outage_delay

if TYPE_CHECKING:
    from engine.queue.boot import WorkerBoot

log = logging.getLogger(__name__)


def error_result_data(executor: Executor, item: Any, exc: Exception) -> dict[str, Any]:
    """The data of an item whose ``execute`` raised, in the kind's shape when it can."""
    error = f"{type(exc).__name__}: {exc}"
    try:
        return executor.error_data(item, error)
    except Exception:
        log.exception("error_data failed for an item; storing the bare error")
        return {"error": error}


def new_worker_id(prefix: str = "w") -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


@dataclass
class _Held:
    work: TaskWork
    pending: int
    directive: Directive = Directive.CONTINUE
    runner: asyncio.Task[None] | None = None
    in_flight: set[asyncio.Task[Any]] = field(default_factory=set)


class Worker:
    def __init__(
        self,
        backend: QueueBackend,
        settings: Settings,
        worker_id: str,
        kind: str = "local",
        run_id: int | None = None,
        idle_exit_s: float | None = None,
        env: WorkerEnv | None = None,
        host: str | None = None,
        countries: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend
        # the countries whose tasks it claims (normal forms, engine.countries; empty: any),
        # besides tasks of no country: ``worker --countries``; a pool's workers serve any
        self.countries = countries
        # the host it registers under: the machine's name, or the fleet's name for the host
        # (``worker --host-label``; namespaces and containers share or reuse host names)
        self.host = host or socket.gethostname()
        # What executors share in this process (its rate limiter): given by the deployment
        # (the worker's boot); a worker built without one is alone and limits in memory.
        self.env = env if env is not None else WorkerEnv.local()
        self.settings = settings
        self.worker_id = worker_id
        self.kind = kind
        self.run_id = run_id
        self.idle_exit_s = idle_exit_s
        self.exiting = asyncio.Event()
        self._held: dict[int, _Held] = {}
        self._results: list[ItemResult | ResultBatch] = []
        # Runs whose kind hands results over column by column: run id → columns, and the
        # batch being filled until the next flush.
        self._columns: dict[int, tuple[str, ...] | None] = {}
        self._batches: dict[int, ResultBatch] = {}
        # Leases (task id → token) of tasks whose results are all buffered, of tasks to hand
        # back, and of both until handed over (their heartbeats keep them).
        self._finished: dict[int, str] = {}
        self._released: dict[int, str] = {}
        self._unsettled: dict[int, str] = {}
        self._executors: dict[int, Executor] = {}
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._done = 0
        self._failed = 0
        self._flush_lock = asyncio.Lock()
        self._tail_flush: asyncio.Task[bool] | None = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, self.worker_id, *args)

    async def _call_retrying(
        self, fn: Any, *args: Any, until_exit: bool = False, within_s: float | None = None
    ) -> Any:
        """``_call``, retried with backoff while the queue is unreachable (the database
        restarting): until the worker is asked to exit (``until_exit``; then None), or for
        ``within_s`` (then the last error is raised). Other errors are raised at once."""
        deadline = None if within_s is None else time.monotonic() + within_s
        failures = 0
        while True:
            try:
                return await self._call(fn, *args)
            except Exception as exc:
                if not self.backend.is_transient(exc):
                    raise
                failures += 1
                delay = outage_delay(failures)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                if until_exit and self.exiting.is_set():
                    return None
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "%s: cannot reach the queue (%s: %s); try %d, again in %.1f s",
                        fn.__name__, type(exc).__name__, exc, failures + 1, delay,
                    )  # fmt: skip
                if until_exit:
                    await self._wait(delay)
                else:
                    await asyncio.sleep(delay)

    # --- main loop ---------------------------------------------------------------------

    async def run(self) -> str:
        await self._call_retrying(
            self.backend.register,
            self.host,
            os.getpid(),
            self.kind,
            self.countries,
            until_exit=True,
        )
        flusher = asyncio.create_task(self._flush_loop())
        beater = asyncio.create_task(self._heartbeat_loop())
        reason = "stopped"
        idle_since = time.monotonic()
        try:
            while not self.exiting.is_set():
                # Keep a backlog beyond what runs: half the concurrency, or up to three
                # tasks when that is more (small concurrency, large tasks: the backlog must
                # outlast a claim that waits for the coordinator's flush). Claim only when a
                # quarter of the concurrency, and at least a task, is free: each claim then
                # brings several tasks (one round trip, one transaction; a claim costs the
                # coordinator ~10-15 ms whatever it brings) and slots never sit empty.
                pending = sum(h.pending for h in self._held.values())
                conc, batch = self.settings.concurrency, self.settings.batch_size
                backlog = max(conc // 2, min(3 * batch, 2 * conc))
                room = conc + backlog - pending
                if room < max(1, conc // 4, min(batch, backlog)) and self._held:
                    await self._wait(0.05)
                    continue
                want = max(1, min(32, -(-room // self.settings.batch_size)))
                reply = await self._claim(want)
                self._apply(reply)
                if reply.worker_action is WorkerAction.EXIT:
                    reason = "asked to exit"
                    break
                for work in reply.tasks:
                    self._start(work)
                if self._held or reply.tasks:
                    idle_since = time.monotonic()
                elif self.idle_exit_s and time.monotonic() - idle_since > self.idle_exit_s:
                    reason = f"idle for {self.idle_exit_s:.0f}s"
                    break
                if not reply.tasks:
                    await self._wait(0.2)
        finally:
            await self._drain()
            flusher.cancel()
            beater.cancel()
            await asyncio.gather(flusher, beater, return_exceptions=True)
            await self._flush_rest()
            for ex in self._executors.values():
                await ex.aclose()
            try:
                await self._call_retrying(
                    self.backend.unregister, reason, within_s=self.settings.lease_s
                )
            except Exception as exc:  # the watchdog marks it dead once its heartbeats stop
                log.warning("could not unregister: %s: %s", type(exc).__name__, exc)
        return reason

    async def _claim(self, want: int) -> Reply:
        reply = await self._call_retrying(
            self.backend.claim, want, self.run_id, self.countries, until_exit=True
        )
        return Reply() if reply is None else reply  # asked to exit while unreachable

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exiting.wait(), seconds)

    def request_exit(self) -> None:
        self.exiting.set()

    async def _drain(self) -> None:
        """Let in-flight items finish; hand back what was not started."""
        for held in self._held.values():
            if held.directive is Directive.CONTINUE:
                held.directive = Directive.RELEASE
        runners = [h.runner for h in self._held.values() if h.runner]
        if runners:
            await asyncio.gather(*runners, return_exceptions=True)

    # --- tasks -------------------------------------------------------------------------

    def _start(self, work: TaskWork) -> None:
        self._supersede(work)
        held = _Held(work=work, pending=len(work.items))
        self._held[work.id] = held
        held.runner = asyncio.create_task(self._run_task(held))

    def _supersede(self, work: TaskWork) -> None:
        """A task claimed again while this worker still has an execution of it: that one's
        lease was lost (only a queued task is claimed) before a heartbeat said so. It starts
        nothing more, and what it left here — buffered results, a completion or a release
        not yet handed over — is dropped (the store would refuse its old lease anyway)."""
        old = self._held.get(work.id)
        stale = {
            lease
            for lease in (
                old.work.lease if old else None,
                self._finished.pop(work.id, None),
                self._released.pop(work.id, None),
                self._unsettled.pop(work.id, None),
            )
            if lease is not None and lease != work.lease
        }
        if old is not None:
            old.directive = Directive.ABANDON
        if stale:
            log.info("task %s: claimed again; its earlier execution's lease was lost", work.id)
            self._drop_results(stale)

    async def _executor(self, work: TaskWork) -> Executor:
        ex = self._executors.get(work.run_id)
        if ex is None:
            kind = get_kind(work.kind, self.settings)

            async def proxy_pool() -> list[tuple[Any, ...]]:
                return await self._call_retrying(
                    self.backend.proxy_pool, work.run_id, within_s=self.settings.lease_s
                )

            env = dataclasses.replace(self.env, proxy_pool=proxy_pool)
            ex = await kind.open_executor(work.params, env)
            self._executors[work.run_id] = ex
            self._columns[work.run_id] = kind.columns
        return ex

    async def _run_task(self, held: _Held) -> None:
        work = held.work
        try:
            executor = await self._executor(work)
        except Exception as exc:
            from storage.errors import is_database_outage

            log.warning("task %s: cannot start run %s: %s", work.id, work.run_id, exc)
            self._let_go(held)
            lease = {work.id: work.lease}
            try:
                if is_database_outage(exc):  # our database, not the task: no attempt
                    await self._call_retrying(
                        self.backend.release, lease, within_s=self.settings.lease_s
                    )
                else:
                    await self._call_retrying(
                        self.backend.fail,
                        lease,
                        f"{type(exc).__name__}: {exc}",
                        within_s=self.settings.lease_s,
                    )
            except Exception as again:  # its lease expires and it is re-queued
                log.warning("task %s: could not hand it back: %s", work.id, again)
            return
        jobs = [asyncio.create_task(self._run_item(held, executor, item)) for item in work.items]
        await asyncio.gather(*jobs, return_exceptions=True)
        self._let_go(held)
        if held.directive is Directive.CONTINUE:
            self._finished[work.id] = self._unsettled[work.id] = work.lease
        elif held.directive is Directive.RELEASE:
            self._released[work.id] = self._unsettled[work.id] = work.lease
        if not self._held and not self.exiting.is_set():
            # Nothing else held: this may be the run's last task. Hand it over now rather
            # than at the next periodic flush, so the run settles without that delay.
            self._tail_flush = asyncio.create_task(self._flush())

    def _let_go(self, held: _Held) -> None:
        """An execution ends: it is no longer held, unless a newer one of its task is."""
        if self._held.get(held.work.id) is held:
            del self._held[held.work.id]

    async def _run_item(self, held: _Held, executor: Executor, item: Any) -> None:
        async with self._sem:
            if held.directive is not Directive.CONTINUE:
                held.pending -= 1
                return
            work = held.work
            try:
                ok, outcome, data = await executor.execute(item)
            except Exception as exc:
                ok, outcome, data = False, "error", error_result_data(executor, item, exc)
            held.pending -= 1
            if held.directive is Directive.ABANDON:
                return  # fetched under a lease lost meanwhile: never handed over
            if ok:
                self._done += 1
            else:
                self._failed += 1
            columns = self._columns.get(work.run_id)
            if columns is not None:
                batch = self._batches.get(work.run_id)
                if batch is None:
                    batch = self._batches[work.run_id] = ResultBatch.empty(work.run_id, columns)
                batch.add(work.id, item_ref(item), ok, outcome, data, self.worker_id, work.lease)
                return
            self._results.append(
                ItemResult(
                    run_id=work.run_id,
                    task_id=work.id,
                    ref=item_ref(item),
                    ok=ok,
                    outcome=outcome,
                    data=data,
                    worker_id=self.worker_id,
                    lease=work.lease,
                )
            )

    # --- background --------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(flush_delay(self.settings.flush_s, failures))
            failures = 0 if await self._flush() else failures + 1

    async def _flush(self) -> bool:
        """Hand over what is buffered: results, then completions, then releases. True when
        all of it went; otherwise what did not go stays buffered, ahead of what arrived
        since, for the next flush (the backend stores a result once however often it is
        handed over), and the held tasks' leases are kept by the heartbeats meanwhile."""
        async with self._flush_lock:
            results, self._results = self._results, []
            results += self._batches.values()
            self._batches = {}
            finished, self._finished = self._finished, {}
            released, self._released = self._released, {}
            try:
                if results:
                    await self._call(self.backend.submit, results)
                    results = []
                if finished:
                    await self._call(self.backend.complete, finished)
                    self._settled(finished)
                    finished = {}
                if released:
                    await self._call(self.backend.release, released)
                    self._settled(released)
                    released = {}
            except BaseException as exc:  # a cancelled flush keeps its buffers too
                self._results[:0] = results
                # ahead of what came since, unless a newer claim of the task superseded it
                self._finished = {**self._keep(finished), **self._finished}
                self._released = {**self._keep(released), **self._released}
                if not isinstance(exc, Exception):
                    raise
                log.warning(
                    "flush failed, kept for the next one (%d results, %d tasks): %s: %s",
                    len(results), len(finished) + len(released), type(exc).__name__, exc,
                )  # fmt: skip
                return False
            return True

    def _settled(self, leases: dict[int, str]) -> None:
        for task_id, lease in leases.items():
            if self._unsettled.get(task_id) == lease:
                del self._unsettled[task_id]

    def _keep(self, leases: dict[int, str]) -> dict[int, str]:
        """Of the leases a failed flush carried, those no newer claim has superseded."""
        return {t: lease for t, lease in leases.items() if self._unsettled.get(t) == lease}

    async def _flush_rest(self) -> None:
        """The last flush before the worker ends: retried with backoff for up to a lease;
        what still cannot go is left to the leases (its tasks run again elsewhere)."""
        deadline = time.monotonic() + self.settings.lease_s
        failures = 0
        while not await self._flush():
            failures += 1
            delay = flush_delay(self.settings.flush_s, failures)
            if time.monotonic() + delay > deadline:
                log.error(
                    "giving up handing over tasks %s after %d tries: they will run again",
                    sorted(self._unsettled), failures,
                )  # fmt: skip
                return
            await asyncio.sleep(delay)

    async def _heartbeat_loop(self) -> None:
        failures = 0
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            # Finished tasks not yet handed over (a flush that failed) keep their leases too.
            leases = {**self._unsettled, **{t: h.work.lease for t, h in self._held.items()}}
            done, failed = self._done, self._failed
            self._done = self._failed = 0
            status = "busy" if leases else "idle"
            call = asyncio.ensure_future(
                self._call(self.backend.heartbeat, leases, status, done, failed)
            )
            try:
                reply = await self._fenced_wait(call, last_ok)
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:  # once per outage, then now and then
                    log.warning("heartbeat failed (%d in a row): %s", failures, exc)
                if time.monotonic() - last_ok > self.settings.lease_s:
                    self._fence_self()
                continue
            failures = 0
            last_ok = time.monotonic()
            self._apply(reply, leases)

    async def _fenced_wait(self, call: asyncio.Future[Reply], last_ok: float) -> Reply:
        """The heartbeat's reply. A heartbeat that neither answers nor fails (a cut link
        drops packets: the call waits on TCP retransmissions for minutes) fences the worker
        once a lease has passed since the last one that went through, as a failed one does;
        its reply, when it comes, still says which tasks were lost."""
        left = last_ok + self.settings.lease_s - time.monotonic()
        if left > 0:
            done, _ = await asyncio.wait({call}, timeout=left)
            if done:
                return call.result()
        self._fence_self()
        return await call

    def _fence_self(self) -> None:
        """No heartbeat went through for a whole lease: the watchdog may have given these
        tasks to another worker by now. Stop starting their items (what is in flight ends;
        the store drops results of a lost lease), so no two workers go on with one task."""
        abandoned = [
            task_id for task_id, held in self._held.items() if held.directive is Directive.CONTINUE
        ]
        for task_id in abandoned:
            self._held[task_id].directive = Directive.ABANDON
        self._drop_results({self._held[t].work.lease for t in abandoned})
        if abandoned:
            log.warning(
                "no heartbeat for %.0f s (a lease): abandoning tasks %s, which may run "
                "elsewhere by now", self.settings.lease_s, abandoned,
            )  # fmt: skip

    def _drop_results(self, leases: set[str]) -> None:
        """Forget the buffered results fetched under leases that are lost: the store would
        drop them too (each carries its lease); this only spares handing them over."""
        if not leases:
            return

        def kept(batch: ResultBatch) -> ResultBatch:
            keep = [i for i, lease in enumerate(batch.leases) if lease not in leases]
            return batch if len(keep) == len(batch.leases) else batch.keep(keep)

        self._results = [
            kept(r) if isinstance(r, ResultBatch) else r
            for r in self._results
            if isinstance(r, ResultBatch) or r.lease not in leases
        ]
        self._batches = {run_id: kept(b) for run_id, b in self._batches.items()}

    def _apply(self, reply: Reply, sent: dict[int, str] | None = None) -> None:
        """Directives of a heartbeat that carried the leases ``sent``: each applies to the
        execution it was about, not to a newer claim of the task made meanwhile."""
        for task_id, directive in reply.directives.items():
            held = self._held.get(task_id)
            if (
                held
                and directive is not Directive.CONTINUE
                and held.directive is Directive.CONTINUE
                and (sent is None or sent.get(task_id) == held.work.lease)
            ):
                log.info("task %s: %s", task_id, directive.value)
                held.directive = directive
                if directive is Directive.ABANDON:
                    self._drop_results({held.work.lease})
        if reply.worker_action is WorkerAction.EXIT:
            self.exiting.set()


async def run_worker(worker: Worker) -> str:
    """Run a worker until it is asked to exit; SIGTERM/SIGINT ask it to exit gracefully."""
    import signal

    from engine.runtime.process import tune_gc

    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.request_exit)
    return await worker.run()


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover — uvloop is in requirements; stdlib works too
        pass


def process_main(boot: WorkerBoot) -> None:
    """Entry point of a pool process (spawned): the boot builds the backend and the limiter,
    the loop runs, the boot closes what it opened."""
    import signal

    from engine.logs import setup_logging
    from fetchers.lifeline import end_own_lineage, mark_lineage

    # Before anything starts a process: all this worker starts (browsers, drivers, tor) is
    # tagged, so whoever sees it die (the coordinator, or this process at its end) ends them.
    mark_lineage(boot.worker_id)
    setup_logging(boot.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides; Ctrl-C is its
    settings = boot.load_settings()
    backend = boot.open_backend()
    env = WorkerEnv(limiter=boot.open_limiter())
    install_uvloop()
    worker = Worker(backend, settings, boot.worker_id, kind="local", env=env)

    async def supervised() -> str:
        from engine.runtime.process import on_parent_death

        loop = asyncio.get_running_loop()
        on_parent_death(lambda: loop.call_soon_threadsafe(worker.request_exit))
        return await run_worker(worker)

    asyncio.run(supervised())
    end_own_lineage()  # what an executor failed to close
    boot.close()
