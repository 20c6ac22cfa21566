"""Each fetch method against the sim shops, for real: curl_cffi, Playwright and Selenium
with the system Chromium/ChromeDriver, all on loopback. The cascade passes the JS challenge
with a browser after http is blocked, then skips http for that domain; a captcha page is
never content; 429 waits for Retry-After; browser memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType
from fetchers.methods._browser import browser_tree_memory
from fetchers.methods.api import ApiSpec
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from tests.conftest import require_tool

TOKEN = "shop-api-secret-123"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    config = ShopsConfig(
        (
            ShopSpec("plain", "Malaysia", n_products=100),
            ShopSpec("guarded", "Malaysia", "js_challenge"),
            ShopSpec("guarded2", "Malaysia", "js_challenge"),
            ShopSpec("captcha", "Russia", "captcha"),
            ShopSpec("limited", "Brazil", "rate_limit", rate_limit=3, retry_after_s=1),
            ShopSpec("flaky", "Brazil", "flaky", error_rate=0.3, seed=3),
            ShopSpec("onion", "Argentina", "socks_only"),
            ShopSpec("slow", "Chile", "slow", latency_ms=800),
            ShopSpec("market", "India", n_products=100, api_token=TOKEN),
        )
    )
    with ShopWorld(config) as world:
        yield world


def settings(**kw: Any) -> FetchSettings:
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("explore_rate", 0.0)
    kw.setdefault("fetch_timeout_s", 20)
    return FetchSettings(**kw)


def run(st: FetchSettings, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Run fetches in order on one Fetcher (one event loop), then close it."""

    async def go() -> list[Any]:
        async with Fetcher(st) as f:
            out = [await f.fetch(url, **kw) for url, kw in calls]
            out.append(f)
            return out

    return asyncio.run(go())


