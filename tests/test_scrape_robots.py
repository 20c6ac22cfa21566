"""robots.txt (Disallow, Crawl-delay, an unavailable file) and the page's own URL as a field
and as the entity's id, against the sim shops."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.jobs.scrape.kind import ScrapeExecutor
from engine.jobs.scrape.spec import SpecError, parse_spec
from fetchers.cascade import Fetcher, domain_of
from fetchers.config import FetchSettings
from fetchers.robots import MAX_CRAWL_DELAY_S
from sim.shops import ShopsConfig, ShopSpec, ShopWorld, shop_products
from storage.scrape_rows import PageResult, UrlItem
from tests.test_scrape import catalog_spec, cli, fetch_all_rows, stored, truth, write

SHOPS = ShopsConfig(
    (
        ShopSpec("no-products", "Malaysia", "none", 40, seed=5, robots_disallow="/product/"),
        ShopSpec("no-products-2", "Malaysia", "none", 40, seed=6, robots_disallow="/product/"),
        ShopSpec("robots-down", "Malaysia", "none", 40, seed=5, robots_status=503),
        ShopSpec("robots-gone", "Malaysia", "none", 40, seed=5, robots_status=404),
        ShopSpec("slow-please", "Malaysia", "none", 40, seed=5, robots_crawl_delay=7),
        ShopSpec("very-slow", "Malaysia", "none", 40, seed=5, robots_crawl_delay=1e6),
        ShopSpec("other-bots", "Malaysia", "none", 40, seed=5, robots_disallow="/",
                 robots_agent="otherbot"),
        ShopSpec("redirects", "Malaysia", "none", 40, seed=5),
    )
)  # fmt: skip


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(SHOPS) as world:
        yield world


def with_products(shops: ShopWorld, name: str, extra: str = "") -> str:
    """Catalog pages followed (entities from them), and every product link."""
    spec = catalog_spec([("Malaysia", shops[name].catalog_url(1))], extra)
    return spec.replace('css = ["a.next"]', 'css = ["a.next", "a.product-link"]')


def scrape(tmp_path: Path, spec: str, db: str, *more: str) -> dict:
    out = cli("scrape", "--spec", write(tmp_path, spec), "--db", db, "--json", "--workers", "1",
              *more)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_disallowed_pages_are_recorded_not_fetched_and_ignore_fetches_them(
    shops: ShopWorld, tmp_path: Path, db_url: str
) -> None:
    name = "no-products" if "duckdb" in db_url else "no-products-2"
    shop = shops[name]
    summary = scrape(tmp_path, with_products(shops, name), db_url)
    pages, n = shop.spec.pages, shop.spec.n_products
    assert summary["status"] == "completed"
    assert summary["counts"]["outcomes"] == {"done": pages, "disallowed": n}
    assert summary["counts"]["failed"] == 0  # a page robots.txt forbids is not a failure
    assert set(stored(db_url)) == set(truth(shops, name))  # the rest is scraped
    stats = shops.stats(name)
    assert stats.get("product_pages", 0) == 0  # never requested
    assert stats["robots"] == 1  # once per origin and run (one worker process)
    rows = fetch_all_rows(
        db_url, "SELECT url, error_type, error FROM urls WHERE status = 'disallowed'"
    )
    assert len(rows) == n
    assert all("/product/" in url and etype == "robots" for url, etype, _ in rows)
    assert rows[0][2] == f"disallowed by {shop.base_url}/robots.txt for fetchfleet"
    assert fetch_all_rows(db_url, "SELECT count(*) FROM errors")[0][0] == 0
    logged = fetch_all_rows(db_url, "SELECT count(*) FROM fetch_logs WHERE url LIKE '%/product/%'")
    assert logged[0][0] == 0

    again = scrape(tmp_path, 'robots = "ignore"\n' + with_products(shops, name), db_url)
    assert again["counts"]["outcomes"] == {"done": pages + n}
    assert shops.stats(name)["product_pages"] == n
    assert shops.stats(name)["robots"] == 1  # not asked at all


def test_unavailable_robots_txt_disallows_a_4xx_allows(shops: ShopWorld, tmp_path: Path) -> None:
    """5xx: the site could not say, nothing is fetched (Google's reading); 404: no rules."""
    db = f"duckdb:///{tmp_path / 'r.duckdb'}"
    down = scrape(tmp_path, with_products(shops, "robots-down"), db)
    assert down["counts"]["outcomes"] == {"disallowed": 1}
    assert shops.stats("robots-down").get("requests", 0) == 0
    assert shops.stats("robots-down")["robots"] >= 1  # with the cascade's retries
    (reason,) = fetch_all_rows(db, "SELECT error FROM urls WHERE status = 'disallowed'")[0]
    assert "robots.txt unavailable (HTTP 503)" in reason

    gone = scrape(tmp_path, with_products(shops, "robots-gone"), db)
    spec = shops["robots-gone"].spec
    assert gone["counts"]["outcomes"] == {"done": spec.pages + spec.n_products}
    # a group for another agent does not apply to us
    other = scrape(tmp_path, with_products(shops, "other-bots"), db)
    assert other["counts"]["outcomes"] == {"done": spec.pages + spec.n_products}


def _execute(spec_text: str, url: str) -> tuple[Fetcher, PageResult]:
    async def go() -> tuple[Fetcher, PageResult]:
        spec = parse_spec(spec_text)
        fetcher = Fetcher(FetchSettings(retries=0))
        ex = ScrapeExecutor(spec, {"files_dir": "/nonexistent"}, fetcher)
        try:
            _, _, data = await ex.execute(UrlItem(1, url, 0, "Malaysia"))
        finally:
            await ex.aclose()
        return fetcher, PageResult.from_wire(data["page"])

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("name", "delay"), [("slow-please", 7.0), ("very-slow", MAX_CRAWL_DELAY_S)]
)
def test_crawl_delay_becomes_the_domains_gap(shops: ShopWorld, name: str, delay: float) -> None:
    url = shops[name].catalog_url(1)
    fetcher, page = _execute(catalog_spec([("Malaysia", url)]), url)
    assert page.status == "done"
    domain = domain_of(url)
    assert fetcher.politeness.delay_for(domain) == delay
    assert fetcher.politeness.delay_for("elsewhere.test") == 0.0
    # the page's request start pushed the next start a whole delay on
    next_start = fetcher.politeness.next_start(domain)
    assert next_start is not None and next_start - time.monotonic() > delay - 5

    ignore = 'robots = "ignore"\n' + catalog_spec([("Malaysia", url)])
    fetcher, page = _execute(ignore, url)
    assert page.status == "done" and fetcher.politeness.delay_for(domain) == 0.0


