"""The scrape job end to end: specs against the sim shops, stored entities compared with the
sim's ground truth, files, bad specs, stop/resume, kill -9, proxies from storage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.api import submit_run, wait_run
from engine.runtime.coordinator import Coordinator
from engine.settings import Settings
from sim.shops import (
    HOSTILE_FILES,
    HOSTILE_LINKS,
    ShopsConfig,
    ShopSpec,
    ShopWorld,
    leaflet_pdf,
    shop_products,
)
from storage.bulk import fetch_all
from storage.db import open_database
from storage.scrape import entity_rows
from tests.conftest import cli_here, run_cli, start_cli
from tests.keys import KEY_FILE  # the CLI's and the in-process runs' key

FIELDS = ("name", "price", "sku", "category", "currency")

SHOPS = ShopsConfig(
    (
        ShopSpec("my-pharmacy", "Malaysia", "none", 100, seed=3),
        ShopSpec("in-market", "India", "none", 60, seed=3),
        ShopSpec("br-flaky", "Brazil", "flaky", 160, seed=3, error_rate=0.3),
        ShopSpec("id-slow", "Indonesia", "slow", 160, seed=3, latency_ms=300),
        ShopSpec("ar-socks", "Argentina", "socks_only", 40, seed=3),
        ShopSpec("my-hostile", "Malaysia", "none", 60, seed=3, hostile_links=True),
    )
)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(SHOPS) as world:
        yield world


KEY_ENV = {"FETCHFLEET_SECRET_KEY_FILE": str(KEY_FILE)}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``run_cli`` with this module's key (test_docs_crawl and test_scrape_robots use it)."""
    return run_cli(*args, env=KEY_ENV, timeout=timeout)


CATALOG_EXTRACT = """
[[extract]]
match = "/catalog"
list = "li.product"
[extract.fields]
id = { attr = "data-id" }
name = ".name"
price = { css = ".price", type = "float" }
currency = { css = ".price", attr = "data-currency" }
sku = { xpath = ".//span[@class='sku']/text()" }
category = ".category"
"""


def catalog_spec(sources: list[tuple[str, str]], extra: str = "") -> str:
    """A spec following `a.next` from page 1 of each (country, catalog URL)."""
    parts = ['name = "test"', 'entity_type = "product"']
    for country, url in sources:
        parts += ["[[sources]]", f'country = "{country}"', f'start_urls = ["{url}"]']
    parts += ["[follow]", 'css = ["a.next"]', "max_depth = 100", extra, CATALOG_EXTRACT]
    return "\n".join(parts)


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def truth(shops: ShopWorld, name: str) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in shop_products(shops[name].spec)}


def stored(
    db_url: str, country: str | None = None, entity_type: str = "product"
) -> dict[str, dict[str, Any]]:
    """The stored entities of a type by external id, each with its attributes."""
    db = open_database(db_url)
    try:
        with db.connect() as conn:
            rows = entity_rows(conn, entity_type, country)
    finally:
        db.dispose()
    return {r["external_id"]: r for r in rows}


def fetch_all_rows(db_url: str, sql: str, **params: Any) -> list[Any]:
    db = open_database(db_url)
    try:
        with db.connect() as conn:
            return fetch_all(conn, sa.text(sql), params)
    finally:
        db.dispose()


def scalar(db_url: str, sql: str, **params: Any) -> Any:
    return fetch_all_rows(db_url, sql, **params)[0][0]


# --- the ground truth ------------------------------------------------------------------------


