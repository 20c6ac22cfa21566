"""Storage of the scrape job: the URL registry, entities with attributes, files, fetch logs.

Everything is written in bulk per flush (``storage.bulk``: list parameters on DuckDB, COPY
on PostgreSQL): a page brings ~20 entities and ~100 attributes, and row-by-row inserts would
cost 20x. Exactly once: a page result is stored only while its ``urls`` row is still
``queued``; entities are keyed by (type, country, external id) across runs, so a page fetched
twice (a task re-run after a crash) updates ``last_seen`` and stores nothing twice. Newly found
links become ``urls`` rows in the same transaction, and ``store_pages`` returns their ids so
that the caller (the scrape kind) queues them as tasks before it commits: a run cannot settle
as completed while a page it discovered is still unqueued. Storage registers; it does not plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged, staged_columns
from storage.clock import utcnow
from storage.schema import entities, entity_attributes, errors, fetch_logs, files, urls
from storage.scrape_rows import Entity, PageResult, UrlItem

__all__ = ["Entity", "PageResult", "UrlItem"]  # re-exported: the rows live in scrape_rows

# A page's fetch outcome as stored in urls.status; "done" is the only fetched one, and
# "disallowed" (robots.txt) was never requested: its reason is in urls.error, not in errors.
PAGE_STATUSES = ("done", "failed", "blocked", "disallowed")


# --- planning --------------------------------------------------------------------------------


def register_urls(
    conn: sa.Connection,
    run_id: int,
    new: Sequence[tuple[str, int, int | None, str]],
    max_pages: int | None,
) -> list[int]:
    """Add (url, depth, parent id, country) rows not yet registered for the run, up to ``max_pages``
    URLs in all; returns the ids of the rows added, in input order."""
    return [url_id for url_id, _ in _register_urls(conn, run_id, new, max_pages)]


def _register_urls(
    conn: sa.Connection,
    run_id: int,
    new: Sequence[tuple[str, int, int | None, str]],
    max_pages: int | None,
) -> list[tuple[int, str]]:
    """``register_urls``, with the country of each row added: (id, country)."""
    seen: set[str] = set()
    rows = []
    for url, depth, parent, country in new:
        if url not in seen:
            seen.add(url)
            rows.append((len(rows), url, depth, parent, country))
    if not rows:
        return []
    cap = None
    if max_pages is not None:
        have = fetch_all(
            conn, sa.select(sa.func.count()).select_from(urls).where(urls.c.run_id == run_id)
        )[0][0]
        cap = max(0, max_pages - have)
        if cap == 0:
            return []
    cols = {
        "ord": "bigint",
        "url": "text",
        "depth": "int",
        "parent_id": "bigint",
        "country": "text",
    }
    with staged(conn, cols, rows, once=True) as s:
        limit = f"LIMIT {int(cap)}" if cap is not None else ""
        conflict = " ON CONFLICT DO NOTHING" if conn.dialect.name == "postgresql" else ""
        added = fetch_all(
            conn,
            sa.text(
                f"INSERT INTO urls (run_id, url, country, depth, parent_id, status, created_at) "
                f"SELECT CAST(:run AS BIGINT), s.url, s.country, s.depth, s.parent_id, 'queued', "
                f"CAST(:now AS TIMESTAMP) FROM ("
                f"  SELECT * FROM {s} x WHERE NOT EXISTS ("
                f"    SELECT 1 FROM urls u WHERE u.run_id = :run AND u.url = x.url)"
                f"  ORDER BY x.ord {limit}) s{conflict} RETURNING id, url"
            ),
            {"run": run_id, "now": utcnow()},
        )
    order = {row[1]: row[0] for row in rows}
    return [(r[0], rows[order[r[1]]][4]) for r in sorted(added, key=lambda r: order[r[1]])]


def load_urls(conn: sa.Connection, run_id: int, ids: list[Any]) -> list[UrlItem]:
    """The still-queued URLs among ``ids`` (a re-run task skips pages already stored)."""
    if not ids:
        return []
    # One list parameter, not an expanded IN of one parameter per id: 4x cheaper on DuckDB,
    # and every claim runs this.
    member = (
        "list_contains(CAST(:ids AS BIGINT[]), id)"
        if conn.dialect.name == "duckdb"
        else "id = ANY(CAST(:ids AS BIGINT[]))"
    )
    rows = fetch_all(
        conn,
        sa.text(
            "SELECT id, url, depth, country FROM urls "
            f"WHERE run_id = :run AND status = 'queued' AND {member}"
        ),
        {"run": run_id, "ids": [int(i) for i in ids]},
    )
    return [UrlItem(int(r[0]), r[1], int(r[2]), r[3]) for r in rows]


# --- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class StoreContext:
    run_id: int
    entity_type: str
    max_pages: int | None
    max_depth: int
    snapshot_limit: int = 0  # error snapshots kept per run (storage.snapshots), 0: none


@dataclass(slots=True)
class StoredPages:
    """What ``store_pages`` did: pages stored for the first time, and the ids of the ``urls``
    rows registered for the links they brought (still to be queued, in link order)."""

    pages: int = 0
    new_urls: list[int] = field(default_factory=list)
    new_countries: list[str] = field(default_factory=list)  # of each of new_urls, as written
    fresh: list[PageResult] = field(default_factory=list)  # the pages stored here first


def store_pages(
    conn: sa.Connection,
    ctx: StoreContext,
    results: Sequence[tuple[int | None, str | None, PageResult]],
) -> StoredPages:
    """Store page results ((task id, worker id, page)) of one run and register the links of
    the pages new here (up to the run's ``max_pages``, above ``max_depth`` only)."""
    first: dict[int, tuple[int | None, str | None, PageResult]] = {}
    for task_id, worker_id, page in results:
        first.setdefault(page.url_id, (task_id, worker_id, page))
    if not first:
        return StoredPages()
    now = utcnow()
    # A page is new here while its url is still queued: marking it fetched in the same
    # statement (RETURNING) is what makes a page stored once per run.
    fresh_ids = _update_urls(conn, ctx.run_id, [p for _, _, p in first.values()], now)
    pages = [t for i, t in first.items() if i in fresh_ids]  # arrival order: the last wins
    if not pages:
        return StoredPages()
    entity_ids: dict[tuple[str, str], int] = {}
    for country in sorted({p.country for _, _, p in pages}):
        of_country = [p for _, _, p in pages if p.country == country]
        for ext, eid in _store_entities(conn, ctx, country, of_country, now).items():
            entity_ids[(country, ext)] = eid
    _store_fetch_logs(conn, ctx, pages, now)
    _store_files(conn, ctx, [p for _, _, p in pages], entity_ids, now)
    _store_invalid(conn, ctx, pages, now)
    links = [
        (link, p.depth + 1, p.url_id, p.country)
        for _, _, p in pages
        if p.depth < ctx.max_depth
        for link in p.links
    ]
    added = _register_urls(conn, ctx.run_id, links, ctx.max_pages) if links else []
    if ctx.snapshot_limit:  # last: its advisory lock (PostgreSQL) is held the shortest
        _store_snapshots(conn, ctx, pages)
    fresh = [p for _, _, p in pages]
    return StoredPages(len(pages), [i for i, _ in added], [c for _, c in added], fresh)


def fail_pages(
    conn: sa.Connection,
    run_id: int,
    pages: Sequence[tuple[int | None, str | None, int]],
    error_type: str,
    error: str,
) -> int:
    """Record pages ((task id, worker id, url id)) whose result could not be stored as
    failed with ``error``, once per run like ``store_pages`` (only urls still queued), with
    one ``errors`` row each; returns how many were new."""
    ids = [int(url_id) for _, _, url_id in pages]
    if not ids:
        return 0
    now = utcnow()
    done = fetch_all(
        conn,
        sa.update(urls)
        .where(urls.c.run_id == run_id, urls.c.id.in_(ids), urls.c.status == "queued")
        .values(status="failed", error_type=error_type, error=error[:2000], fetched_at=now)
        .returning(urls.c.id, urls.c.url),
    )
    by_id = {int(url_id): (task_id, worker_id) for task_id, worker_id, url_id in pages}
    rows = [
        {
            "run_id": run_id,
            "task_id": by_id[int(url_id)][0],
            "worker_id": by_id[int(url_id)][1],
            "item_key": url[:500],
            "error_type": error_type,
            "message": f"{url}: {error}"[:2000],
            "created_at": now,
        }
        for url_id, url in done
    ]
    if rows:
        conn.execute(sa.insert(errors), rows)
    return len(rows)


def _update_urls(conn: sa.Connection, run_id: int, pages: list[PageResult], now: Any) -> set[int]:
    """Record the pages' fetch on their urls still queued; returns the ids it updated."""
    cols = {
        "id": "bigint",
        "status": "text",
        "method": "text",
        "http_status": "int",
        "bytes": "bigint",
        "entities": "int",
        "error_type": "text",
        "error": "text",
        "fetched_at": "timestamp",
    }
    rows = [
        (
            p.url_id,
            p.status,
            p.method,
            p.http_status,
            p.bytes,
            len(p.entities),
            p.error_type,
            (p.error or "")[:2000] or None,
            p.fetched_at or now,
        )
        for p in pages
    ]
    sets = ", ".join(f"{c} = s.{c}" for c in cols if c != "id")
    with staged(conn, cols, rows, once=True) as s:
        done = fetch_all(
            conn,
            sa.text(
                f"UPDATE urls SET {sets} FROM {s} s WHERE urls.id = s.id "
                "AND urls.run_id = :run AND urls.status = 'queued' RETURNING urls.id"
            ),
            {"run": run_id},
        )
    return {int(r[0]) for r in done}


def _store_entities(
    conn: sa.Connection, ctx: StoreContext, country: str, pages: list[PageResult], now: Any
) -> dict[str, int]:
    """Upsert the pages' entities; returns external id → entity id."""
    # external id → (content hash, attributes, source url); the same entity twice in one
    # flush: the last wins. Entities are Entity tuples or plain 4-tuples (off the wire).
    latest: dict[str, tuple[str, list[tuple[str, str | None, str]], str | None]] = {}
    for p in pages:
        for e in p.entities:
            latest[e[0]] = (e[1], e[2], e[3] or p.url)
    if not latest:
        return {}
    cols = {"external_id": "text", "content_hash": "text", "source_url": "text"}
    rows = [(ext, h, src) for ext, (h, _, src) in latest.items()]
    key = {"t": ctx.entity_type, "c": country, "run": ctx.run_id, "now": now}
    with staged(conn, cols, rows) as s:
        before = {
            r[1]: (int(r[0]), r[2])
            for r in fetch_all(
                conn,
                sa.text(
                    f"SELECT e.id, e.external_id, e.content_hash FROM entities e JOIN {s} s "
                    "ON e.external_id = s.external_id WHERE e.entity_type = :t AND e.country = :c"
                ),
                key,
            )
        }
        conflict = " ON CONFLICT DO NOTHING" if conn.dialect.name == "postgresql" else ""
        inserted = fetch_all(
            conn,
            sa.text(
                "INSERT INTO entities (entity_type, country, external_id, content_hash, "
                "source_url, first_run_id, last_run_id, first_seen, last_seen) "
                "SELECT CAST(:t AS TEXT), CAST(:c AS TEXT), s.external_id, s.content_hash, "
                "s.source_url, CAST(:run AS BIGINT), CAST(:run AS BIGINT), "
                "CAST(:now AS TIMESTAMP), CAST(:now AS TIMESTAMP) "
                f"FROM {s} s WHERE NOT EXISTS (SELECT 1 FROM entities e WHERE "
                "e.entity_type = :t AND e.country = :c AND e.external_id = s.external_id)"
                f"{conflict} RETURNING id, external_id"
            ),
            key,
        )
        if before or len(inserted) < len(latest):  # not only new ones: touch what was there
            conn.execute(
                sa.text(
                    "UPDATE entities SET content_hash = s.content_hash, "
                    "source_url = s.source_url, last_run_id = :run, last_seen = :now "
                    f"FROM {s} s WHERE entities.entity_type = :t AND entities.country = :c "
                    "AND entities.external_id = s.external_id"
                ),
                key,
            )
        if conn.dialect.name == "postgresql" and len(inserted) + len(before) < len(latest):
            # another worker inserted some of them between our two statements
            before.update(
                {
                    r[1]: (int(r[0]), "")
                    for r in fetch_all(
                        conn,
                        sa.text(
                            f"SELECT e.id, e.external_id FROM entities e JOIN {s} s ON "
                            "e.external_id = s.external_id WHERE e.entity_type = :t AND "
                            "e.country = :c"
                        ),
                        key,
                    )
                    if r[1] not in before
                }
            )
    ids = {ext: eid for ext, (eid, _) in before.items()}
    ids.update({r[1]: int(r[0]) for r in inserted})
    changed = [ids[ext] for ext, (_, h) in before.items() if h != latest[ext][0]]
    if changed:
        conn.execute(
            sa.text("DELETE FROM entity_attributes WHERE entity_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": changed},
        )
    write = set(changed) | {int(r[0]) for r in inserted}
    ent: list[int] = []
    names: list[str] = []
    values: list[str | None] = []
    types: list[str] = []
    for ext, (_, attributes, _) in latest.items():
        eid = ids.get(ext)
        if eid in write:
            for name, value, vtype in attributes:
                ent.append(eid)
                names.append(name)
                values.append(value)
                types.append(vtype)
    if ent:
        acols = {"entity_id": "bigint", "name": "text", "value": "text", "value_type": "text"}
        with staged_columns(conn, acols, [ent, names, values, types], once=True) as s:
            conn.execute(
                sa.text(
                    f"INSERT INTO entity_attributes (entity_id, name, value, value_type) "
                    f"SELECT entity_id, name, value, value_type FROM {s}"
                )
            )
    return ids


def _store_fetch_logs(
    conn: sa.Connection,
    ctx: StoreContext,
    pages: list[tuple[int | None, str | None, PageResult]],
    now: Any,
) -> None:
    cols = {
        "run_id": "bigint",
        "task_id": "bigint",
        "url": "text",
        "method": "text",
        "proxy": "text",
        "status": "int",
        "bytes": "bigint",
        "ms": "float",
        "error_type": "text",
        "blocked_reason": "text",
        "domain": "text",
        "avoided": "text",
        "country": "text",
        "created_at": "timestamp",
    }
    rows = [
        (ctx.run_id, task_id, p.url, *a, p.country, p.fetched_at or now)
        for task_id, _, p in pages
        for a in p.attempts
    ]
    if rows:
        with staged(conn, cols, rows, once=True) as s:
            names = ", ".join(cols)
            conn.execute(sa.text(f"INSERT INTO fetch_logs ({names}) SELECT {names} FROM {s}"))


def _store_files(
    conn: sa.Connection,
    ctx: StoreContext,
    pages: list[PageResult],
    entity_ids: dict[tuple[str, str], int],
    now: Any,
) -> None:
    rows = [
        {
            "run_id": ctx.run_id,
            "entity_id": entity_ids.get((p.country, f[7])) if f[7] is not None else None,
            "page_url": p.url,
            "url": f[0],
            "path": f[1],
            "sha256": f[2],
            "bytes": f[3],
            "content_type": f[4],
            "status": f[5],
            "error": f[6],
            "created_at": now,
        }
        for p in pages
        for f in p.files
    ]
    if rows:
        conn.execute(sa.insert(files), rows)


def _store_invalid(
    conn: sa.Connection,
    ctx: StoreContext,
    pages: list[tuple[int | None, str | None, PageResult]],
    now: Any,
) -> None:
    rows = [
        {
            "run_id": ctx.run_id,
            "task_id": task_id,
            "worker_id": worker_id,
            "item_key": p.url[:500],
            "error_type": etype,
            "message": message[:2000],
            "created_at": now,
        }
        for task_id, worker_id, p in pages
        for etype, message in _page_errors(p)
    ]
    if rows:
        conn.execute(sa.insert(errors), rows)


def _store_snapshots(
    conn: sa.Connection, ctx: StoreContext, pages: list[tuple[int | None, str | None, PageResult]]
) -> None:
    from storage.snapshots import add_snapshots

    for task_id, worker_id, p in pages:
        if p.snapshots:
            add_snapshots(conn, ctx.run_id, p.snapshots, ctx.snapshot_limit, worker_id, task_id)


def _page_errors(p: PageResult) -> Iterable[tuple[str, str]]:
    if p.status not in ("done", "disallowed"):
        yield (p.error_type or p.status), f"{p.url}: {p.error or p.status}"
    for key, reason in p.invalid:
        yield "invalid_entity", f"{p.url}: entity {key}: {reason}"
    for f in p.files:
        if f[5] != "stored":
            yield f"file_{f[5]}", f"{f[0]}: {f[6] or f[5]}"
    yield from p.errors


def entity_rows(
    conn: sa.Connection, entity_type: str | None = None, country: str | None = None
) -> list[dict[str, Any]]:
    """Entities with their attributes as dicts (tests, small exports, the console preview)."""
    stmt = sa.select(
        entities.c.id, entities.c.external_id, entities.c.country, entities.c.entity_type
    )
    if entity_type:
        stmt = stmt.where(entities.c.entity_type == entity_type)
    if country:
        stmt = stmt.where(entities.c.country == country)
    base = {
        int(r[0]): {"external_id": r[1], "country": r[2], "entity_type": r[3]}
        for r in fetch_all(conn, stmt)
    }
    if base:
        attrs = fetch_all(
            conn,
            sa.select(
                entity_attributes.c.entity_id, entity_attributes.c.name, entity_attributes.c.value
            ),
        )
        for eid, name, value in attrs:
            if int(eid) in base:
                base[int(eid)][name] = value
    return list(base.values())


def run_stats(conn: sa.Connection, run_id: int) -> dict[str, Any]:
    """What a scrape run produced: entities seen and new, which method won per country,
    why attempts were blocked, files stored."""
    seen, new = fetch_all(
        conn,
        sa.select(
            sa.func.count(),
            sa.func.coalesce(
                sa.func.sum(sa.case((entities.c.first_run_id == run_id, 1), else_=0)), 0
            ),
        ).where(entities.c.last_run_id == run_id),
    )[0]
    mix: dict[str, dict[str, int]] = {}
    for country, method, n in fetch_all(
        conn,
        sa.select(urls.c.country, urls.c.method, sa.func.count())
        .where(urls.c.run_id == run_id, urls.c.status == "done")
        .group_by(urls.c.country, urls.c.method)
        .order_by(urls.c.country, urls.c.method),
    ):
        mix.setdefault(country, {})[method or "?"] = int(n)
    blocked = {
        r[0]: int(r[1])
        for r in fetch_all(
            conn,
            sa.select(fetch_logs.c.blocked_reason, sa.func.count())
            .where(fetch_logs.c.run_id == run_id, fetch_logs.c.blocked_reason.is_not(None))
            .group_by(fetch_logs.c.blocked_reason)
            .order_by(sa.func.count().desc())
            .limit(10),
        )
    }
    stored_files = fetch_all(
        conn,
        sa.select(sa.func.count()).where(files.c.run_id == run_id, files.c.status == "stored"),
    )[0][0]
    return {
        "entities": int(seen),
        "new_entities": int(new),
        "methods": mix,
        "blocked_reasons": blocked,
        "files": int(stored_files),
    }


def store_entities(
    conn: sa.Connection, run_id: int, entity_type: str, country: str, entities: list[Entity]
) -> dict[str, int]:
    """Upsert entities outside a page (the pipeline API's ``store``); returns external id →
    entity id. Same rules as pages: keyed by (type, country, external id), attributes
    replaced only when the content hash changed."""
    ctx = StoreContext(run_id, entity_type, None, 0)
    page = PageResult(0, "", 0, country, "done", entities=entities)
    return _store_entities(conn, ctx, country, [page], utcnow())
