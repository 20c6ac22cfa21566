"""ProxyChecker against real servers on loopback (tests/test_proxy_fakes.py), under uvloop.

Every test is bounded: timeouts are short (0.5-1 s) and each case asserts how long the
verdict took where that matters (a dead port must not cost three attempts).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from fetchers.errors import FetchError
from fetchers.proxy_check import CheckResult, Outcome, ProxyChecker
from fetchers.proxy_parse import ProxySpec, parse_proxy_line
from tests.test_proxy_fakes import (
    JUDGE_IP,
    LoopbackBed,
    blackhole_handler,
    canned_handler,
    garbage_handler,
    judge_handler,
)

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0


def run(fn: Callable[[LoopbackBed], Awaitable[None]], judge: str = "httpbin") -> None:
    async def main() -> None:
        bed = LoopbackBed()
        try:
            await bed.start_judge(judge)
            await fn(bed)
        finally:
            await bed.close()

    uvloop.run(main())


async def check(bed: LoopbackBed, line: str, **kw: object) -> CheckResult:
    async with ProxyChecker(bed.judge_url, timeout=TIMEOUT, **kw) as checker:  # type: ignore[arg-type]
        return await checker.check(parse_proxy_line(line))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_settle(before: int, slack: int = 2, within: float = 3.0) -> bool:
    """True once this process is back to `before` descriptors (the fake servers live here
    too, and their side of a connection closes a moment after ours)."""
    deadline = time.monotonic() + within
    while open_fds() > before + slack:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def tasks_settle(within: float = 3.0) -> bool:
    """True once only the test's own task is left in the loop."""
    deadline = time.monotonic() + within
    while len(asyncio.all_tasks()) > 1:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# --------------------------------------------------------------------------- alive


def test_http_elite_alive_with_latency_exit_ip_and_timestamp() -> None:
    async def t(bed: LoopbackBed) -> None:
        proxy = await bed.http_proxy(behaviour="elite")
        r = await check(bed, f"http://{proxy}")
        assert r.outcome == Outcome.ALIVE and r.alive, r
        assert r.protocol == "http"
        assert r.latency_ms is not None and 0 < r.latency_ms < 1000
        assert r.anonymity == "elite"
        assert r.exit_ip == proxy.split(":")[0]
        assert r.country is None  # loopback has no country
        assert r.error is None
        assert r.checked_at.tzinfo == dt.UTC

    run(t)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("elite", "elite"),
        ("anonymous", "anonymous"),  # adds Via
        ("transparent", "transparent"),  # X-Forwarded-For: <checker>
        ("xff_self", "anonymous"),  # X-Forwarded-For: <proxy itself> — no leak, still a proxy
        ("forwarded", "transparent"),  # Forwarded: for="<checker>:4711"
    ],
)
@pytest.mark.parametrize("judge", ["httpbin", "azenv"])
def test_http_anonymity(behaviour: str, expected: str, judge: str) -> None:
    async def t(bed: LoopbackBed) -> None:
        proxy = await bed.http_proxy(behaviour=behaviour)
        r = await check(bed, f"http://{proxy}")
        assert r.alive, r
        assert r.anonymity == expected
        assert r.exit_ip == proxy.split(":")[0]

    run(t, judge)


def test_socks5_and_socks4_alive() -> None:
    async def t(bed: LoopbackBed) -> None:
        s5 = await bed.socks5()
        s4 = await bed.socks4()
        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            r5 = await c.check(parse_proxy_line(f"socks5://{s5}"))
            r4 = await c.check(parse_proxy_line(f"socks4://{s4}"))
        assert (r5.outcome, r5.protocol, r5.anonymity) == ("alive", "socks5", "elite"), r5
        assert (r4.outcome, r4.protocol, r4.anonymity) == ("alive", "socks4", "elite"), r4
        assert r5.exit_ip == s5.split(":")[0]

    run(t)


