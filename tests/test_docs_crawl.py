"""A real site in the suite: Debian's ``postgresql-doc-15`` HTML (about a thousand pages, as
installed) served by nginx on loopback, crawled by ``specs/postgresql_docs.toml`` through the
CLI with the stealth HTTP method, and compared with an independent reading of the same files.

The reading shares nothing with the crawler: the standard library's ``html.parser`` (not
selectolax, not lxml), links resolved as file paths on disk (not ``urljoin``), a fragment or
query dropped, a link kept only when its file exists. Every reachable page must be stored
exactly once (and requested once, in nginx's own log), with its URL as the id, its <title>
and its first heading (h1–h6 in document order) equal to the reading's, both with
whitespace normalized the documented way: stripped, every run of whitespace (the no-break
space included) one space.

A second, small site adds a page of other spellings of the same pages (``./``, ``..`` in an
absolute link, escapes of unreserved characters in either case, a space and a non-ASCII
name written raw and escaped, an upper-case scheme and host, missing pages): each page is
stored once, under one URL, and a missing one fails with its 404.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from sim.docs import DOCS_DIR, DocsSite
from sim.nginx import NGINX, free_port
from tests.conftest import require_tool
from tests.test_scrape import cli, fetch_all_rows, stored, write

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "postgresql_docs.toml"
SPEC_START = "http://127.0.0.1:8480/index.html"
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


def normalize_space(text: str) -> str:
    """The documented normalization of an extracted text (README, Scraping)."""
    return " ".join(text.split())


class _Page(HTMLParser):
    """<a href>s, the <title>'s text and the first heading's text of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.title: str | None = None
        self.heading: str | None = None
        self._in: str | None = None  # "title" or the open heading's tag
        self._depth = 0  # the same tag nested inside the one being read
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.hrefs.append(href)
        if self._in is not None:
            self._depth += tag == self._in
            return
        if (tag == "title" and self.title is None) or (tag in HEADINGS and self.heading is None):
            self._in, self._depth, self._text = tag, 0, []

    def handle_endtag(self, tag: str) -> None:
        if tag != self._in:
            return
        if self._depth:
            self._depth -= 1
            return
        text = normalize_space("".join(self._text))
        if tag == "title":
            self.title = text
        else:
            self.heading = text
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._text.append(data)


@dataclass(frozen=True)
class Reading:
    title: str | None
    heading: str | None


@dataclass
class Site:
    """What the reading found: pages by path (as on disk), and the .html paths linked but
    not there."""

    pages: dict[str, Reading]
    broken: set[str]

    def urls(self, origin: str) -> dict[str, Reading]:
        """The pages by the URL they have on ``origin`` (each path percent-encoded once)."""
        return {origin + "/" + quote(path): reading for path, reading in self.pages.items()}


def read_site(
    docs: Path, starts: tuple[str, ...] = ("index.html",), origin: str = "", max_depth: int = 100
) -> Site:
    """Every page reachable from ``starts`` by <a href> within ``docs``, with its title and
    first heading, breadth first up to ``max_depth`` links away. Links are resolved as the
    file system sees them (a path relative to the page, percent-decoded, ``.``/``..``
    applied); an absolute link counts when it is on ``origin``."""
    site = Site({}, set())
    todo = deque((path, 0) for path in starts)
    seen = set(starts)
    while todo:  # bounded: each file of the directory is read at most once
        path, depth = todo.popleft()
        parser = _Page()
        parser.feed((docs / path).read_text(encoding="utf-8"))
        parser.close()
        site.pages[path] = Reading(parser.title, parser.heading)
        if depth == max_depth:
            continue
        for href in parser.hrefs:
            target = _local_target(href.strip(), path, origin)
            if target is None or target in seen:
                continue
            seen.add(target)
            if (docs / target).is_file():
                todo.append((target, depth + 1))
            else:
                site.broken.add(target)
    return site


