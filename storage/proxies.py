"""The proxy pool and its check history: import, selection, idempotent result writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged, staged_columns, unnest_select
from storage.clock import utcnow
from storage.proxy_rows import ProxyRow
from storage.schema import proxies, proxy_checks, proxy_quality, run_proxies
from storage.secrets import SecretBox

# EWMA weight of the newest latency sample: recent behaviour matters, one outlier does not.
LATENCY_ALPHA = 0.3
#: The status (and check outcome) of a proxy that modifies content (fetchers.integrity).
TAMPERING = "tampering"
#: Statuses no scrape run or gateway may route through, whatever an operator asks for.
NEVER_ROUTED = frozenset({TAMPERING})


def _routable(status: str) -> str:
    if status in NEVER_ROUTED:
        raise ValueError(
            f"proxies with status {status!r} modify the content they relay: they are never "
            "used for traffic; choose another status (e.g. active)"
        )
    return status


@dataclass(slots=True)
class ProxyFilter:
    status: str | None = None  # untested / active / inactive / tampering
    protocol: str | None = None  # matches the declared scheme or the detected protocol
    older_than_hours: float | None = None  # last checked before, or never
    minutes_old: float | None = None  # revalidate: last checked before (never-checked excluded)
    limit: int | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        conds: list[sa.ColumnElement[bool]] = []
        now = utcnow()
        if self.status:
            conds.append(proxies.c.status == self.status)
        if self.protocol:
            conds.append(
                sa.or_(proxies.c.scheme == self.protocol, proxies.c.protocol == self.protocol)
            )
        if self.older_than_hours is not None:
            cutoff = now - _hours(self.older_than_hours)
            conds.append(sa.or_(proxies.c.last_checked.is_(None), proxies.c.last_checked < cutoff))
        if self.minutes_old is not None:
            cutoff = now - _hours(self.minutes_old / 60)
            conds.append(proxies.c.last_checked < cutoff)
        return conds


def _hours(h: float) -> Any:
    from datetime import timedelta

    return timedelta(hours=h)


IMPORT_COLS = {
    "ord": "bigint",
    "key": "text",
    "scheme": "text",
    "host": "text",
    "port": "int",
    "username": "text",
    "password_enc": "text",
    "source": "text",
    "created_at": "timestamp",
}


def upsert_proxies(
    conn: sa.Connection, specs: Sequence[Any], box: SecretBox, source: str
) -> list[int]:
    """Add proxies not yet in the pool; return the ids of all given, in input order.

    ``specs`` are ``fetchers.proxy_parse.ProxySpec``-like objects (key, scheme, host, port,
    username, password). An existing proxy keeps its history; a new password replaces the old.
    """
    if not specs:
        return []
    n = len(specs)
    values = [
        list(range(n)),
        [s.key for s in specs],
        [s.scheme for s in specs],
        [s.host for s in specs],
        [s.port for s in specs],
        [s.username for s in specs],
        [box.encrypt(s.password) for s in specs],
        [source] * n,
        [utcnow()] * n,
    ]
    with staged_columns(conn, IMPORT_COLS, values) as s:
        conn.execute(
            sa.text(
                f"""INSERT INTO proxies (key, scheme, host, port, username, password_enc, source,
                                     created_at, status)
                SELECT key, scheme, host, port, username, password_enc, source, created_at,
                       'untested' FROM {s}
                ON CONFLICT (key) DO NOTHING"""
            )
        )
        conn.execute(
            sa.text(
                f"""UPDATE proxies SET password_enc = {s}.password_enc FROM {s}
                WHERE proxies.key = {s}.key AND {s}.password_enc IS NOT NULL"""
            )
        )
        rows = fetch_all(
            conn,
            sa.text(f"SELECT p.id FROM proxies p JOIN {s} ON p.key = {s}.key ORDER BY {s}.ord"),
        )
    return [int(r[0]) for r in rows]


def select_ids(conn: sa.Connection, flt: ProxyFilter) -> list[int]:
    """Proxy ids matching a filter, least recently checked first."""
    stmt = (
        sa.select(proxies.c.id)
        .where(*flt.where())
        .order_by(proxies.c.last_checked.asc().nulls_first(), proxies.c.id)
    )
    if flt.limit:
        stmt = stmt.limit(flt.limit)
    return [int(r[0]) for r in fetch_all(conn, stmt)]


def load_for_check(
    conn: sa.Connection, run_id: int, ids: Sequence[int], box: SecretBox
) -> list[ProxyRow]:
    """The proxies of a task that this run has not stored a result for yet."""
    if not ids:
        return []
    if conn.dialect.name == "duckdb":  # on the claim path: one statement, ids bound as a list
        rows = conn.exec_driver_sql(
            """SELECT p.id, p.key, p.scheme, p.host, p.port, p.username, p.password_enc
            FROM proxies p
            WHERE p.id IN (SELECT unnest($1::BIGINT[]))
              AND NOT EXISTS (SELECT 1 FROM proxy_checks c
                              WHERE c.run_id = $2 AND c.proxy_id = p.id)""",
            ([int(i) for i in ids], int(run_id)),
        ).fetchall()
        return _proxy_rows(rows, box)
    done = {
        int(r[0])
        for r in fetch_all(
            conn,
            sa.select(proxy_checks.c.proxy_id).where(
                proxy_checks.c.run_id == run_id, proxy_checks.c.proxy_id.in_(list(ids))
            ),
        )
    }
    todo = [i for i in ids if i not in done]
    if not todo:
        return []
    rows = fetch_all(
        conn,
        sa.select(
            proxies.c.id,
            proxies.c.key,
            proxies.c.scheme,
            proxies.c.host,
            proxies.c.port,
            proxies.c.username,
            proxies.c.password_enc,
        ).where(proxies.c.id.in_(todo)),
    )
    return _proxy_rows(rows, box)


def _proxy_rows(rows: Sequence[Any], box: SecretBox) -> list[ProxyRow]:
    return [
        ProxyRow(
            id=int(r[0]),
            key=r[1],
            scheme=r[2],
            host=r[3],
            port=int(r[4]),
            username=r[5],
            password=box.decrypt(r[6]) if r[6] is not None else None,
        )
        for r in rows
    ]


CHECK_COLS = {
    "run_id": "bigint",
    "proxy_id": "bigint",
    "task_id": "bigint",
    "worker_id": "text",
    "checked_at": "timestamp",
    "outcome": "text",
    "alive": "bool",
    "protocol": "text",
    "latency_ms": "float",
    "anonymity": "text",
    "exit_ip": "text",
    "country": "text",
    "error": "text",
}


def store_checks(conn: sa.Connection, rows: Iterable[Sequence[Any]]) -> int:
    """Store check results (tuples in CHECK_COLS order) exactly once per (run, proxy) and fold
    them into the pool. Returns how many were new."""
    rows = list(rows)
    if not rows:
        return 0
    return store_check_columns(conn, [list(c) for c in zip(*rows, strict=True)])


# What the pool takes from a new check (the UPDATE below reads these columns of ``s``).
_FOLD_COLS = (
    "proxy_id", "checked_at", "outcome", "alive", "protocol", "latency_ms", "anonymity",
    "exit_ip", "country", "error",
)  # fmt: skip


def _fold_sql(s: str) -> str:
    a = LATENCY_ALPHA
    return f"""UPDATE proxies SET
                status = CASE WHEN {s}.outcome = '{TAMPERING}' THEN '{TAMPERING}'
                              WHEN {s}.alive THEN 'active' ELSE 'inactive' END,
                protocol = COALESCE({s}.protocol, proxies.protocol),
                anonymity = CASE WHEN {s}.alive THEN {s}.anonymity ELSE proxies.anonymity END,
                exit_ip = CASE WHEN {s}.alive THEN {s}.exit_ip ELSE proxies.exit_ip END,
                country = CASE WHEN {s}.alive THEN {s}.country ELSE proxies.country END,
                latency_ms = {s}.latency_ms,
                latency_ewma_ms = CASE
                    WHEN {s}.latency_ms IS NULL THEN proxies.latency_ewma_ms
                    WHEN proxies.latency_ewma_ms IS NULL THEN {s}.latency_ms
                    ELSE {1 - a} * proxies.latency_ewma_ms + {a} * {s}.latency_ms END,
                success_count = proxies.success_count + CASE WHEN {s}.alive THEN 1 ELSE 0 END,
                failure_count = proxies.failure_count + CASE WHEN {s}.alive THEN 0 ELSE 1 END,
                last_outcome = {s}.outcome,
                last_error = {s}.error,
                last_checked = {s}.checked_at"""


def store_check_columns(conn: sa.Connection, columns: Sequence[list[Any]]) -> int:
    """``store_checks`` from one list per column (CHECK_COLS order, equal lengths).

    Callers on PostgreSQL hold the lock of the tasks these rows belong to, so two executions
    of one task cannot both count as new. On DuckDB the coordinator is the only writer (its
    writes are serialised by ``Database.write_lock``): the insert skips what is stored for
    (run, proxy) in the same statement, and only what it inserted is folded into the pool.
    """
    if not columns or not columns[0]:
        return 0
    keys = list(zip(columns[0], columns[1], strict=True))
    if len(set(keys)) != len(keys):  # a batch repeating an item: its first result counts
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        keep = sorted(first.values())
        columns = [[col[i] for i in keep] for col in columns]
    if conn.dialect.name == "duckdb":
        return _store_checks_duckdb(conn, columns)
    rows = list(zip(*columns, strict=True))
    cols = ", ".join(CHECK_COLS)
    with staged(conn, CHECK_COLS, rows) as s:
        conn.execute(
            sa.text(
                f"""DELETE FROM {s} WHERE EXISTS (SELECT 1 FROM proxy_checks c
                WHERE c.run_id = {s}.run_id AND c.proxy_id = {s}.proxy_id)"""
            )
        )
        new = fetch_all(conn, sa.text(f"SELECT count(*) FROM {s}"))[0][0]
        if not new:
            return 0
        conn.execute(
            sa.text(
                f"INSERT INTO proxy_checks ({cols}) SELECT {cols} FROM {s} ON CONFLICT DO NOTHING"
            )
        )
        conn.execute(sa.text(_fold_sql(s) + f" FROM {s} WHERE proxies.id = {s}.proxy_id"))
    return int(new)


def _store_checks_duckdb(conn: sa.Connection, columns: Sequence[list[Any]]) -> int:
    """Two statements, no temp table: insert what is new (list parameters unnested), then fold
    the inserted rows into the pool."""
    cols = ", ".join(CHECK_COLS)
    new = conn.exec_driver_sql(
        f"""INSERT INTO proxy_checks ({cols})
        SELECT * FROM (SELECT {unnest_select(CHECK_COLS)}) s
        WHERE NOT EXISTS (SELECT 1 FROM proxy_checks c
                          WHERE c.run_id = s.run_id AND c.proxy_id = s.proxy_id)
        RETURNING run_id, proxy_id""",
        tuple(columns),
    ).fetchall()
    if not new:
        return 0
    index = {name: i for i, name in enumerate(CHECK_COLS)}
    fold = [columns[index[c]] for c in _FOLD_COLS]
    if len(new) != len(columns[0]):  # some were stored already (a task run again)
        stored = set(map(tuple, new))
        keep = [k in stored for k in zip(columns[0], columns[1], strict=True)]
        fold = [[v for v, k in zip(col, keep, strict=True) if k] for col in fold]
    fold_types = {c: CHECK_COLS[c] for c in _FOLD_COLS}
    conn.exec_driver_sql(
        _fold_sql("s")
        + f" FROM (SELECT {unnest_select(fold_types)}) s WHERE proxies.id = s.proxy_id",
        tuple(fold),
    )
    return len(new)


def pool_counts(conn: sa.Connection) -> dict[str, int]:
    rows = fetch_all(conn, sa.select(proxies.c.status, sa.func.count()).group_by(proxies.c.status))
    return {r[0]: int(r[1]) for r in rows}


def last_check_time(conn: sa.Connection, run_id: int) -> datetime | None:
    rows = fetch_all(
        conn,
        sa.select(sa.func.max(proxy_checks.c.checked_at)).where(proxy_checks.c.run_id == run_id),
    )
    return rows[0][0] if rows else None


# How pools are chosen and ordered: most reliable over time first (the Wilson lower bound of
# a proxy's checks and uses, ``storage.proxy_history``: a proxy proven over many answers
# before a lucky new one or a fast flaky one), no history last, then fastest. A limit takes
# the most reliable.
_BY_QUALITY = (
    proxy_quality.c.reliability.desc().nulls_last(),
    proxies.c.latency_ms.nulls_last(),
    proxies.c.id,
)
_WITH_QUALITY = proxies.outerjoin(proxy_quality, proxy_quality.c.proxy_id == proxies.c.id)


def pool_snapshot(conn: sa.Connection, status: str, limit: int) -> list[tuple[Any, ...]]:
    """The proxies with ``status``, most reliable first, then fastest (``_BY_QUALITY``), as
    (protocol, scheme, host, port, username, password token): what a scrape run routes
    through. Passwords stay encrypted. A status in ``NEVER_ROUTED`` raises ValueError."""
    _routable(status)
    rows = fetch_all(
        conn,
        sa.select(
            proxies.c.protocol,
            proxies.c.scheme,
            proxies.c.host,
            proxies.c.port,
            proxies.c.username,
            proxies.c.password_enc,
        )
        .select_from(_WITH_QUALITY)
        .where(proxies.c.status == status)
        .order_by(*_BY_QUALITY)
        .limit(limit),
    )
    return [tuple(r) for r in rows]


def snapshot_run_pool(conn: sa.Connection, run_id: int, status: str, limit: int) -> int:
    """Copy the proxies with ``status`` (at most ``limit``, in ``pool_snapshot``'s order)
    into ``run_proxies`` for a run: its workers, on any machine, route through this copy
    while ``proxies`` goes on changing. Returns how many were copied. A status in
    ``NEVER_ROUTED`` raises ValueError."""
    _routable(status)
    conn.execute(sa.delete(run_proxies).where(run_proxies.c.run_id == run_id))
    p = proxies.c
    chosen = (
        sa.select(p.protocol, p.scheme, p.host, p.port, p.username, p.password_enc)
        .add_columns(sa.func.row_number().over(order_by=_BY_QUALITY).label("ord"))
        .select_from(_WITH_QUALITY)
        .where(p.status == status)
        .order_by(*_BY_QUALITY)
        .limit(limit)
        .subquery()
    )
    c = chosen.c
    columns = ["ord", "protocol", "scheme", "host", "port", "username", "password_enc"]
    conn.execute(
        run_proxies.insert().from_select(
            ["run_id", *columns],
            sa.select(sa.literal(run_id, sa.BigInteger), *(c[k] for k in columns)),
        )
    )
    count = sa.select(sa.func.count()).where(run_proxies.c.run_id == run_id)
    return int(fetch_all(conn, count)[0][0])


def read_run_pool(conn: sa.Connection, run_id: int) -> list[tuple[Any, ...]]:
    """A run's pool (``snapshot_run_pool``) as (protocol, scheme, host, port, username,
    password token) rows, in order. Passwords stay encrypted: workers decrypt them."""
    c = run_proxies.c
    rows = fetch_all(
        conn,
        sa.select(c.protocol, c.scheme, c.host, c.port, c.username, c.password_enc)
        .where(c.run_id == run_id)
        .order_by(c.ord),
    )
    return [tuple(r) for r in rows]


def pool_states(conn: sa.Connection) -> dict[str, tuple[str, str | None, str | None]]:
    """Every stored proxy's key → (status, anonymity, detected protocol)."""
    rows = fetch_all(
        conn, sa.select(proxies.c.key, proxies.c.status, proxies.c.anonymity, proxies.c.protocol)
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def gateway_members(conn: sa.Connection, status: str, limit: int) -> list[tuple[Any, ...]]:
    """The proxies with ``status`` as the rotating gateway needs them: (key, protocol, scheme,
    host, port, username, password token, country, anonymity, latency EWMA ms), most
    reliable first, then fastest (``_BY_QUALITY``). Passwords stay encrypted; the gateway decrypts them in memory. A status in
    ``NEVER_ROUTED`` raises ValueError."""
    _routable(status)
    rows = fetch_all(
        conn,
        sa.select(
            proxies.c.key,
            proxies.c.protocol,
            proxies.c.scheme,
            proxies.c.host,
            proxies.c.port,
            proxies.c.username,
            proxies.c.password_enc,
            proxies.c.country,
            proxies.c.anonymity,
            sa.func.coalesce(proxies.c.latency_ewma_ms, proxies.c.latency_ms),
        )
        .select_from(_WITH_QUALITY)
        .where(proxies.c.status == status)
        .order_by(*_BY_QUALITY)
        .limit(limit),
    )
    return [tuple(r) for r in rows]
