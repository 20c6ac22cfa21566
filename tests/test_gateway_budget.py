"""The gateway's per-process buffer budget (`--buffer-budget`): two answers buffered at once
that together exceed it. Without the budget both are held whole (the peak shows it); with it
the second one is streamed as it comes, both clients still get their whole answer, and the
accounting returns to zero."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.gateway.budget import BufferBudget, parse_size
from engine.gateway.config import GatewayConfig
from engine.gateway.members import Member
from engine.gateway.metrics import GatewayCollector
from engine.gateway.server import Gateway
from fetchers.pool import ProxyPool
from fetchers.proxy_parse import ProxySpec

pytestmark = [pytest.mark.timeout(60)]
BODY = bytes(range(256)) * 400  # 102,400 bytes
FIRST = 60_000  # sent at once; the rest when the test opens the gate
BUDGET = 110_000  # one whole answer fits, the first parts of two do not


class HeldMember:
    """An HTTP member that answers every request itself: the head and the first FIRST bytes
    of BODY at once, the rest when `gate` is set. A stand-in origin whose timing the test
    controls (the answers must be in flight together)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        self.requests += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY[:FIRST])  # fmt: skip
        await w.drain()
        await self.gate.wait()
        w.write(BODY[FIRST:])
        await w.drain()
        w.close()


async def get(port: int, head_seen: asyncio.Event) -> tuple[bytes, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(
        b"GET http://origin.test/big HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
    )
    head = await r.readuntil(b"\r\n\r\n")
    head_seen.set()
    body = await r.read()
    w.close()
    return head, body


async def two_answers_at_once(budget: int) -> tuple[Gateway, list[tuple[bytes, bytes]], str]:
    member = HeldMember()
    mport = await member.start()
    pool = ProxyPool([], allow_empty=True)
    pool.update([((ProxySpec("http", "127.0.0.1", mport), 1.0), Member("http", None, None, None))])
    gw = Gateway(GatewayConfig(port=0, buffer_budget_bytes=budget), pool)
    await gw.start()
    try:
        seen_a, seen_b = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(get(gw.port, seen_a))
        for _ in range(1000):  # bounded: A's first part buffered in the gateway
            if gw.budget.used >= FIRST:
                break
            await asyncio.sleep(0.005)
        assert gw.budget.used == FIRST
        b = asyncio.create_task(get(gw.port, seen_b))
        if budget < 2 * FIRST:  # B does not fit: it is streamed, its head comes at once
            await asyncio.wait_for(seen_b.wait(), 10)
            assert not seen_a.is_set()  # A is still held whole, being judged
        else:  # B fits: both held until the gate opens
            for _ in range(1000):
                if gw.budget.used >= 2 * FIRST:
                    break
                await asyncio.sleep(0.005)
            assert not seen_a.is_set() and not seen_b.is_set()
        member.gate.set()
        answers = [await asyncio.wait_for(t, 10) for t in (a, b)]
        assert member.requests == 2
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GatewayCollector(gw.snapshot))
        return gw, answers, generate_latest(registry).decode()
    finally:
        await gw.stop(1)
        assert member.server is not None
        member.server.close()


def test_a_spent_budget_streams_the_answer_instead_of_buffering_it() -> None:
    gw, answers, metrics = asyncio.run(two_answers_at_once(BUDGET))
    for head, body in answers:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert body == BODY
    streamed = answers[1][0]
    assert b"Connection: close" in streamed and b"Content-Length: %d" % len(BODY) in streamed
    b = gw.budget
    assert (b.capacity, b.fallbacks, b.used) == (BUDGET, 1, 0)
    assert FIRST <= b.peak <= BUDGET
    assert gw.stats.requests[("http", "ok")] == 1
    assert gw.stats.requests[("http", "streamed")] == 1
    assert "fetchfleet_gateway_buffer_budget_fallbacks_total 1.0" in metrics
    assert f"fetchfleet_gateway_buffer_budget_capacity_bytes {float(BUDGET)}" in metrics


def test_without_the_bound_both_answers_are_held_whole() -> None:
    """The control: the same two answers under a large budget exceed BUDGET at once."""
    gw, answers, metrics = asyncio.run(two_answers_at_once(1 << 30))
    assert [body for _, body in answers] == [BODY, BODY]
    b = gw.budget
    assert (b.fallbacks, b.used) == (0, 0)
    # one answer whole while (at least) the other's first part is held: over BUDGET. Both
    # whole at once only when their ends are read before the first one is answered (the
    # first is answered and released in the callback that completes it)
    assert BUDGET < len(BODY) + FIRST <= b.peak <= 2 * len(BODY)
    assert gw.stats.requests[("http", "ok")] == 2
    assert "fetchfleet_gateway_buffer_budget_fallbacks_total 0.0" in metrics


def test_budget_accounting_and_sizes() -> None:
    b = BufferBudget(10)
    assert b.reserve(6) and not b.reserve(5) and b.reserve(4)
    assert (b.used, b.peak) == (10, 10)
    b.release(10)
    assert b.used == 0 and b.peak == 10
    assert BufferBudget(0).reserve(0)
    assert parse_size("256MB") == 256 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1048576") == 1 << 20
    with pytest.raises(ValueError):
        parse_size("lots")