def _local_target(href: str, here: str, origin: str) -> str | None:
    """The .html file of the directory an href names, or None (another host or scheme, a
    fragment of the page itself, a path leaving the directory)."""
    href = href.split("#", 1)[0].split("?", 1)[0]
    if "://" in href[:8] or href.startswith("//"):
        scheme, _, rest = href.partition("//")
        host, _, path = rest.partition("/")
        if not origin or f"{scheme.lower()}//{host.lower()}" != origin:
            return None
        href = "/" + path
    elif not href or ":" in href.split("/", 1)[0]:
        return None
    path = unquote(href)
    base = "" if path.startswith("/") else posixpath.dirname(here)
    target = posixpath.normpath(posixpath.join(base, path.lstrip("/")))
    if target.startswith("..") or not target.endswith(".html"):
        return None
    return target


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocsSite]:
    require_tool(NGINX, "nginx")
    require_tool(str(DOCS_DIR / "index.html"), "postgresql-doc-15")
    with DocsSite(tmp_path_factory.mktemp("docs-nginx")) as site:
        yield site


@pytest.fixture(scope="session")
def truth() -> dict[str, Reading]:
    require_tool(str(DOCS_DIR / "index.html"), "postgresql-doc-15")
    site = read_site(DOCS_DIR)
    assert site.broken == set()  # the package's links all lead somewhere
    return site.pages


def test_reading_the_docs_finds_about_a_thousand_pages(truth: dict[str, Reading]) -> None:
    """The reading itself: the package's pages, each titled, all but one with a heading."""
    pages = truth
    assert len(pages) > 1000
    index = pages["index.html"]  # "PostgreSQL 15.x Documentation", its <title> and <h1>
    assert index.title and index.title.startswith("PostgreSQL 15") and index.heading == index.title
    assert pages["tutorial-start.html"] == Reading(
        "Chapter 1. Getting Started", "Chapter 1. Getting Started"
    )
    assert all(r.title for r in pages.values())
    assert [p for p, r in pages.items() if not r.heading] == ["legalnotice.html"]


@pytest.mark.slow
def test_crawl_of_the_postgresql_docs_matches_an_independent_reading(
    docs_site: DocsSite, truth: dict[str, Reading], tmp_path: Path
) -> None:
    spec = SPEC.read_text().replace(SPEC_START, docs_site.url("/index.html"))
    assert spec != SPEC.read_text()
    db = f"duckdb:///{tmp_path / 'docs.duckdb'}"
    began = time.monotonic()
    out = cli(
        "scrape", "--spec", write(tmp_path, spec), "--db", db, "--json",
        "--workers", "2", "--concurrency", "16", "--batch-size", "20", timeout=300,
    )  # fmt: skip
    took = time.monotonic() - began
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    print(f"\n{len(truth)} pages crawled in {took:.1f} s")

    want = {docs_site.url("/" + path): reading for path, reading in truth.items()}
    assert summary["status"] == "completed"
    assert summary["counts"]["outcomes"] == {"done": len(want)}
    assert summary["scrape"]["entities"] == summary["scrape"]["new_entities"] == len(want)

    # every reachable page once in the run's registry, and nothing else
    urls = fetch_all_rows(db, "SELECT url, status FROM urls")
    assert Counter(u for u, _ in urls) == Counter(set(want)), "URLs stored more than once"
    assert set(u for u, _ in urls) ^ set(want) == set()
    assert {s for _, s in urls} == {"done"}

    # one entity a page, its URL the id, every field right
    got = stored(db, entity_type="doc_page")
    assert set(got) ^ set(want) == set()
    wrong = {
        url: (fields, (url, r.title, r.heading))
        for url, r in want.items()
        if (fields := (got[url]["url"], got[url]["title"], got[url].get("heading")))
        != (url, r.title, r.heading)
    }
    assert not wrong, f"{len(wrong)} pages differ, e.g. {list(wrong.items())[:3]}"

    # nginx's word: each page requested once, answered 200; robots.txt asked (404: allowed)
    hits = docs_site.hits()
    pages = Counter(uri for uri, _ in hits if uri != "/robots.txt")
    assert pages == Counter({"/" + path: 1 for path in truth})
    assert {s for uri, s in hits if uri != "/robots.txt"} == {200}
    assert {s for uri, s in hits if uri == "/robots.txt"} == {404}


