"""Each proxy's quality over time: its last N checks and its last N uses by the cascade.

Why this shape (``storage.schema.proxy_quality``): one row per proxy holding the recent
events as parallel lists, oldest first, each cut to the newest N on every write, plus the
figures derived from them (success ratios, median and mean latency, reliability). A batch of
results is appended set-based over the staged batch, grouped by proxy, then one ``UPDATE``
of the derived figures of the proxies it touched: no per-row round trip, no row per event to
prune, no secondary index (DuckDB pays for every index on write), and the console sorts
100,000 proxies by a plain column. On PostgreSQL the append is one ``INSERT … ON CONFLICT DO
UPDATE``, which takes the batch's proxies in id order, so two workers storing at once cannot
deadlock on them, and each re-reads the row the other committed (READ COMMITTED), so no
event is lost. On DuckDB, which one process writes, it is an ``UPDATE … FROM`` of the known
proxies and an ``INSERT`` of the new ones: less than half the time of the upsert there.

Checks arrive from the validate kind's store step (a run's check of a proxy counts once:
its run id is kept beside it), uses from the scrape kind's store step (the attempts of the
pages it stores for the first time, mapped to proxies through the run's pool), on the
coordinator with DuckDB and in each worker with PostgreSQL, as every result is.

Reliability is the lower bound of the Wilson score interval (95 %) of the success ratio over
the last N checks and the last N uses together: 20 successes of 20 score 0.84, 1 of 1 scores
0.21, so a proven proxy ranks above a lucky newcomer, and a proxy with no history has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged_columns
from storage.clock import utcnow
from storage.schema import proxies, proxy_quality

HISTORY_N = 20  # the default window (``Settings.proxy_history_n``)
Z = 1.96  # 95 % confidence

STAGE_COLS = {
    "proxy_id": "bigint",
    "run_id": "bigint",
    "ord": "bigint",
    "ok": "int",
    "ms": "float",
    "ts": "timestamp",
}
# What the console shows per proxy, beside the proxy's own columns.
QUALITY_COLUMNS = (
    "reliability",
    "checks_n",
    "check_ratio",
    "check_ms_median",
    "check_ms_mean",
    "uses_n",
    "use_ratio",
    "use_ms_mean",
)


def wilson_lower(successes: int, trials: int, z: float = Z) -> float | None:
    """The lower bound of the Wilson score interval: what ``reliability`` stores."""
    if trials <= 0:
        return None
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, (centre - margin) / (1 + z2 / trials))  # 0 of n: 0, not -1e-18


# --- writes --------------------------------------------------------------------------------


def record_checks(
    conn: sa.Connection,
    run_id: int,
    proxy_ids: Sequence[int],
    oks: Sequence[bool],
    latencies: Sequence[float | None],
    ats: Sequence[datetime],
    n: int = HISTORY_N,
) -> int:
    """Append a batch of one run's check results to the proxies' histories; a proxy this
    run's checks are already in keeps them once. Returns how many proxies it touched."""
    seen: set[int] = set()
    rows = []
    for pid, ok, ms, at in zip(proxy_ids, oks, latencies, ats, strict=True):
        if pid in seen:  # a batch repeating an item: its first result counts
            continue
        seen.add(pid)
        rows.append((int(pid), run_id, len(rows), 1 if ok else 0, ms if ok else None, at))
    return _record(conn, "check", rows, n)


def record_uses(
    conn: sa.Connection,
    uses: Sequence[tuple[int, bool, float | None, datetime]],
    n: int = HISTORY_N,
) -> int:
    """Append uses by the cascade ((proxy id, ok, latency ms, at), in the order they
    happened) to the proxies' histories. Returns how many proxies it touched."""
    rows = [
        (int(pid), None, i, 1 if ok else 0, ms if ok else None, at)
        for i, (pid, ok, ms, at) in enumerate(uses)
    ]
    return _record(conn, "use", rows, n)


def _record(conn: sa.Connection, source: str, rows: list[tuple[Any, ...]], n: int) -> int:
    if not rows:
        return 0
    merge = _MERGES[conn.dialect.name]
    columns = [list(c) for c in zip(*rows, strict=True)]
    # once: no temp table; DuckDB's two statements each read the registered arrays
    with staged_columns(conn, STAGE_COLS, columns, once=True) as s:
        merge(conn, _Merge(conn.dialect.name, source, max(1, int(n)), s))
    ids = sorted({r[0] for r in rows})
    refresh(conn, ids)
    return len(ids)


