"""Scraping benchmark (issue 3): Fetchfleet's scrape job vs Scrapy and a bare asyncio client.

    python bench/scrape.py [--pages 2000,20000] [--repeat 1] [--quick]
                           [--skip scrapy,bare,fetchfleet,browsers] [--browser-pages 50]
                           [--out bench/out/scrape.json]

The workload: N product-list pages, 20 products each, in the sim shops' own HTML
(`sim.shops.catalog_html` of one `ShopSpec`, ground truth `shop_products`), written as static
files under a temp dir and served by Debian's nginx (a C server, one worker process, keep-alive,
no access log) on 127.0.0.1, so the server leaves the 2 cores to the client. Every contender
gets the same start-URL file and is timed from process start to exit, its process tree
sampled in /proc for peak RSS (the sum over the tree); the CPU nginx used and the CPU the
rest of the machine used meanwhile are read too:

* **fetchfleet** — `python -m engine.run scrape --json` as a user runs it: coordinator + local
  pool (--workers, --concurrency) + DuckDB in a temp dir, everything stored (entities,
  attributes, url registry, fetch logs); the stored rows are counted and checked afterwards;
* **scrapy** — Scrapy 2.19, a plain spider with the same selectors writing JSON lines
  (bench/scrapy_peer.py), default settings but 64 requests in flight;
* **bare** — aiohttp + selectolax (Lexbor) on uvloop, 64 in flight per process, nothing
  stored: the ceiling of a Python client, in 1 process and in 2 (the URL list split in two).

Every contender's entities are checked against the truth (ids and every field). Sizes give
the cost growth: seconds per 1,000 pages, peak MB, and the marginal rate between the smallest
and the largest size. Then, on the sim shop behind the JS challenge (`ShopWorld`), the
browser methods of `fetchers` (Playwright, Selenium: the system Chromium and ChromeDriver)
fetch --browser-pages catalog pages each, with cookie hand-off off so every page solves the
challenge (the browsers' worst case, as in bench/browser_memory.py): browser pages/s.

Other people's jobs share the machine: before each run the bench waits (--quiet-wait-s) for
it to be idle, and with --repeat the table shows each row's least disturbed run. Every run has
a hard timeout (its process group is killed); nginx is stopped on exit, Ctrl-C included. All
traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.validate import (  # noqa: E402  (one way of measuring for every bench)
    TreeSampler,
    _stat,
    code_state,
    run_sampled,
    wait_for_quiet,
)
from sim.nginx import NGINX, free_port, stop_nginx  # noqa: E402

PER_PAGE = 20
FIELDS = ("id", "name", "price", "currency", "sku", "category")
FF, SCRAPY, BARE1, BARE2 = "fetchfleet", "scrapy", "bare (1 proc)", "bare (2 procs)"


# --------------------------------------------------------------------------- the site


def truth_sum(products: list[dict[str, Any]]) -> int:
    """Order-free checksum of the entities' fields (the bare client stores nothing, so it
    reports this instead)."""
    return sum(zlib.crc32("\x1f".join(str(p[f]) for f in FIELDS).encode()) for p in products)


class Site:
    """`pages` static catalog pages (the sim shops' HTML) under root, served by nginx."""

    def __init__(self, root: Path, pages: int, seed: int, host: str = "127.0.0.1") -> None:
        from sim.shops import ShopSpec

        self.root = root
        self.host = host  # bench/fleet.py: an address the namespace hosts reach
        self.pages = pages
        self.spec = ShopSpec("bench", "Malaysia", n_products=PER_PAGE * pages, seed=seed)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def generate(self) -> float:
        from sim.shops import catalog_html

        began = time.monotonic()
        os.chmod(self.root, 0o755)  # nginx's worker runs as nobody when we are root
        www = self.root / "www" / "catalog"
        www.mkdir(parents=True, exist_ok=True)
        for k in range(1, self.pages + 1):
            (www / f"{k}.html").write_bytes(catalog_html(self.spec, k))
        return time.monotonic() - began

    def url(self, k: int) -> str:
        return f"http://{self.host}:{self.port}/catalog/{k}.html"

    def urls_file(self, n: int) -> Path:
        path = self.root / f"urls-{n}.txt"
        if not path.exists():
            path.write_text("".join(self.url(k) + "\n" for k in range(1, n + 1)))
        return path

    def truth(self, n: int) -> list[dict[str, Any]]:
        from sim.shops import shop_products

        return shop_products(self.spec)[: PER_PAGE * n]

    def start(self) -> None:
        self.port = free_port(self.host)
        conf = self.root / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
worker_rlimit_nofile 8192;
pid {self.root}/nginx.pid;
error_log {self.root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/html;
    types {{ text/html html; }}
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=20s;
    client_body_temp_path {self.root}/nginx-tmp/body;
    proxy_temp_path {self.root}/nginx-tmp/proxy;
    fastcgi_temp_path {self.root}/nginx-tmp/fastcgi;
    uwsgi_temp_path {self.root}/nginx-tmp/uwsgi;
    scgi_temp_path {self.root}/nginx-tmp/scgi;
    server {{
        listen {self.host}:{self.port} backlog=4096;
        root {self.root}/www;
    }}
}}
"""
        )
        (self.root / "nginx-tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.root), "-e", str(self.root / "nginx-error.log"),
             "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches us; we stop it
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(self.url(1), timeout=2) as resp:
                    if resp.status == 200 and b'class="product"' in resp.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                log = self.root / "nginx-error.log"
                err += log.read_text()[-500:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"nginx did not start: {err.strip()}")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        """CPU seconds of nginx's master and workers so far."""
        if self.proc is None:
            return 0.0
        total = 0.0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            st = _stat(int(name))
            if st and self.proc.pid in (int(name), st[0]):
                total += st[2]
        return total

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_nginx(proc)


