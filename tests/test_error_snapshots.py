"""Error snapshots: the first page of each distinct error kind of a run, kept with its HTML
and, when a browser fetched it, a screenshot; bounded, deduplicated across workers, shown
on Runs & errors and exported by `python -m engine.run snapshots`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fetchers.errors import ErrorType
from fetchers.snapshots import Snapshot, Snapshotter, fetch_kind, safe_url
from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from storage import runs as run_store
from storage import snapshots as snap_store
from storage.bulk import fetch_all
from storage.db import open_database
from storage.export import export
from storage.migrations import migrate
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- kinds and the per-worker snapshotter ----------------------------------------------------


@pytest.mark.parametrize(
    ("etype", "reason", "kind"),
    [
        (ErrorType.BLOCKED, "recaptcha, status 200", "blocked:recaptcha"),
        (ErrorType.BLOCKED, "access denied, status 403", "blocked:http_403"),
        (ErrorType.BLOCKED, "access denied, status 401 (cloudflare)", "blocked:http_401"),
        (
            ErrorType.BLOCKED,
            "cloudflare firewall (error 1020), status 403",
            "blocked:cloudflare_firewall",
        ),
        (
            ErrorType.BLOCKED,
            "captcha page (title 'security check'), status 200",
            "blocked:captcha_page",
        ),
        (ErrorType.RATE_LIMITED, "status 429 (cloudflare)", "rate_limited:http_429"),
        (ErrorType.INVALID, "selector not found: li.product", "validation:missing_selector"),
        (ErrorType.INVALID, "12 bytes, fewer than the minimum 500", "validation:too_short"),
        (ErrorType.INVALID, "not JSON: Expecting value", "validation:not_json"),
        (ErrorType.TIMEOUT, "no answer", None),
        (ErrorType.SERVER_ERROR, "status 503", None),
        (None, None, None),
    ],
)
def test_fetch_kinds(etype: ErrorType | None, reason: str | None, kind: str | None) -> None:
    assert fetch_kind(etype, reason) == kind


def test_snapshotter_keeps_each_kind_once_up_to_its_limit_and_no_secret() -> None:
    s = Snapshotter(limit=2, html_cap=10, png_cap=4)
    proxy = "http://bob:s3cret@127.0.0.9:8080"
    assert s.add("blocked:a", "http://u:pw@x.test/a", "http", "via s3cret", b"<p>s3cret-1234567</p>",
                 screenshot=b"12345", proxy=proxy)  # fmt: skip
    assert not s.add("blocked:a", "http://x.test/b", "http", "again", b"b")
    assert s.wants("blocked:b") and s.add("blocked:b", "http://x.test/c", "playwright", "", b"c",
                                          screenshot=b"1234")  # fmt: skip
    assert not s.wants("blocked:c")  # the limit
    first, second = s.take()
    assert s.take() == []
    assert first.url == "http://x.test/a" and first.message == "via ***"
    assert first.html == b"<p>***-123" and first.html_bytes == 21  # scrubbed, then cut
    assert first.screenshot is None  # over the PNG cap: dropped
    assert second.screenshot == b"1234"
    assert safe_url("https://a:b@h.test:8/x?q=1") == "https://h.test:8/x?q=1"


# --- storage: first writer wins, bounded, on both backends ---------------------------------


def _snap(kind: str, n: int = 0, png: bytes | None = None) -> tuple[Any, ...]:
    html = f"<b>{n}</b>".encode()
    return Snapshot(kind, f"http://x.test/{n}", "http", f"m{n}", html, 8, png).to_wire()


def test_store_keeps_the_first_per_kind_and_at_most_the_limit(db_url: str, tmp_path: Path) -> None:
    db = open_database(db_url)
    try:
        migrate(db)
        with db.begin() as conn:
            run_id = run_store.create_run(conn, "scrape", {}, "t")
            assert snap_store.add_snapshots(conn, run_id, [_snap("blocked:a", 1)], 3, "w1") == 1
        with db.begin() as conn:  # a second worker, the same kind and two new ones
            batch = [_snap("blocked:a", 2), _snap("blocked:b", 3, PNG_MAGIC + b"x"),
                     _snap("blocked:b", 4), _snap("validation:x", 5), _snap("blocked:c", 6)]  # fmt: skip
            assert snap_store.add_snapshots(conn, run_id, batch, 3, "w2") == 2
        with db.begin() as conn:  # a task executed twice: nothing twice
            assert snap_store.add_snapshots(conn, run_id, batch, 3, "w2") == 0
        with db.connect() as conn:
            rows = snap_store.list_snapshots(conn, run_id)
            assert [(r["kind"], r["url"]) for r in rows] == [
                ("blocked:a", "http://x.test/1"),
                ("blocked:b", "http://x.test/3"),
                ("validation:x", "http://x.test/5"),
            ]
            assert [r["has_screenshot"] for r in rows] == [False, True, False]
            full = snap_store.get_snapshot(conn, run_id, rows[1]["id"])
            assert full is not None and full["html"] == b"<b>3</b>"
            assert full["screenshot"] == PNG_MAGIC + b"x"
            assert snap_store.get_snapshot(conn, run_id + 1, rows[1]["id"]) is None
        # a table export carries the metadata; the bytes go out as files
        assert export(db, "error_snapshots", "csv", tmp_path / "s.csv", run_id=run_id) == 3
        header = (tmp_path / "s.csv").read_text().splitlines()[0]
        assert '"kind"' in header and '"html"' not in header and "screenshot" not in header
        with db.connect() as conn:
            assert snap_store.write_snapshots(conn, run_id, tmp_path / "files") == 3
        assert (tmp_path / "files" / "002-blocked-b.png").read_bytes() == PNG_MAGIC + b"x"
    finally:
        db.dispose()


def test_an_extraction_error_keeps_its_page(tmp_path: Path) -> None:
    """``execute`` raising after the fetch fails the page as before; the page it failed on
    travels with that failure as ``extraction_error:<class>``."""
    import asyncio

    from engine.jobs.scrape.kind import ScrapeExecutor
    from engine.jobs.scrape.spec import parse_spec
    from fetchers.result import FetchResult
    from storage.scrape_rows import PageResult, UrlItem

    class StubFetcher:
        snapshots = Snapshotter(limit=5)

        async def fetch(self, url: str, **kw: Any) -> FetchResult:
            body = b"<html><li class='product'>odd</li></html>"
            return FetchResult(url, True, 200, body, url, "http")

    spec = parse_spec(
        'name = "t"\nrobots = "ignore"\ncountry = "Malaysia"\nstart_urls = ["http://x.test/"]\n'
        '[[extract]]\nlist = "li.product"\n[extract.fields]\nid = ".id"\n',
        "t",
    )
    ex = ScrapeExecutor(spec, {"files_dir": str(tmp_path)}, StubFetcher())

    def boom(*a: Any, **kw: Any) -> None:
        raise LookupError("no such thing")

    ex._extract = boom  # type: ignore[method-assign]
    item = UrlItem(1, "http://u:pw@x.test/catalog", 0, "Malaysia")
    with pytest.raises(LookupError):
        asyncio.run(ex.execute(item))
    page = PageResult.from_wire(ex.error_data(item, "LookupError: no such thing")["page"])
    (snap,) = [Snapshot.from_wire(t) for t in page.snapshots]
    assert snap.kind == "extraction_error:LookupError" and snap.method == "http"
    assert snap.url == "http://x.test/catalog" and snap.message == "LookupError: no such thing"
    assert snap.html.startswith(b"<html><li") and snap.screenshot is None


# --- a scrape run over the sim shops, through the CLI ------------------------------------------

SHOPS = ShopsConfig(
    (
        ShopSpec("ru-captcha", "Russia", "captcha", 60, seed=5),
        ShopSpec("ar-denied", "Argentina", "socks_only", 60, seed=5),
        ShopSpec("my-open", "Malaysia", "none", 60, seed=5),
    )
)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(SHOPS) as world:
        yield world


@pytest.fixture(scope="module")
def key_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CLI's secret key in this module's own directory, not a path other runs share."""
    return {"FETCHFLEET_SECRET_KEY_FILE": str(tmp_path_factory.mktemp("key") / "secret.key")}


