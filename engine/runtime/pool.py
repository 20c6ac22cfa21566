"""The local pool: worker processes (spawn start method) the coordinator supervises.

Spawn, not fork: a forked child would inherit the coordinator's database connections,
threads and file locks. A process that dies is noticed by ``reap`` (the coordinator then
re-queues its tasks) and replaced while the pool is meant to run.

Nothing a worker started outlives it: each worker tags its descendants with its id
(``fetchers.lifeline``), and whenever the pool sees a worker gone — reaped, killed, or at the
end of the pool — it ends every process carrying that tag, however deep, whatever its
process group (Playwright's Chromium and Chromium's crash handler leave the worker's group).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.runtime.worker import new_worker_id, process_main
from engine.settings import Settings
from fetchers.lifeline import end_lineage

if TYPE_CHECKING:
    from engine.queue.boot import BootFactory, WorkerBoot

log = logging.getLogger(__name__)


def start_process(ctx: Any, target: Callable[..., None], boot: WorkerBoot, *args: Any) -> Any:
    """Start one worker process on ``boot`` (its first argument), then let the boot drop
    what the parent must not keep (its copy of the child's end of a pipe)."""
    proc = ctx.Process(target=target, args=(boot, *args), name=boot.worker_id, daemon=True)
    proc.start()
    boot.started()
    return proc


class LocalPool:
    """Worker processes of one coordinator; ``boot`` builds what each one is spawned with
    (how it reaches the queue: ``engine.queue.pool_link``)."""

    def __init__(
        self,
        settings: Settings,
        boot: BootFactory,
        ctx: Any | None = None,
        log_level: str = "WARNING",
    ) -> None:
        self.settings = settings
        self.boot = boot
        self.ctx = ctx or mp.get_context("spawn")
        self.log_level = log_level
        self.members: dict[str, Any] = {}  # worker id → its process
        self.target = 0
        self.closing = False
        self.retiring: set[str] = set()  # asked to exit, still finishing in-flight items

    def spawn(self) -> str:
        worker_id = new_worker_id("local")
        proc = start_process(
            self.ctx, process_main, self.boot(worker_id, self.settings, self.log_level)
        )
        self.members[worker_id] = proc
        log.info("started worker %s (pid %s)", worker_id, proc.pid)
        return worker_id

    def active(self) -> list[str]:
        """Workers alive and not asked to exit, oldest first."""
        members = list(self.members.items())  # other threads (the console) read it too
        return [w for w, m in members if m.is_alive() and w not in self.retiring]

    def resize(self, n: int) -> None:
        """Grow now; shrink by asking the newest workers to exit gracefully."""
        self.target = max(0, n)
        alive = self.active()
        for _ in range(self.target - len(alive)):
            self.spawn()
        for worker_id in alive[self.target :]:
            self.terminate(worker_id)

    def terminate(self, worker_id: str) -> None:
        member = self.members.get(worker_id)
        if member and member.pid and member.is_alive():
            self.retiring.add(worker_id)
            os.kill(member.pid, signal.SIGTERM)

    def reap(self) -> list[tuple[str, int | None]]:
        """Workers whose process ended since the last call: (worker id, exit code)."""
        ended = []
        for worker_id, member in list(self.members.items()):
            if not member.is_alive():
                member.join(0)
                ended.append((worker_id, member.exitcode))
                del self.members[worker_id]
                self.retiring.discard(worker_id)
        if ended:  # a worker killed with -9 could not end its browsers: end them here
            self._end_descendants([w for w, _ in ended])
        return ended

    @staticmethod
    def _end_descendants(worker_ids: list[str]) -> None:
        if n := end_lineage(worker_ids):
            log.warning("ended %d process(es) left by worker(s) %s", n, ", ".join(worker_ids))

    def replace_missing(self) -> list[str]:
        if self.closing:
            return []
        return [self.spawn() for _ in range(self.target - len(self.active()))]

    def pids(self) -> dict[str, int | None]:
        return {w: m.pid for w, m in list(self.members.items())}

    def stop(self) -> None:
        """Ask every worker to exit (SIGTERM: finish in-flight items, hand tasks back)."""
        self.closing = True
        for worker_id in list(self.members):
            self.terminate(worker_id)

    def kill(self) -> None:
        """SIGKILL every worker, then end what they started."""
        self.closing = True
        members = list(self.members.items())
        for _, member in members:
            if member.is_alive():
                member.kill()
        for _, member in members:  # dead before the sweep: none can start one after it
            member.join(5)
        self._end_descendants([w for w, _ in members])

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for member in list(self.members.values()):  # the watchdog reaps meanwhile
            member.join(max(0.0, deadline - time.monotonic()))
        return not any(m.is_alive() for m in list(self.members.values()))
