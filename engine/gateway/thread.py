"""A gateway on an event loop thread of its own, for a process that is not the gateway
(the console's server, tests, benchmarks): start, snapshot, stop from plain threads."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from engine.gateway.config import GatewayConfig
from engine.gateway.service import GatewayService, ServeOptions


class GatewayThread:
    def __init__(self, config: GatewayConfig, options: ServeOptions) -> None:
        self.config = config
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.service: GatewayService | None = None
        self.members = 0

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> GatewayThread:
        """Listening when it returns; OSError (port taken) and read errors propagate, with the
        thread stopped."""
        self.thread.start()

        async def make() -> GatewayService:
            return GatewayService(self.config, self.options)

        try:
            self.service = self.call(make())
            self.members = self.call(self.service.start())
        except BaseException:
            self.service = None
            self._end_loop()
            raise
        return self

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.service is not None

    def stop(self, timeout: float | None = None) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            self.call(service.stop(), timeout=(timeout or self.config.grace_s) + 30)
        self._end_loop()

    def _end_loop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def port(self) -> int:
        assert self.service is not None
        return self.service.gateway.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        m = self.service.metrics if self.service is not None else None
        return m.port if m is not None else None

    def snapshot(self) -> dict[str, Any]:
        service = self.service
        assert service is not None

        async def snap() -> dict[str, Any]:
            return service.snapshot()

        return self.call(snap())

    def refresh(self) -> int:
        assert self.service is not None
        return self.call(asyncio.to_thread(self.service.source.refresh))
