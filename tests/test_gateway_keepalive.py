"""The gateway's upstream keep-alive pool (plain HTTP through `http` members): connections to
a member are reused across requests when the member's answer allowed it, a stale one is
retried once on a fresh connection without counting against the member, and a connection is
never reused after `Connection: close`, HTTP/1.0, an error or a block page. Members: a
Python keep-alive member (tests/keepalive_member.py) whose behaviour the test controls, and
Debian's squid (real keep-alive) with a counting TCP relay in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.gateway.config import GatewayConfig
from engine.gateway.members import Member
from engine.gateway.metrics import GatewayCollector
from engine.gateway.server import Gateway
from fetchers.pool import ProxyPool
from fetchers.proxy_parse import ProxySpec
from sim.nginx import free_port
from tests.conftest import require_tool
from tests.keepalive_member import KeepAliveMember, get
from tests.real_proxies import squid_conf
from tests.relays import CountingRelay

pytestmark = [pytest.mark.timeout(60)]
N = 20


def make_gateway(ports: list[int], **cfg: object) -> Gateway:
    pool = ProxyPool([], allow_empty=True)
    pool.update(
        [
            ((ProxySpec("http", "127.0.0.1", p), 1.0), Member("http", None, None, None))
            for p in ports
        ]
    )
    return Gateway(GatewayConfig(**{"port": 0, "retries": 1, **cfg}), pool)  # type: ignore[arg-type]


def upstream(gw: Gateway) -> dict:
    return gw.snapshot()["upstream_pool"]


def metrics_text(gw: Gateway) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw.snapshot))
    return generate_latest(registry).decode()


async def with_members(n: int, body, **cfg: object):  # type: ignore[no-untyped-def]
    members = [KeepAliveMember(f"m{i}") for i in range(n)]
    ports = [await m.start() for m in members]
    gw = make_gateway(ports, **cfg)
    await gw.start()
    try:
        return await body(gw, members)
    finally:
        await gw.stop(1)
        for m in members:
            await m.stop()


def run(n: int, body, **cfg: object):  # type: ignore[no-untyped-def]
    return asyncio.run(with_members(n, body, **cfg))


def test_sequential_requests_reuse_one_upstream_connection() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        # each request on its own client connection: only the upstream side is kept
        for i in range(N):
            [(status, _, text)] = await get(gw.port, [f"http://origin.test/p{i}"])
            assert status == 200 and text.endswith(f"/p{i}".encode())
        m = ms[0]
        assert (m.connections, m.requests) == (1, N)
        up = upstream(gw)
        assert (up["opened"], up["reused"], up["idle"]) == (1, N - 1, 1)
        assert sum(up["discarded"].values()) == 0
        # the member saw keep-alive requests, each with the member's own headers only
        assert all(b"Connection: keep-alive" in h for h in m.heads)
        text = metrics_text(gw)
        assert "fetchfleet_gateway_upstream_reused_total 19.0" in text
        assert "fetchfleet_gateway_upstream_opened_total 1.0" in text
        assert "fetchfleet_gateway_upstream_idle 1.0" in text

    run(1, body)


def test_the_pool_is_off_with_zero_idle_per_member() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        for i in range(5):
            [(status, _, _)] = await get(gw.port, [f"http://origin.test/p{i}"])
            assert status == 200
        assert ms[0].connections == 5
        assert all(b"Connection: close" in h for h in ms[0].heads)
        up = upstream(gw)
        assert (up["opened"], up["reused"], up["idle"]) == (5, 0, 0)

    run(1, body, upstream_idle_per_member=0)


def test_chunked_answers_are_reused_correctly() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        urls = ["http://origin.test/chunked", "http://origin.test/a"] * 3
        answers = await get(gw.port, urls)
        assert [a[2] for a in answers] == [
            b"m0 conn 1 req 1 /chunked!", b"m0 conn 1 req 2 /a",
            b"m0 conn 1 req 3 /chunked!", b"m0 conn 1 req 4 /a",
            b"m0 conn 1 req 5 /chunked!", b"m0 conn 1 req 6 /a",
        ]  # fmt: skip
        assert ms[0].connections == 1

    run(1, body)


@pytest.mark.parametrize("path", ["close", "http10"])
def test_an_answer_that_ends_the_connection_is_not_reused(path: str) -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        answers = await get(gw.port, [f"http://origin.test/{path}"] * 3 + ["http://origin.test/x"])
        assert [a[0] for a in answers] == [200] * 4
        assert [a[2] for a in answers] == [
            f"m0 conn {i} req 1 /{p}".encode()
            for i, p in ((1, path), (2, path), (3, path), (4, "x"))
        ]
        up = upstream(gw)
        assert (up["opened"], up["reused"], up["idle"]) == (4, 0, 1)
        assert up["discarded"] == {"not_reusable": 3}
        assert gw.stats.members[f"http://127.0.0.1:{ms[0].port}"].failures == 0

    run(1, body)


@pytest.mark.parametrize("with_408", [False, True])
def test_a_stale_reused_connection_is_retried_on_a_fresh_one(with_408: bool) -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        [(s1, _, _)] = await get(gw.port, ["http://origin.test/one"])
        m = ms[0]
        m.drop_reused = 1  # the member closes the kept connection as the next request comes
        m.drop_with = with_408
        [(s2, _, text)] = await get(gw.port, ["http://origin.test/two"])
        assert (s1, s2) == (200, 200)
        assert text == b"m0 conn 2 req 1 /two"
        assert (m.connections, m.dropped, m.requests) == (2, 1, 2)
        up = upstream(gw)
        assert (up["opened"], up["reused"], up["stale_retries"]) == (2, 1, 1)
        assert up["discarded"] == {"stale": 1}
        key = f"http://127.0.0.1:{m.port}"
        assert gw.stats.members[key].failures == 0
        assert gw.stats.members[key].requests == 2
        [state] = gw.pool.proxies
        assert state.consecutive_failures == 0
        assert gw.stats.requests[("http", "ok")] == 2

    run(1, body)


def test_connections_the_member_closes_while_idle_leave_the_pool() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        await get(gw.port, ["http://origin.test/a"])
        assert upstream(gw)["idle"] == 1
        ms[0].close_idle()
        for _ in range(400):  # bounded: the gateway sees the member's FIN
            if upstream(gw)["idle"] == 0:
                break
            await asyncio.sleep(0.005)
        assert upstream(gw)["discarded"] == {"closed_idle": 1}
        [(status, _, text)] = await get(gw.port, ["http://origin.test/b"])
        assert status == 200 and text == b"m0 conn 2 req 1 /b"
        assert upstream(gw)["stale_retries"] == 0

    run(1, body)


def test_idle_connections_expire() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        await get(gw.port, ["http://origin.test/a"])
        for _ in range(400):  # bounded: the sweep closes it after the idle timeout
            if upstream(gw)["idle"] == 0:
                break
            await asyncio.sleep(0.005)
        assert upstream(gw)["discarded"] == {"idle_timeout": 1}

    run(1, body, upstream_idle_timeout_s=0.05)


def test_a_block_page_connection_is_never_pooled() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        for m in ms:
            m.blocks = True
        [(status, _, text)] = await get(gw.port, ["http://origin.test/x"])
        assert status == 403  # both members blocked: the client sees the page
        up = upstream(gw)
        assert (up["idle"], up["discarded"]) == (0, {"blocked": 2})
        for m in ms:
            m.blocks = False
        [(status, _, text)] = await get(gw.port, ["http://other.test/after"])
        assert status == 200 and text.endswith(b"conn 2 req 1 /after")

    run(2, body)


def test_failover_after_a_block_page_pools_only_the_good_answer() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        ms[0].blocks = True
        for i in range(2):  # round robin: one of them tries m0 first, then fails over
            [(status, _, text)] = await get(gw.port, [f"http://origin.test/{i}"])
            assert status == 200 and text.startswith(b"m1 conn 1 ")
        assert (ms[0].connections, ms[1].connections, ms[1].requests) == (1, 1, 2)
        up = upstream(gw)
        assert (up["idle"], up["discarded"]) == (1, {"blocked": 1})
        assert gw.stats.members[f"http://127.0.0.1:{ms[0].port}"].blocked == 1

    run(2, body)


def test_a_timeout_is_never_reused() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        await get(gw.port, ["http://origin.test/a"])
        [(status, _, _)] = await get(gw.port, ["http://origin.test/slow"])
        assert status == 504
        up = upstream(gw)
        assert up["idle"] == 0 and up["discarded"] == {"error": 1}
        ms[0].gate.set()
        [(status, _, text)] = await get(gw.port, ["http://origin.test/b"])
        assert status == 200 and b"req 1 /b" in text

    run(1, body, response_timeout_s=0.3, retries=0)


def test_hop_by_hop_headers_and_per_request_credentials() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        extra = "Connection: keep-alive, X-Private\r\nX-Private: secret\r\nX-Kept: yes\r\n"
        for _ in range(3):
            await get(gw.port, ["http://origin.test/h"], extra)
        m = ms[0]
        assert m.connections == 1 and len(m.heads) == 3
        for h in m.heads:
            low = h.lower()
            assert b"x-private" not in low and b"x-kept: yes" in low
            assert low.count(b"connection:") == 1 and b"connection: keep-alive" in low
            assert b"proxy-authorization: basic " in low  # on every reused request

    async def with_auth() -> None:
        m = KeepAliveMember()
        port = await m.start()
        pool = ProxyPool([], allow_empty=True)
        spec = ProxySpec("http", "127.0.0.1", port, "u", "pw")
        pool.update([((spec, 1.0), Member("http", None, None, None))])
        gw = Gateway(GatewayConfig(port=0), pool)
        await gw.start()
        try:
            await body(gw, [m])
        finally:
            await gw.stop(1)
            await m.stop()

    asyncio.run(with_auth())


# -- a real keep-alive member: Debian's squid -----------------------------------------------


class Origin:
    """A keep-alive origin: `/chunked/N` answers chunked, anything else with a length."""

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                body = b"origin " + path
                if path.startswith(b"/chunked"):
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                            b"Cache-Control: no-store\r\n\r\n"
                            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # fmt: skip
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await w.drain()


@pytest.fixture(scope="module")
def squid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = require_tool("/usr/sbin/squid", "squid")
    d = tmp_path_factory.mktemp("squid-member")
    d.chmod(0o777)
    port = free_port()
    (d / "squid.conf").write_text(squid_conf(d, port, "127.0.0.1", "http_access allow localhost"))
    p = subprocess.Popen(
        [binary, "-N", "-f", str(d / "squid.conf")], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import socket
        import time

        deadline = time.monotonic() + 20
        while True:  # bounded by the deadline
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    log = Path(d / "cache.log")
                    raise RuntimeError(f"squid did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.05)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_through_real_squid_the_gateway_reuses_its_connection(squid: int) -> None:
    async def body() -> None:
        origin = Origin()
        oport = await origin.start()
        relay = CountingRelay(("127.0.0.1", squid))
        rport = await relay.start()
        gw = make_gateway([rport])
        await gw.start()
        try:
            for i in range(N):
                path = f"/chunked/{i}" if i % 2 else f"/len/{i}"
                [(status, _, text)] = await get(gw.port, [f"http://127.0.0.1:{oport}{path}"])
                assert (status, text) == (200, f"origin {path}".encode())
            assert relay.accepted <= 2  # one, unless squid closed it (never seen)
            up = upstream(gw)
            assert up["opened"] == relay.accepted and up["reused"] == N - relay.accepted
        finally:
            await gw.stop(1)
            origin.server.close()
            assert relay.server is not None
            relay.server.close()

    asyncio.run(body())


def test_the_idle_limit_per_member_closes_the_surplus() -> None:
    async def body(gw: Gateway, ms: list[KeepAliveMember]) -> None:
        m = ms[0]
        a = asyncio.create_task(get(gw.port, ["http://origin.test/slow"]))
        b = asyncio.create_task(get(gw.port, ["http://origin.test/slow"]))
        for _ in range(400):  # bounded: both requests reached the member
            if len(m.heads) == 2:
                break
            await asyncio.sleep(0.005)
        assert m.connections == 2
        m.gate.set()
        assert [r[0][0] for r in await asyncio.gather(a, b)] == [200, 200]
        up = upstream(gw)
        assert (up["opened"], up["idle"], up["discarded"]) == (2, 1, {"limit": 1})

    run(1, body, upstream_idle_per_member=1)
