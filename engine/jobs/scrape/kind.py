"""The ``scrape`` job kind: pages through the fetcher cascade, entities out of them.

Items are ids of the run's ``urls`` registry. Planning registers the spec's start URLs; each
executed page hands back its entities, the links it follows (normalized, filtered by the
spec) and its downloaded files; storing a page registers its new links (``storage.scrape``)
and this kind queues them as tasks in the same transaction, so the run grows as it discovers
pages and cannot complete while one is still unqueued. A page is stored once per run (its
URL row leaves ``queued``); an entity once per (type, country, external id) across runs.

Each worker process holds one `fetchers.Fetcher` per run: one browser per method reused
across pages, the per-domain memory of which method works, politeness limits, and the proxy
pool when the run uses one. The spec travels with the run as TOML text (it holds no secrets;
API tokens are environment-variable names), so workers need no spec file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from engine.files import MAX_SPEC_BYTES, size_text
from engine.jobs.base import CountryBatch, Executor, JobKind, WorkerEnv
from engine.jobs.scrape.params import ScrapeParams
from engine.jobs.scrape.spec import (
    ScrapeSpec,
    SpecError,
    normalize_url,
    parse_spec,
    read_spec_text,
    read_start_urls,
)
from engine.model import ItemResult, ResultBatch
from fetchers.extract import Row, page_fields
from fetchers.robots import RobotsCache
from fetchers.snapshots import slug
from storage.scrape_rows import Entity, PageResult, UrlItem

if TYPE_CHECKING:  # pool workers never touch SQL: no SQLAlchemy import at run time
    import sqlalchemy as sa

    from storage.db import Database
    from storage.item_logs import ItemLog

log = logging.getLogger(__name__)

DISALLOWED = "disallowed"  # a page robots.txt forbids: not fetched, not a failure
PLAN_CHUNK = 5_000  # start URLs registered per transaction
MAX_PROXIES = 10_000


class ScrapeJob(JobKind):
    name = "scrape"
    params_model = ScrapeParams
    columns = ("page",)  # pages travel as wire tuples in ResultBatch columns

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        # run id → (storage.scrape.StoreContext, the run's batch size)
        self._contexts: dict[int, tuple[Any, int]] = {}
        self._pools: dict[int, dict[str, int]] = {}  # run id → its pool (_pool_ids)

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        """``spec`` (a path) or ``spec_text``; optional ``country``, ``methods``,
        ``max_pages``, ``proxies`` (a status like "active" to route through the stored pool),
        ``strategy`` (``ScrapeParams``). Reads the spec and its start-URL files."""
        p = ScrapeParams.build(params, self.settings)
        try:
            if p.spec_text:
                if len(p.spec_text.encode()) > MAX_SPEC_BYTES:
                    raise SpecError(f"the spec is larger than {size_text(MAX_SPEC_BYTES)}")
                spec = parse_spec(p.spec_text, p.spec_name or "spec")
                base_dir = Path(p.base_dir or ".").resolve()
                text = p.spec_text
            elif p.spec:
                path = Path(p.spec)
                text = read_spec_text(path, p.file_roots)
                spec = parse_spec(text, str(path))
                base_dir = path.resolve().parent
            else:
                raise ScrapeParams.error("spec", "a spec is required: a TOML file, or its text")
            sources = spec.all_sources()
            if p.country:
                sources = [s for s in sources if s.country.lower() == p.country.lower()]
                if not sources:
                    known = ", ".join(sorted({s.country for s in spec.all_sources()}))
                    raise ScrapeParams.error(
                        "country", f"the spec has sources for {known}", p.country
                    )
            if not spec.extract and not spec.follow.css and not spec.follow.regex:
                raise ScrapeParams.error(
                    "spec", "the spec neither extracts ([[extract]]) nor follows links ([follow])"
                )
            n_start = sum(len(read_start_urls(s, base_dir, p.file_roots)) for s in sources)
        except SpecError as exc:  # where in the spec, or which start-URL file
            raise ScrapeParams.error("spec", str(exc)) from None
        if n_start == 0:
            raise ScrapeParams.error("spec", "the spec has no start URLs")
        max_pages = p.max_pages or spec.max_pages
        out = {
            **p.stored(),
            "spec_text": text,
            "spec_name": spec.name,
            "base_dir": str(base_dir),
            "countries": sorted({s.country for s in sources}),
            "entity_type": spec.entity_type,
            "max_pages": int(max_pages) if max_pages else None,
            "files_dir": str(Path(p.files_dir or self.settings.data_dir / "files").resolve()),
            "start_urls": n_start,
            # error snapshots kept for the run (the same for every worker)
            "snapshot_limit": self.settings.error_snapshots,
        }
        del out["spec"]  # the text travels with the run; workers need no file
        return out

    def spec(self, params: dict[str, Any]) -> ScrapeSpec:
        return parse_spec(params["spec_text"], params.get("spec_name") or "spec")

    def plan(self, db: Database, run_id: int, params: dict[str, Any]) -> Iterator[CountryBatch]:
        from storage import scrape as store

        spec = self.spec(params)
        if params.get("proxies"):
            _snapshot_pool(db, run_id, params["proxies"])
        base_dir = Path(params["base_dir"])
        batch = params["batch_size"]
        for source in spec.all_sources():
            if source.country not in params["countries"]:
                continue
            roots = params.get("file_roots")
            urls = [normalize_url(u) for u in read_start_urls(source, base_dir, roots)]
            for i in range(0, len(urls), PLAN_CHUNK):
                chunk = [(u, 0, None, source.country) for u in urls[i : i + PLAN_CHUNK]]
                with db.begin() as conn:
                    ids = store.register_urls(conn, run_id, chunk, params.get("max_pages"))
                for j in range(0, len(ids), batch):  # one source: one country a task
                    yield CountryBatch(ids[j : j + batch], source.country)

    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        from storage import scrape as store

        return store.load_urls(conn, run_id, refs)

    def _context(self, conn: sa.Connection, run_id: int) -> tuple[Any, int]:
        ctx = self._contexts.get(run_id)
        if ctx is None:
            from storage import runs as run_store
            from storage import scrape as store

            run = run_store.get_run(conn, run_id)
            if run is None:
                raise ValueError(f"no run with id {run_id}")
            params = run.params
            spec = self.spec(params)
            ctx = self._contexts[run_id] = (
                store.StoreContext(
                    run_id=run_id,
                    entity_type=params["entity_type"],
                    max_pages=params.get("max_pages"),
                    max_depth=spec.follow.max_depth,
                    snapshot_limit=self._snapshot_limit(params),
                ),
                int(params["batch_size"]),
            )
        return ctx

    def _snapshot_limit(self, params: dict[str, Any]) -> int:
        return int(params.get("snapshot_limit", self.settings.error_snapshots))

    def store(self, conn: sa.Connection, results: list[ItemResult]) -> int:
        if not results:
            return 0
        triples = [(r.task_id, r.worker_id, r.data["page"]) for r in results]
        return self._store(conn, results[0].run_id, triples)

    def store_batch(self, conn: sa.Connection, batch: ResultBatch) -> int:
        triples = zip(batch.task_ids, batch.worker_ids, batch.columns["page"], strict=True)
        return self._store(conn, batch.run_id, triples)

    def store_failed(self, conn: sa.Connection, results: list[ItemResult], error: str) -> int:
        """Pages whose result could not be stored: their urls become ``failed`` with the
        error (the run counts them), logged in ``errors`` under the page's URL."""
        from storage.error_log import UNSTORABLE
        from storage.scrape import fail_pages

        if not results:
            return 0
        pages = [(r.task_id, r.worker_id or None, r.ref) for r in results]
        return fail_pages(conn, results[0].run_id, pages, UNSTORABLE, error)

    def _store(self, conn: sa.Connection, run_id: int, triples: Iterable[tuple[Any, ...]]) -> int:
        """(task id, worker id, page as sent) of one run → stored pages. The links the new
        pages bring are queued in the caller's transaction, with the pages."""
        from storage.scrape import store_pages

        pages = [(task_id, worker_id, PageResult.from_wire(p)) for task_id, worker_id, p in triples]
        if not pages:
            return 0
        ctx, batch_size = self._context(conn, run_id)
        stored = store_pages(conn, ctx, pages)
        if stored.new_urls:
            self._queue_urls(conn, run_id, stored.new_urls, stored.new_countries, batch_size)
        if stored.fresh:
            self._record_uses(conn, run_id, stored.fresh)
        return stored.pages

    def _record_uses(self, conn: sa.Connection, run_id: int, pages: list[PageResult]) -> None:
        """The proxies' history of uses by the cascade: every attempt of the pages stored
        here first that went through a proxy of the run's pool, in one write per batch.
        An attempt names its proxy as the pool's lease did (``ProxyState.redacted``): the
        same text is rebuilt for each member of the run's pool to find its id."""
        from storage.proxy_history import record_uses

        members = self._pool_ids(conn, run_id)
        if not members:
            return
        uses = []
        for page in sorted(pages, key=lambda p: p.fetched_at or datetime.min):
            for a in page.attempts:  # (method, proxy, status, bytes, ms, error type, …)
                pid = members.get(a[1]) if a[1] else None
                if pid is not None:
                    uses.append((pid, a[5] is None, a[4], page.fetched_at))
        record_uses(conn, uses, self.settings.proxy_history_n)

    def _pool_ids(self, conn: sa.Connection, run_id: int) -> dict[str, int]:
        """The run's pool as redacted proxy URL → proxy id (empty: the run uses none)."""
        members = self._pools.get(run_id)
        if members is None:
            from fetchers.proxy_parse import ProxySpec
            from storage.proxy_history import run_pool_members

            members = {}
            for pid, protocol, scheme, host, port, user, has_pw in run_pool_members(conn, run_id):
                # the spec _open_pool builds for this member: its lease's redacted URL
                spec = ProxySpec(
                    scheme=protocol or scheme or "http",
                    host=host,
                    port=int(port),
                    username=user,
                    password="x" if has_pw else None,
                )
                members.setdefault(spec.redacted(), int(pid))
            self._pools[run_id] = members
        return members

    def _queue_urls(
        self,
        conn: sa.Connection,
        run_id: int,
        url_ids: Sequence[int],
        countries: Sequence[str],
        batch_size: int,
    ) -> None:
        """One task per ``batch_size`` URL ids of one country (a link keeps the country of
        the page it was found on), numbered after the run's existing tasks."""
        from engine.countries import normal_country
        from storage import queue as q
        from storage import runs as run_store

        by_country: dict[str | None, list[int]] = {}
        for url_id, country in zip(url_ids, countries, strict=True):
            by_country.setdefault(normal_country(country), []).append(url_id)
        batches: list[list[int]] = []
        of: list[str | None] = []
        for country, ids in by_country.items():
            for i in range(0, len(ids), batch_size):
                batches.append(ids[i : i + batch_size])
                of.append(country)
        seq = run_store.planned_tasks(conn, run_id)
        n = q.add_tasks(conn, run_id, batches, seq, self.settings.max_attempts, of)
        run_store.add_planned(conn, run_id, n, len(batches))

    def item_log(self) -> ItemLog:
        from storage.item_logs import ItemLog
        from storage.schema import urls

        # one urls row per page, a result once it left `queued`
        return ItemLog(
            "scrape",
            urls,
            time="fetched_at",
            ok_column="status",
            ok_value=("done", DISALLOWED),  # a page robots.txt forbids is not a failure
            key="url",
            outcome="status",
            worker=None,
            pending="queued",
        )

    def summary_extra(self, conn: sa.Connection, run_id: int) -> dict[str, Any]:
        """Entities seen and new, the method that won per country, why attempts were
        blocked, files stored (``storage.scrape.run_stats``)."""
        from storage.scrape import run_stats

        return run_stats(conn, run_id)

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        stats = summary.get(self.name)
        if not stats:
            return []
        from engine.jobs.scrape.cli import format_scrape

        return format_scrape(stats)

    def ok_outcomes(self) -> set[str]:
        return {"done", DISALLOWED}

    def cost(self, conn: sa.Connection, run_id: int) -> dict[str, Any]:
        """From the fetch log: requests per method, browser-seconds, bytes by route, per
        domain, the browser time domain learning saved; per entity stored or seen again."""
        from engine.costs import with_per_stored
        from fetchers.methods.base import BROWSER_METHODS
        from storage import run_costs

        cost = run_costs.fetch_costs(conn, run_id, BROWSER_METHODS)
        cost["api_calls"] = cost["requests"].get("api", 0)
        cost["file_bytes"] = run_costs.file_bytes(conn, run_id)
        cost["stored"] = run_costs.entities_seen(conn, run_id)
        return with_per_stored(cost)

    def stop_window(self, conn: sa.Connection, run_id: int, since: Any) -> dict[str, float]:
        from fetchers.methods.base import BROWSER_METHODS
        from storage.run_costs import fetch_window

        return fetch_window(conn, run_id, since, BROWSER_METHODS)

    async def open_executor(self, params: dict[str, Any], env: WorkerEnv) -> Executor:
        from fetchers.cascade import Fetcher
        from fetchers.config import FetchSettings
        from fetchers.snapshots import Snapshotter

        spec = self.spec(params)
        overrides: dict[str, Any] = {}
        if spec.fetch.timeout_s:
            overrides["fetch_timeout_s"] = spec.fetch.timeout_s
        fsettings = FetchSettings(**overrides)
        pool = await _open_pool(params, env, self.settings) if params.get("proxies") else None
        limit = self._snapshot_limit(params)
        snapshots = Snapshotter(limit) if limit > 0 else None
        fetcher = Fetcher(fsettings, pool=pool, snapshots=snapshots)
        return ScrapeExecutor(spec, params, fetcher)