class _Merge:
    """The SQL pieces of appending a staged batch (relation ``stage``) to the ``source``
    lists, each cut to the newest ``n``."""

    def __init__(self, dialect: str, source: str, n: int, stage: str) -> None:
        self.stage = stage
        self.n = n
        self.dialect = dialect
        self.cols = [f"{source}_ok", f"{source}_ms", f"{source}_at"]
        values = ["CAST(s.ok AS SMALLINT)", "s.ms", "s.ts"]
        self.where = ""  # the staged rows that count
        if source == "check":  # a run's check of a proxy counts once
            self.cols.append("check_run")
            values.append("s.run_id")
            kept = (
                "list_contains(q.check_run, s.run_id)"
                if dialect == "duckdb"
                else "s.run_id = ANY(q.check_run)"
            )
            self.where = (
                "WHERE NOT EXISTS (SELECT 1 FROM proxy_quality q "
                f"WHERE q.proxy_id = s.proxy_id AND {kept})"
            )
        # each list of the batch, per proxy, oldest first
        self.aggs = [_tail(dialect, f"array_agg({v} ORDER BY s.ord)", n) for v in values]
        self.total = f"{source}s_total"

    def appended(self, col: str, new: str) -> str:
        """The list ``col`` with ``new`` appended, cut to the newest n."""
        return _tail(
            self.dialect, f"coalesce(proxy_quality.{col}, {_empty(self.dialect)}) || {new}", self.n
        )


def _merge_on_conflict(conn: sa.Connection, m: _Merge) -> None:
    """One ``INSERT … ON CONFLICT DO UPDATE``: on PostgreSQL it takes the batch's proxies
    in id order (two workers storing at once cannot deadlock on them), a proxy another
    worker inserted meanwhile is updated, not refused, and it is the faster there
    (bench/proxy_history.py)."""
    sets = [f"{c} = {m.appended(c, f'excluded.{c}')}" for c in m.cols]
    conn.execute(
        sa.text(
            f"""INSERT INTO proxy_quality (proxy_id, {", ".join(m.cols)}, {m.total}, updated_at)
            SELECT s.proxy_id, {", ".join(m.aggs)}, count(*), CAST(:now AS TIMESTAMP)
            FROM {m.stage} s {m.where}
            GROUP BY s.proxy_id ORDER BY s.proxy_id
            ON CONFLICT (proxy_id) DO UPDATE SET {", ".join(sets)},
                {m.total} = proxy_quality.{m.total} + excluded.{m.total},
                updated_at = excluded.updated_at"""
        ),
        {"now": utcnow()},
    )


def _merge_update_insert(conn: sa.Connection, m: _Merge) -> None:
    """DuckDB: ``UPDATE … FROM`` the batch's proxies that have a row, then ``INSERT`` those
    that have none: about half the time of ``ON CONFLICT DO UPDATE`` on list columns
    (bench/proxy_history.py). Safe there because one process writes a DuckDB file: no
    other writer can insert a proxy between the two statements."""
    now = {"now": utcnow()}
    named = ", ".join(f"{agg} AS {c}" for agg, c in zip(m.aggs, m.cols, strict=True))
    sets = ", ".join(f"{c} = {m.appended(c, f'b.{c}')}" for c in m.cols)
    conn.execute(
        sa.text(
            f"""UPDATE proxy_quality SET {sets},
                {m.total} = proxy_quality.{m.total} + b.k,
                updated_at = CAST(:now AS TIMESTAMP)
            FROM (SELECT s.proxy_id, {named}, count(*) AS k
                  FROM {m.stage} s {m.where} GROUP BY s.proxy_id) b
            WHERE proxy_quality.proxy_id = b.proxy_id"""
        ),
        now,
    )
    conn.execute(  # the proxies new to the table (its rows updated above are left out)
        sa.text(
            f"""INSERT INTO proxy_quality (proxy_id, {", ".join(m.cols)}, {m.total}, updated_at)
            SELECT s.proxy_id, {", ".join(m.aggs)}, count(*), CAST(:now AS TIMESTAMP)
            FROM {m.stage} s
            WHERE NOT EXISTS (SELECT 1 FROM proxy_quality q WHERE q.proxy_id = s.proxy_id)
            GROUP BY s.proxy_id ORDER BY s.proxy_id"""
        ),
        now,
    )


