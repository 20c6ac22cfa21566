"""Shared by the gateway tests and bench/gateway.py: stored members from a sim world, a
gateway running in a thread of its own (so a test drives it with real clients: curl, our
fetchers, raw sockets), and a curl runner."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from engine.cli.common import open_database
from engine.gateway.config import GatewayConfig
from engine.gateway.service import GatewayService, ServeOptions
from fetchers.proxy_parse import ProxySpec
from sim.fleet import ProxyTruth
from storage.proxies import upsert_proxies
from storage.schema import proxies
from storage.secrets import SecretBox

SECRET_KEY = Fernet.generate_key().decode()


def store_members(
    db_url: str,
    truth: Sequence[ProxyTruth],
    countries: Sequence[str | None] = (),
    status: str = "active",
) -> list[ProxySpec]:
    """The world's proxies stored as a validation run leaves them (status, detected protocol,
    anonymity, country), passwords encrypted; the specs, in truth order."""
    box = SecretBox.load(SECRET_KEY, Path("/nonexistent"))
    specs = [ProxySpec(t.protocol, t.host, t.port, t.username, t.password) for t in truth]
    db = open_database(db_url)
    try:
        with db.begin() as conn:
            upsert_proxies(conn, specs, box, "test")
            for i, (spec, t) in enumerate(zip(specs, truth, strict=True)):
                conn.execute(
                    proxies.update()
                    .where(proxies.c.key == spec.key)
                    .values(
                        status=status,
                        protocol=t.protocol,
                        anonymity=t.anonymity_expected,
                        country=countries[i] if i < len(countries) else None,
                        latency_ms=float(t.latency_ms or 1),
                    )
                )
    finally:
        db.dispose()
    return specs


def set_status(db_url: str, specs: Iterable[ProxySpec], status: str) -> None:
    db = open_database(db_url)
    try:
        with db.begin() as conn:
            for spec in specs:
                conn.execute(
                    proxies.update().where(proxies.c.key == spec.key).values(status=status)
                )
    finally:
        db.dispose()


class RunningGateway:
    """A `GatewayService` on its own event loop thread; `url` is its HTTP proxy URL."""

    def __init__(self, config: GatewayConfig, options: ServeOptions) -> None:
        options = replace(options, secret_key=SECRET_KEY)
        self.config = config
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service: GatewayService | None = None

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> RunningGateway:
        self.thread.start()

        async def make() -> GatewayService:
            return GatewayService(self.config, self.options)

        self.service = self.call(make())
        self.members = self.call(self.service.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.service is not None:
            self.call(self.service.stop())
            self.service = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def port(self) -> int:
        assert self.service is not None
        return self.service.gateway.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> dict[str, Any]:
        assert self.service is not None

        async def snap() -> dict[str, Any]:
            return self.service.snapshot()  # type: ignore[union-attr]

        return self.call(snap())

    def refresh(self) -> int:
        assert self.service is not None
        return self.call(asyncio.to_thread(self.service.source.refresh))

    def metrics_text(self) -> str:
        assert self.service is not None and self.service.metrics is not None
        url = f"http://127.0.0.1:{self.service.metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def metrics_json(self) -> dict[str, Any]:
        assert self.service is not None and self.service.metrics is not None
        url = f"http://127.0.0.1:{self.service.metrics.port}/metrics.json"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())


def start_gateway(db_url: str, **kw: object) -> RunningGateway:
    """A gateway over the members stored at db_url on a free port, metrics on another; `kw`
    are `GatewayConfig` fields and `ServeOptions` fields mixed."""
    cfg = {k: v for k, v in kw.items() if k in GatewayConfig.__dataclass_fields__}
    opt = {k: v for k, v in kw.items() if k not in cfg}
    opt.setdefault("metrics_port", 0)
    return RunningGateway(GatewayConfig(port=0, **cfg), ServeOptions(db_url=db_url, **opt))  # type: ignore[arg-type]


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real curl binary; -s, no proxy from the environment, bounded."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        env={"PATH": "/usr/bin:/bin"},
    )