# Other spellings of the same pages: what real sites write besides the docs' plain names.
# nginx (as most servers) decodes escapes and applies dot segments, so each line here reaches
# a page under another spelling; the crawler must store each page once, under one URL.
VARIANTS = """<html><head><title>Link&nbsp;variants &amp; their pages</title></head><body>
<h2>  Same   pages,
 other spellings </h2>
<a href="./tutorial-start.html">dot segment</a>
<a href="sub/../tutorial-install.html">dot-dot, relative</a>
<a href="{origin}/nowhere/../tutorial-sql.html">dot-dot in an absolute link</a>
<a href="{origin}/./tutorial-arch.html">dot in an absolute link</a>
<a href="%74utorial-concepts.html">an unreserved letter escaped</a>
<a href="tutorial%2dtable.html">an unreserved escape in lower case</a>
<a href="tutorial-table.html">and as written</a>
<a href="read me.html">a space as written</a>
<a href="read%20me.html#top">a space escaped, with a fragment</a>
<a href="caf\u00e9.html">a non-ASCII name as written</a>
<a href="caf%c3%a9.html">and escaped in lower case</a>
<a href="HTTP://{host}/tutorial-select.html">scheme and host in upper case</a>
<a href="missing-page.html">a page that is not there</a>
<a href="Tutorial-Start.html">another case: another (missing) file</a>
<a href="mailto:docs@example.org">mail</a> <a href="#top">this page</a>
</body></html>
"""
EXTRA_PAGE = "<html><head><title>{0}</title></head><body><h1>{0}</h1></body></html>"


def test_other_spellings_of_the_same_pages_are_one_page_each(tmp_path: Path) -> None:
    require_tool(NGINX, "nginx")
    require_tool(str(DOCS_DIR / "index.html"), "postgresql-doc-15")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for page in DOCS_DIR.glob("tutorial-*.html"):
        (site_dir / page.name).symlink_to(page)
    (site_dir / "read me.html").write_text(EXTRA_PAGE.format("Read me"))
    (site_dir / "caf\u00e9.html").write_text(EXTRA_PAGE.format("Caf\u00e9"))
    with DocsSite(tmp_path / "nginx", site_dir, port=free_port()) as site:
        origin = site.url("")
        host = origin.removeprefix("http://").upper()
        (site_dir / "variants.html").write_text(VARIANTS.format(origin=origin, host=host))
        reading = read_site(site_dir, ("variants.html",), origin, max_depth=1)
        assert len(reading.pages) == 10 and reading.broken == {
            "missing-page.html", "Tutorial-Start.html"
        }  # fmt: skip
        want = reading.urls(origin)
        spec = SPEC.read_text().replace(SPEC_START, site.url("/variants.html"))
        spec = spec.replace("max_depth = 100", "max_depth = 1")  # variants.html and its links
        assert site.url("/variants.html") in spec and "max_depth = 1 " in spec
        db = f"duckdb:///{tmp_path / 'v.duckdb'}"
        out = cli("scrape", "--spec", write(tmp_path, spec), "--db", db, "--json",
                  "--workers", "1")  # fmt: skip
        hits = site.hits()
    assert out.returncode == 0, out.stderr[-3000:]
    urls = fetch_all_rows(db, "SELECT url, status, http_status FROM urls")
    assert sorted(u for u, s, _ in urls if s == "done") == sorted(want), "\n".join(map(str, urls))
    broken = {origin + "/" + quote(p) for p in reading.broken}
    assert {(u, s, h) for u, s, h in urls if s != "done"} == {(u, "failed", 404) for u in broken}
    got = stored(db, entity_type="doc_page")
    assert {u: (g["title"], g.get("heading")) for u, g in got.items()} == {
        u: (r.title, r.heading) for u, r in want.items()
    }
    assert got[site.url("/variants.html")]["title"] == "Link variants & their pages"
    assert got[site.url("/variants.html")]["heading"] == "Same pages, other spellings"
    served = Counter(uri for uri, status in hits if status == 200)
    assert sorted(served.values()) == [1] * len(want), served