#: how each backend appends a batch (both give the same rows: tests/test_proxy_history.py)
_MERGES = {"duckdb": _merge_update_insert, "postgresql": _merge_on_conflict}


def _tail(dialect: str, expr: str, n: int) -> str:
    """The newest ``n`` elements of a list expression."""
    if dialect == "duckdb":
        return f"list_slice({expr}, -{n}, -1)"
    return f"({expr})[greatest(cardinality({expr}) - {n - 1}, 1):]"


def _empty(dialect: str) -> str:
    return "[]" if dialect == "duckdb" else "'{}'"


def _stats(dialect: str) -> dict[str, str]:
    """Per proxy row: counts, sums, median and mean over its lists."""
    if dialect == "duckdb":
        return {
            "cn": "coalesce(len(check_ok), 0)",
            "cs": "coalesce(list_sum(check_ok), 0)",
            "cmed": "list_aggregate(check_ms, 'median')",
            "cmean": "list_avg(check_ms)",
            "un": "coalesce(len(use_ok), 0)",
            "us": "coalesce(list_sum(use_ok), 0)",
            "umean": "list_avg(use_ms)",
        }

    def over(col: str, agg: str) -> str:
        return f"(SELECT {agg} FROM unnest({col}) AS x(v))"

    return {
        "cn": "coalesce(cardinality(check_ok), 0)",
        "cs": f"coalesce({over('check_ok', 'sum(v)')}, 0)",
        "cmed": over("check_ms", "percentile_cont(0.5) WITHIN GROUP (ORDER BY v)"),
        "cmean": over("check_ms", "avg(v)"),
        "un": "coalesce(cardinality(use_ok), 0)",
        "us": f"coalesce({over('use_ok', 'sum(v)')}, 0)",
        "umean": over("use_ms", "avg(v)"),
    }


def _wilson_sql(s: str, t: str) -> str:
    z2 = Z * Z
    p = f"(({s}) * 1.0 / ({t}))"
    return (
        f"CASE WHEN ({t}) > 0 THEN greatest(0.0, ({p} + {z2} / (2.0 * ({t})) - {Z} * "
        f"sqrt({p} * (1 - {p}) / ({t}) + {z2} / (4.0 * ({t}) * ({t})))) / (1 + {z2} / ({t}))) "
        "END"
    )


def refresh(conn: sa.Connection, ids: Sequence[int] | None) -> None:
    """Recompute the derived figures of these proxies (None: of every proxy)."""
    d = conn.dialect.name
    if ids is not None and not ids:
        return
    stats = ", ".join(
        f"CAST({e} AS {'INTEGER' if k in ('cn', 'cs', 'un', 'us') else 'DOUBLE PRECISION'}) AS {k}"
        for k, e in _stats(d).items()
    )
    where = ""
    params: dict[str, Any] = {}
    if ids is not None:
        where = (
            "WHERE proxy_id IN (SELECT unnest(CAST(:ids AS BIGINT[])))"
            if d == "duckdb"
            else "WHERE proxy_id = ANY(CAST(:ids AS BIGINT[]))"
        )
        params["ids"] = [int(i) for i in ids]
    conn.execute(
        sa.text(
            f"""UPDATE proxy_quality SET
                checks_n = a.cn, check_ok_n = a.cs,
                check_ratio = CASE WHEN a.cn > 0 THEN a.cs * 1.0 / a.cn END,
                check_ms_median = a.cmed, check_ms_mean = a.cmean,
                uses_n = a.un, use_ok_n = a.us,
                use_ratio = CASE WHEN a.un > 0 THEN a.us * 1.0 / a.un END,
                use_ms_mean = a.umean,
                reliability = {_wilson_sql("a.cs + a.us", "a.cn + a.un")}
            FROM (SELECT proxy_id, {stats} FROM proxy_quality {where}) a
            WHERE proxy_quality.proxy_id = a.proxy_id"""
        ),
        params,
    )