def test_https_connect_anonymity_comes_from_a_forwarded_request() -> None:
    async def t(bed: LoopbackBed) -> None:
        both = await bed.http_proxy(behaviour="anonymous", forward=True, connect=True)
        tunnel_only = await bed.http_proxy(behaviour="anonymous", forward=False, connect=True)
        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            r1 = await c.check(parse_proxy_line(f"https://{both}"))
            r2 = await c.check(parse_proxy_line(f"https://{tunnel_only}"))
        assert (r1.outcome, r1.protocol, r1.anonymity) == ("alive", "https", "anonymous"), r1
        # no forwarding: judged from the tunnel (remote address only)
        assert (r2.outcome, r2.protocol, r2.anonymity) == ("alive", "https", "elite"), r2

    run(t)


# --------------------------------------------------------------------------- failures


def test_refused_is_fast_even_without_scheme() -> None:
    async def t(bed: LoopbackBed) -> None:
        dead = bed.refused()
        t0 = time.perf_counter()
        r = await check(bed, dead)
        assert r.outcome == Outcome.REFUSED and not r.alive, r
        assert "refused" in (r.error or "")
        assert time.perf_counter() - t0 < 0.8  # no timeout was waited for

    run(t)


def test_black_hole_times_out_once_not_per_protocol() -> None:
    async def t(bed: LoopbackBed) -> None:
        hole = await bed.simple(blackhole_handler())
        t0 = time.perf_counter()
        r = await check(bed, hole)  # no scheme: would be 3 attempts without early stop
        took = time.perf_counter() - t0
        assert r.outcome == Outcome.TIMEOUT, r
        assert TIMEOUT * 0.9 < took < TIMEOUT * 2.5, took  # 3 attempts would be >= 3 s

    run(t)


@pytest.mark.parametrize("scheme", ["http", "https", "socks4", "socks5"])
def test_black_hole_with_explicit_scheme(scheme: str) -> None:
    async def t(bed: LoopbackBed) -> None:
        hole = await bed.simple(blackhole_handler())
        r = await check(bed, f"{scheme}://{hole}")
        assert r.outcome == Outcome.TIMEOUT, r

    run(t)


def test_canned_page_is_bad_response_not_alive() -> None:
    async def t(bed: LoopbackBed) -> None:
        fake = await bed.simple(canned_handler())
        r = await check(bed, f"http://{fake}")
        assert r.outcome == Outcome.BAD_RESPONSE and not r.alive, r
        assert "token" in (r.error or "")
        r = await check(bed, fake)  # auto-detection must not call it alive either
        assert r.outcome == Outcome.BAD_RESPONSE, r

    run(t)


def test_fake_page_that_echoes_a_different_token_is_bad_response() -> None:
    async def t(bed: LoopbackBed) -> None:
        body = b'{"args": {"ffp": "0123456789abcdef"}, "headers": {}, "origin": "1.2.3.4"}'
        fake = await bed.simple(canned_handler(body))
        r = await check(bed, f"http://{fake}")
        assert r.outcome == Outcome.BAD_RESPONSE, r

    run(t)


def test_garbage_is_bad_response() -> None:
    async def t(bed: LoopbackBed) -> None:
        g = await bed.simple(garbage_handler())
        for line in (f"http://{g}", f"socks5://{g}", f"socks4://{g}", f"https://{g}", g):
            r = await check(bed, line)
            assert r.outcome == Outcome.BAD_RESPONSE, (line, r)

    run(t)


def test_http_407_is_auth_failed_and_right_credentials_pass() -> None:
    async def t(bed: LoopbackBed) -> None:
        p = await bed.http_proxy(auth=("alice", "s3cr3t!"))
        r = await check(bed, f"http://{p}")
        assert r.outcome == Outcome.AUTH_FAILED, r
        r = await check(bed, f"http://alice:wrong-pw@{p}")
        assert r.outcome == Outcome.AUTH_FAILED, r
        assert "wrong-pw" not in repr(r)
        r = await check(bed, f"https://alice:wrong-pw@{p}")  # CONNECT 407
        assert r.outcome == Outcome.AUTH_FAILED, r
        r = await check(bed, f"http://alice:s3cr3t!@{p}")
        assert r.outcome == Outcome.ALIVE, r
        r = await check(bed, f"{p}:alice:s3cr3t!")  # no scheme, ip:port:user:pass
        assert (r.outcome, r.protocol) == (Outcome.ALIVE, "http"), r

    run(t)


