"""Connections opened ahead to members (engine/gateway/standby.py): a tunnel starts on one the
member already accepted, one more is opened per use, unused ones expire without being
replaced, and one the member closed just as it was taken costs a retry on a fresh connection,
never a failure of the member or of the client's request.

The member is a small CONNECT proxy in this file that answers every CONNECT itself and then
echoes, and counts what it accepted and answered, so a test can tell which connection carried
which tunnel."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.gateway.config import GatewayConfig
from engine.gateway.members import Member
from engine.gateway.metrics import GatewayCollector
from engine.gateway.server import Gateway
from fetchers.pool import ProxyPool
from fetchers.proxy_parse import ProxySpec
from tests.conftest import cli_here

pytestmark = [pytest.mark.timeout(60)]
# how long a connection opened ahead is left waiting before a test uses it: the member tells
# a waited connection from a fresh one by half of it (a margin no loaded machine closes)
WAIT_S = 0.6


class ConnectMember:
    """Answers `CONNECT` with 200, then echoes. `drop_after_s`: a CONNECT that arrives on a
    connection accepted longer ago than this is dropped unanswered (the member's own idle
    timeout firing just as the request comes)."""

    def __init__(self, drop_after_s: float | None = None) -> None:
        self.drop_after_s = drop_after_s
        self.accepted = self.connects = self.dropped = 0
        self.waited: list[bool] = []  # per CONNECT: was its connection accepted before it?
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(w)
        since = time.monotonic()
        try:
            head = await r.readuntil(b"\r\n\r\n")
            waited = time.monotonic() - since
            if not head.startswith(b"CONNECT "):
                return
            if self.drop_after_s is not None and waited > self.drop_after_s:
                self.dropped += 1
                return
            self.connects += 1
            self.waited.append(waited > WAIT_S / 2)
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            while data := await r.read(65536):  # bounded by the client, who closes
                w.write(data)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(w)
            w.close()


async def tunnel(port: int, payload: bytes = b"ping") -> bytes:
    """One CONNECT through the gateway, `payload` echoed back through the tunnel."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            return head
        w.write(payload)
        return await asyncio.wait_for(r.readexactly(len(payload)), 10)
    finally:
        w.close()


async def settled(gw: Gateway, idle: int) -> dict:
    """The standby snapshot once `idle` connections wait and none is being opened (bounded)."""
    for _ in range(500):
        snap = gw.snapshot()["standby"]
        if snap["idle"] == idle and snap["opening"] == 0:
            return snap
        await asyncio.sleep(0.01)
    raise AssertionError(f"standby never settled at {idle} idle: {gw.snapshot()['standby']}")


async def with_member(member: ConnectMember, body, **cfg: object):  # type: ignore[no-untyped-def]
    port = await member.start()
    pool = ProxyPool([], allow_empty=True)
    pool.update([((ProxySpec("http", "127.0.0.1", port), 1.0), Member("http", None, None, None))])
    gw = Gateway(GatewayConfig(**{"port": 0, "retries": 1, **cfg}), pool)  # type: ignore[arg-type]
    await gw.start()
    try:
        await body(gw)
    finally:
        await gw.stop(1)
        await member.stop()
    return gw


def test_tunnels_start_on_connections_the_member_accepted_ahead() -> None:
    member = ConnectMember()
    n = 4

    async def body(gw: Gateway) -> None:
        for i in range(n):
            if i:
                await settled(gw, 1)  # the one opened ahead has connected
                await asyncio.sleep(WAIT_S)  # ... and waits, so the member can tell
            assert await tunnel(gw.port) == b"ping"
        snap = await settled(gw, 1)
        # the first tunnel found none ready; each later one took one and opened the next
        assert (snap["misses"], snap["used"], snap["opened"]) == (1, n - 1, n)
        assert (snap["failed"], snap["stale_retries"], snap["discarded"]) == (0, 0, {})
        text = generate_latest(_registry(gw)).decode()
        assert f"fetchfleet_gateway_standby_used_total {n - 1}.0" in text
        assert "fetchfleet_gateway_standby_idle 1.0" in text

    gw = asyncio.run(with_member(member, body))
    assert member.connects == n and member.dropped == 0
    # every tunnel after the first went out on a connection that had waited for it
    assert member.waited == [False] + [True] * (n - 1)
    assert member.accepted == n + 1  # the tunnels' connections and the one still waiting
    (stats,) = gw.stats.members.values()
    assert (stats.requests, stats.failures) == (n, 0)


