"""`serve-proxy` assembled: the pool read from the database, the listener, the metrics port,
the background refresh and health checks, and a drain on stop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.gateway.auth import Authenticator, Credentials
from engine.gateway.cache import GatewayCache
from engine.gateway.config import GatewayConfig
from engine.gateway.health import HealthChecker
from engine.gateway.members import MemberFilter, MemberSource
from engine.gateway.metrics import MetricsServer
from engine.gateway.server import Gateway
from fetchers.pool import ProxyPool

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Everything `serve-proxy` takes besides the listener's knobs."""

    db_url: str
    filter: MemberFilter = field(default_factory=MemberFilter)
    credentials: Credentials | None = None
    cache: str | None = None  # ttl / lru
    cache_size: int = 10_000
    ttl_s: float = 60.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    refresh_s: float = 30.0
    judge_url: str | None = None
    health_interval_s: float = 15.0
    secret_key: str | None = None
    secret_key_file: str = "data/secret.key"
    reader: Callable[[str], list[Any]] | None = None  # status → rows; None: open db_url per read


class GatewayService:
    def __init__(self, config: GatewayConfig, options: ServeOptions) -> None:
        from pathlib import Path

        from storage.secrets import SecretBox

        self.config = config
        self.options = options
        self.pool = ProxyPool(
            [],
            config.strategy,
            failure_threshold=config.failure_threshold,
            cooldown_s=config.cooldown_s,
            site_cooldown_s=config.site_cooldown_s,
            allow_empty=True,
        )
        box = SecretBox.load(options.secret_key, Path(options.secret_key_file))
        self.source = MemberSource(
            options.db_url,
            options.filter,
            self.pool,
            box.decrypt,
            options.refresh_s,
            options.reader,
        )
        cache = (
            GatewayCache(options.cache, options.cache_size, options.ttl_s)
            if options.cache
            else None
        )
        self.gateway = Gateway(
            config, self.pool, auth=Authenticator(options.credentials), cache=cache
        )
        self.metrics = (
            MetricsServer(self.snapshot, options.metrics_host, options.metrics_port)
            if options.metrics_port is not None
            else None
        )
        self.health = (
            HealthChecker(self.pool, options.judge_url, options.health_interval_s)
            if options.judge_url
            else None
        )
        self.stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def snapshot(self) -> dict[str, object]:
        snap = self.gateway.snapshot()
        snap["members_source_error"] = self.source.last_error
        return snap

    async def start(self) -> int:
        """Load the members, start listening; the number of members."""
        n = self.source.load(await asyncio.to_thread(self.source.read))
        await self.gateway.start()
        if self.metrics is not None:
            await self.metrics.start()
        self._tasks.append(asyncio.create_task(self._refresh()))
        if self.health is not None:
            self._tasks.append(asyncio.create_task(self.health.run(self.stop_event)))
        return n

    async def _refresh(self) -> None:
        await self.source.run(self.stop_event)

    async def stop(self) -> None:
        self.stop_event.set()
        await self.gateway.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


GC_GEN0 = 20_000


def tune_gc() -> None:
    """For a serving process (not a library caller): what was built at start-up leaves the
    collector's view (`gc.freeze`), and the young generation is collected every
    `GC_GEN0` allocations instead of 700 — every request allocates dozens of objects that
    are freed by reference counting, so the default threshold ran a collection every few
    requests (about 2 % of the gateway's CPU under load) for almost no cycles found."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, g1, g2)