def test_socks5_auth() -> None:
    async def t(bed: LoopbackBed) -> None:
        p = await bed.socks5(auth=("bob", "pw"))
        assert (await check(bed, f"socks5://{p}")).outcome == Outcome.AUTH_FAILED
        r = await check(bed, f"socks5://bob:nope@{p}")
        assert r.outcome == Outcome.AUTH_FAILED, r
        assert "nope" not in (r.error or "")
        assert (await check(bed, f"socks5://bob:pw@{p}")).outcome == Outcome.ALIVE
        r = await check(bed, f"bob:pw@{p}")  # detected
        assert (r.outcome, r.protocol) == (Outcome.ALIVE, "socks5"), r

    run(t)


def test_error_messages_never_contain_the_password() -> None:
    async def t(bed: LoopbackBed) -> None:
        pw = "Pa55-w0rd-xyz"
        lines = [
            f"http://u:{pw}@{bed.refused()}",
            f"socks5://u:{pw}@{await bed.simple(garbage_handler())}",
            f"https://u:{pw}@{await bed.http_proxy(auth=('u', 'other'))}",
        ]
        for line in lines:
            r = await check(bed, line)
            assert not r.alive
            assert pw not in repr(r) and pw not in (r.error or ""), r

    run(t)


# --------------------------------------------------------------------------- detection


def test_scheme_detection_for_lines_without_scheme() -> None:
    async def t(bed: LoopbackBed) -> None:
        cases = {
            await bed.http_proxy(): "http",
            await bed.http_proxy(forward=False, connect=True): "https",
            await bed.socks5(): "socks5",
            await bed.socks4(): "socks4",
        }
        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            for addr, expected in cases.items():
                r = await c.check(parse_proxy_line(addr))
                assert (r.outcome, r.protocol) == ("alive", expected), (addr, r)

    run(t)


# --------------------------------------------------------------------------- judge / start


def test_start_learns_own_address_and_fails_clearly_without_judge() -> None:
    async def t(bed: LoopbackBed) -> None:
        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            assert {str(ip) for ip in c.own_ips} == {"127.0.0.1"}
        dead = bed.refused()
        with pytest.raises(FetchError, match="cannot use judge"):
            async with ProxyChecker(f"http://{dead}/get", timeout=TIMEOUT):
                pass
        with pytest.raises(FetchError, match="not an http"):
            ProxyChecker("ftp://127.0.0.2/get")

    run(t)


def test_judge_that_does_not_echo_is_refused_at_start() -> None:
    async def t(bed: LoopbackBed) -> None:
        fake_judge = await bed.simple(canned_handler(b"203.0.113.7"))
        with pytest.raises(FetchError, match="does not echo"):
            async with ProxyChecker(f"http://{fake_judge}/", timeout=TIMEOUT):
                pass
        # bare-IP judges work when echo verification is explicitly off
        async with ProxyChecker(f"http://{fake_judge}/", timeout=TIMEOUT, verify_echo=False):
            pass

    run(t)


