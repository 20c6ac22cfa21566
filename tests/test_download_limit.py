"""`max_bytes` is enforced while a download arrives, for real: curl_cffi against the sim shop's
`/__sim/stream` on loopback. A body over the limit without Content-Length is cut off as soon
as the limit is passed (a 30-second stream ends in well under 5 s, a 50 MB one after a few
chunks); a Content-Length over the limit is refused before the body is read; a file under the
limit is stored as before; the scrape job records the refused files as `too_large` rows."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.jobs.scrape.kind import ScrapeExecutor
from engine.jobs.scrape.spec import parse_spec
from fetchers import Fetcher, FetchSettings
from fetchers.errors import ErrorType, TooLarge
from fetchers.result import FetchResult
from sim.shops import ShopsConfig, ShopSpec, ShopWorld, leaflet_pdf
from storage.scrape_rows import PageResult

pytestmark = pytest.mark.timeout(90)

LIMIT = 100_000
MB = 1024 * 1024


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(ShopsConfig((ShopSpec("files", "Malaysia", n_products=20),))) as world:
        yield world


def settings() -> FetchSettings:
    return FetchSettings(backoff_s=0.05, explore_rate=0.0, fetch_timeout_s=20, cache="off")


def fetch(url: str, **kw: Any) -> tuple[FetchResult, float]:
    """One fetch with the http method first (api after it: it must not be tried), timed."""

    async def go() -> tuple[FetchResult, float]:
        async with Fetcher(settings()) as f:
            began = time.monotonic()
            res = await f.fetch(url, method=["http", "api"], **kw)
            return res, time.monotonic() - began

    return asyncio.run(go())


def streamed(shops: ShopWorld) -> int:
    return int(shops.stats("files").get("stream_bytes", 0))


def stream_url(shops: ShopWorld, size: int, seconds: float = 0, length: bool = False) -> str:
    query = f"bytes={size}&seconds={seconds}" + ("&length=1" if length else "")
    return shops["files"].url(f"/__sim/stream?{query}")


def assert_too_large(res: FetchResult) -> None:
    assert not res.success and res.error_type == ErrorType.TOO_LARGE, res.error
    assert [a.method for a in res.attempts] == ["http"]  # final: no other method tried
    assert res.status == 200 and not res.content
    assert f"max_bytes {LIMIT:,}" in (res.error or "")
    with pytest.raises(TooLarge):
        res.raise_for_error()


def test_a_slow_stream_without_length_is_cut_off_at_once(shops: ShopWorld) -> None:
    before = streamed(shops)
    cut_before = shops.stats("files").get("streams_cut", 0)
    # 30 MB over 30 s, chunked: reading it all would take 30 s
    res, elapsed = fetch(stream_url(shops, 30 * MB, seconds=30), max_bytes=LIMIT)
    assert_too_large(res)
    assert elapsed < 5, elapsed
    received = res.attempts[-1].bytes
    assert LIMIT < received < LIMIT + MB
    assert f"transfer stopped at {received:,} bytes" in (res.error or "")
    assert "content-length" not in res.headers
    # The sim stops writing when we hang up: its stream ends early, long before the 30 s it
    # would take to send everything (a client that kept reading would not end it at all).
    deadline = time.monotonic() + 15
    while shops.stats("files").get("streams_cut", 0) < cut_before + 1:
        assert time.monotonic() < deadline, "the stream went on after the client hung up"
        time.sleep(0.05)
    assert streamed(shops) - before < LIMIT + 2 * MB


def test_a_large_fast_stream_without_length_is_cut_off(shops: ShopWorld) -> None:
    before = streamed(shops)
    res, elapsed = fetch(stream_url(shops, 50 * MB), max_bytes=LIMIT)
    assert_too_large(res)
    assert elapsed < 5, elapsed
    assert LIMIT < res.attempts[-1].bytes < LIMIT + MB
    time.sleep(0.5)
    assert streamed(shops) - before < 25 * MB  # far from the 50 MB a full read takes


def test_a_content_length_over_the_limit_is_refused_unread(shops: ShopWorld) -> None:
    res, elapsed = fetch(stream_url(shops, 30 * MB, seconds=30, length=True), max_bytes=LIMIT)
    assert_too_large(res)
    assert elapsed < 5, elapsed
    assert res.attempts[-1].bytes == 0
    assert res.headers["content-length"] == str(30 * MB)
    assert f"Content-Length {30 * MB:,} > max_bytes {LIMIT:,}" in (res.error or "")


def test_bodies_under_the_limit_arrive_whole(shops: ShopWorld) -> None:
    shop = shops["files"]
    pid = shop.products()[0]["id"]
    want = leaflet_pdf(shop.spec, pid)
    for url, body in [
        (shop.url(f"/files/{pid}.pdf"), want),  # with Content-Length
        (stream_url(shops, LIMIT), b"x" * LIMIT),  # chunked, exactly at the limit
        (stream_url(shops, LIMIT, length=True), b"x" * LIMIT),
    ]:
        limited, _ = fetch(url, max_bytes=LIMIT)
        plain, _ = fetch(url)  # no limit: the plain, unstreamed request
        for res in (limited, plain):
            assert res.success and res.status == 200, res.error
            assert res.content == body
            assert hashlib.sha256(res.content).digest() == hashlib.sha256(body).digest()
    over, _ = fetch(stream_url(shops, LIMIT + 1), max_bytes=LIMIT)
    assert over.error_type == ErrorType.TOO_LARGE


SPEC = """
name = "files"
entity_type = "product"
[[sources]]
country = "Malaysia"
start_urls = ["{base}/"]
[[files]]
css = "a.file"
max_bytes = {limit}
"""


def test_the_scrape_job_records_too_large_rows_and_stores_the_rest(
    shops: ShopWorld, tmp_path: Path
) -> None:
    shop = shops["files"]
    pid = shop.products()[0]["id"]
    leaflet = leaflet_pdf(shop.spec, pid)
    links = {
        "slow": stream_url(shops, 30 * MB, seconds=30),
        "big": stream_url(shops, 50 * MB),
        "announced": stream_url(shops, 30 * MB, seconds=30, length=True),
        "leaflet": shop.url(f"/files/{pid}.pdf"),
    }
    html = "".join(f'<a class="file" href="{u}">{k}</a>' for k, u in links.items()).encode()
    spec = parse_spec(SPEC.format(base=shop.base_url, limit=LIMIT))
    page = PageResult(url_id=1, url=shop.url("/"), depth=0, country="Malaysia", status="done")

    async def go() -> float:
        executor = ScrapeExecutor(spec, {"files_dir": str(tmp_path)}, Fetcher(settings()))
        began = time.monotonic()
        try:
            await executor._download(page, html, page.url)
        finally:
            await executor.aclose()
        return time.monotonic() - began

    elapsed = asyncio.run(go())
    assert elapsed < 10, elapsed
    rows = {row[0]: row for row in page.files}
    assert set(rows) == set(links.values())
    for kind in ("slow", "big", "announced"):
        _, path, sha, size, ctype, status, message, _ = rows[links[kind]]
        assert (path, sha, status, ctype) == (None, None, "too_large", "application/octet-stream")
        assert size == (30 * MB if kind == "announced" else None)  # unknown when cut off
        assert f"max_bytes {LIMIT:,}" in message
    _, path, sha, size, _, status, message, _ = rows[links["leaflet"]]
    assert (status, size, message) == ("stored", len(leaflet), None)
    assert sha == hashlib.sha256(leaflet).hexdigest()
    assert (tmp_path / path).read_bytes() == leaflet
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [Path(path).name]