def browsers_gone(timeout_s: float = 15.0) -> bool:
    """True once no browser started by this process runs (they exit a little after close)."""
    deadline = time.monotonic() + timeout_s
    while browser_tree_memory()["processes"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def methods_of(result: Any) -> list[str]:
    return [a.method for a in result.attempts]


# -- http (curl_cffi) ---------------------------------------------------------------------------


def test_http_sends_one_browsers_consistent_headers(shops: ShopWorld):
    r, _ = run(settings(), (shops["plain"].url("/__sim/echo"), {"method": "http"}))
    assert r.success and r.method_used == "http"
    headers = dict((k.lower(), v) for k, v in json.loads(r.content)["headers"])
    ua = headers["user-agent"]
    major = re.search(r"Chrome/(\d+)", ua).group(1)
    assert f'v="{major}"' in headers["sec-ch-ua"]
    assert headers["sec-fetch-mode"] == "navigate" and "accept-language" in headers
    assert "upgrade" not in headers  # plain http goes out as a browser does: HTTP/1.1


def test_http_through_the_socks_proxy_reaches_the_socks_only_shop(shops: ShopWorld):
    onion = shops["onion"].catalog_url(1)
    direct, proxied, _ = run(
        settings(retries=0),
        (onion, {"method": "http"}),
        (onion, {"method": "http", "proxy": shops.socks_proxy, "selectors": ["li.product"]}),
    )
    assert not direct.success and direct.error_type == ErrorType.BLOCKED
    assert "1020" in direct.blocked_reason
    assert proxied.success and proxied.attempts[0].proxy == shops.socks_proxy


def test_http_gets_no_content_from_challenge_or_captcha_pages(shops: ShopWorld):
    challenge, captcha, _ = run(
        settings(),
        (shops["guarded"].catalog_url(1), {"method": "http"}),
        (shops["captcha"].catalog_url(1), {"method": "http"}),
    )
    for r in (challenge, captcha):
        assert not r.success and r.error_type == ErrorType.BLOCKED and r.content == b""
    assert "challenge" in challenge.blocked_reason
    assert captcha.status == 200 and "recaptcha" in captcha.blocked_reason


def test_429_is_retried_after_retry_after(shops: ShopWorld):
    shop = shops["limited"]
    calls = [(shop.catalog_url(i), {"method": "http", "use_cache": False}) for i in (1, 2, 3, 4, 5)]
    *results, _ = run(settings(), *calls)
    assert all(r.success for r in results)
    limited = [a for r in results for a in r.attempts if a.error_type == ErrorType.RATE_LIMITED]
    assert limited and all(a.retry_after == 1.0 for a in limited)
    stats = shops.stats("limited")
    assert stats["rate_limited"] == len(limited)
    assert stats.get("early_retries", 0) == 0  # no request came before Retry-After ran out


def test_slow_pages_time_out_and_flaky_pages_are_retried(shops: ShopWorld):
    slow = shops["slow"].catalog_url(1)
    timed_out, ok, _ = run(
        settings(retries=0),
        (slow, {"method": "http", "timeout_s": 0.3}),
        (slow, {"method": "http", "timeout_s": 5}),
    )
    assert timed_out.error_type == ErrorType.TIMEOUT and ok.success
    flaky = [(shops["flaky"].catalog_url(p), {"method": "http"}) for p in (1, 2, 3, 4, 5)] * 2
    *results, _ = run(settings(retries=5, backoff_s=0.01), *flaky)
    assert all(r.success for r in results)
    errors = [a for r in results for a in r.attempts if a.error_type == ErrorType.SERVER_ERROR]
    assert errors  # some 5xx happened and were retried


def test_api_pages_through_json_with_a_token_from_the_environment(
    shops: ShopWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    shop = shops["market"]
    spec = ApiSpec(
        url_template=shop.base_url + "/api/products?page={page}",
        auth_env="FF_TEST_SHOP_TOKEN",
        pagination="page",
        max_pages=10,
    )
    url = shop.catalog_url(1)
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("FF_TEST_SHOP_TOKEN", raising=False)
    no_token, _ = run(settings(), (url, {"country": "India", "api": spec}))
    assert no_token.success and methods_of(no_token) == ["api", "http"]
    assert "FF_TEST_SHOP_TOKEN" in no_token.attempts[0].message
    monkeypatch.setenv("FF_TEST_SHOP_TOKEN", TOKEN)
    r, _ = run(settings(), (url, {"country": "India", "api": spec}))
    assert r.success and r.method_used == "api"
    doc = json.loads(r.content)
    assert doc["pages"] == 5 and doc["items"] == shop.products()
    assert TOKEN not in repr(r) + json.dumps(r.to_dict()) + caplog.text


def test_the_sync_fetch_entry_point(shops: ShopWorld):
    import fetchers

    r = fetchers.fetch(shops["plain"].catalog_url(3), method="http", selectors=["li.product"])
    assert r.success and r.status == 200 and r.method_used == "http"
    assert r.text.count('class="product"') == 20


# -- browsers -----------------------------------------------------------------------------------


def test_playwright_direct_through_a_proxy_blocked_and_captcha(shops: ShopWorld):
    require_tool(CHROMIUM, "chromium")
    sel = {"method": "playwright", "selectors": ["li.product"]}
    plain, onion, denied, captcha, _ = run(
        settings(retries=0),
        (shops["plain"].catalog_url(2), sel),
        (shops["onion"].catalog_url(1), {**sel, "proxy": shops.socks_proxy}),
        (shops["onion"].catalog_url(2), sel),
        (shops["captcha"].catalog_url(2), sel),
    )
    assert plain.success and plain.method_used == "playwright" and plain.status == 200
    assert plain.content.count(b'class="product"') == 20
    assert onion.success and onion.attempts[0].proxy == shops.socks_proxy
    # a hard block is recognised after a short grace, not after the 20 s timeout
    assert denied.error_type == ErrorType.BLOCKED and "1020" in denied.blocked_reason
    assert denied.attempts[0].ms < 8000
    assert captcha.success  # the captcha page's script reloads it within the grace


def test_cascade_passes_the_js_challenge_then_skips_http_for_the_domain(shops: ShopWorld):
    require_tool(CHROMIUM, "chromium")
    guarded = shops["guarded"]
    sel = {"selectors": ["li.product"], "country": "Malaysia"}
    first, second, other, _ = run(
        settings(handoff_cookies=False),
        (guarded.catalog_url(1), sel),
        (guarded.catalog_url(2), sel),
        (shops["plain"].catalog_url(1), sel),
    )
    assert first.success and methods_of(first) == ["http", "playwright"]
    assert first.attempts[0].error_type == ErrorType.BLOCKED and first.attempts[0].status == 503
    assert first.content.count(b'class="product"') == 20 and b"Just a moment" not in first.content
    assert second.success and methods_of(second) == ["playwright"]  # memory: http skipped
    assert methods_of(other) == ["http"]  # another domain starts cheap
    assert shops.stats("guarded")["cleared"] >= 2


def test_browser_cookies_and_user_agent_let_http_through(shops: ShopWorld):
    require_tool(CHROMIUM, "chromium")
    shop = shops["guarded2"]
    first, second, _ = run(
        settings(explore_rate=1.0),
        (shop.catalog_url(1), {"selectors": ["li.product"]}),
        (shop.catalog_url(2), {"selectors": ["li.product"]}),
    )
    assert methods_of(first) == ["http", "playwright"]
    assert second.success and methods_of(second) == ["http"] and second.attempts[0].explored


def test_selenium_passes_the_captcha_and_the_challenge(shops: ShopWorld):
    require_tool(CHROMIUM, "chromium")
    require_tool(CHROMEDRIVER, "chromium-driver")
    sel = {"method": "selenium", "selectors": ["li.product"]}
    captcha, challenge, onion, _ = run(
        settings(),
        (shops["captcha"].catalog_url(1), {"country": "Russia", "selectors": ["li.product"]}),
        (shops["guarded"].catalog_url(3), sel),
        (shops["onion"].catalog_url(1), {**sel, "proxy": shops.socks_proxy}),
    )
    assert onion.success and onion.content.count(b'class="product"') == 20
    assert captcha.success and methods_of(captcha) == ["selenium"]  # Russia starts there
    assert b"g-recaptcha" not in captcha.content
    assert challenge.success and challenge.status == 200
    assert challenge.content.count(b'class="product"') == 20


def test_playwright_memory_stays_bounded_over_many_pages(shops: ShopWorld):
    """30 pages, the browser relaunched every 10: the tree's memory does not grow.
    (bench/browser_memory.py measures 500 pages of both browsers.)"""
    require_tool(CHROMIUM, "chromium")
    shop = shops["plain"]
    assert browsers_gone(), "browsers of earlier tests are still running"

    async def go() -> tuple[list[int], int]:
        samples: list[int] = []
        st = settings(browser_relaunch_every=10, browser_pages=2)
        async with Fetcher(st) as f:
            for batch in range(6):
                pages = [shop.catalog_url(1 + (batch * 5 + i) % 5) for i in range(5)]
                results = await asyncio.gather(
                    *(
                        f.fetch(
                            u,
                            method="playwright",
                            selectors=["a.next, .page-count"],
                            use_cache=False,
                        )
                        for u in pages
                    )
                )
                assert all(r.success for r in results)
                samples.append(browser_tree_memory()["pss"])
            return samples, f.method("playwright").launches

    samples, launches = asyncio.run(go())
    mib = [s // 2**20 for s in samples]
    print(f"\nplaywright tree PSS (MiB) every 5 pages over 30 pages: {mib}")
    assert launches == 3
    assert max(samples) < 1.5 * 2**30
    assert max(samples[-3:]) < 1.6 * max(samples[:3])
    assert browsers_gone()  # closed with the fetcher
