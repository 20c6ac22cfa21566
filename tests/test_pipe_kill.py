"""A pool worker killed with ``kill -9`` while it writes a large message to the coordinator
must never block the coordinator: the next worker is still answered, every time.

With one pipe shared by every worker (a multiprocessing queue), the dead writer kept its
write lock and the reader waited for the rest of a half-written message for ever."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

from engine.queue.base import Reply
from engine.queue.pipe import PipeServer
from engine.runtime.pool import start_process
from engine.settings import Settings

BLOB = 4 << 20  # one 4 MB submit: far more than a pipe holds, so a kill lands mid-write
KILLS = 3  # one kill at each of the three offsets into the flood below
WAIT_S = 30.0


class Recorder:
    """The server's storage side, recording instead of storing (this is about transport)."""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.stored = 0

    def register(self, worker_id: str, *args: Any) -> None:
        self.registered.append(worker_id)

    def claim(self, worker_id: str, *args: Any) -> Reply:
        return Reply()

    def heartbeat(self, worker_id: str, *args: Any) -> Reply:
        return Reply()

    def store(self, results: list[Any], completes: list[int]) -> None:
        self.stored += len(results)

    def release(self, *args: Any) -> None: ...

    def fail(self, *args: Any) -> None: ...

    def unregister(self, *args: Any) -> None: ...


def flood(boot: Any, ready: Any) -> None:
    """A worker that sends 4 MB submits until it is killed."""
    queue = boot.open_backend()
    queue.register(boot.worker_id, "h", os.getpid(), "local")
    ready.set()
    blob = [b"x" * BLOB]
    while True:
        queue.submit(boot.worker_id, blob)


def probe(boot: Any) -> None:
    """A healthy worker: registers, claims, and exits 0 once both are answered."""
    queue = boot.open_backend()
    queue.register(boot.worker_id, "h", os.getpid(), "local")
    queue.claim(boot.worker_id, 1)
    os._exit(0)


def test_kill_9_mid_write_never_blocks_the_coordinator() -> None:
    ctx = mp.get_context("spawn")
    sql = Recorder()
    server = PipeServer(sql, ctx, limits_path="/nonexistent", flush_s=0.05)  # type: ignore[arg-type]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve_until(time.monotonic() + 0.2, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = Settings()
    try:
        for i in range(KILLS):
            ready = ctx.Event()
            boot = server.boot(f"flood-{i}", settings, "WARNING")
            flooder = start_process(ctx, flood, boot, ready)
            assert ready.wait(WAIT_S), "the flooding worker started"
            time.sleep(0.05 * (i % 3))  # a few 4 MB writes in: the kill lands mid-message
            os.kill(flooder.pid, signal.SIGKILL)
            flooder.join(WAIT_S)
            server.forget(f"flood-{i}")
            boot = server.boot(f"probe-{i}", settings, "WARNING")
            prober = start_process(ctx, probe, boot)
            prober.join(WAIT_S)
            alive = prober.is_alive()
            if alive:
                prober.kill()
            server.forget(f"probe-{i}")
            assert not alive and prober.exitcode == 0, f"the coordinator hung after kill {i + 1}"
        assert sql.registered.count("probe-0") == 1 and f"probe-{KILLS - 1}" in sql.registered
    finally:
        stop.set()
        server.wake()
        thread.join(WAIT_S)
