"""What runs cost, in SQL over what is stored per fetch attempt and per item.

A scrape run's cost is in ``fetch_logs`` (one row per attempt): requests per method, the wall
time of browser attempts (browser-seconds), bytes by route (direct, through a proxy, over
tor), and per domain (``domain``, logged since schema version 9). ``avoided`` marks a page got
without a browser thanks to domain learning; the browser time it saved is that browser's
measured time per attempt on the domain (else in the run). A backfill run's is in
``backfill_items``: requests (``attempts``) and the bodies' bytes. Which methods are browsers
is the caller's to say (``browsers``): storage knows nothing of fetching.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.schema import backfill_items, entities, fetch_logs, files

fl = fetch_logs
_SENT = fl.c.error_type.is_distinct_from("unavailable")  # an unavailable method sent nothing
_PROXY = fl.c.proxy.is_not(None)
_TOR = sa.and_(fl.c.method == "tor", fl.c.proxy.is_(None))
_DIRECT = sa.and_(fl.c.proxy.is_(None), fl.c.method != "tor")


def _sum(col: Any, cond: Any = None) -> Any:
    expr = sa.func.sum(col) if cond is None else sa.func.sum(col).filter(cond)
    return sa.func.coalesce(expr, 0)


def _by_method(conn: sa.Connection, run_id: int, *, domain: bool) -> list[Any]:
    keys = [fl.c.domain, fl.c.method] if domain else [fl.c.method]
    return fetch_all(
        conn,
        sa.select(
            *keys,
            sa.func.count().filter(_SENT),
            _sum(fl.c.ms, _SENT),
            _sum(fl.c.bytes, _DIRECT),
            _sum(fl.c.bytes, _PROXY),
            _sum(fl.c.bytes, _TOR),
            sa.func.count().filter(fl.c.error_type.is_(None)),
        )
        .where(fl.c.run_id == run_id)
        .group_by(*keys),
    )


def _empty() -> dict[str, Any]:
    return {
        "requests": {},
        "browser_s": 0.0,
        "bytes": {"direct": 0, "proxy": 0, "tor": 0},
        "pages": 0,
        "saved_pages": 0,
        "saved_browser_s": 0.0,
    }


def _add(cost: dict[str, Any], row: Sequence[Any], browsers: Sequence[str]) -> None:
    method, sent, ms, direct, proxy, tor, ok = row
    if sent:
        cost["requests"][method] = cost["requests"].get(method, 0) + int(sent)
    if method in browsers:
        cost["browser_s"] += float(ms) / 1000
    for route, n in (("direct", direct), ("proxy", proxy), ("tor", tor)):
        cost["bytes"][route] += int(n)
    cost["pages"] += int(ok)


def fetch_costs(
    conn: sa.Connection, run_id: int, browsers: Sequence[str], top_domains: int = 20
) -> dict[str, Any]:
    """A run's fetch cost: requests per method, browser-seconds, bytes by route, pages got,
    and the browser time domain learning saved; ``domains`` the same per domain (the
    ``top_domains`` costliest by browser time, then bytes)."""
    total = _empty()
    domains: dict[str, dict[str, Any]] = {}
    browser_ms: dict[tuple[str | None, str], tuple[float, int]] = {}  # mean inputs
    for row in _by_method(conn, run_id, domain=True):
        domain, method, sent, ms = row[0], row[1], row[2], row[3]
        _add(total, row[1:], browsers)
        _add(domains.setdefault(domain or "?", _empty()), row[1:], browsers)
        if method in browsers and sent:
            for key in ((domain, method), (None, method)):
                t, n = browser_ms.get(key, (0.0, 0))
                browser_ms[key] = (t + float(ms), n + int(sent))
    avoided = fetch_all(
        conn,
        sa.select(fl.c.domain, fl.c.avoided, sa.func.count())
        .where(fl.c.run_id == run_id, fl.c.avoided.is_not(None))
        .group_by(fl.c.domain, fl.c.avoided),
    )
    for domain, method, n in avoided:
        t, k = browser_ms.get((domain, method)) or browser_ms.get((None, method)) or (0.0, 0)
        saved_s = (t / k / 1000) * int(n) if k else 0.0  # no measure in the run: not claimed
        for cost in (total, domains.setdefault(domain or "?", _empty())):
            cost["saved_pages"] += int(n)
            cost["saved_browser_s"] += saved_s
    ranked = sorted(
        domains.items(), key=lambda d: (-d[1]["browser_s"], -sum(d[1]["bytes"].values()), d[0])
    )
    total["domains"] = [{"domain": d, **_rounded(c)} for d, c in ranked[:top_domains]]
    return _rounded(total)


def _rounded(cost: dict[str, Any]) -> dict[str, Any]:
    return {
        **cost,
        "browser_s": round(cost["browser_s"], 3),
        "saved_browser_s": round(cost["saved_browser_s"], 3),
    }


def file_bytes(conn: sa.Connection, run_id: int) -> int:
    """Bytes of the files a run stored (downloads are not fetch attempts of its pages)."""
    return int(
        fetch_all(
            conn,
            sa.select(_sum(files.c.bytes)).where(
                files.c.run_id == run_id, files.c.status == "stored"
            ),
        )[0][0]
    )


def entities_seen(conn: sa.Connection, run_id: int) -> int:
    """Entities a scrape run stored or saw again: the denominator of its cost per entity."""
    return int(
        fetch_all(conn, sa.select(sa.func.count()).where(entities.c.last_run_id == run_id))[0][0]
    )


def _text_bytes(conn: sa.Connection, col: Any) -> Any:
    # bytes of a text value: PostgreSQL's octet_length, DuckDB's strlen
    return sa.func.octet_length(col) if conn.dialect.name == "postgresql" else sa.func.strlen(col)


def backfill_costs(conn: sa.Connection, run_id: int) -> dict[str, Any]:
    """A backfill run's cost: API calls (every request, retries included), the bytes of the
    bodies stored, items stored ok, and the items the API last answered 429."""
    b = backfill_items
    calls, body, ok, limited = fetch_all(
        conn,
        sa.select(
            _sum(b.c.attempts),
            _sum(_text_bytes(conn, b.c.body)),
            sa.func.count().filter(b.c.status == "ok"),
            sa.func.count().filter(b.c.http_status == 429),
        ).where(b.c.run_id == run_id),
    )[0]
    return {
        "requests": {"api": int(calls)} if calls else {},
        "api_calls": int(calls),
        "bytes": {"direct": int(body), "proxy": 0, "tor": 0},
        "browser_s": 0.0,
        "stored": int(ok),
        "http_429": int(limited),
    }


# --- sliding windows, for stop rules --------------------------------------------------------


def fetch_window(
    conn: sa.Connection, run_id: int, since: datetime, browsers: Sequence[str]
) -> dict[str, float]:
    """A scrape run's attempts since ``since`` (``created_at``: indexed on PostgreSQL): 429
    answers, browser-seconds, megabytes through proxies."""
    n429, ms, proxied = fetch_all(
        conn,
        sa.select(
            sa.func.count().filter(fl.c.status == 429),
            _sum(fl.c.ms, fl.c.method.in_(list(browsers))),
            _sum(fl.c.bytes, _PROXY),
        ).where(fl.c.run_id == run_id, fl.c.created_at >= since),
    )[0]
    return {"http_429": int(n429), "browser_s": float(ms) / 1000, "proxy_mb": int(proxied) / 1e6}


def backfill_window(conn: sa.Connection, run_id: int, since: datetime) -> dict[str, float]:
    """A backfill run's items since ``since`` whose last answer was a 429."""
    b = backfill_items
    n = fetch_all(
        conn,
        sa.select(sa.func.count()).where(
            b.c.run_id == run_id, b.c.fetched_at >= since, b.c.http_status == 429
        ),
    )[0][0]
    return {"http_429": int(n)}