def test_with_standby_off_every_tunnel_opens_its_own_connection() -> None:
    member = ConnectMember()

    async def body(gw: Gateway) -> None:
        for _ in range(4):
            assert await tunnel(gw.port) == b"ping"
        snap = gw.snapshot()["standby"]
        assert (snap["opened"], snap["used"], snap["idle"]) == (0, 0, 0)

    asyncio.run(with_member(member, body, standby_per_member=0))
    assert member.accepted == member.connects == 4
    assert member.waited == [False] * 4


def test_unused_connections_expire_and_are_not_replaced() -> None:
    member = ConnectMember()

    async def body(gw: Gateway) -> None:
        assert await tunnel(gw.port) == b"ping"
        await settled(gw, 1)
        snap = await settled(gw, 0)  # the sweep closes it after standby_timeout_s
        assert snap["discarded"] == {"idle_timeout": 1}
        assert snap["opened"] == 1

    asyncio.run(with_member(member, body, standby_timeout_s=0.2))
    assert member.accepted == 2 and member.connects == 1


def test_a_connection_the_member_drops_as_it_is_taken_is_retried_fresh_not_failed() -> None:
    # the member drops a CONNECT on any connection that waited over WAIT_S / 2: its idle
    # timer firing just as the request arrives; the gateway's standby timeout (10 s) is longer
    member = ConnectMember(drop_after_s=WAIT_S / 2)

    async def body(gw: Gateway) -> None:
        assert await tunnel(gw.port) == b"ping"
        await settled(gw, 1)
        await asyncio.sleep(WAIT_S)  # past the member's idle limit, not the gateway's
        assert await tunnel(gw.port) == b"ping"
        snap = gw.snapshot()["standby"]
        assert (snap["used"], snap["stale_retries"]) == (1, 1)

    gw = asyncio.run(with_member(member, body, failure_threshold=1, retries=0))
    assert member.dropped == 1 and member.connects == 2
    (stats,) = gw.stats.members.values()
    # neither a failure of the member (its breaker would be open at threshold 1) nor a
    # second attempt: with --retries 0 the client would otherwise have had a 502
    assert (stats.requests, stats.failures) == (2, 0)
    assert gw.stats.requests[("connect", "ok")] == 2


def test_openings_that_fail_are_counted_and_given_up() -> None:
    member = ConnectMember()

    async def body(gw: Gateway) -> None:
        assert await tunnel(gw.port) == b"ping"
        await settled(gw, 1)
        assert member.server is not None
        member.server.close()  # the member stops accepting; the waiting one it closes
        for w in list(member.writers):
            w.transport.abort()
        await settled(gw, 0)
        # the next tunnel finds none, fails to connect, and its refill fails too
        head = await tunnel(gw.port)
        assert head.startswith(b"HTTP/1.1 502")
        for _ in range(500):
            if gw.snapshot()["standby"]["failed"] == 1:
                break
            await asyncio.sleep(0.01)
        snap = await settled(gw, 0)
        assert snap["failed"] == 1 and snap["discarded"] == {"closed_idle": 1}

    asyncio.run(with_member(member, body, retries=0))


def _registry(gw: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw.snapshot))
    return registry


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--standby", "-1"), "--standby and --standby-total must be 0 or more"),
        (("--standby-total", "-5"), "--standby and --standby-total must be 0 or more"),
        (("--standby-timeout", "0"), "--standby-timeout must be more than 0"),
    ],
)
def test_bad_standby_options_are_refused_with_what_to_do(args: tuple[str, ...], says: str) -> None:
    done = cli_here("serve-proxy", "--port", "0", *args)
    assert done.returncode != 0
    assert says in done.stderr
