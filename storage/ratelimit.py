"""The fleet-wide rate limiter's statements (PostgreSQL): one ``rate_limits`` row per key.

    UPDATE rate_limits
       SET margin = <the key's margin after this grant>,
           tat = greatest(tat, <db clock>) + (W + <margin in use>) / (N - B + 1)
     WHERE key = :key
    RETURNING tat, <db clock>, margin

The row lock serialises every process of every machine on the key, and both times come from
the database, so machines with skewed clocks agree. The clock is ``clock_timestamp()``, not
``now()``: ``now()`` is the start of the transaction, taken *before* the statement waited
for the row lock; a stale "now" would let a grant start its interval in the past and the
next one come less than T later. ``clock_timestamp()`` in the SET list is read after the
lock is held (PostgreSQL re-evaluates the target list on the locked row).

The margin is updated in the same statement as the TAT because the interval depends on it
(``engine.ratelimit.margin.next_margin``, written here in SQL: the largest ask, the stored
margin decaying toward the floor, within floor and cap). The algorithm around these
statements is in ``engine.ratelimit``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

CLOCK = "extract(epoch FROM clock_timestamp())::float8"
# A TAT that is not a finite number (NaN wins greatest(); written by a junk Retry-After before
# penalties were bounded) restarts the schedule rather than turning the limit off.
TAT = "(CASE WHEN tat IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) THEN 0 ELSE tat END)"
_STORED = (
    "(CASE WHEN margin IS NULL OR margin IN ('NaN'::float8, 'Infinity'::float8) "
    "OR margin < :floor THEN :floor ELSE margin END)"
)
_AGE = f"greatest({CLOCK} - coalesce(margin_at, 0), 0)"
# next_margin: min(cap, max(floor, ask, floor + (stored - floor) * 0.5 ** min(age / H, 64)))
MARGIN = (
    f"least(:cap, greatest(:floor, :ask, :floor + ({_STORED} - :floor) "
    f"* power(0.5::float8, least({_AGE} / :half_life, 64))))"
)
USED = f"coalesce(CAST(:fixed AS float8), {MARGIN})"

_ACQUIRE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest({TAT}, {CLOCK}) + (:window + {USED}) / :slots,
            margin = {MARGIN},
            margin_at = {CLOCK},
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat, {CLOCK}, margin"""
)
_PENALIZE = sa.text(
    f"""UPDATE rate_limits
        SET tat = greatest({TAT}, {CLOCK} + :seconds + :tau),
            updated_at = (clock_timestamp() AT TIME ZONE 'UTC')
        WHERE key = :key
        RETURNING tat"""
)
_CREATE = sa.text(
    "INSERT INTO rate_limits (key, tat, margin, margin_at, updated_at) VALUES (:key, 0, 0, 0, "
    "(clock_timestamp() AT TIME ZONE 'UTC')) ON CONFLICT (key) DO NOTHING"
)


def _update(conn: sa.Connection, stmt: sa.TextClause, params: dict[str, Any]) -> Any:
    """Run ``stmt`` on the key's row, creating the row the first time (any process)."""
    row = conn.execute(stmt, params).fetchone()
    if row is None:
        # No row yet. ON CONFLICT waits for a concurrent creator to commit; the retried
        # UPDATE (a new statement under READ COMMITTED) then sees its row.
        conn.execute(_CREATE, {"key": params["key"]})
        row = conn.execute(stmt, params).fetchone()
    return row


def reserve(
    conn: sa.Connection,
    key: str,
    *,
    window_s: float,
    slots: int,
    ask: float,
    floor: float,
    cap: float,
    half_life_s: float,
    fixed: float | None,
) -> tuple[float, float, float]:
    """One grant: the key's margin takes in ``ask``, the TAT moves one interval for the margin
    in use (``fixed`` if the user gave one): ``(new TAT, database clock, stored margin)``,
    epoch seconds."""
    params = {
        "key": key,
        "window": float(window_s),
        "slots": int(slots),
        "ask": float(ask),
        "floor": float(floor),
        "cap": float(cap),
        "half_life": float(half_life_s),
        "fixed": None if fixed is None else float(fixed),
    }
    tat, now, margin = _update(conn, _ACQUIRE, params)
    return float(tat), float(now), float(margin)


def push_back(conn: sa.Connection, key: str, seconds: float, tau_s: float) -> None:
    """No grant for ``key`` before ``seconds`` from now (the server refused with a 429)."""
    _update(conn, _PENALIZE, {"key": key, "seconds": float(seconds), "tau": tau_s})
