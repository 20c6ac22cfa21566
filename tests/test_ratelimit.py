"""The shared rate limiter: GCRA arithmetic, every backend, and the guarantee under load.

The multi-process tests record the moment every grant is *used* (after the sleep, as a
worker would send) in four spawned processes and check that no window of the stated length
ever holds more than N — against the local pool's shared file and against PostgreSQL.
Windows are counted as servers count them: half-open, (t - W, t].
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import random
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any

import pytest

from engine.ratelimit.base import Gate, MemoryLimiter, Rate, Slot, gcra
from engine.ratelimit.shared import SharedLimiter


def max_in_window(times: list[float], window: float) -> int:
    """The most events in any half-open window (t - window, t] (windows end at events), as a
    sliding log or fixed windows count them."""
    times = sorted(times)
    return max((bisect_right(times, t) - bisect_right(times, t - window) for t in times), default=0)


# --- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "window"),
    [("3000/5m", 3000, 300), ("10/1s", 10, 1), ("100/s", 100, 1), ("5/2h", 5, 7200)],
)
def test_parse_rates(text: str, limit: int, window: float) -> None:
    rate = Rate.parse(text)
    assert (rate.limit, rate.window_s) == (limit, window)
    # the documented formula: burst - 1 + (window + margin) / T = N
    assert rate.burst - 1 + (rate.window_s + rate.jitter) / rate.interval_s <= rate.limit + 1e-9


@pytest.mark.parametrize("text", ["abc", "", "3000", "10/5x", "0/1s", "-1/1s", "10/0s", "1/1h"])
def test_bad_rates_are_refused_with_the_format(text: str) -> None:
    with pytest.raises(ValueError, match=r"N/period|more than zero|exceed the burst|longer than"):
        Rate.parse(text)


def test_schedule_reaches_the_limit_for_realistic_windows() -> None:
    assert Rate.parse("3000/5m").utilisation > 0.99
    assert Rate.parse("12000/1m").utilisation > 0.98
    assert Rate.parse("1500/10s").utilisation > 0.97
    assert Rate.parse("200/2s").utilisation > 0.94


def test_gcra_spaces_grants_and_allows_the_burst() -> None:
    rate = Rate(limit=10, window_s=1.0, burst=3, jitter_s=0.0)  # T = 0.125, tau = 0.25
    tat, grants = 0.0, []
    for _ in range(6):
        tat, wait = gcra(tat, 100.0, rate.interval_s, rate.tau_s)
        grants.append(100.0 + wait)
    assert grants[:3] == [100.0, 100.0, 100.0]  # the burst
    assert grants[3:] == pytest.approx([100.125, 100.25, 100.375])


@pytest.mark.parametrize("burst", [1, 5])
def test_no_window_exceeds_the_limit_for_any_arrivals(burst: int) -> None:
    """Random arrivals (bursts, idle gaps) against a fake clock; grants checked exactly."""
    rng = random.Random(burst)
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    rate = Rate(limit=50, window_s=1.0, burst=burst)
    grants = []
    for _ in range(3000):
        now[0] += rng.choice([0.0, 0.0, 0.001, 0.01, 0.05, 0.5])
        grants.append(now[0] + limiter.acquire_now("k", rate))
    assert max_in_window(grants, rate.window_s) <= rate.limit
    # grants used late by up to the margin still hold the limit
    late = [g + rng.uniform(0, rate.jitter) for g in grants]
    assert max_in_window(late, rate.window_s) <= rate.limit


def test_penalize_moves_every_later_grant_past_retry_after() -> None:
    now = [10.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    rate = Rate.parse("100/1s")
    assert limiter.acquire_now("k", rate) == 0
    asyncio.run(limiter.penalize("k", rate, 2.0))
    assert limiter.acquire_now("k", rate) == pytest.approx(2.0)
    assert limiter.acquire_now("other", rate) == 0  # keys are independent


def test_gate_keeps_the_schedule_a_short_horizon_ahead() -> None:
    """Many coroutines through one gate: slots stay T apart and the shared schedule runs at
    most the gate's horizon ahead (a stop or a crash wastes almost nothing).

    Asserted on the schedule the limiter hands out (on its clock), not on when the coroutines
    happened to run: a busy machine wakes them late, which the margin is for."""
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    rate = Rate(limit=40, window_s=1.0, jitter_s=0.0)  # T = 25 ms: depth 2
    slots: list[float] = []
    ahead: list[float] = []

    class Recording:
        async def reserve(self, key: str, r: Rate, ask: float = 0.0) -> Slot:
            now[0] = time.monotonic()
            slot = limiter.reserve_now(key, r, ask)
            slots.append(now[0] + slot.wait)
            ahead.append(limiter._keys[key].tat - now[0])
            return slot

    async def main() -> None:
        gate = Gate(Recording(), horizon_s=0.05)  # type: ignore[arg-type]
        assert gate.depth(rate) == 2
        await asyncio.gather(*(gate.wait("k", rate) for _ in range(20)))

    asyncio.run(main())
    assert len(slots) >= 20
    # a reservation, asked for as the slot before it is used, ends at most depth + 1 slots on
    assert max(ahead) <= 3 * rate.interval_s + 1e-9
    gaps = [b - a for a, b in itertools.pairwise(sorted(slots))]
    assert min(gaps) >= rate.interval_s - 1e-9


# --- the shared file (local pool) ---------------------------------------------------------------


def test_shared_file_is_one_schedule_for_every_opener_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb.ratelimit"
    now = [50.0]
    a = SharedLimiter(path, clock=lambda: now[0])
    b = SharedLimiter(path, clock=lambda: now[0])
    rate = Rate(limit=10, window_s=1.0, jitter_s=0.0)  # T = 0.1
    assert a.acquire_now("api", rate) == 0
    assert b.acquire_now("api", rate) == pytest.approx(0.1)
    assert a.acquire_now("api", rate) == pytest.approx(0.2)
    a.close()
    b.close()
    c = SharedLimiter(path, clock=lambda: now[0])  # a new coordinator after kill -9
    assert c.acquire_now("api", rate) == pytest.approx(0.3)
    c.penalize_now("api", rate, 5.0)
    assert c.acquire_now("api", rate) == pytest.approx(5.0)
    c.close()


def test_shared_file_from_another_boot_is_cleared(tmp_path: Path) -> None:
    import engine.ratelimit.shared as shared

    path = tmp_path / "x.ratelimit"
    a = SharedLimiter(path, clock=lambda: 1e6)
    a.acquire_now("api", Rate.parse("10/1s"))
    a.acquire_now("api", Rate.parse("10/1s"))
    a.close()
    real = shared.boot_id
    shared.boot_id = lambda: b"\x01" * 16
    try:
        b = SharedLimiter(path, clock=lambda: 1e6)
        assert b.acquire_now("api", Rate.parse("10/1s")) == 0
        b.close()
    finally:
        shared.boot_id = real


# --- many processes: the guarantee --------------------------------------------------------------

RATE = "200/2s"
# The sends are timed here, in the test's processes, on a machine the suite keeps busy: the
# margin is the measured one (the default), which grows when these processes wake late.
DURATION_S = 10.0
PROCESSES = 4


def _hammer(backend: str, target: str, key: str, ready: Any, out: mp.Queue) -> None:
    """One process: 8 coroutines take slots through a Gate for DURATION_S once every process
    is ready (a barrier, not a start time: on a loaded machine an import can take longer than
    any fixed head start); report use times and the margin of each slot used."""
    from engine.runtime.worker import install_uvloop

    if backend == "shared":
        limiter = SharedLimiter(target)
    else:
        from engine.ratelimit.postgres import PgLimiter
        from storage.db import open_database

        limiter = PgLimiter(open_database(target, create=False))
    rate = Rate.parse(RATE)
    install_uvloop()

    async def main() -> list[tuple[float, float]]:
        gate = Gate(limiter)
        used: list[tuple[float, float]] = []
        await asyncio.to_thread(ready.wait, 120)
        end = time.time() + DURATION_S

        async def sender() -> None:
            while time.time() < end:
                await gate.wait(key, rate)
                used.append((time.time(), gate.margins[key]))  # when a worker would send

        await asyncio.gather(*(sender() for _ in range(8)))
        return used

    out.put(asyncio.run(main()))


def _run_processes(backend: str, target: str) -> list[tuple[float, float]]:
    ctx = mp.get_context("spawn")  # as the local pool starts its workers
    out = ctx.Queue()
    ready = ctx.Barrier(PROCESSES)  # every process imported and its limiter open
    procs = [
        ctx.Process(target=_hammer, args=(backend, target, "api-key", ready, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=DURATION_S + 150) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert all(results), "every process got slots"
    return [t for r in results for t in r]


def _assert_guarantee(sent: list[tuple[float, float]]) -> None:
    rate = Rate.parse(RATE)
    times = [t for t, _ in sent]
    peak = max_in_window(times, rate.window_s)
    achieved = (len(times) - 1) / (max(times) - min(times))
    margin = sum(m for _, m in sent) / len(sent)
    print(
        f"\n{len(times)} grants, peak {peak}/{rate.limit} per {rate.window_s}s, "
        f"{achieved:.1f}/s = {achieved / rate.per_second:.3f} of the limit, "
        f"margin {min(m for _, m in sent) * 1000:.0f}-{max(m for _, m in sent) * 1000:.0f} ms"
    )
    assert peak <= rate.limit
    # not safe by being slow: at the pace of the margins in force
    assert achieved >= 0.9 * rate.utilisation_for(margin) * rate.per_second


@pytest.mark.slow
def test_four_processes_through_the_shared_file_never_exceed_the_limit(tmp_path: Path) -> None:
    _assert_guarantee(_run_processes("shared", str(tmp_path / "pool.ratelimit")))


@pytest.mark.slow
@pytest.mark.postgres
def test_four_processes_through_postgres_never_exceed_the_limit(pg_url: str) -> None:
    from storage.db import open_database

    open_database(pg_url).dispose()  # schema (rate_limits)
    _assert_guarantee(_run_processes("pg", pg_url))


@pytest.mark.postgres
def test_postgres_limiter_uses_the_database_clock(pg_url: str) -> None:
    import sqlalchemy as sa

    from engine.ratelimit.postgres import PgLimiter
    from storage.db import open_database

    db = open_database(pg_url)
    try:
        limiter = PgLimiter(db)
        rate = Rate(limit=10, window_s=1.0, jitter_s=0.0)  # T = 0.1
        waits = [limiter.acquire_now("k", rate) for _ in range(5)]
        # back to back: each reservation is T after the previous one (minus the time spent)
        assert waits[0] == 0
        assert waits[4] == pytest.approx(0.4, abs=0.05)
        limiter.penalize_now("k", rate, 3.0)
        assert limiter.acquire_now("k", rate) == pytest.approx(3.0, abs=0.05)
        with db.connect() as conn:
            keys = conn.execute(sa.text("SELECT key FROM rate_limits")).fetchall()
        assert [k[0] for k in keys] == ["k"]
    finally:
        db.dispose()


def test_gate_drops_a_slot_it_woke_too_late_for() -> None:
    """A starved process must not send on a slot long past: it takes a new one."""
    limiter = MemoryLimiter()
    rate = Rate(limit=10, window_s=1.0, jitter_s=0.02)  # T = 102 ms: drop when > 10 ms late

    async def main() -> tuple[float, int]:
        gate = Gate(limiter, horizon_s=0.0)
        t0 = time.monotonic()
        await gate.wait("k", rate)  # the first slot: now

        async def block_the_loop() -> None:
            await asyncio.sleep(0.05)
            time.sleep(0.15)  # the event loop is stuck until 200 ms: 98 ms past the 2nd slot

        blocker = asyncio.create_task(block_the_loop())
        await gate.wait("k", rate)
        await blocker
        return time.monotonic() - t0, gate.late_slots

    took, late = asyncio.run(main())
    assert late == 1
    assert took >= 2 * rate.interval_s - 0.005  # it waited for the third slot


class SlowLink:
    """A limiter a long way off: every answer takes ``out`` to arrive and ``back`` to return,
    as a distant or busy PostgreSQL does (the slot is stamped in between)."""

    def __init__(self, out: float, back: float) -> None:
        self.inner = MemoryLimiter()
        self.out, self.back = out, back

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        await asyncio.sleep(self.out)
        slot = self.inner.reserve_now(key, rate, ask)
        stamped = time.monotonic()
        await asyncio.sleep(self.back)
        aged = max(0.0, slot.wait - (time.monotonic() - stamped))  # as a remote clock's answer
        return Slot(aged, slot.margin)


def test_a_slow_limiter_costs_throughput_never_all_of_it() -> None:
    """A 200 ms round trip, four times (J + T) / 2: every grant used to count as late and be
    dropped, for ever. A delay every grant shares keeps their spacing; they are used."""
    link = SlowLink(out=0.1, back=0.1)
    rate = Rate(limit=101, window_s=1.0)  # T = 11 ms, (J + T) / 2 = 55 ms

    async def main() -> tuple[list[float], int]:
        gate = Gate(link, horizon_s=0.05)
        used: list[float] = []

        async def one() -> None:
            await gate.wait("k", rate)
            used.append(time.monotonic())

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(10))), timeout=30)
        return used, gate.late_slots

    used, late = asyncio.run(main())
    assert len(used) == 10
    assert late < 10  # some may be dropped on a busy machine; not all of them