def test_three_country_spec_stores_exactly_the_sims_products(
    shops: ShopWorld, tmp_path: Path, db_url: str
) -> None:
    names = {"Malaysia": "my-pharmacy", "India": "in-market", "Brazil": "br-flaky"}
    spec = catalog_spec([(c, shops[n].catalog_url(1)) for c, n in names.items()])
    out = cli(
        "scrape", "--spec", write(tmp_path, spec), "--db", db_url, "--json",
        "--concurrency", "16", "--batch-size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    pages = sum(shops[n].spec.pages for n in names.values())
    assert summary["status"] == "completed"
    assert summary["counts"]["outcomes"] == {"done": pages}
    assert summary["scrape"]["entities"] == 320
    assert set(summary["scrape"]["methods"]) == set(names)
    for country, name in names.items():
        want = truth(shops, name)
        got = stored(db_url, country)
        assert set(got) == set(want), country
        for pid, product in want.items():
            assert {f: got[pid][f] for f in FIELDS} == {f: product[f] for f in FIELDS}
    # each page stored once, every attempt logged (the flaky shop's 5xx retries included)
    assert scalar(db_url, "SELECT count(*) FROM urls WHERE status = 'done'") == pages
    assert scalar(db_url, "SELECT count(DISTINCT url) FROM urls") == pages
    assert scalar(db_url, "SELECT count(*) FROM fetch_logs") >= pages
    assert scalar(db_url, "SELECT count(*) FROM fetch_logs WHERE status >= 500") >= 1
    assert scalar(db_url, "SELECT count(*) FROM entity_attributes") == 320 * 6

    # a second run sees the same entities again: nothing new, nothing duplicated
    again = cli("scrape", "--spec", write(tmp_path, spec), "--db", db_url, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["scrape"] == {
        **json.loads(again.stdout)["scrape"],
        "entities": 320,
        "new_entities": 0,
    }
    assert scalar(db_url, "SELECT count(*) FROM entities") == 320
    assert scalar(db_url, "SELECT count(*) FROM entity_attributes") == 320 * 6


def test_detail_pages_and_leaflet_downloads(shops: ShopWorld, tmp_path: Path) -> None:
    shop = shops["in-market"]
    spec = f"""
name = "details"
country = "India"
entity_type = "product"
start_urls = ["{shop.catalog_url(1)}"]
[follow]
css = ["a.next", "a.product-link"]
[[extract]]
match = "/product/"
[extract.fields]
id = {{ css = ".product-detail", attr = "data-id" }}
name = "h1.name"
price = {{ css = ".price", type = "float" }}
stock = {{ css = ".stock", type = "bool" }}
[[files]]
css = "a.leaflet"
max_bytes = 100000
"""
    db = f"duckdb:///{tmp_path / 'd.duckdb'}"
    files_dir = tmp_path / "files"
    out = cli(
        "scrape", "--spec", write(tmp_path, spec), "--db", db, "--json",
        "--files-dir", str(files_dir),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    want = truth(shops, "in-market")
    got = stored(db)
    assert set(got) == set(want)
    assert all(got[i]["stock"] == ("true" if p["in_stock"] else "false") for i, p in want.items())
    assert json.loads(out.stdout)["scrape"]["files"] == 60
    db_ = open_database(db)
    with db_.connect() as conn:
        rows = fetch_all(
            conn,
            sa.text(
                "SELECT e.external_id, f.path, f.sha256, f.bytes FROM files f "
                "JOIN entities e ON e.id = f.entity_id WHERE f.status = 'stored'"
            ),
        )
    db_.dispose()
    assert len(rows) == 60
    for ext, path, sha, size in rows:
        data = leaflet_pdf(shop.spec, ext)
        assert sha == hashlib.sha256(data).hexdigest() and size == len(data)
        assert (files_dir / path).read_bytes() == data

    # a size limit below the file's: recorded as too_large, reported, nothing written
    small = spec.replace("max_bytes = 100000", "max_bytes = 100")
    db2 = f"duckdb:///{tmp_path / 'd2.duckdb'}"
    out = cli(
        "scrape", "--spec", write(tmp_path, small, "small.toml"), "--db", db2, "--json",
        "--files-dir", str(tmp_path / "none"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert scalar(db2, "SELECT count(*) FROM files WHERE status = 'too_large'") == 60
    assert scalar(db2, "SELECT count(*) FROM errors WHERE error_type = 'file_too_large'") == 60
    assert not (tmp_path / "none").exists()


def test_invalid_entities_are_reported_not_stored(shops: ShopWorld, tmp_path: Path) -> None:
    shop = shops["my-pharmacy"]
    pattern = r"^\d{1,2}\."  # prices under 100 pass
    spec = catalog_spec([("Malaysia", shop.catalog_url(1))], "") + (
        f"\n[validate]\nrequired = ['name']\npatterns = {{ price = '{pattern}' }}\n"
    )
    db = f"duckdb:///{tmp_path / 'i.duckdb'}"
    out = cli("scrape", "--spec", write(tmp_path, spec), "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    cheap = {i for i, p in truth(shops, "my-pharmacy").items() if float(p["price"]) < 100}
    assert 0 < len(cheap) < 100
    assert set(stored(db)) == cheap
    assert scalar(
        db, "SELECT count(*) FROM errors WHERE error_type = 'invalid_entity'"
    ) == 100 - len(cheap)


def test_bad_specs_are_refused_with_the_place(shops: ShopWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'b.duckdb'}"
    good = catalog_spec([("Malaysia", shops["my-pharmacy"].catalog_url(1))])
    cases = {
        "name = 'x'\ncountry = = 'Malaysia'\n": "at line 2, column 11",  # TOML syntax
        good.replace("max_depth", "max_dept"): "follow.max_dept: unknown key",
        good.replace('list = "li.product"', 'list = "li..product"'): "CSS selector",
        good.replace(".//span[@class='sku']/text()", ".//span[@class="): "XPath",
        good.replace('type = "float"', 'type = "money"'): "type 'money'",
        good.replace('id = { attr = "data-id" }', ""): "id_field 'id'",
        "name = 'x'\ncountry = 'Malaysia'\n" + CATALOG_EXTRACT: "start_urls",
        good.replace("http://", "ftp://"): "not an http(s) URL",
    }
    for i, (text, expected) in enumerate(cases.items()):
        run = cli if i == 0 else cli_here  # one real process (its exit code); the rest here
        out = run("scrape", "--spec", write(tmp_path, text), "--db", db)
        assert out.returncode == 2, (expected, out.stderr)
        assert expected in out.stderr, (expected, out.stderr)
    out = cli_here("scrape", "--spec", write(tmp_path, good), "--db", db, "--country", "Peru")
    assert out.returncode == 2 and "--country Peru: the spec has sources for Malaysia" in out.stderr
    out = cli_here("scrape", "--spec", str(tmp_path / "missing.toml"), "--db", db)
    assert out.returncode == 2 and "no such spec file" in out.stderr


def test_proxies_from_storage_reach_a_socks_only_site(shops: ShopWorld, tmp_path: Path) -> None:
    """Routed through the validated pool (here: the shop world's SOCKS proxy stored as an
    active proxy) the SOCKS-only shop answers; without it every page is access-denied."""
    from storage.proxies import upsert_proxies

    shop = shops["ar-socks"]
    db = f"duckdb:///{tmp_path / 'p.duckdb'}"
    spec = write(tmp_path, catalog_spec([("Argentina", shop.catalog_url(1))]))
    direct = cli("scrape", "--spec", spec, "--db", db, "--json", "--methods", "http")
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["counts"]["outcomes"] == {"blocked": 1}
    assert stored(db) == {}

    from fetchers.proxy_parse import parse_proxy_line
    from storage.secrets import SecretBox

    database = open_database(db)
    box = SecretBox.load(None, KEY_FILE)
    with database.begin() as conn:
        upsert_proxies(conn, [parse_proxy_line(shops.socks_proxy)], box, source="test")
        conn.execute(sa.text("UPDATE proxies SET status = 'active', protocol = 'socks5'"))
    database.dispose()
    routed = cli(
        "scrape", "--spec", spec, "--db", db, "--json", "--methods", "http",
        "--proxies", "active", "--strategy", "round_robin",
    )  # fmt: skip
    assert routed.returncode == 0, routed.stderr
    assert json.loads(routed.stdout)["counts"]["outcomes"] == {"done": shop.spec.pages}
    assert set(stored(db)) == set(truth(shops, "ar-socks"))
    proxy = scalar(db, "SELECT max(proxy) FROM fetch_logs WHERE run_id = 2")
    assert proxy and proxy.startswith("socks5://127.0.0.5:")


def test_hostile_links_are_errors_of_their_link_not_of_the_run(
    shops: ShopWorld, tmp_path: Path, db_url: str
) -> None:
    """Every catalog page carries links that do not parse (followed) and files in schemes no
    method speaks: each is recorded as an error of its page, every page and product is
    stored, and the run completes (it used to wedge: the page's result was unstorable and
    took the whole flush down with it, on every retry)."""
    shop = shops["my-hostile"]
    spec = (
        catalog_spec([("Malaysia", shop.catalog_url(1))]).replace(
            'css = ["a.next"]', 'css = ["a.next", "a.bad-link"]'
        )
        + '\n[[files]]\ncss = "a.bad-file"\n'
    )
    db = open_database(db_url)
    s = Settings(
        workers=2, concurrency=4, batch_size=1, heartbeat_s=0.5, lease_s=10.0,
        retry_backoff_s=0.2, secret_key_file=KEY_FILE,
    )  # fmt: skip
    coord = Coordinator(db, s).start()
    try:
        params = {"spec": write(tmp_path, spec), "files_dir": str(tmp_path / "files")}
        run_id = submit_run(db, s, "scrape", params, coord.name)
        summary = wait_run(db, run_id, timeout_s=120)
    finally:
        coord.shutdown()
        db.dispose()
    pages = shop.spec.pages
    assert summary["status"] == "completed", summary
    assert summary["counts"]["outcomes"] == {"done": pages}
    want = truth(shops, "my-hostile")
    got = stored(db_url)
    assert set(got) == set(want)
    assert all({f: got[i][f] for f in FIELDS} == {f: p[f] for f in FIELDS} for i, p in want.items())
    assert scalar(db_url, "SELECT count(*) FROM urls") == pages  # no bad link registered
    # each hostile link is an error of its page: exactly these, nothing else
    bad = {"bad_link": HOSTILE_LINKS, "file_failed": HOSTILE_FILES}
    page_urls = [shop.catalog_url(i) for i in range(1, pages + 1)]
    want_errors = sorted(
        (t, u, link) for u in page_urls for t, links in bad.items() for link in links
    )
    got_errors = sorted(
        (t, key, next((link for link in bad.get(t, ()) if link in message), message))
        for t, key, message in fetch_all_rows(
            db_url, "SELECT error_type, item_key, message FROM errors"
        )
    )
    assert got_errors == want_errors
    want_files = sorted((u, link, "failed") for u in page_urls for link in HOSTILE_FILES)
    assert sorted(fetch_all_rows(db_url, "SELECT page_url, url, status FROM files")) == want_files
    assert not (tmp_path / "files").exists()


# --- stop, resume, kill -9 -------------------------------------------------------------------


def slow_spec(shops: ShopWorld, tmp_path: Path) -> str:
    """Catalog pages of the slow shop, then every product page (300 ms each)."""
    shop = shops["id-slow"]
    pages = ", ".join(f'"{shop.catalog_url(i)}"' for i in range(1, shop.spec.pages + 1))
    return write(
        tmp_path,
        f"""
name = "slow"
country = "Indonesia"
entity_type = "product"
start_urls = [{pages}]
[follow]
css = ["a.product-link"]
max_depth = 1
[[extract]]
match = "/product/"
[extract.fields]
id = {{ css = ".product-detail", attr = "data-id" }}
name = "h1.name"
price = ".price"
""",
        "slow.toml",
    )


def check_slow_run(shops: ShopWorld, db: str, run_id: int) -> None:
    n = shops["id-slow"].spec.n_products
    pages = shops["id-slow"].spec.pages + n
    assert set(stored(db)) == set(truth(shops, "id-slow"))
    assert scalar(db, "SELECT count(*) FROM urls WHERE run_id = :r", r=run_id) == pages
    assert (
        scalar(db, "SELECT count(*) FROM urls WHERE status = 'done' AND run_id = :r", r=run_id)
        == pages
    )
    # every stored page's successful attempt is logged exactly once
    assert (
        scalar(
            db, "SELECT count(*) FROM fetch_logs WHERE error_type IS NULL AND run_id = :r", r=run_id
        )
        == pages
    )
    assert scalar(db, "SELECT count(*) FROM entities") == n
    assert scalar(db, "SELECT count(*) FROM entity_attributes") == n * 3


def start_slow(shops: ShopWorld, tmp_path: Path, db: str) -> subprocess.Popen[str]:
    return start_cli(
        "scrape", "--spec", slow_spec(shops, tmp_path), "--db", db, "--json",
        "--concurrency", "4", "--batch-size", "4",
    )  # fmt: skip


# Mid-run, whatever the machine's speed: the slow shop answers HELD_AFTER pages, then holds
# every later answer until the test has acted (stop, kill) and leaves `shops.holding`. The
# run cannot finish before the test acts, and the test acts only once it is under way.
HELD_AFTER = 20


def test_stop_from_another_terminal_then_resume(shops: ShopWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 's.duckdb'}"
    proc = None
    try:
        with shops.holding("id-slow", after=HELD_AFTER):
            proc = start_slow(shops, tmp_path, db)
            shops.wait_held("id-slow", alive=lambda: proc.poll() is None)
            stop = cli("stop", "--db", db, "1", timeout=60)
            assert stop.returncode == 0, stop.stderr
        out, err = proc.communicate(timeout=120)  # the held pages are answered: they finish
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    stopped = json.loads(out)
    assert stopped["status"] == "stopped"
    # at most the pages let through and those held in flight when the stop landed
    assert (
        stopped["counts"]["done"] < stopped["counts"]["total"] or stopped["counts"]["total"] < 168
    )
    resumed = cli("scrape", "--resume", "1", "--db", db, "--json", "--concurrency", "16")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    check_slow_run(shops, db, 1)


def test_kill_9_of_the_cli_then_resume(shops: ShopWorld, tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'k.duckdb'}"
    with shops.holding("id-slow", after=HELD_AFTER):
        proc = start_slow(shops, tmp_path, db)
        try:
            shops.wait_held("id-slow", alive=lambda: proc.poll() is None)
        finally:
            proc.kill()  # mid-run: it is waiting on a held page
            proc.communicate(timeout=30)
    resumed = cli("scrape", "--resume", "1", "--db", db, "--json", "--concurrency", "16")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    check_slow_run(shops, db, 1)


def test_kill_9_of_a_pool_worker_mid_scrape(shops: ShopWorld, tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    db = open_database(url)
    s = Settings(
        workers=2,
        concurrency=4,
        batch_size=4,
        heartbeat_s=0.5,
        lease_s=10.0,
        retry_backoff_s=0.2,
        secret_key_file=KEY_FILE,
    )
    coord = Coordinator(db, s).start()
    try:
        with shops.holding("id-slow", after=HELD_AFTER):
            run_id = submit_run(db, s, "scrape", {"spec": slow_spec(shops, tmp_path)}, coord.name)
            shops.wait_held("id-slow")
            victim, pid = next(iter(coord.pool.pids().items()))
            os.kill(pid, signal.SIGKILL)  # mid-run: the workers wait on held pages
        summary = wait_run(db, run_id, timeout_s=120)
        assert summary["status"] == "completed", summary
        assert [r[0] for r in coord.replaced] == [victim]
    finally:
        coord.shutdown()
        db.dispose()
    check_slow_run(shops, url, run_id)


# --- the cascade inside a scrape: browsers where needed --------------------------------------


def test_challenge_and_captcha_shops_pass_through_a_browser(tmp_path: Path) -> None:
    """http is blocked (JS challenge 503, captcha 200 page); Playwright gets through; no
    challenge or captcha page is ever stored as content; the block reasons are logged."""
    from tests.conftest import require_tool

    require_tool("/usr/bin/chromium", "chromium")
    config = ShopsConfig(
        (
            ShopSpec("my-guarded", "Malaysia", "js_challenge", 60, seed=4),
            ShopSpec("ru-apteka", "Russia", "captcha", 60, seed=4),
        )
    )
    with ShopWorld(config) as world:
        sources = [
            ("Malaysia", world["my-guarded"].catalog_url(1)),
            ("Russia", world["ru-apteka"].catalog_url(1)),
        ]
        spec = catalog_spec(sources).replace(
            'name = "test"', 'name = "guarded"\nmethods = ["http", "playwright"]'
        )
        db = f"duckdb:///{tmp_path / 'g.duckdb'}"
        out = cli(
            "scrape", "--spec", write(tmp_path, spec), "--db", db, "--json",
            "--workers", "1", "--concurrency", "4", timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["counts"]["outcomes"] == {"done": 6}
        for country, name in (("Malaysia", "my-guarded"), ("Russia", "ru-apteka")):
            assert set(stored(db, country)) == set(truth(world, name))
        methods = summary["scrape"]["methods"]
        # the browser gets through first; the cookies it earned then let http in (handoff)
        for country in ("Russia", "Malaysia"):
            assert methods[country].get("playwright", 0) >= 1, methods
            assert sum(methods[country].values()) == 3
        reasons = " ".join(summary["scrape"]["blocked_reasons"])
        assert "captcha" in reasons and "challenge" in reasons
    assert scalar(db, "SELECT count(*) FROM urls WHERE status <> 'done'") == 0
    assert scalar(db, "SELECT count(*) FROM entities") == 120


def test_api_source_with_token_from_the_environment(shops: ShopWorld, tmp_path: Path) -> None:
    """India's order starts with `api`: with the spec's [api] and its token variable set, one
    paginated API call brings every product; without the variable the method is unavailable
    and the cascade falls back to the HTML pages. The token is never stored."""
    config = ShopsConfig((ShopSpec("in-api", "India", "none", 70, seed=5, api_token="s3cr3t-tok"),))
    with ShopWorld(config) as world:
        base = world["in-api"].base_url
        spec = f"""
name = "india-api"
country = "India"
entity_type = "product"
start_urls = ["{base}/catalog?page=1"]
[api]
url_template = "{base}/api/products?page={{page}}"
auth_env = "FF_TEST_SHOP_TOKEN"
pagination = "page"
max_pages = 20
[follow]
css = ["a.next"]
[[extract]]
json_list = "items"
list = "li.product"
[extract.fields]
id = {{ attr = "data-id", json = "id" }}
name = {{ css = ".name", json = "name" }}
price = {{ css = ".price", json = "price", type = "float" }}
"""
        path = write(tmp_path, spec)
        db = f"duckdb:///{tmp_path / 'api.duckdb'}"
        token = {"FF_TEST_SHOP_TOKEN": "s3cr3t-tok"}
        out = run_cli("scrape", "--spec", path, "--db", db, "--json", env=token)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["scrape"]["methods"] == {"India": {"api": 1}}
        want = truth(world, "in-api")
        got = stored(db)
        assert set(got) == set(want)
        assert all(
            got[i]["name"] == p["name"] and got[i]["price"] == p["price"] for i, p in want.items()
        )

        db2 = f"duckdb:///{tmp_path / 'html.duckdb'}"
        out = run_cli("scrape", "--spec", path, "--db", db2, "--json")  # no token
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["scrape"]["methods"] == {"India": {"http": 4}}
        assert set(stored(db2)) == set(want)
    for url in (db, db2):
        database = open_database(url)
        with database.connect() as conn:
            for table in ("runs", "fetch_logs", "errors", "urls", "entity_attributes"):
                rows = fetch_all(conn, sa.text(f"SELECT * FROM {table}"))
                assert "s3cr3t-tok" not in repr(rows), table
        database.dispose()