def spec_text(shops: ShopWorld) -> str:
    def urls(name: str) -> str:
        return json.dumps([shops[name].catalog_url(i) for i in (1, 2, 3)])

    return f"""name = "snapshots"
entity_type = "product"

[[sources]]
country = "Russia"
methods = ["http"]
start_urls = {urls("ru-captcha")}

[[sources]]
country = "Argentina"
methods = ["playwright"]
start_urls = {urls("ar-denied")}

[[sources]]
country = "Malaysia"
methods = ["http"]
start_urls = {urls("my-open")}

[validate]
patterns = {{ price = '^\\d{{1,2}}\\.' }}

[[extract]]
match = "/catalog"
list = "li.product"
[extract.fields]
id = {{ attr = "data-id" }}
name = ".name"
price = {{ css = ".price", type = "float" }}
"""


def rows(db: str, sql: str, **params: Any) -> list[Any]:
    database = open_database(db)
    try:
        with database.connect() as conn:
            return fetch_all(conn, sa.text(sql), params)
    finally:
        database.dispose()


@pytest.fixture(scope="module")
def scraped(
    shops: ShopWorld, tmp_path_factory: pytest.TempPathFactory, key_env: dict[str, str]
) -> tuple[str, int]:
    """One run (a pool worker, DuckDB: results reach the database over the pipe)."""
    from tests.conftest import require_tool

    require_tool("/usr/bin/chromium", "chromium")
    tmp = tmp_path_factory.mktemp("snap")
    (tmp / "spec.toml").write_text(spec_text(shops))
    db = f"duckdb:///{tmp / 's.duckdb'}"
    out = run_cli(
        "scrape", "--spec", str(tmp / "spec.toml"), "--db", db, "--json",
        "--workers", "1", "--concurrency", "4", env=key_env, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr  # blocked pages are outcomes: the run completes
    return db, json.loads(out.stdout)["run_id"]


def test_one_snapshot_per_kind_with_html_and_a_browsers_screenshot(
    scraped: tuple[str, int],
) -> None:
    db, run_id = scraped
    got = rows(
        db,
        "SELECT kind, method, url, message, html, screenshot, html_bytes FROM error_snapshots "
        "WHERE run_id = :r ORDER BY kind",
        r=run_id,
    )
    kinds = [r[0] for r in got]
    assert kinds == ["blocked:cloudflare_firewall", "blocked:recaptcha", "invalid_entity:price"]
    by = {r[0]: r for r in got}
    denied, captcha, invalid = (
        by["blocked:cloudflare_firewall"],
        by["blocked:recaptcha"],
        by["invalid_entity:price"],
    )
    assert denied[1] == "playwright" and "/catalog" in denied[2]
    assert b"Access denied" in bytes(denied[4]) and "1020" in denied[3]
    assert bytes(denied[5]).startswith(PNG_MAGIC)  # the browser's screenshot
    assert captcha[1] == "http" and captcha[5] is None  # curl: no screenshot
    assert b"g-recaptcha" in bytes(captcha[4])
    assert invalid[1] == "http" and b'class="product"' in bytes(invalid[4])
    assert "does not match" in invalid[3]
    assert all(len(bytes(r[4])) == r[6] for r in got)  # small pages: kept whole


def test_a_browser_screenshots_only_a_refused_page_of_a_kind_not_kept_yet(
    shops: ShopWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Playwright takes a screenshot while the page is open, only when the cascade says the
    answer would be snapshotted: not for a good page, not for a second page of a kind."""
    import asyncio

    from fetchers.cascade import Fetcher
    from fetchers.config import FetchSettings
    from fetchers.methods.playwright import PlaywrightMethod
    from tests.conftest import require_tool

    require_tool("/usr/bin/chromium", "chromium")
    monkeypatch.setattr("fetchers.methods._browser.BLOCK_GRACE_S", 0.2)  # a block stays one
    shots: list[bytes] = []

    class Counting(PlaywrightMethod):
        async def _screenshot(self, *args: Any) -> bytes | None:
            png = await super()._screenshot(*args)
            if png:
                shots.append(png)
            return png

    async def go() -> tuple[list[bool], list[Snapshot]]:
        settings = FetchSettings()
        snaps = Snapshotter(limit=5)
        methods = {"playwright": Counting(settings)}
        async with Fetcher(settings, methods=methods, snapshots=snaps) as f:
            urls = [shops["my-open"].catalog_url(1)] + [
                shops["ar-denied"].catalog_url(i) for i in (1, 2)
            ]
            ok = [(await f.fetch(u, method="playwright")).success for u in urls]
        return ok, snaps.take()

    ok, taken = asyncio.run(go())
    assert ok == [True, False, False]
    assert len(shots) == 1
    assert [(s.kind, s.method, s.status) for s in taken] == [
        ("blocked:cloudflare_firewall", "playwright", 403)
    ]
    assert taken[0].screenshot == shots[0] and shots[0].startswith(PNG_MAGIC)
    assert taken[0].url == shops["ar-denied"].catalog_url(1)


def test_postgresql_workers_write_theirs_bounded_by_the_setting(
    shops: ShopWorld, pg_url: str, tmp_path: Path, key_env: dict[str, str]
) -> None:
    """On PostgreSQL a pool worker stores its own results, snapshots with them: the first
    kind it meets is kept, and FETCHFLEET_ERROR_SNAPSHOTS=1 keeps no more than one."""
    text = spec_text(shops)
    start = text.index('[[sources]]\ncountry = "Argentina"')
    text = text[:start] + text[text.index('[[sources]]\ncountry = "Malaysia"') :]
    (tmp_path / "spec.toml").write_text(text)  # http only: the captcha shop, the open one
    out = run_cli(
        "scrape", "--spec", str(tmp_path / "spec.toml"), "--db", pg_url, "--json",
        "--workers", "1", "--concurrency", "4",
        env={**key_env, "FETCHFLEET_ERROR_SNAPSHOTS": "1"}, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = rows(pg_url, "SELECT kind, method, worker_id FROM error_snapshots")
    assert len(got) == 1 and got[0][0] in ("blocked:recaptcha", "invalid_entity:price")
    assert got[0][1] == "http" and got[0][2]


def test_snapshots_export_writes_files_and_an_index(
    scraped: tuple[str, int], tmp_path: Path, key_env: dict[str, str]
) -> None:
    db, run_id = scraped
    out = run_cli(
        "snapshots", str(run_id), "--db", db, "--out", str(tmp_path / "x"), "--json",
        env=key_env, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["snapshots"] == 3
    with (tmp_path / "x" / "index.csv").open() as f:
        index = list(csv.DictReader(f))
    assert sorted(r["kind"] for r in index) == [
        "blocked:cloudflare_firewall",
        "blocked:recaptcha",
        "invalid_entity:price",
    ]
    for r in index:
        html = (tmp_path / "x" / r["html_file"]).read_bytes()
        assert html.startswith(b"<!DOCTYPE html>") or b"<html" in html[:200]
        if r["kind"] == "blocked:cloudflare_firewall":
            assert (tmp_path / "x" / r["screenshot_file"]).read_bytes().startswith(PNG_MAGIC)
        else:
            assert r["screenshot_file"] == ""


def test_runs_page_lists_shows_and_offers_the_snapshots(
    scraped: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from console.resources import shutdown_all
    from console.testing import run_page, use_fresh_database

    db, _ = scraped
    url = use_fresh_database(tmp_path, monkeypatch)
    shutil.copy(db.removeprefix("duckdb:///"), url.removeprefix("duckdb:///"))
    try:
        at = run_page("pages/runs.py")
        assert not at.exception
        (table,) = [d.value for d in at.dataframe if "screenshot" in d.value.columns]
        assert sorted(table["kind"]) == [
            "blocked:cloudflare_firewall",
            "blocked:recaptcha",
            "invalid_entity:price",
        ]
        pick = at.selectbox(key="snapshot_pick")
        denied = next(o for o in pick.options if o.startswith("blocked:cloudflare_firewall"))
        pick.select(denied).run()
        assert not at.exception
        assert "Access denied" in at.code[0].value  # the source, escaped by st.code
        frames = [m.value for m in at.markdown if "<iframe" in m.value]
        assert len(frames) == 1 and 'sandbox=""' in frames[0]
        assert "&lt;h1&gt;Access denied" in frames[0]  # inside srcdoc, escaped
        images = [e for e in at.main if type(e).__name__ == "Image"]
        assert len(images) == 1
        assert {b.proto.label for b in at.get("download_button")} >= {"HTML", "Screenshot"}
    finally:
        shutdown_all()
