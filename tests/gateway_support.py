"""Shared by the gateway tests and bench/gateway.py: stored members from a sim world, a
gateway running in a thread of its own (so a test drives it with real clients: curl, our
fetchers, raw sockets), and a curl runner."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from engine.cli.common import open_database
from engine.gateway.config import GatewayConfig
from engine.gateway.service import ServeOptions
from engine.gateway.thread import GatewayThread
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


class RunningGateway(GatewayThread):
    """`GatewayThread` with the test key and the metrics port read over HTTP."""

    def __init__(self, config: GatewayConfig, options: ServeOptions) -> None:
        super().__init__(config, replace(options, secret_key=SECRET_KEY))

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def metrics_json(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics.json"
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
