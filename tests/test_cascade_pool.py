"""Proxy selection strategies and the per-proxy circuit breaker (fetchers/pool.py), and the
cascade drawing proxies from a pool."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType, ProxyFailure
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse
from fetchers.pool import BreakerState, NoProxyAvailable, ProxyPool

PROXIES = ["http://10.0.0.1:8080", "socks5://u:pw@10.0.0.2:1080", "10.0.0.3:3128"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_cycles_and_redacts():
    pool = ProxyPool(PROXIES, "round_robin")
    picks = []
    for _ in range(6):
        lease = pool.acquire()
        picks.append(lease.redacted)
        lease.release("ok", 10)
    assert picks[:3] == picks[3:]
    assert set(picks) == {
        "http://10.0.0.1:8080",
        "socks5://u:***@10.0.0.2:1080",
        "http://10.0.0.3:3128",
    }
    assert "pw" not in str(pool.stats())


def test_least_connections_prefers_idle_proxies():
    pool = ProxyPool(PROXIES, "least_connections")
    held = [pool.acquire() for _ in range(3)]
    assert len({h.url for h in held}) == 3
    held[1].release("ok", 5)
    assert pool.acquire().url == held[1].url


def test_weighted_follows_weights():
    pool = ProxyPool(
        [(PROXIES[0], 8.0), (PROXIES[1], 1.0), (PROXIES[2], 1.0)],
        "weighted",
        rng=random.Random(1),
    )
    counts: Counter[str] = Counter()
    for _ in range(2000):
        lease = pool.acquire()
        counts[lease.url] += 1
        lease.release("ok", 5)
    assert 0.74 < counts[PROXIES[0]] / 2000 < 0.86


def test_adaptive_learns_latency_and_success():
    pool = ProxyPool(PROXIES, "adaptive", rng=random.Random(2))
    latency = {PROXIES[0]: 400.0, "socks5://u:pw@10.0.0.2:1080": 30.0, "http://10.0.0.3:3128": 30.0}
    counts: Counter[str] = Counter()
    for _ in range(600):
        lease = pool.acquire()
        counts[lease.url] += 1
        failing = lease.url == "http://10.0.0.3:3128"
        lease.release("blocked" if failing else "ok", latency[lease.url])
    fast = counts["socks5://u:pw@10.0.0.2:1080"]
    assert fast > counts[PROXIES[0]] * 3 and fast > counts["http://10.0.0.3:3128"] * 3


def test_circuit_breaker_opens_half_opens_and_closes():
    clock = Clock()
    pool = ProxyPool(PROXIES[:2], "round_robin", failure_threshold=2, cooldown_s=10, clock=clock)
    bad = pool.proxies[0]
    for _ in range(4):  # round robin alternates: two failures of the first proxy
        lease = pool.acquire()
        lease.release("failed" if lease.state is bad else "ok")
    assert bad.state == BreakerState.OPEN
    assert all(pool.acquire().state is not bad for _ in range(5))
    for p in pool.proxies:
        p.in_flight = 0
    clock.now = 10.5  # cool-down over: one trial request
    leases = [pool.acquire() for _ in range(4)]
    trial = [lease for lease in leases if lease.state is bad]
    assert len(trial) == 1 and bad.state == BreakerState.HALF_OPEN
    trial[0].release("failed")
    assert bad.state == BreakerState.OPEN  # the trial failed: open again
    clock.now = 21
    for _ in range(100):  # the half-open member gets its trial within a few rounds
        if (lease := pool.acquire()).state is bad:
            break
        lease.release("ok")
    assert lease.state is bad, "the half-open proxy was never tried again"
    lease.release("ok")
    assert bad.state == BreakerState.CLOSED and bad.consecutive_failures == 0


def test_blocks_do_not_trip_the_breaker():
    pool = ProxyPool(PROXIES[:1], failure_threshold=2)
    for _ in range(5):
        pool.acquire().release("blocked", 50)
    assert pool.proxies[0].state == BreakerState.CLOSED
    assert pool.proxies[0].success_ewma < 0.2


def test_all_open_raises_with_when():
    clock = Clock()
    pool = ProxyPool(PROXIES[:1], failure_threshold=1, cooldown_s=30, clock=clock)
    pool.acquire().release("failed")
    with pytest.raises(NoProxyAvailable, match=r"half-opens in 30\.0s"):
        pool.acquire()


def test_bad_pools():
    with pytest.raises(ValueError):
        ProxyPool([])
    with pytest.raises(ValueError):
        ProxyPool(PROXIES, "fastest")


class ProxyEcho(FetchMethod):
    name = "http"

    def __init__(self, dead: set[str]) -> None:
        self.dead = dead
        self.seen: list[str | None] = []

    def unavailable_reason(self) -> str | None:
        return None

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.seen.append(request.proxy)
        if request.proxy in self.dead:
            raise ProxyFailure("proxy refused")
        return RawResponse(200, b"<html>ok</html>", {}, request.url)


def test_cascade_retries_through_another_proxy_and_trips_the_breaker():
    method = ProxyEcho(dead={"http://10.0.0.1:8080"})
    pool = ProxyPool(PROXIES[::2], "round_robin", failure_threshold=1, cooldown_s=60)
    f = Fetcher(FetchSettings(backoff_s=0.0, retries=2), methods={"http": method}, pool=pool)

    async def go():
        return [await f.fetch(f"http://p.test/{i}", method="http") for i in range(4)]

    results = asyncio.run(go())
    assert all(r.success for r in results)
    assert results[0].attempts[0].error_type == ErrorType.PROXY
    assert results[0].attempts[0].proxy == "http://10.0.0.1:8080"
    assert method.seen.count("http://10.0.0.1:8080") == 1  # open after one failure
    assert pool.proxies[0].state == BreakerState.OPEN
