"""The gateway as a long-running process: a real browser through it (plain and CONNECT to
the TLS origin), memory flat over many requests, file descriptors back to their baseline
after clients hang up mid-transfer, several processes on one port, and a PostgreSQL restart
under it (members kept)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.origin import Origin
from sim.world import SimWorld, WorldConfig
from tests.conftest import require_tool
from tests.gateway_support import SECRET_KEY, curl, start_gateway, store_members

pytestmark = [pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
REQUESTS = 10_000  # a round; a million is the bench's (bench/gateway.py --endurance)
RSS_MARGIN_KB = 12 * 1024


@pytest.fixture(scope="module")
def world() -> Iterator[SimWorld]:
    cfg = WorldConfig(n_proxies=4, mix={"elite": 1.0}, seed=7, latency_ms=(0, 0))
    with SimWorld(cfg) as w:
        yield w


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    with Origin(tmp_path_factory.mktemp("origin")) as o:
        yield o


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory, world: SimWorld) -> str:
    url = f"duckdb:///{tmp_path_factory.mktemp('db') / 'ff.duckdb'}"
    store_members(url, world.truth)
    return url


def wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class CliGateway:
    """`serve-proxy` as its own process (what a user runs), its pid's RSS and open fds."""

    def __init__(self, db_url: str, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "engine.run", "serve-proxy", "--db", db_url, "--port", "0",
             "--metrics-port", "0", *args],
            cwd=REPO, env={**os.environ, "FETCHFLEET_SECRET_KEY": SECRET_KEY},
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.p.stderr is not None
        self.banner = self.p.stderr.readline()
        m = re.search(r"gateway on 127\.0\.0\.1:(\d+) .*metrics http://127\.0\.0\.1:(\d+)/",
                      self.banner)  # fmt: skip
        assert m, self.banner
        self.port, self.metrics_port = int(m[1]), int(m[2])
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.p.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.p.pid}/fd"))

    def metrics(self) -> dict:
        import json
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics.json"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(60)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()


# -- a small client (many requests fast: curl per request would take minutes) ----------------


async def _read_response(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    return head + await r.readexactly(length)


async def keep_alive_client(port: int, url: str, n: int) -> int:
    """n GETs over one kept-alive connection; the number answered 200."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for _ in range(n):
            w.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            ok += (await _read_response(r)).startswith(b"HTTP/1.1 200")
    finally:
        w.close()
    return ok


async def hang_up_mid_transfer(port: int, origin: Origin, kind: int) -> None:
    """0: a 6 MB answer read a little, then a reset; 1: a CONNECT tunnel left mid-request;
    2: half a request head, then gone."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == 0:
            w.write(f"GET {origin.url('/big')} HTTP/1.1\r\n\r\n".encode())
            await r.readexactly(65536)
        elif kind == 1:
            host = origin.url("").split("//")[1].rstrip("/")
            w.write(f"CONNECT {host} HTTP/1.1\r\n\r\n".encode())
            await r.readuntil(b"\r\n\r\n")
            w.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            await r.readexactly(4096)
        else:
            w.write(b"GET http://127.0.0.1/ HTTP/1.1\r\nHos")
            await w.drain()
    finally:
        w.transport.abort()


async def run_many(port: int, url: str, total: int, clients: int = 16) -> int:
    per = total // clients
    return sum(await asyncio.gather(*(keep_alive_client(port, url, per) for _ in range(clients))))


# -- tests --------------------------------------------------------------------------------------


def test_a_browser_fetches_plain_and_tls_pages_through_the_gateway(
    db_url: str, world: SimWorld, origin: Origin
) -> None:
    require_tool(CHROMIUM, "chromium")
    from playwright.sync_api import sync_playwright

    members = {t.host for t in world.truth}
    with start_gateway(db_url) as gw, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, proxy={"server": gw.url}
        )
        try:
            context = browser.new_context(ignore_https_errors=True)  # the origin's own cert
            page = context.new_page()
            seen = []
            for url in (origin.url("/page"), origin.tls_url("/page")):
                response = page.goto(url, timeout=30_000)
                assert response is not None and response.status == 200
                text = page.inner_text("body").strip()
                assert text.startswith("page for "), text
                seen.append(text.rsplit(" ", 1)[1])
        finally:
            browser.close()
        snap = gw.snapshot()
    assert set(seen) <= members  # both left through members, not from 127.0.0.1
    results = {(r["kind"], r["result"]) for r in snap["requests"]}
    assert ("http", "ok") in results and ("connect", "ok") in results


