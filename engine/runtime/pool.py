"""The local pool: worker processes (spawn start method) the coordinator supervises.

Spawn, not fork: a forked child would inherit the coordinator's database connections,
threads and file locks. A process that dies is noticed by ``reap`` (the coordinator then
re-queues its tasks) and replaced while the pool is meant to run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from engine.runtime.worker import new_worker_id, process_main
from engine.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Member:
    process: Any
    replies: Any | None


class LocalPool:
    def __init__(
        self,
        settings: Settings,
        mode: str,
        db_url: str | None = None,
        requests: Any | None = None,
        ctx: Any | None = None,
        log_level: str = "WARNING",
    ) -> None:
        self.settings = settings
        self.mode = mode
        self.db_url = db_url
        self.ctx = ctx or mp.get_context("spawn")
        self.requests = requests
        self.log_level = log_level
        self.members: dict[str, _Member] = {}
        self.target = 0
        self.closing = False
        self.retiring: set[str] = set()  # asked to exit, still finishing in-flight items

    def replies(self, worker_id: str) -> Any | None:
        member = self.members.get(worker_id)
        return member.replies if member else None

    def spawn(self) -> str:
        worker_id = new_worker_id("local")
        replies = self.ctx.Queue() if self.mode == "pipe" else None
        if replies is not None:
            # A reply to a worker that died must not hold up this process's exit.
            replies.cancel_join_thread()
        boot = {
            "worker_id": worker_id,
            "mode": self.mode,
            "settings": self.settings.model_dump(mode="json"),
            "db_url": self.db_url,
            "requests": self.requests,
            "replies": replies,
            "log_level": self.log_level,
            "limits_path": self._limits_path(),
        }
        proc = self.ctx.Process(target=process_main, args=(boot,), name=worker_id, daemon=True)
        proc.start()
        self.members[worker_id] = _Member(proc, replies)
        log.info("started worker %s (pid %s)", worker_id, proc.pid)
        return worker_id

    def _limits_path(self) -> str | None:
        """Where pool workers share rate limits (embedded mode), computed here so that they
        need not import the storage layer."""
        if self.mode != "pipe":
            return None
        from engine.ratelimit.shared import shared_path_for

        return str(shared_path_for(self.db_url, coordinator_pid=os.getpid()))

    def active(self) -> list[str]:
        """Workers alive and not asked to exit, oldest first."""
        members = list(self.members.items())  # other threads (the console) read it too
        return [w for w, m in members if m.process.is_alive() and w not in self.retiring]

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
        if member and member.process.pid and member.process.is_alive():
            self.retiring.add(worker_id)
            os.kill(member.process.pid, signal.SIGTERM)

    def reap(self) -> list[tuple[str, int | None]]:
        """Workers whose process ended since the last call: (worker id, exit code)."""
        ended = []
        for worker_id, member in list(self.members.items()):
            if not member.process.is_alive():
                member.process.join(0)
                ended.append((worker_id, member.process.exitcode))
                del self.members[worker_id]
                self.retiring.discard(worker_id)
        return ended

    def replace_missing(self) -> list[str]:
        if self.closing:
            return []
        return [self.spawn() for _ in range(self.target - len(self.active()))]

    def pids(self) -> dict[str, int | None]:
        return {w: m.process.pid for w, m in list(self.members.items())}

    def stop(self) -> None:
        """Ask every worker to exit (SIGTERM: finish in-flight items, hand tasks back)."""
        self.closing = True
        for worker_id in list(self.members):
            self.terminate(worker_id)

    def kill(self) -> None:
        self.closing = True
        for member in list(self.members.values()):
            if member.process.is_alive():
                member.process.kill()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for member in list(self.members.values()):  # the watchdog reaps meanwhile
            member.process.join(max(0.0, deadline - time.monotonic()))
        return not any(m.process.is_alive() for m in list(self.members.values()))