MAX_LINK_ERRORS = 20  # per page: a page full of bad links is reported, not copied out


def _link_error(page: PageResult, error_type: str, link: str, exc: Exception) -> None:
    """Record a link of ``page`` that could not be used (the first ``MAX_LINK_ERRORS``)."""
    if sum(1 for t, _ in page.errors if t == error_type) < MAX_LINK_ERRORS:
        page.errors.append((error_type, f"{page.url}: link {link[:300]!r}: {exc}"))


def _snapshot_pool(db: Database, run_id: int, status: str) -> None:
    """Copy the stored proxies with ``status`` into the run's pool (``run_proxies``).

    Why the database and not a file: the run's workers may be anywhere. PostgreSQL workers,
    on this machine or another, read it with their queue backend; pool workers of a DuckDB
    coordinator, which cannot open the file the coordinator holds, ask it over their pipe
    (``QueueBackend.proxy_pool``), and it reads it on their behalf. One mechanism for every
    deployment, written once in the planning transaction's database, read once per run and
    worker process. Passwords stay Fernet tokens, as stored; workers decrypt them with the
    fleet's secret key (``FETCHFLEET_SECRET_KEY``, the same on every machine)."""
    from storage.proxies import snapshot_run_pool

    with db.begin() as conn:
        n = snapshot_run_pool(conn, run_id, status, MAX_PROXIES)
    if not n:
        raise ValueError(
            f"--proxies {status}: no stored proxy has that status; validate a list "
            "first (`python -m engine.run validate --proxies FILE`)"
        )


