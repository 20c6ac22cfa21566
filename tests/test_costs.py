"""Cost accounting: the summary's cost equals what was fetched (pages, methods, the sim's
body sizes, direct or through a proxy); browser-seconds only for pages a browser fetched;
the browser time domain learning saved (fake methods, then the sim's JS challenge)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fetchers import Policy
from fetchers.errors import NetworkFailure
from sim.shops import ShopsConfig, ShopSpec, ShopWorld, catalog_html
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import cli_here, run_cli
from tests.keys import KEY_FILE as TEST_KEY_FILE
from tests.test_cascade import CHALLENGE, Fake, fetcher, ok, status

pytestmark = pytest.mark.timeout(240)

SHOPS = ShopsConfig(
    (
        ShopSpec("plain", "Malaysia", "none", 70, seed=8),  # 4 pages
        ShopSpec("socks", "Argentina", "socks_only", 45, seed=8),  # 3 pages
    )
)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(SHOPS) as world:
        yield world


KEY_FILE = str(TEST_KEY_FILE)
KEY_ENV = {"FETCHFLEET_SECRET_KEY_FILE": KEY_FILE}  # the CLI decrypts the proxies stored here


def spec(tmp_path: Path, country: str, url: str, methods: str = "") -> str:
    path = tmp_path / f"{country}.toml"
    path.write_text(
        f'name = "c"\nentity_type = "product"\n{methods}\n[[sources]]\ncountry = "{country}"\n'
        f'start_urls = ["{url}"]\n[follow]\ncss = ["a.next"]\nmax_depth = 100\n'
        '[[extract]]\nlist = "li.product"\n[extract.fields]\nid = { attr = "data-id" }\n'
    )
    return str(path)


def rows(db: str, sql: str) -> list:
    database = open_database(db)
    try:
        with database.connect() as conn:
            return fetch_all(conn, sa.text(sql))
    finally:
        database.dispose()


# --- the cascade: which browser a page avoided -------------------------------------------------


def test_a_learned_order_skips_the_browser_and_says_so() -> None:
    """Policy playwright then http: playwright fails once, http wins; the next pages start
    with http (learned) and report the playwright they avoided."""
    pw = Fake("playwright", [NetworkFailure("down"), ok()], is_browser=True)
    http = Fake("http", [ok()])
    f = fetcher(pw, http, retries=0)
    f.policy = Policy.from_mapping({"_default": ["playwright", "http"]})

    async def go() -> list:
        return [await f.fetch(f"http://shop.test/p{i}") for i in range(3)]

    first, *later = asyncio.run(go())
    assert [a.method for a in first.attempts] == ["playwright", "http"]
    assert first.attempts[-1].avoided is None  # a browser was tried for it
    for r in later:
        assert [a.method for a in r.attempts] == ["http"] and r.attempts[0].avoided == "playwright"
    assert len(pw.requests) == 1


def test_cookies_a_browser_earned_spare_it_on_later_pages() -> None:
    """http is blocked until a browser passed the challenge on the domain; later pages by
    http avoided that browser; on another domain nothing was avoided."""
    http = Fake("http", [status(503, CHALLENGE), ok(), ok()])
    pw = Fake("playwright", [ok(cookies={"clearance": "x"}, ua="UA")], is_browser=True)
    f = fetcher(http, pw)

    async def go() -> list:
        out = [await f.fetch(f"http://a.test/{i}", method=["http", "playwright"]) for i in range(3)]
        out.append(await f.fetch("http://b.test/", method=["http", "playwright"]))
        return out

    first, second, third, other = asyncio.run(go())
    assert first.method_used == "playwright" and first.attempts[-1].avoided is None
    assert second.attempts[-1].avoided == third.attempts[-1].avoided == "playwright"
    assert other.method_used == "http" and other.attempts[-1].avoided is None


# --- a scrape's cost equals what it fetched --------------------------------------------------------


def test_cost_equals_the_pages_and_bytes_fetched_direct_and_through_a_proxy(
    shops: ShopWorld, tmp_path: Path
) -> None:
    plain = shops["plain"]
    db = f"duckdb:///{tmp_path / 'c.duckdb'}"
    out = run_cli(
        "scrape", "--spec", spec(tmp_path, "Malaysia", plain.catalog_url(1)), "--db", db,
        "--json", "--methods", "http", "--workers", "1", env=KEY_ENV, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cost = json.loads(out.stdout)["cost"]
    pages = plain.spec.pages
    body = sum(len(catalog_html(plain.spec, p)) for p in range(1, pages + 1))
    assert cost["requests"] == {"http": pages} and cost["pages"] == pages
    assert cost["bytes"] == {"direct": body, "proxy": 0, "tor": 0}
    assert cost["browser_s"] == 0 and cost["saved_pages"] == 0
    assert cost["stored"] == plain.spec.n_products
    assert cost["per_stored"]["bytes"] == pytest.approx(body / plain.spec.n_products, abs=0.1)
    assert cost["per_stored"]["requests"] == pytest.approx(pages / plain.spec.n_products, abs=1e-4)
    assert [d["domain"] for d in cost["domains"]] == [plain.url("/").split("/")[2]]
    human = cli_here("status", "--db", db, "1").stdout
    assert f"requests http {pages}" in human and "per stored entity (70)" in human

    # through the stored SOCKS proxy: the same bytes, counted as proxied
    from fetchers.proxy_parse import parse_proxy_line
    from storage.proxies import upsert_proxies
    from storage.secrets import SecretBox

    socks = shops["socks"]
    database = open_database(db)
    box = SecretBox.load(None, Path(KEY_FILE))
    with database.begin() as conn:
        upsert_proxies(conn, [parse_proxy_line(shops.socks_proxy)], box, source="test")
        conn.execute(sa.text("UPDATE proxies SET status = 'active', protocol = 'socks5'"))
    database.dispose()
    out = run_cli(
        "scrape", "--spec", spec(tmp_path, "Argentina", socks.catalog_url(1)), "--db", db,
        "--json", "--methods", "http", "--proxies", "active", "--workers", "1",
        env=KEY_ENV, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cost = json.loads(out.stdout)["cost"]
    body = sum(len(catalog_html(socks.spec, p)) for p in range(1, socks.spec.pages + 1))
    assert cost["requests"] == {"http": socks.spec.pages}
    assert cost["bytes"] == {"direct": 0, "proxy": body, "tor": 0}


# --- browser-seconds: only for pages a browser fetched -----------------------------------------


def test_browser_seconds_only_for_browser_pages_and_the_time_learning_saved(
    tmp_path: Path,
) -> None:
    from tests.conftest import require_tool

    require_tool("/usr/bin/chromium", "chromium")
    config = ShopsConfig((ShopSpec("guarded", "Malaysia", "js_challenge", 60, seed=4),))
    with ShopWorld(config) as world:
        shop = world["guarded"]
        db = f"duckdb:///{tmp_path / 'b.duckdb'}"
        out = run_cli(
            "scrape", "--spec",
            spec(tmp_path, "Malaysia", shop.catalog_url(1), 'methods = ["http", "playwright"]'),
            "--db", db, "--json", "--workers", "1", "--concurrency", "2",
            env=KEY_ENV, timeout=180,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    cost = summary["cost"]
    assert summary["counts"]["outcomes"] == {"done": shop.spec.pages}
    per_page = rows(
        db,
        "SELECT u.url, u.method, coalesce(sum(f.ms) FILTER (WHERE f.method = 'playwright'), 0),"
        " count(f.avoided) FROM urls u JOIN fetch_logs f ON f.url = u.url GROUP BY 1, 2",
    )
    assert len(per_page) == shop.spec.pages
    for url, method, browser_ms, avoided in per_page:
        assert (browser_ms > 0) == (method == "playwright"), (url, method, browser_ms)
        assert avoided == (method == "http"), (url, method)  # http got in on its cookies
    browser_s = sum(r[2] for r in per_page) / 1000
    assert cost["browser_s"] == pytest.approx(browser_s, abs=1e-3) and browser_s > 0
    by_http = sum(1 for r in per_page if r[1] == "http")
    assert by_http >= 1 and cost["saved_pages"] == by_http
    mean = browser_s / rows(db, "SELECT count(*) FROM fetch_logs WHERE method = 'playwright'")[0][0]
    assert cost["saved_browser_s"] == pytest.approx(by_http * mean, abs=1e-3)
    assert cost["domains"][0]["saved_pages"] == by_http
