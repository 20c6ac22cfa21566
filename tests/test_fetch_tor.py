"""The tor method with a real tor: launched through stem with `DisableNetwork 1` (it never
contacts the public network), it answers NEWNYM on its control port and reports its rate
limit; requests go through the sim's SOCKS5 proxy standing in for Tor's SOCKS port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from tests.conftest import require_tool

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # inside stem 1.8
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    config = ShopsConfig(
        (
            ShopSpec("onion", "Argentina", "socks_only", n_products=40),
            ShopSpec("denies", "Argentina", "socks_only", n_products=5),
        )
    )
    with ShopWorld(config) as world:
        yield world


def test_real_tor_answers_newnym_and_fetches_go_through_the_socks_port(shops: ShopWorld):
    require_tool("tor", "tor")
    st = FetchSettings(
        tor_socks=shops.socks_proxy.split("://", 1)[1],  # the stand-in for Tor's SOCKS port
        tor_control=f"127.0.0.1:{free_port()}",
        tor_launch=True,
        tor_offline=True,
        explore_rate=0.0,
    )

    async def go() -> None:
        async with Fetcher(st) as f:
            r = await f.fetch(
                shops["onion"].catalog_url(2), country="Argentina", selectors=["li.product"]
            )
            assert r.success and r.method_used == "tor"
            assert [a.method for a in r.attempts] == ["tor"]  # Argentina starts with tor
            assert r.content.count(b'class="product"') == 20

            tor = f.method("tor")
            assert await tor.new_identity() == 0.0  # launches our tor, then NEWNYM
            process = tor.control.process
            assert process is not None and process.poll() is None
            ctl = tor.control.controller()
            assert ctl.get_conf("DisableNetwork") == "1"  # never reaches the network
            wait = await tor.new_identity()
            assert 5.0 < wait <= 10.5  # Tor's NEWNYM rate limit, reported, nothing sent
            assert tor.control.newnym_sent == 1
            assert await tor.on_blocked() is False  # no retry through tor while limited
        assert process.poll() is not None  # closed with the fetcher

    asyncio.run(go())


def test_tor_is_unavailable_without_tor_and_the_cascade_moves_on(shops: ShopWorld):
    st = FetchSettings(
        tor_socks=f"127.0.0.1:{free_port()}",
        tor_control=f"127.0.0.1:{free_port()}",
        tor_launch=False,
        retries=0,
    )

    async def go():
        async with Fetcher(st) as f:
            return await f.fetch(shops["denies"].catalog_url(1), method="tor,http")

    r = asyncio.run(go())
    assert [(a.method, a.error_type) for a in r.attempts] == [
        ("tor", ErrorType.UNAVAILABLE),
        ("http", ErrorType.BLOCKED),
    ]
    assert "FETCHFLEET_TOR_LAUNCH" in r.attempts[0].message
    assert not r.success and r.error_type == ErrorType.BLOCKED
