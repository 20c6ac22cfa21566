"""The gateway's waits on members end by deadline (the sweep in `Gateway._sweep`, no loop
timer per wait): a member that never answers a plain request costs one failed attempt and the
request moves on (or gets 504 when none is left); a member that never completes a CONNECT
handshake gets 502; a client that leaves mid-wait ends its request task."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from engine.gateway.config import GatewayConfig
from engine.gateway.members import Member
from engine.gateway.server import Gateway
from fetchers.pool import ProxyPool
from fetchers.proxy_parse import ProxySpec

pytestmark = [pytest.mark.timeout(60)]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def member(answer: bytes | None) -> tuple[asyncio.Server, int, list[int]]:
    """A member that answers every request with `answer`, or never (None: holds the
    connection open, reading); the list counts the requests it got (not the connections:
    the gateway opens some ahead, engine/gateway/standby.py)."""
    seen = [0]

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            seen[0] += 1
            if answer is None:
                await r.read()  # until the gateway gives up and closes
            else:
                w.write(answer)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), seen


async def with_gateway(
    answers: list[bytes | None],
    body: Callable[[Gateway, list[list[int]]], Awaitable[None]],
    **cfg: object,
) -> Gateway:
    servers, pool = [], ProxyPool([], "round_robin", allow_empty=True)
    members, seen = [], []
    for a in answers:
        server, port, count = await member(a)
        servers.append(server)
        seen.append(count)
        members.append(
            ((ProxySpec("http", "127.0.0.1", port), 1.0), Member("http", None, None, None))
        )
    pool.update(members)
    gw = Gateway(GatewayConfig(port=0, **cfg), pool)  # type: ignore[arg-type]
    await gw.start()
    try:
        await body(gw, seen)
    finally:
        await gw.stop(1)
        for s in servers:
            s.close()
    return gw


async def ask(port: int, head: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head)
    out = await asyncio.wait_for(r.read(), 10)
    w.close()
    return out


GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
CONNECT = b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n"


def test_a_silent_member_costs_one_attempt_then_the_request_moves_on() -> None:
    async def body(gw: Gateway, seen: list[list[int]]) -> None:
        answers = [await ask(gw.port, GET) for _ in range(2)]  # round robin: each first once
        assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(b"ok") for a in answers)
        assert seen[0] == [2] and seen[1] == [2]  # the silent one tried once per request

    gw = asyncio.run(
        with_gateway([None, OK], body, retries=1, response_timeout_s=0.4, failure_threshold=9)
    )
    counts = sorted((m.requests, m.failures) for m in gw.stats.members.values())
    assert counts == [(2, 0), (2, 2)]  # the good one, the silent one
    assert gw.stats.requests[("http", "ok")] == 2


def test_no_answer_in_time_is_504_and_a_stuck_handshake_is_502() -> None:
    async def body(gw: Gateway, seen: list[list[int]]) -> None:
        assert (await ask(gw.port, GET)).startswith(b"HTTP/1.1 504 ")
        assert (await ask(gw.port, CONNECT)).startswith(b"HTTP/1.1 502 ")
        assert seen[0] == [2]

    gw = asyncio.run(
        with_gateway(
            [None], body, retries=0, response_timeout_s=0.4, connect_timeout_s=0.3,
            failure_threshold=9,
        )
    )  # fmt: skip
    assert gw.stats.requests[("http", "504")] == 1
    assert gw.stats.requests[("connect", "502")] == 1
    (silent,) = gw.stats.members.values()
    assert (silent.requests, silent.failures) == (2, 2)


def test_a_client_leaving_mid_wait_ends_its_request() -> None:
    async def body(gw: Gateway, seen: list[list[int]]) -> None:
        _r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(GET)
        for _ in range(500):  # bounded: the request reached the member
            if seen[0][0] + seen[1][0] == 1:
                break
            await asyncio.sleep(0.01)
        assert seen[0][0] + seen[1][0] == 1 and gw.stats.connections_open == 1
        sock = w.get_extra_info("socket")  # a reset, not a half-close (that still gets its answer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
        for _ in range(500):
            if gw.stats.connections_open == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.stats.connections_open == 0
        await asyncio.sleep(0.6)  # past the answer's deadline: no failover to the other one
        assert seen[0][0] + seen[1][0] == 1

    gw = asyncio.run(with_gateway([None, None], body, retries=2, response_timeout_s=0.4))
    assert not gw.stats.requests  # no answer was counted: the client was gone