PAGE_URL_SPEC = """
name = "page-url"
country = "Malaysia"
entity_type = "product"
start_urls = [{starts}]
[[extract]]
match = "/product/"
[extract.fields]
id = {{ page = "final_url", regex = "/product/([^/?#]+)$" }}
asked = {{ page = "url" }}
landed = {{ page = "final_url", type = "url" }}
name = "h1.name"
"""


def test_page_url_as_field_and_as_id(shops: ShopWorld, tmp_path: Path) -> None:
    shop = shops["redirects"]
    products = shop_products(shop.spec)[:5]
    starts = ", ".join(f'"{shop.url("/go/" + p["id"])}"' for p in products)
    db = f"duckdb:///{tmp_path / 'u.duckdb'}"
    summary = scrape(tmp_path, PAGE_URL_SPEC.format(starts=starts), db)
    assert summary["counts"]["outcomes"] == {"done": 5}
    got = stored(db)
    assert set(got) == {p["id"] for p in products}
    for p in products:
        row = got[p["id"]]
        assert row["asked"] == shop.url("/go/" + p["id"])
        assert row["landed"] == shop.url("/product/" + p["id"])
        assert row["name"] == p["name"]
    assert shops.stats("redirects")["redirects"] == 5

    # the page's URL on every entity of a list page
    spec = catalog_spec([("Malaysia", shop.catalog_url(1))]).replace(
        'category = ".category"', 'category = ".category"\npage_url = { page = "url" }'
    )
    db2 = f"duckdb:///{tmp_path / 'u2.duckdb'}"
    scrape(tmp_path, spec, db2)
    got = stored(db2)
    first = {p["id"] for p in shop_products(shop.spec)[: shop.spec.page_size]}
    assert {got[i]["page_url"] for i in first} == {shop.catalog_url(1)}
    assert {got[i]["page_url"] for i in set(got) - first} == {shop.catalog_url(2)}


def test_page_field_spec_errors() -> None:
    head = "name='x'\ncountry='M'\nstart_urls=['http://a/']\n[[extract]]\n[extract.fields]\n"
    with pytest.raises(SpecError, match=r"fields.id: .*page 'body': use one of url, final_url"):
        parse_spec(head + "id={page='body'}\n")
    with pytest.raises(SpecError, match=r"fields.id: .*give no css"):
        parse_spec(head + "id={page='url', css='a'}\n")
    with pytest.raises(SpecError, match=r"robots: "):
        parse_spec("robots='maybe'\n" + head + "id={page='url'}\n")


def test_an_unavailable_robots_txt_is_asked_again_after_the_hold_off(shops: ShopWorld) -> None:
    """Fetched once per origin while cached (concurrent checks share the fetch); the 5xx
    verdict lasts ``error_ttl_s``, then robots.txt is asked again."""
    from fetchers.robots import RobotsCache

    now = [0.0]
    url = shops["robots-down"].catalog_url(1)

    async def go() -> list[int]:
        async with Fetcher(FetchSettings(retries=0)) as fetcher:
            cache = RobotsCache(fetcher, "fetchfleet", error_ttl_s=300, clock=lambda: now[0])
            verdicts = await asyncio.gather(*(cache.check(url) for _ in range(5)))
            assert not any(v.allowed for v in verdicts)
            seen = [cache.fetches]
            now[0] = 299.0
            await cache.check(url)
            seen.append(cache.fetches)
            now[0] = 301.0
            await cache.check(url)
            seen.append(cache.fetches)
            return seen

    assert asyncio.run(go()) == [1, 1, 2]
