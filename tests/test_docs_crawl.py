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
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sim.docs import DOCS_DIR, DocsSite
from sim.nginx import NGINX
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


def read_site(docs: Path, start: str = "index.html") -> dict[str, Reading]:
    """Every page reachable from ``start`` by <a href> within ``docs`` (relative paths as
    written, resolved on disk), with its title and first heading; keyed by path."""
    pages: dict[str, Reading] = {}
    todo = [start]
    while todo:  # bounded: each file of the directory is read at most once
        path = todo.pop()
        if path in pages:
            continue
        parser = _Page()
        parser.feed((docs / path).read_text(encoding="utf-8"))
        parser.close()
        pages[path] = Reading(parser.title, parser.heading)
        for href in parser.hrefs:
            target = _local_target(href.strip(), path)
            if target and target not in pages and (docs / target).is_file():
                todo.append(target)
    return pages


def _local_target(href: str, here: str) -> str | None:
    """The .html file of the directory a relative href names, or None (another host, a
    scheme, a fragment of the page itself, a path leaving the directory)."""
    path = href.split("#", 1)[0].split("?", 1)[0]
    if not path or ":" in path.split("/", 1)[0] or path.startswith("/"):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(here), path))
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
    return read_site(DOCS_DIR)


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