# --------------------------------------------------------------------------- measuring


def pss(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Sampler(TreeSampler):
    """bench/validate.py's sampler (RSS every 0.1 s), the tree found every 0.5 s (not 1 s:
    the bare client's forked processes live a few seconds), and the tree's PSS every 0.5 s:
    a sum of RSS counts the pages a forked or spawned worker shares with its parent (and
    Chromium's processes with each other) once per process; PSS splits them."""

    peak_pss = 0

    def run(self) -> None:
        next_scan = 0.0
        while not self._done.is_set():
            if time.monotonic() >= next_scan:
                self._discover()
                self.peak_pss = max(self.peak_pss, sum(pss(pid) for pid in self.members))
                next_scan = time.monotonic() + 0.5
            rss = {pid: st[1] for pid in self.members if (st := _stat(pid))}
            self.peak_total = max(self.peak_total, sum(rss.values()))
            self.peak_root = max(self.peak_root, rss.get(self.root, 0))
            self.peak_child = max([self.peak_child, *(v for p, v in rss.items() if p != self.root)])
            self.peak_procs = max(self.peak_procs, len(rss))
            self._done.wait(0.1)


@dataclass
class Proc:
    code: int | None = None
    started: float = 0.0  # epoch
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the tree's user + system (wait4: the process and its reaped children)
    machine_busy_s: float = 0.0
    peak_tree_mb: float = 0.0  # sum of RSS over the tree
    peak_pss_mb: float = 0.0  # sum of PSS over the tree (sampled every 0.5 s)
    peak_root_mb: float = 0.0
    peak_child_mb: float = 0.0
    procs: int = 1
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""


def measure(cmd: list[str], env: dict[str, str], timeout_s: float) -> Proc:
    """bench/validate.py's run, with this bench's sampler (PSS too)."""
    res = Proc()
    watch, _ = run_sampled(cmd, env, timeout_s, res, Sampler)
    res.peak_pss_mb = watch.peak_pss / 2**20
    return res


@dataclass
class Row:
    contender: str
    pages: int
    entities: int = 0
    expected: int = 0
    seconds: float = 0.0  # process start to exit (browsers: the fetching itself)
    run_s: float = 0.0  # the fetching alone, as the contender reports it (no start-up/exit)
    wrong: int = 0  # entities missing or with a field unlike the truth
    nginx_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # the rest of the machine meanwhile (other people's jobs)
    proc: Proc = field(default_factory=Proc)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    @property
    def run_pages_per_s(self) -> float:
        return self.pages / self.run_s if self.run_s else 0.0

    @property
    def entities_per_s(self) -> float:
        return self.entities / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.note and not self.proc.timed_out and self.seconds > 0


def run_timeout(args: argparse.Namespace, pages: int) -> float:
    return args.run_timeout_s + pages / args.min_rate


def run_measured(
    row: Row, cmd: list[str], env: dict[str, str], site: Site, timeout_s: float
) -> Proc:
    nginx0 = site.cpu_s()
    proc = measure(cmd, env, timeout_s)
    row.proc = proc
    row.seconds = proc.wall_s
    row.nginx_cpu_s = site.cpu_s() - nginx0
    row.other_cpu_s = max(0.0, proc.machine_busy_s - proc.cpu_s - row.nginx_cpu_s)
    if proc.timed_out:
        row.note = f"timed out after {timeout_s:.0f}s"
    elif proc.code != 0:
        row.note = f"exit {proc.code}: {proc.stderr.strip()[-300:]}"
    return proc


def grade(row: Row, truth: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Entities found, and how many of the truth are missing or differ in a field."""
    row.entities = len(got)
    row.expected = len(truth)
    by_id = {str(g.get("id")): g for g in got}
    row.wrong = sum(
        1
        for p in truth
        if (g := by_id.get(p["id"])) is None
        or any(str(g.get(f) or "").strip() != str(p[f]) for f in FIELDS)
    )
    if len(by_id) != len(got):
        row.extra["duplicates"] = len(got) - len(by_id)


# --------------------------------------------------------------------------- scrapy


def run_scrapy(site: Site, n: int, args: argparse.Namespace, tmp: Path) -> Row:
    row = Row(SCRAPY, n)
    out = tmp / f"scrapy-{n}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(REPO / "bench" / "scrapy_peer.py"), str(site.urls_file(n)),
        str(out), "--concurrency", str(args.peer_concurrency),
    ]  # fmt: skip
    proc = run_measured(row, cmd, dict(os.environ), site, run_timeout(args, n))
    with contextlib.suppress(ValueError, IndexError, KeyError):
        row.extra["spider"] = json.loads(proc.stdout.strip().splitlines()[-1])
        _, began, ended = row.extra["spider"]["marks"]
        row.run_s = max(0.0, ended - began)
    got = []
    if out.exists():
        with out.open() as fh:
            got = [json.loads(line) for line in fh if line.strip()]
    grade(row, site.truth(n), got)
    out.unlink(missing_ok=True)
    return row


# --------------------------------------------------------------------------- bare client


async def _bare(urls: list[str], concurrency: int) -> dict[str, int]:
    import aiohttp
    from selectolax.lexbor import LexborHTMLParser

    counts = {"pages": 0, "entities": 0, "failed": 0, "checksum": 0}
    pending = iter(urls)

    def text(node: Any, css: str) -> str:
        hit = node.css_first(css)
        return hit.text() if hit is not None else ""

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for url in pending:
                try:
                    async with session.get(url) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            counts["failed"] += 1
                            continue
                except (aiohttp.ClientError, TimeoutError):
                    counts["failed"] += 1
                    continue
                for li in LexborHTMLParser(body).css("li.product"):
                    price = li.css_first(".price")
                    item = {
                        "id": li.attributes.get("data-id") or "",
                        "name": text(li, ".name"),
                        "price": price.text() if price is not None else "",
                        "currency": (price.attributes.get("data-currency") or "") if price else "",
                        "sku": text(li, ".sku"),
                        "category": text(li, ".category"),
                    }
                    counts["entities"] += 1
                    counts["checksum"] += zlib.crc32("\x1f".join(item.values()).encode())
                counts["pages"] += 1

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(urls)))))
    return counts


def _bare_process(urls: list[str], concurrency: int, out: Any) -> None:
    import uvloop

    out.send(uvloop.run(_bare(urls, concurrency)))
    out.close()


def bare_child(urls_file: str, procs: int, concurrency: int) -> None:
    """Inside the bare client's process: fetch and parse, store nothing, print the counts."""
    import multiprocessing

    ready = time.time()
    urls = Path(urls_file).read_text().split()
    began = time.time()
    if procs == 1:
        import uvloop

        parts = [uvloop.run(_bare(urls, concurrency))]
    else:
        ctx = multiprocessing.get_context("fork")
        pipes, children = [], []
        for i in range(procs):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_bare_process, args=(urls[i::procs], concurrency, tx))
            p.start()
            tx.close()
            pipes.append(rx)
            children.append(p)
        parts = [rx.recv() for rx in pipes]
        for p in children:
            p.join()
    total = {k: sum(part[k] for part in parts) for k in parts[0]}
    print(json.dumps({"marks": [ready, began, time.time()], **total}))


def run_bare(site: Site, n: int, procs: int, args: argparse.Namespace, tmp: Path) -> Row:
    row = Row(BARE1 if procs == 1 else BARE2, n)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--bare-child", str(site.urls_file(n)),
        "--bare-procs", str(procs), "--peer-concurrency", str(args.peer_concurrency),
    ]  # fmt: skip
    proc = run_measured(row, cmd, dict(os.environ), site, run_timeout(args, n))
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row.note = row.note or f"no result: {proc.stderr.strip()[-300:]}"
        return row
    truth = site.truth(n)
    row.entities, row.expected = res["entities"], len(truth)
    row.extra = res
    row.run_s = res["marks"][2] - res["marks"][1]
    # no storage, so no per-entity check: the entity count and a checksum of every field
    row.wrong = abs(len(truth) - res["entities"]) + (res["checksum"] != truth_sum(truth))
    if res["failed"]:
        row.note = f"{res['failed']} pages failed"
    return row


