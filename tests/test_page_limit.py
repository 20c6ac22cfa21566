"""`max_page_bytes` bounds every page a method keeps: http and tor (curl, the transfer
stopped once the limit is passed), api (each page and the pages together) and the browsers'
HTML (Playwright `page.content()`, Selenium `page_source`). A page over it fails as the final
`too_large`, like a download over its `max_bytes`; pages under it arrive as before."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType
from fetchers.methods.api import ApiSpec
from fetchers.result import FetchResult
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from tests.conftest import require_tool

pytestmark = pytest.mark.timeout(120)

LIMIT = 100_000
MB = 1024 * 1024


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(ShopsConfig((ShopSpec("big", "Malaysia", n_products=100),))) as world:
        yield world


def settings(**kw: Any) -> FetchSettings:
    kw.setdefault("max_page_bytes", LIMIT)
    return FetchSettings(backoff_s=0.05, explore_rate=0.0, fetch_timeout_s=20, cache="off", **kw)


def fetch(url: str, st: FetchSettings, **kw: Any) -> tuple[FetchResult, float]:
    async def go() -> tuple[FetchResult, float]:
        async with Fetcher(st) as f:
            began = time.monotonic()
            res = await f.fetch(url, **kw)
            return res, time.monotonic() - began

    return asyncio.run(go())


def stream(shops: ShopWorld, size: int, **q: str) -> str:
    query = "&".join([f"bytes={size}", *(f"{k}={v}" for k, v in q.items())])
    return shops["big"].url(f"/__sim/stream?{query}")


def assert_too_large(res: FetchResult, method: str) -> None:
    assert not res.success and res.error_type == ErrorType.TOO_LARGE, res.error
    assert [a.method for a in res.attempts] == [method]  # final: no other method tried
    assert "max_page_bytes" in (res.error or "")
    assert not res.content


def test_http_stops_a_page_over_the_limit(shops: ShopWorld) -> None:
    before = int(shops.stats("big").get("stream_bytes", 0))
    res, elapsed = fetch(stream(shops, 50 * MB), settings(), method=["http", "api"])
    assert_too_large(res, "http")
    assert elapsed < 5, elapsed
    assert LIMIT < res.attempts[-1].bytes < LIMIT + MB
    time.sleep(0.5)
    assert int(shops.stats("big").get("stream_bytes", 0)) - before < 25 * MB
    announced, _ = fetch(stream(shops, 30 * MB, length="1"), settings(), method="http")
    assert_too_large(announced, "http")


def test_http_pages_under_the_limit_arrive_whole(shops: ShopWorld) -> None:
    res, _ = fetch(stream(shops, LIMIT), settings(), method="http", min_length=0)
    assert res.success and res.content == b"x" * LIMIT
    default, _ = fetch(stream(shops, 2 * MB), FetchSettings(cache="off"), method="http")
    assert default.success and len(default.content) == 2 * MB  # 10 MiB by default


def test_api_pages_are_bounded_one_by_one_and_together(shops: ShopWorld) -> None:
    one = ApiSpec(url_template=stream(shops, 5 * MB))
    res, elapsed = fetch(shops["big"].url("/"), settings(), method="api", api=one)
    assert_too_large(res, "api")
    assert elapsed < 5, elapsed

    paged = ApiSpec(
        url_template=shops["big"].base_url + "/api/products?page={page}",
        pagination="page",
        max_pages=100,
    )
    whole, _ = fetch(shops["big"].url("/"), settings(max_page_bytes=MB), method="api", api=paged)
    assert whole.success, whole.error
    doc = json.loads(whole.content)
    assert doc["pages"] == 5
    page_size = len(json.dumps({"items": doc["items"][:20]}))
    limit = max(1024, page_size * 2 + page_size // 2)  # 2.5 pages: the third one is too many
    res, _ = fetch(shops["big"].url("/"), settings(max_page_bytes=limit), method="api", api=paged)
    assert_too_large(res, "api")
    assert "pages together" in (res.error or "")


@pytest.mark.parametrize("method", ["playwright", "selenium"])
def test_browsers_refuse_a_page_over_the_limit(shops: ShopWorld, method: str) -> None:
    require_tool("/usr/bin/chromium", "chromium")
    if method == "selenium":
        require_tool("/usr/bin/chromedriver", "chromium-driver")
    res, _ = fetch(stream(shops, 3 * LIMIT, type="html"), settings(), method=method)
    assert_too_large(res, method)
    ok, _ = fetch(shops["big"].catalog_url(1), settings(), method=method, min_length=100)
    assert ok.success and b"li" in ok.content, ok.error
