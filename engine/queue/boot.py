"""How a worker process gets its queue backend and its rate limiter: a ``WorkerBoot``.

The pool hands each process it spawns one small picklable boot object; the process calls
``open_backend`` and ``open_limiter`` and runs the same worker loop whatever the deployment.
Which boot a pool uses is decided once, from the database, in ``engine.queue.pool_link``;
the pool and the worker never look at the deployment themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.queue.base import QueueBackend
    from engine.ratelimit.base import RateLimiter
    from engine.settings import Settings


@dataclass(kw_only=True)
class WorkerBoot(ABC):
    """What a worker process needs to start: who it is, its settings, and (subclasses) how to
    reach the queue. Built in the parent, pickled to the child: keep it small."""

    worker_id: str
    settings: dict[str, Any]  # Settings.model_dump(mode="json")
    log_level: str = "WARNING"

    def load_settings(self) -> Settings:
        from engine.settings import Settings

        return Settings(**self.settings)

    @abstractmethod
    def open_backend(self) -> QueueBackend:
        """The queue backend of this process (called once, in the worker process)."""

    @abstractmethod
    def open_limiter(self) -> RateLimiter:
        """The rate limiter this process shares with the others of its deployment."""

    def started(self) -> None:  # noqa: B027 — optional hook
        """In the parent, once the process runs: close the parent's copies of its channels."""

    def close(self) -> None:  # noqa: B027 — optional hook
        """After the worker loop ended: release what ``open_*`` opened."""


# (worker id, settings, log level) → the boot of a new pool process
BootFactory = Callable[[str, "Settings", str], WorkerBoot]
