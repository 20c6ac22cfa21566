"""The rotating gateway end to end: real curl through it (plain HTTP, CONNECT with TLS,
SOCKS5), sim proxies of every protocol as members (two with credentials), nginx as the origin.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator

import pytest

from engine.gateway.members import MemberFilter
from sim.origin import Origin
from sim.world import SimWorld, WorldConfig
from tests.gateway_support import curl, start_gateway, store_members

pytestmark = [pytest.mark.timeout(180)]

SEED = 53  # 8 elite members: http ×3 (one with user:pass), https ×2, socks4, socks5 ×2 (one with user:pass)
COUNTRIES = ["MY", "MY", "MY", "MY", "IN", "IN", "IN", "IN"]


@pytest.fixture(scope="module")
def world() -> Iterator[SimWorld]:
    with SimWorld(WorldConfig(n_proxies=8, mix={"elite": 1.0}, seed=SEED, latency_ms=(1, 3))) as w:
        protocols = Counter(t.protocol for t in w.truth)
        assert set(protocols) == {"http", "https", "socks4", "socks5"}, protocols
        assert {t.protocol for t in w.truth if t.username} == {"http", "socks5"}
        yield w


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, world: SimWorld) -> Iterator[Origin]:
    with Origin(tmp_path_factory.mktemp("origin"), block_addresses={world.truth[0].host}) as o:
        yield o


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory, world: SimWorld) -> str:
    url = f"duckdb:///{tmp_path_factory.mktemp('db') / 'ff.duckdb'}"
    store_members(url, world.truth, COUNTRIES)
    return url


start = start_gateway


def exit_address(body: str) -> str:
    """The client address nginx saw ('page for 127.N.x.y')."""
    return body.strip().rsplit(" ", 1)[1]


def test_plain_http_rotates_over_every_member(db_url: str, world: SimWorld, origin: Origin) -> None:
    with start(db_url, strategy="round_robin") as gw:
        assert gw.members == 8
        seen = []
        for _ in range(16):
            r = curl("-x", gw.url, origin.url("/page"))
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("page for "), r.stdout
            seen.append(exit_address(r.stdout))
    # every member carried exactly its share, whatever its protocol or credentials
    assert Counter(seen) == {t.host: 2 for t in world.truth}
    assert all(ipaddress.ip_address(a) != ipaddress.ip_address("127.0.0.1") for a in seen)


def test_connect_tunnel_carries_tls(db_url: str, world: SimWorld, origin: Origin) -> None:
    with start(db_url) as gw:
        seen = set()
        for _ in range(8):
            r = curl("--cacert", str(origin.cert), "-x", gw.url, origin.tls_url("/page"))
            assert r.returncode == 0, r.stderr
            seen.add(exit_address(r.stdout))
        snap = gw.snapshot()
    assert seen == {t.host for t in world.truth}
    assert (
        sum(r["count"] for r in snap["requests"] if r["kind"] == "connect" and r["result"] == "ok")
        == 8
    )


def test_socks5_hostname(db_url: str, world: SimWorld, origin: Origin) -> None:
    with start(db_url) as gw:
        for url in (origin.url("/page"), origin.tls_url("/page")):
            r = curl("--cacert", str(origin.cert), "--socks5-hostname", f"127.0.0.1:{gw.port}", url)
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("page for 127.")
        # SOCKS5 with a username: the country option is honoured
        for _ in range(4):
            r = curl("--socks5-hostname", f"127.0.0.1:{gw.port}", "--proxy-user", "me-country-IN:x",
                     origin.url("/page"))  # fmt: skip
            assert exit_address(r.stdout) in {t.host for t in world.truth[4:]}, r.stdout


def test_country_and_sticky_session_from_the_username(
    db_url: str, world: SimWorld, origin: Origin
) -> None:
    my = {t.host for t in world.truth[:4]}
    with start(db_url) as gw:
        for _ in range(8):
            r = curl("-x", f"http://me-country-MY:x@127.0.0.1:{gw.port}", origin.url("/page"))
            assert exit_address(r.stdout) in my, r.stdout
        sticky = {
            exit_address(
                curl(
                    "-x", f"http://me-session-abc:x@127.0.0.1:{gw.port}", origin.url("/page")
                ).stdout
            )
            for _ in range(6)
        }
        assert len(sticky) == 1
        other = {
            exit_address(
                curl(
                    "-x", f"http://me-session-xyz:x@127.0.0.1:{gw.port}", origin.url("/page")
                ).stdout
            )
            for _ in range(6)
        }
        assert len(other) == 1
        # a country nobody is in: a clear 503, not a random member
        r = curl("-i", "-x", f"http://me-country-AR:x@127.0.0.1:{gw.port}", origin.url("/page"))
        assert " 503 " in r.stdout.splitlines()[0], r.stdout
        r = curl("-i", "-x", f"http://me-colour-blue:x@127.0.0.1:{gw.port}", origin.url("/page"))
        assert " 407 " in r.stdout.splitlines()[0], r.stdout


def test_filters_at_start(db_url: str, world: SimWorld, origin: Origin) -> None:
    flt = MemberFilter(countries=frozenset({"IN"}), types=frozenset({"socks5", "https"}))
    want = {t.host for t in world.truth[4:] if t.protocol in ("socks5", "https")}
    with start(db_url, filter=flt) as gw:
        assert gw.members == len(want) > 0
        seen = {
            exit_address(curl("-x", gw.url, origin.url("/page")).stdout)
            for _ in range(2 * len(want))
        }
    assert seen == want


def test_a_site_that_blocks_a_member_avoids_it_there_only(
    db_url: str, world: SimWorld, origin: Origin
) -> None:
    banned = world.truth[0].host  # the guarded site answers it a captcha page
    with start(db_url, strategy="round_robin", retries=2) as gw:
        for _ in range(16):
            r = curl("-i", "-x", gw.url, origin.url("/page", site="guarded"))
            assert " 200 " in r.stdout.splitlines()[0], r.stdout  # the client never sees the block
        main = [exit_address(curl("-x", gw.url, origin.url("/page")).stdout) for _ in range(16)]
        snap = gw.snapshot()
    guarded = origin.hits("/page", site="guarded")
    assert [a for a, _, s in guarded if s == 403] == [banned]  # blocked once, then avoided there
    assert banned not in [a for a, _, s in guarded if s == 200]
    assert main.count(banned) == 2  # still used for the other site: its share of 16
    row = next(m for m in snap["members"] if banned in m["member"])
    assert row["blocked"] == 1 and row["breaker"] == "closed"