def test_memory_flat_and_descriptors_back_to_baseline(db_url: str, origin: Origin) -> None:
    gw = CliGateway(db_url, "--processes", "1")
    try:
        page = origin.url("/page")
        fds0 = gw.fds()  # listener, metrics port, event loop, logs

        async def trouble() -> None:
            await asyncio.gather(
                *(hang_up_mid_transfer(gw.port, origin, i % 3) for i in range(150)),
                return_exceptions=True,
            )

        # The baseline is taken after a first round of the very workload measured: a leak
        # grows with every round, while the allocator's high-water mark (clients at once
        # each with up to --max-buffer of an answer, which depends on how the clients happen
        # to overlap on a busy machine) and the interpreter's caches are reached in the first.
        # A warm-up smaller than the round let a busier second round raise the mark (45 MB).
        assert asyncio.run(run_many(gw.port, page, REQUESTS)) == REQUESTS
        asyncio.run(trouble())
        wait_for(lambda: gw.metrics()["connections"]["open"] == 0)
        wait_for(lambda: gw.fds() <= fds0)
        rss0 = gw.rss_kb()
        assert asyncio.run(run_many(gw.port, page, REQUESTS)) == REQUESTS
        growth = gw.rss_kb() - rss0  # the ordinary requests: a leak shows here
        # (the hang-ups below buffer up to --max-buffer each, 150 at once: their peak is
        # the allocator's, not a leak, so RSS is not compared across them)
        asyncio.run(trouble())
        # every hung-up client's descriptors (and its member's) are given back
        wait_for(lambda: gw.metrics()["connections"]["open"] == 0)
        wait_for(lambda: gw.fds() <= fds0)
        snap = gw.metrics()
        assert growth < RSS_MARGIN_KB, f"RSS grew {growth} kB over {REQUESTS} requests"
        ok = {(r["kind"], r["result"]): r["count"] for r in snap["requests"]}
        assert ok[("http", "ok")] >= 2 * REQUESTS
        assert gw.stop() == 0
    finally:
        if gw.p.poll() is None:
            gw.p.kill()
            gw.p.wait()


def test_processes_share_the_port_the_sessions_and_the_metrics(
    db_url: str, world: SimWorld, origin: Origin
) -> None:
    gw = CliGateway(db_url, "--processes", "2")
    try:
        assert ": 4 members" in gw.banner and "2 processes" in gw.banner
        for _ in range(8):
            assert curl("-x", gw.url, origin.url("/page")).stdout.startswith("page for ")
        # one session, many connections (spread over both processes): one member
        exits = {
            curl("-x", f"http://me-session-s9:x@127.0.0.1:{gw.port}", origin.url("/page"))
            .stdout.strip()
            .rsplit(" ", 1)[1]
            for _ in range(8)
        }
        assert len(exits) == 1, exits
        # the supervisor's metrics: every worker's counts summed (sent each second)
        wait_for(
            lambda: (
                {(r["kind"], r["result"]): r["count"] for r in gw.metrics()["requests"]}
                == {("http", "ok"): 16}
            )
        )
        snap = gw.metrics()
        assert snap["processes"] == 2 and sum(m["requests"] for m in snap["members"]) == 16
        # tunnels: each process's connections opened ahead, summed the same way (every
        # tunnel takes one or misses; a worker's snapshot is sent whole, so the counts of
        # one merged snapshot agree with each other)
        before = snap["standby"]["used"] + snap["standby"]["misses"]
        for _ in range(6):
            assert curl("-p", "-x", gw.url, origin.url("/page")).stdout.startswith("page for ")

        def tunnels_counted() -> dict | None:
            m = gw.metrics()
            counts = {(r["kind"], r["result"]): r["count"] for r in m["requests"]}
            return m if counts.get(("connect", "ok")) == 6 else None

        wait_for(tunnels_counted)
        standby = gw.metrics()["standby"]
        assert standby["used"] + standby["misses"] == before + 6
        assert standby["limits"]["per_member"] == 2
        assert gw.stop() == 0
    finally:
        if gw.p.poll() is None:
            gw.p.kill()
            gw.p.wait()


@pytest.mark.postgres
def test_the_gateway_survives_a_postgresql_restart(
    pg_url: str, world: SimWorld, origin: Origin
) -> None:
    from tests.test_pg_restart import _pg_ctl

    store_members(pg_url, world.truth)
    with start_gateway(pg_url, refresh_s=0.2) as gw:
        assert gw.members == 4
        _pg_ctl("stop")
        try:
            wait_for(lambda: gw.snapshot()["members_source_error"] is not None, 30)
            for _ in range(4):  # the last members keep serving while the database is away
                assert curl("-x", gw.url, origin.url("/page")).stdout.startswith("page for ")
        finally:
            _pg_ctl("start")
        wait_for(lambda: gw.snapshot()["members_source_error"] is None, 60)
        snap = gw.snapshot()
        assert snap["members_total"] == 4
        assert curl("-x", gw.url, origin.url("/page")).stdout.startswith("page for ")