# --------------------------------------------------------------------------- fetchfleet


def ff_spec(site: Site, n: int, tmp: Path) -> Path:
    """The scrape spec (engine/jobs/scrape/spec.py) of the workload."""
    urls = site.urls_file(n)
    spec = tmp / f"spec-{n}.toml"
    spec.write_text(
        f"""name = "bench-{n}"
country = "Malaysia"
entity_type = "product"
start_urls_file = "{urls.name}"
methods = ["http"]
id_field = "id"

[[extract]]
list = "li.product"

[extract.fields]
id = {{ attr = "data-id" }}
name = ".name"
price = ".price"
currency = {{ css = ".price", attr = "data-currency" }}
sku = ".sku"
category = ".category"
"""
    )
    if spec.parent != urls.parent:
        raise RuntimeError("the spec must sit beside its URL file")
    return spec


def ff_available() -> str | None:
    """None when `engine.run scrape` exists here, else why not."""
    run = subprocess.run(
        [sys.executable, "-m", "engine.run", "scrape", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0:
        return f"not available (`engine.run scrape --help`: exit {run.returncode})"
    return None


def run_ff(site: Site, n: int, args: argparse.Namespace, tmp: Path) -> Row:
    row = Row(FF, n)
    db_path = tmp / f"ff-{n}-{time.monotonic_ns()}.duckdb"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        FETCHFLEET_DATA_DIR=str(tmp),
        FETCHFLEET_SECRET_KEY_FILE=str(tmp / "secret.key"),
    )
    env.pop("FETCHFLEET_DB", None)
    cmd = [
        sys.executable, "-m", "engine.run", "scrape", "--json",
        "--spec", str(ff_spec(site, n, site.root)), "--db", f"duckdb:///{db_path}",
        "--workers", str(args.workers), "--concurrency", str(args.concurrency),
    ]  # fmt: skip
    proc = run_measured(row, cmd, env, site, run_timeout(args, n))
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row.note = row.note or f"no JSON summary: {proc.stderr.strip()[-300:]}"
        return row
    row.extra["summary"] = summary
    row.run_s = float(summary.get("duration_s") or 0.0)
    if summary.get("status") != "completed":
        row.note = f"run {summary.get('status')}: {summary.get('error')}"
    if db_path.exists():
        stored, got = ff_stored(db_path)
        row.extra["stored"] = stored
        grade(row, site.truth(n), got)
        missing = [
            t for t in ("entities", "entity_attributes", "urls", "fetch_logs") if not stored.get(t)
        ]
        if missing:
            row.note = row.note or f"nothing stored in {', '.join(missing)}"
        with contextlib.suppress(OSError):
            row.extra["db_mb"] = round(db_path.stat().st_size / 2**20, 1)
        db_path.unlink(missing_ok=True)
    return row


def ff_stored(db_path: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Rows per table, and the stored entities as {field: value} dicts (storage/schema.py:
    entities keyed by external_id, one entity_attributes row per field)."""
    import duckdb

    con = duckdb.connect(str(db_path), read_only=True)
    try:
        stored = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("entities", "entity_attributes", "urls", "fetch_logs")
        }
        by: dict[str, dict[str, Any]] = {}
        for key, name, value in con.execute(
            "SELECT e.external_id, a.name, a.value FROM entities e "
            "LEFT JOIN entity_attributes a ON a.entity_id = e.id"
        ).fetchall():
            entity = by.setdefault(key, {"id": key})
            if name is not None:
                entity[name] = value
    finally:
        con.close()
    return stored, list(by.values())


# --------------------------------------------------------------------------- browsers


def browser_child(method: str, pages: int, out_path: str) -> None:
    """Inside one browser run: a sim shop behind the JS challenge, `pages` catalog pages
    through one fetch method, hand-off off (every page solves the challenge)."""
    from selectolax.lexbor import LexborHTMLParser

    from fetchers import Fetcher, FetchSettings
    from sim.shops import ShopsConfig, ShopSpec, ShopWorld

    config = ShopsConfig((ShopSpec("challenge", "Malaysia", "js_challenge", n_products=200),))
    result: dict[str, Any] = {"method": method, "pages": pages}

    async def main(world: ShopWorld) -> None:
        shop = world["challenge"]
        settings = FetchSettings(
            handoff_cookies=False, explore_rate=0.0, retries=1, fetch_timeout_s=30
        )
        gate = asyncio.Semaphore(settings.browser_pages)
        began = time.time()
        async with Fetcher(settings) as fetcher:

            async def one(i: int) -> tuple[bool, int]:
                async with gate:
                    r = await fetcher.fetch(
                        shop.catalog_url(1 + i % shop.spec.pages),
                        method=method,
                        selectors=["li.product"],
                        use_cache=False,
                    )
                ok = r.success and r.method_used == method
                return ok, len(LexborHTMLParser(r.content).css("li.product")) if ok else 0

            done = await asyncio.gather(*(one(i) for i in range(pages)))
        result.update(
            marks=[began, time.time()],
            ok=sum(d[0] for d in done),
            entities=sum(d[1] for d in done),
            challenges=world.stats("challenge").get("challenges", 0),
            concurrency=settings.browser_pages if method == "playwright" else 1,
        )

    with ShopWorld(config) as world:
        asyncio.run(main(world))
    Path(out_path).write_text(json.dumps(result))


def run_browser(method: str, args: argparse.Namespace, tmp: Path) -> Row:
    m = args.browser_pages
    row = Row(method, m)
    out = tmp / f"browser-{method}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--browser-child", method,
        "--browser-pages", str(m), "--out", str(out),
    ]  # fmt: skip
    proc = measure(cmd, dict(os.environ), args.run_timeout_s + 10 * m)
    row.proc = proc
    row.other_cpu_s = max(0.0, proc.machine_busy_s - proc.cpu_s)
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        row.seconds = proc.wall_s
        row.note = f"no result (exit {proc.code}): {proc.stderr.strip()[-300:]}"
        return row
    row.extra = res
    row.seconds = row.run_s = res["marks"][1] - res["marks"][0]  # first launch included
    row.entities, row.expected = res["entities"], PER_PAGE * m
    row.wrong = m - res["ok"]
    if res["ok"] != m:
        row.note = f"{m - res['ok']} pages failed"
    return row


# --------------------------------------------------------------------------- report


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}×" if x else "–"


def table(rows: list[Row], all_rows: list[Row], spread: dict[int, tuple[float, float]]) -> str:
    head = (
        "| contender | pages | entities | seconds | pages/s | entities/s | peak MB: PSS (RSS sum) | "
        "× Scrapy | × bare (1 proc) | s / 1k pages | run-phase pages/s | client CPU s "
        "| nginx CPU s | other CPU s |"
    )
    lines = [head, "|---|" + "---:|" * (head.count(" | ") - 1) + "---:|"]

    def ref(name: str, n: int) -> float | None:
        hits = [r for r in rows if r.contender == name and r.pages == n and r.ok]
        return hits[0].pages_per_s if hits else None

    for r in rows:
        if not r.seconds:
            lines.append(f"| {r.contender} | {r.pages:,} | " + "– | " * 12 + f"**{r.note}** |")
            continue
        scrapy, bare = ref(SCRAPY, r.pages), ref(BARE1, r.pages)
        browser = r.contender in ("playwright", "selenium")
        lo_hi = spread.get(id(r))
        secs = f"{r.seconds:.2f}" + (f" ({lo_hi[0]:.1f}–{lo_hi[1]:.1f})" if lo_hi else "")
        ents = f"{r.entities:,}" + (f" ({r.wrong:,} wrong)" if r.wrong else "")
        lines.append(
            f"| {r.contender} | {r.pages:,} | {ents} | {secs} | {r.pages_per_s:,.1f} | "
            f"{r.entities_per_s:,.0f} | {r.proc.peak_pss_mb:,.0f} ({r.proc.peak_tree_mb:,.0f}, "
            f"{r.proc.procs} procs) | "
            f"{fmt_ratio(None if browser or not scrapy else r.pages_per_s / scrapy)} | "
            f"{fmt_ratio(None if browser or not bare else r.pages_per_s / bare)} | "
            f"{1000 * r.seconds / r.pages:.2f} | {r.run_pages_per_s:,.1f} | {r.proc.cpu_s:.1f} | "
            f"{r.nginx_cpu_s:.1f} | {r.other_cpu_s:.1f} |" + (f" **{r.note}**" if r.note else "")
        )
    return "\n".join(lines)


def growth_lines(rows: list[Row]) -> list[str]:
    """Per contender: s per 1k pages and peak MB at each size, the marginal rate between the
    smallest and the largest size."""
    out = []
    by: dict[str, dict[int, Row]] = {}
    for r in rows:
        if r.ok and r.contender not in ("playwright", "selenium"):
            by.setdefault(r.contender, {})[r.pages] = r
    for name, sized in by.items():
        if len(sized) < 2:
            continue
        lo, hi = sized[min(sized)], sized[max(sized)]
        extra_s = hi.seconds - lo.seconds
        marginal = f"{(hi.pages - lo.pages) / extra_s:,.0f}" if extra_s > 0 else "–"
        steps = " → ".join(
            f"{1000 * r.seconds / r.pages:.2f} s/1k, {r.proc.peak_pss_mb:.0f} MB at {n:,}"
            for n, r in sorted(sized.items())
        )
        out.append(
            f"- growth, {name}: {steps}; time ×{hi.seconds / lo.seconds:.1f} for pages "
            f"×{hi.pages / lo.pages:.0f}; marginal {marginal} pages/s; peak memory "
            f"×{hi.proc.peak_pss_mb / max(lo.proc.peak_pss_mb, 1e-9):.2f}"
        )
    return out


def target_lines(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.contender != FF or not r.ok:
            continue
        peers = {p.contender: p for p in rows if p.pages == r.pages and p.ok}
        parts = []
        if SCRAPY in peers:
            x = r.pages_per_s / peers[SCRAPY].pages_per_s
            parts.append(f"{x:.2f}× Scrapy (target ≥ 5: {'met' if x >= 5 else 'NOT met'})")
        for b in (BARE1, BARE2):
            if b in peers:
                x = r.pages_per_s / peers[b].pages_per_s
                parts.append(f"{x:.2f}× {b} (target ≥ 0.5: {'met' if x >= 0.5 else 'NOT met'})")
        if parts:
            out.append(f"- fetchfleet at {r.pages:,} pages: " + ", ".join(parts))
        if stored := r.extra.get("stored"):
            out.append(
                f"- fetchfleet stored at {r.pages:,} pages: "
                + ", ".join(f"{t} {v:,}" for t, v in stored.items())
                + f"; DuckDB file {r.extra.get('db_mb', '?')} MB"
            )
    return out


def least_disturbed(rows: list[Row]) -> tuple[list[Row], dict[int, tuple[float, float]]]:
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.contender, r.pages), []).append(r)
    chosen, spread = [], {}
    for group in groups.values():
        pick = min(group, key=lambda r: (not r.ok, r.other_cpu_s))
        chosen.append(pick)
        if len(group) > 1:
            secs = [r.seconds for r in group if r.ok]
            if secs:
                spread[id(pick)] = (min(secs), max(secs))
    return chosen, spread


def interrupted(*_: Any) -> None:
    raise KeyboardInterrupt


def git_head() -> str:
    run = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return run.stdout.strip() or "?"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " Prints markdown tables; writes every number to --out."
    )
    ap.add_argument("--pages", default="2000,20000", help="page counts (2000,20000)")
    ap.add_argument(
        "--quick", action="store_true", help="a fast check: --pages 200,1000, 10 browser pages"
    )
    ap.add_argument(
        "--skip", default="", help="contenders to leave out: scrapy,bare,fetchfleet,browsers"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of each row; the least disturbed shows"
    )
    ap.add_argument("--workers", type=int, default=2, help="fetchfleet: worker processes (2)")
    ap.add_argument(
        "--concurrency", type=int, default=64, help="fetchfleet: in flight per worker (64)"
    )
    ap.add_argument(
        "--peer-concurrency",
        type=int,
        default=64,
        help="scrapy / bare: in flight (per process) (64)",
    )
    ap.add_argument("--browser-pages", type=int, default=50, help="pages per browser method (50)")
    ap.add_argument("--seed", type=int, default=1, help="product seed (1)")
    ap.add_argument(
        "--quiet-wait-s", type=float, default=30,
        help="before each run, wait up to this long for the machine to be idle (30)",
    )  # fmt: skip
    ap.add_argument(
        "--run-timeout-s", type=float, default=120,
        help="hard limit per run: this + pages / --min-rate seconds (120)",
    )  # fmt: skip
    ap.add_argument(
        "--min-rate", type=float, default=20, help="pages/s below which a run is killed (20)"
    )
    ap.add_argument(
        "--out", default=str(REPO / "bench/out/scrape.json"), help="JSON with every number"
    )
    ap.add_argument("--bare-child", help=argparse.SUPPRESS)
    ap.add_argument("--bare-procs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--browser-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_child:
        bare_child(args.bare_child, args.bare_procs, args.peer_concurrency)
        return 0
    if args.browser_child:
        browser_child(args.browser_child, args.browser_pages, args.out)
        return 0
    if args.quick:
        args.pages = "200,1000"
        args.browser_pages = min(args.browser_pages, 10)
    sizes = sorted(int(s) for s in args.pages.split(","))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"scrapy", "bare", "fetchfleet", "browsers"}
    if unknown:
        ap.error(f"--skip: unknown {', '.join(sorted(unknown))}")

    head, began = git_head(), datetime.now(UTC)
    print(f"commit {head}, {began:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores", file=sys.stderr)
    ff_missing = None if "fetchfleet" in skip else ff_available()
    if ff_missing:
        print(f"fetchfleet: {ff_missing}", file=sys.stderr)
    plan: list[tuple[str, Any]] = []
    if "fetchfleet" not in skip and not ff_missing:
        plan.append((FF, run_ff))
    if "scrapy" not in skip:
        plan.append((SCRAPY, run_scrapy))
    if "bare" not in skip:
        plan.append((BARE1, lambda s, n, a, t: run_bare(s, n, 1, a, t)))
        plan.append((BARE2, lambda s, n, a, t: run_bare(s, n, 2, a, t)))

    rows: list[Row] = []
    code_before = code_state()
    signal.signal(signal.SIGTERM, interrupted)  # like Ctrl-C: children killed, nginx stopped
    with tempfile.TemporaryDirectory(prefix="ff-scrape-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if plan:
            site = Site(tmp, max(sizes), args.seed)
            gen_s = site.generate()
            try:
                site.start()
                print(
                    f"{site.pages:,} pages generated in {gen_s:.1f}s; nginx on port {site.port}",
                    file=sys.stderr,
                )
                for n in sizes:
                    for _ in range(args.repeat):  # interleaved: noise hits every contender alike
                        for _name, run in plan:
                            waited = wait_for_quiet(args.quiet_wait_s)
                            rows.append(run(site, n, args, tmp))
                            rows[-1].extra["waited_for_quiet_s"] = round(waited, 1)
                            print(table(rows[-1:], rows, {}).splitlines()[-1], file=sys.stderr)
            finally:
                site.stop()
        if "browsers" not in skip:
            for method in ("playwright", "selenium"):
                wait_for_quiet(args.quiet_wait_s)
                rows.append(run_browser(method, args, tmp))
                print(table(rows[-1:], rows, {}).splitlines()[-1], file=sys.stderr)
    if ff_missing:
        for n in sizes:
            rows.insert(0, Row(FF, n, note=ff_missing))
    shown, spread = least_disturbed(rows)
    shown.sort(key=lambda r: (r.contender in ("playwright", "selenium"), r.pages))
    code = code_state()
    print(f"commit {head}, {began:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
    print()
    print(table(shown, rows, spread))
    print()
    print("\n".join(growth_lines(shown) + target_lines(shown)))
    if code != code_before:
        print("warning: the code changed during the benchmark (see --out)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": began.isoformat(timespec="seconds"),
        "commit": head,
        "args": {k: v for k, v in vars(args).items() if not k.endswith("_child")},
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "code": {"before": code_before, "after": code},
        "table": table(shown, rows, spread),
        "runs": [
            asdict(r) | {"pages_per_s": r.pages_per_s, "entities_per_s": r.entities_per_s}
            for r in rows
        ],
    }
    for r in report["runs"]:
        r["proc"]["stdout"] = r["proc"]["stdout"][-2000:]
        r["proc"]["stderr"] = r["proc"]["stderr"][-2000:]
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 1 if any(r.note or r.wrong for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