def backfill_checks(conn: sa.Connection, n: int = HISTORY_N) -> None:
    """Seed the history of proxies that have none from the checks stored in
    ``proxy_checks`` (the newest ``n`` of each): schema step 12, on an upgraded pool."""
    conn.execute(
        sa.text(
            f"""INSERT INTO proxy_quality (proxy_id, check_ok, check_ms, check_at, check_run,
                    checks_total, updated_at)
            SELECT proxy_id,
                   array_agg(CAST(CASE WHEN alive THEN 1 ELSE 0 END AS SMALLINT)
                             ORDER BY checked_at, id),
                   array_agg(CAST(CASE WHEN alive THEN latency_ms END AS DOUBLE PRECISION)
                             ORDER BY checked_at, id),
                   array_agg(checked_at ORDER BY checked_at, id),
                   array_agg(run_id ORDER BY checked_at, id),
                   max(total), CAST(:now AS TIMESTAMP)
            FROM (SELECT proxy_id, id, run_id, alive, latency_ms, checked_at,
                         row_number() OVER (PARTITION BY proxy_id
                                            ORDER BY checked_at DESC, id DESC) AS rn,
                         count(*) OVER (PARTITION BY proxy_id) AS total
                  FROM proxy_checks) c
            WHERE rn <= {max(1, int(n))}
            GROUP BY proxy_id
            ON CONFLICT (proxy_id) DO NOTHING"""
        ),
        {"now": utcnow()},
    )
    refresh(conn, None)


# --- reads ---------------------------------------------------------------------------------


def run_pool_members(conn: sa.Connection, run_id: int) -> list[tuple[Any, ...]]:
    """A run's pool (``run_proxies``) as (proxy id, protocol, scheme, host, port, username,
    has a password), in order: what the engine needs to map the cascade's attempts (which
    name a proxy by its redacted URL) back to proxies. The snapshot is a copy of ``proxies``
    rows, and a proxy's key is its (scheme, user, host, port), so the join finds each."""
    rows = fetch_all(
        conn,
        sa.text(
            """SELECT p.id, r.protocol, r.scheme, r.host, r.port, r.username,
                      r.password_enc IS NOT NULL
            FROM run_proxies r JOIN proxies p
              ON p.host = r.host AND p.port = r.port
             AND p.scheme IS NOT DISTINCT FROM r.scheme
             AND p.username IS NOT DISTINCT FROM r.username
            WHERE r.run_id = :run ORDER BY r.ord"""
        ),
        {"run": run_id},
    )
    return [tuple(r) for r in rows]


def history(conn: sa.Connection, proxy_id: int) -> list[tuple[datetime, str, bool, float | None]]:
    """One proxy's kept events, (at, 'check' | 'use', ok, latency ms), oldest first."""
    q = proxy_quality.c
    rows = fetch_all(
        conn,
        sa.select(q.check_ok, q.check_ms, q.check_at, q.use_ok, q.use_ms, q.use_at).where(
            q.proxy_id == proxy_id
        ),
    )
    if not rows:
        return []
    r = rows[0]
    out = [
        (at, source, bool(ok), ms)
        for source, oks, mss, ats in (("check", r[0], r[1], r[2]), ("use", r[3], r[4], r[5]))
        for ok, ms, at in zip(oks or [], mss or [], ats or [], strict=True)
    ]
    return sorted(out, key=lambda e: (e[0], e[1]))


def quality(conn: sa.Connection, proxy_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The derived figures of these proxies (those with a history), by id."""
    if not proxy_ids:
        return {}
    q = proxy_quality.c
    rows = fetch_all(
        conn,
        sa.select(q.proxy_id, q.checks_total, q.uses_total, *(q[c] for c in QUALITY_COLUMNS)).where(
            q.proxy_id.in_([int(i) for i in proxy_ids])
        ),
    )
    names = ("checks_total", "uses_total", *QUALITY_COLUMNS)
    return {int(r[0]): dict(zip(names, r[1:], strict=True)) for r in rows}


def most_reliable(conn: sa.Connection, status: str | None, limit: int) -> list[tuple[Any, ...]]:
    """(key, status, reliability, check ratio, use ratio, median check ms) of the proxies
    with ``status``, most reliable first (no history last), then fastest."""
    q = proxy_quality.c
    stmt = (
        sa.select(
            proxies.c.key,
            proxies.c.status,
            q.reliability,
            q.check_ratio,
            q.use_ratio,
            q.check_ms_median,
        )
        .select_from(proxies.outerjoin(proxy_quality, q.proxy_id == proxies.c.id))
        .order_by(
            q.reliability.desc().nulls_last(), q.check_ms_median.asc().nulls_last(), proxies.c.id
        )
        .limit(max(1, int(limit)))
    )
    if status:
        stmt = stmt.where(proxies.c.status == status)
    return [tuple(r) for r in fetch_all(conn, stmt)]