async def _open_pool(params: dict[str, Any], env: WorkerEnv, settings: Any) -> Any:
    """The run's proxy pool, decrypted: from the database through the worker's backend, or
    (a run planned before pools were kept in the database) from its ``pool_file``. A run
    that routes through proxies never falls back to going direct."""
    from fetchers.pool import ProxyPool
    from fetchers.proxy_parse import ProxySpec
    from storage.secrets import SecretBox

    rows: list[Any] = []
    if env.proxy_pool is not None:
        rows = await env.proxy_pool()
    if not rows and params.get("pool_file") and Path(params["pool_file"]).is_file():
        rows = json.loads(Path(params["pool_file"]).read_text())
    if not rows:
        raise ValueError(
            f"the run routes through proxies ({params['proxies']}) but its pool is empty or "
            "not readable from this worker"
        )
    box = SecretBox.load(settings.secret_key, settings.secret_key_file)
    specs = [
        ProxySpec(
            scheme=protocol or scheme or "http",
            host=host,
            port=int(port),
            username=username,
            password=box.decrypt(password_enc),
        )
        for protocol, scheme, host, port, username, password_enc in rows
    ]
    return ProxyPool(specs, params.get("strategy") or "adaptive")


class ScrapeExecutor(Executor):
    """One page: fetch through the cascade, extract, validate, follow, download files."""

    def __init__(self, spec: ScrapeSpec, params: dict[str, Any], fetcher: Any) -> None:
        from fetchers.extract import make_extractor
        from fetchers.validation import ValidationRules

        self.spec = spec
        self.fetcher = fetcher
        self.files_dir = Path(params["files_dir"])
        self.methods: dict[str, list[str] | None] = {}
        self.apis: dict[str, Any] = {}
        override = params.get("methods")
        for source in spec.all_sources():
            self.methods[source.country] = override or source.methods or spec.methods
            if source.api is not None:
                self.apis[source.country] = source.api.to_api_spec()
        self.rules = ValidationRules(
            min_length=spec.fetch.min_length,
            required_selectors=tuple(spec.fetch.required_selectors),
        )
        follow = spec.follow
        self._follow = make_extractor([], None, None, follow.css, follow.regex)
        from fetchers.extract import JsonExtractor

        self._extractors = [
            (
                e,
                make_extractor(e.rules(), e.list, e.list_xpath, follow.css, follow.regex),
                JsonExtractor(e.rules("json"), e.json_list),
                e.rules("page"),
            )
            for e in spec.extract
        ]
        self._types = {name: f.type for e in spec.extract for name, f in e.fields.items()}
        self._patterns = {k: re.compile(v) for k, v in spec.validate_.patterns.items()}
        self._required = list(dict.fromkeys([spec.id_field, *spec.validate_.required]))
        self.robots: RobotsCache | None = None
        if spec.robots == "obey":  # one per run and worker process: robots.txt once an origin
            self.robots = RobotsCache(fetcher, spec.robots_agent)

    def _order(self, country: str) -> list[str]:
        """The methods a page of ``country`` is fetched with (robots.txt takes the same
        route)."""
        return list(self.methods.get(country) or self.fetcher.policy.order_for(country))

    def _out(self, page: PageResult) -> dict[str, Any]:
        """The page as sent, with the error snapshots this worker made since its last page
        (whichever page leaves first carries them: each kind once a worker, rare)."""
        snaps = getattr(self.fetcher, "snapshots", None)
        if snaps is not None:
            page.snapshots = [s.to_wire() for s in snaps.take()]
        return {"page": page.to_wire()}

    def _snap(self, kind: str, page: PageResult, content: bytes, message: str) -> None:
        """Keep a fetched page as the snapshot of ``kind`` (an invalid entity, an extraction
        error) if this worker has none yet. No screenshot: the browser closed the page,
        which was valid when it had it."""
        snaps = getattr(self.fetcher, "snapshots", None)
        if snaps is not None and snaps.wants(kind):
            snaps.add(kind, page.url, page.method, message, content, status=page.http_status)

    def error_data(self, item: UrlItem, error: str) -> dict[str, Any]:
        """The page failed with ``error`` (``execute`` raised): a failed page all the same,
        so that it is stored, counted and logged like any other."""
        page = PageResult(
            url_id=item.id,
            url=item.url,
            depth=item.depth,
            country=item.country,
            status="failed",
            error_type="error",
            error=error,
            fetched_at=datetime.now(UTC).replace(tzinfo=None),
        )
        return self._out(page)

    async def execute(self, item: UrlItem) -> tuple[bool, str, dict[str, Any]]:
        from fetchers.cascade import domain_of

        fetched_at = datetime.now(UTC).replace(tzinfo=None)
        domain = domain_of(item.url)
        if self.robots is not None:
            verdict = await self.robots.check(item.url, item.country, self._order(item.country))
            if not verdict.allowed:  # recorded with the reason, never requested
                page = PageResult(
                    url_id=item.id,
                    url=item.url,
                    depth=item.depth,
                    country=item.country,
                    status=DISALLOWED,
                    error_type="robots",
                    error=verdict.reason,
                    fetched_at=fetched_at,
                )
                return True, DISALLOWED, self._out(page)
        res = await self.fetcher.fetch(
            item.url,
            country=item.country,
            method=self.methods.get(item.country),
            rules=self.rules,
            api=self.apis.get(item.country),
        )
        page = PageResult(
            url_id=item.id,
            url=item.url,
            depth=item.depth,
            country=item.country,
            status="done" if res.success else "failed",
            method=res.method_used,
            http_status=res.status,
            bytes=len(res.content),
            fetched_at=fetched_at,
            attempts=[
                (
                    a.method,
                    a.proxy,
                    a.status,
                    a.bytes,
                    round(a.ms, 1),
                    str(a.error_type) if a.error_type else None,
                    a.blocked_reason,
                    domain,
                    a.avoided,
                )
                for a in res.attempts
            ],
        )
        if not res.success:
            if res.error_type is not None and str(res.error_type) in ("blocked", "invalid"):
                page.status = "blocked"
            page.error_type = str(res.error_type) if res.error_type else "failed"
            page.error = res.blocked_reason or res.error
            return False, page.status, self._out(page)
        try:
            return await self._use(page, res, item)
        except Exception as exc:  # failed as before (error_data); its page is kept first
            name = type(exc).__name__
            self._snap(f"extraction_error:{name}", page, res.content, f"{name}: {exc}")
            raise

    async def _use(
        self, page: PageResult, res: Any, item: UrlItem
    ) -> tuple[bool, str, dict[str, Any]]:
        """A fetched page: its entities, links to follow and files."""
        base = res.final_url or item.url
        if res.method_used == "api":  # a JSON answer: entities by json paths, no links
            self._extract(page, res.content, base, json_answer=True)
            return True, "done", self._out(page)
        self._extract(page, res.content, base)
        if self.spec.follow.css or self.spec.follow.regex:
            page.links = self._links(page, res.content, base)
        if self.spec.files:
            await self._download(page, res.content, base)
        return True, "done", self._out(page)

    def _extract(
        self, page: PageResult, content: bytes, url: str, json_answer: bool = False
    ) -> None:
        chosen, from_page = next(
            (
                (jx if json_answer else ex, px)
                for e, ex, jx, px in self._extractors
                if e.match is None or re.search(e.match, url)
            ),
            (None, []),
        )
        if chosen is None:
            return
        page_values: Row | None = None
        if from_page:  # the page's address: the same for every entity of the page
            page_values = page_fields(from_page, {"url": page.url, "final_url": url})
        id_field, required, patterns, types = (
            self.spec.id_field,
            self._required,
            self._patterns,
            self._types,
        )
        order: list[str] | None = None  # the fields sorted, for the content hash
        for i, (values, problem) in enumerate(chosen.extract(content, url)):
            if page_values is not None:
                values = {**values, **page_values[0]}
                problem = "; ".join(p for p in (problem, page_values[1]) if p) or None
            key = values.get(id_field) or f"#{i + 1}"
            missing = [f for f in required if not values.get(f)]
            if missing:
                self._invalid(page, key, f"missing {', '.join(missing)}", missing[0], content)
                continue
            if problem:  # "<field>: what is wrong" (fetchers.extract.Invalid)
                self._invalid(page, key, problem, problem.partition(":")[0], content)
                continue
            if patterns:
                bad = [
                    (name, f"{name} {values.get(name)!r} does not match {p.pattern!r}")
                    for name, p in patterns.items()
                    if values.get(name) is not None and not p.search(values[name] or "")
                ]
                if bad:
                    self._invalid(page, key, "; ".join(b for _, b in bad), bad[0][0], content)
                    continue
            if order is None:  # every row of one extractor has the same fields
                order = sorted(values)
            digest = hashlib.sha1(
                "\x1f".join([f"{k}={values[k]}" for k in order]).encode()
            ).hexdigest()[:16]
            attrs = [(k, v, types.get(k, "str")) for k, v in values.items()]
            page.entities.append(Entity(str(values[id_field]), digest, attrs, url))

    def _invalid(self, page: PageResult, key: str, reason: str, field: str, content: bytes) -> None:
        page.invalid.append((key, reason))
        self._snap(f"invalid_entity:{slug(field)}", page, content, f"entity {key}: {reason}")

    def _links(self, page: PageResult, content: bytes, url: str) -> list[str]:
        """The page's links to follow, normalized. A link that does not parse (an unclosed
        IPv6 host, a port out of range) is an error of that link, recorded on the page."""
        here = urlsplit(url).hostname
        out: dict[str, None] = {}
        for link in self._follow.links(content, url):
            try:
                parts = urlsplit(link)
                if parts.scheme not in ("http", "https"):
                    continue
                if self.spec.follow.same_domain and parts.hostname != here:
                    continue
                out[normalize_url(link)] = None
            except ValueError as exc:
                _link_error(page, "bad_link", link, exc)
        return list(out)

    async def _download(self, page: PageResult, content: bytes, url: str) -> None:
        owner = page.entities[0].external_id if len(page.entities) == 1 else None
        for files in self.spec.files:
            for link in dict.fromkeys(self._follow.hrefs(content, url, files.css)):
                # A link no fetch method takes (ftp:, data:, file:, a host that does not
                # parse) is a failed file of this page, not a failed page.
                try:
                    scheme = urlsplit(link).scheme
                    if scheme not in ("http", "https"):
                        raise ValueError(f"not an http(s) URL (scheme {scheme or 'none'!r})")
                    page.files.append(await self._download_one(page, link, files, owner))
                except ValueError as exc:
                    error = str(exc)[:500]
                    page.files.append((link[:2000], None, None, None, None, "failed", error, owner))

    async def _download_one(
        self, page: PageResult, link: str, files: Any, owner: str | None
    ) -> tuple[Any, ...]:
        """One file of the page: its ``PageResult.files`` row (stored, failed, too_large)."""
        from fetchers.errors import ErrorType
        from fetchers.validation import ValidationRules

        res = await self.fetcher.fetch(
            link,
            country=page.country,
            method="http",
            rules=ValidationRules(min_length=1, detect_blocks=False),
            use_cache=False,
            max_bytes=files.max_bytes,  # enforced while the body arrives
        )
        ctype = res.headers.get("content-type")
        if res.error_type == ErrorType.TOO_LARGE:
            # refused by its Content-Length (the size), or cut off as it arrived (no size)
            length = res.headers.get("content-length", "")
            announced = int(length) if length.isdigit() else 0
            size = announced if announced > files.max_bytes else None
            return (link, None, None, size, ctype, "too_large", res.error or "", owner)
        if not res.success:
            return (link, None, None, None, ctype, "failed", res.error or "", owner)
        data = res.content
        if len(data) > files.max_bytes:  # a second guard (a method that does not stream)
            error = f"{len(data):,} bytes > max_bytes {files.max_bytes:,}"
            return (link, None, None, len(data), ctype, "too_large", error, owner)
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(urlsplit(link).path).suffix[:10]
        rel = f"{digest[:2]}/{digest}{suffix}"
        target = self.files_dir / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(target)
        return (link, rel, digest, len(data), ctype, "stored", None, owner)

    async def aclose(self) -> None:
        await self.fetcher.aclose()