def test_https_judge_through_tunnels_and_tls_outcome(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sim.origin import make_cert

    cert, key = make_cert(tmp_path, JUDGE_IP)

    async def t(bed: LoopbackBed) -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        server = await asyncio.start_server(judge_handler(), JUDGE_IP, 0, ssl=server_ctx)
        bed.servers.append(server)
        url = f"https://{JUDGE_IP}:{server.sockets[0].getsockname()[1]}/get"
        trusting = ssl.create_default_context(cafile=cert)
        s5 = await bed.socks5()
        ct = await bed.http_proxy(connect=True)
        async with ProxyChecker(url, timeout=TIMEOUT, ssl_context=trusting) as c:
            for line in (f"socks5://{s5}", f"https://{ct}", s5):
                r = await c.check(parse_proxy_line(line))
                assert r.outcome == Outcome.ALIVE, (line, r)
        # a checker that does not trust the judge's certificate: tls (own_ips given, so
        # start() is not needed to fail first)
        c = ProxyChecker(url, timeout=TIMEOUT, own_ips={"127.0.0.1"})
        c._started = True  # skip the direct request, which would fail the same way
        r = await c.check(parse_proxy_line(f"socks5://{s5}"))
        assert r.outcome == Outcome.TLS, r
        await c.aclose()

    run(t)


# --------------------------------------------------------------------------- resources


def test_no_fd_or_task_leak_across_outcomes() -> None:
    async def t(bed: LoopbackBed) -> None:
        lines = [
            await bed.http_proxy(),
            f"socks5://{await bed.socks5()}",
            bed.refused(),
            await bed.simple(canned_handler()),
            await bed.simple(garbage_handler()),
            f"http://{await bed.http_proxy(auth=('a', 'b'))}",
            await bed.socks4(),
        ]
        specs = [parse_proxy_line(x) for x in lines] * 20
        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            await c.check(specs[0])
            await asyncio.sleep(0.05)
            before = open_fds()
            results = [r async for _, r in c.check_many(specs, concurrency=50)]
        assert len(results) == len(specs)
        assert await fds_settle(before), (before, open_fds())
        assert await tasks_settle(), asyncio.all_tasks()  # checker tasks and server handlers

    run(t)


def test_cancellation_closes_sockets() -> None:
    async def t(bed: LoopbackBed) -> None:
        hole = parse_proxy_line(await bed.simple(blackhole_handler()))
        slow_socks = parse_proxy_line(f"socks5://{await bed.simple(blackhole_handler())}")
        async with ProxyChecker(bed.judge_url, timeout=5.0) as c:
            await asyncio.sleep(0.05)
            before = open_fds()
            tasks = [asyncio.create_task(c.check(s)) for s in [hole, slow_socks] * 50]
            await asyncio.sleep(0.3)
            assert open_fds() > before + 50  # they really are connected
            for task in tasks:
                task.cancel()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(x, asyncio.CancelledError) for x in res)
        assert await fds_settle(before), (before, open_fds())

    run(t)


def test_overall_cap_bounds_one_check() -> None:
    async def t(bed: LoopbackBed) -> None:
        hole = parse_proxy_line(f"https://{await bed.simple(blackhole_handler())}")
        async with ProxyChecker(bed.judge_url, timeout=2.0, overall_timeout=0.3) as c:
            t0 = time.perf_counter()
            r = await c.check(hole)
        assert r.outcome == Outcome.TIMEOUT and time.perf_counter() - t0 < 1.2, r

    run(t)


def test_checker_rejects_use_after_close() -> None:
    async def t(bed: LoopbackBed) -> None:
        c = ProxyChecker(bed.judge_url, timeout=TIMEOUT)
        await c.start()
        await c.aclose()
        with pytest.raises(FetchError, match="closed"):
            await c.check(ProxySpec("http", "127.0.0.1", 9))

    run(t)


def test_check_many_is_lazy_and_stops_cleanly() -> None:
    async def t(bed: LoopbackBed) -> None:
        proxy = parse_proxy_line(f"http://{await bed.http_proxy()}")
        pulled = 0

        def specs():  # type: ignore[no-untyped-def]
            nonlocal pulled
            for _ in range(10_000):
                pulled += 1
                yield proxy

        async with ProxyChecker(bed.judge_url, timeout=TIMEOUT) as c:
            got = []
            async for _spec, r in c.check_many(specs(), concurrency=5):
                got.append(r)
                if len(got) == 7:
                    break
        assert all(r.alive for r in got)
        assert pulled < 30  # the generator was not drained
        assert await tasks_settle(), asyncio.all_tasks()

    run(t)


def test_ipv6_proxy() -> None:
    async def t(bed: LoopbackBed) -> None:
        proxy = await bed.http_proxy(listen_ip="::1")
        r = await check(bed, f"http://{proxy}")
        assert (r.outcome, r.protocol) == ("alive", "http"), r
        # it connects onward from 127.0.0.1, our own address: the judge sees us
        assert r.anonymity == "transparent"

    run(t)
