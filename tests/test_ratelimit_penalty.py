"""A 429's ``Retry-After`` is the server's word, and a server can say anything: junk must never
turn a limit off or stop a key for ever, in any limiter (one contract over all three)."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.jobs.backfill.kind import MAX_RETRY_AFTER_S, retry_after_seconds
from engine.ratelimit.base import MAX_PENALTY_S, MemoryLimiter, Rate
from engine.ratelimit.shared import SharedLimiter
from fetchers.validation import parse_retry_after

RATE = Rate.parse("10/1s")  # T = 0.122 s with the default 0.1 s margin
LIMITERS = ["memory", "shared", "postgresql"]


@pytest.fixture(params=LIMITERS)
def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryLimiter()
    elif request.param == "shared":
        shared = SharedLimiter(tmp_path / "pool.ratelimit")
        yield shared
        shared.close()
    else:
        from engine.ratelimit.postgres import PgLimiter
        from storage.db import open_database

        db = open_database(request.getfixturevalue("pg_url"))
        yield PgLimiter(db)
        db.dispose()


@pytest.mark.parametrize("junk", [math.nan, math.inf, -math.inf, -5.0, 1e300])
def test_a_junk_penalty_neither_disables_nor_stops_the_limit(limiter: Any, junk: float) -> None:
    limiter.acquire_now("api", RATE)
    asyncio.run(limiter.penalize("api", RATE, junk))
    slots = []  # (earliest, latest) local time of each slot: the call's start/end + its wait
    for _ in range(4):
        began = time.monotonic()
        wait = limiter.acquire_now("api", RATE)
        assert math.isfinite(wait) and 0 <= wait <= MAX_PENALTY_S + 1, wait
        slots.append((began + wait, time.monotonic() + wait))
    # still a schedule: each slot one interval after the one before, however slow the calls
    for (lo0, hi0), (lo1, hi1) in itertools.pairwise(slots):
        assert lo1 - hi0 <= RATE.interval_s + 1e-6 <= hi1 - lo0 + 2e-6


def test_a_huge_penalty_holds_for_the_bound_not_for_ever(limiter: Any) -> None:
    asyncio.run(limiter.penalize("api", RATE, 10 * MAX_PENALTY_S))
    wait = limiter.acquire_now("api", RATE)
    assert MAX_PENALTY_S - 5 <= wait <= MAX_PENALTY_S + 1


@pytest.mark.postgres
def test_a_nan_already_stored_restarts_the_schedule(pg_url: str) -> None:
    """A row poisoned before the fix (NaN wins greatest()) heals on the next grant."""
    from engine.ratelimit.postgres import PgLimiter
    from storage.db import open_database

    db = open_database(pg_url)
    try:
        limiter = PgLimiter(db)
        limiter.acquire_now("api", RATE)
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE rate_limits SET tat = 'NaN'::float8 WHERE key = 'api'"))
        waits = [limiter.acquire_now("api", RATE) for _ in range(3)]
        assert waits[0] == 0 and waits[2] == pytest.approx(2 * RATE.interval_s, abs=0.05)
    finally:
        db.dispose()


@pytest.mark.parametrize("junk", ["nan", "NaN", "inf", "-inf", "1e999", "-5", "soon", ""])
def test_junk_retry_after_headers_read_as_absent(junk: str) -> None:
    assert parse_retry_after(junk) is None
    assert retry_after_seconds(junk, default=1.5) == 1.5


def test_retry_after_is_bounded_for_backfill() -> None:
    assert retry_after_seconds("86400") == MAX_RETRY_AFTER_S
    assert retry_after_seconds("0") == 0.0
