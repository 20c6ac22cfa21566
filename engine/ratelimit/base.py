"""Rate limits shared by every worker that sends to one key (an API, a domain).

The algorithm is GCRA, the generic cell rate algorithm. Its whole state per key is one
timestamp, the *theoretical arrival time* TAT. With emission interval ``T`` and burst
tolerance ``tau``, a request arriving at ``now`` is scheduled at

    grant = max(now, TAT - tau)          (the caller sleeps grant - now, then sends)
    TAT   = max(TAT, now) + T

so grants are spaced ``T`` apart after an initial burst of ``B = tau / T + 1``. Because the
state is one number it fits every place workers can share: a dict (one process), an mmap'd
file (the local pool: ``engine.ratelimit.shared``) and one row updated with a single
``UPDATE … RETURNING`` stamped by the database clock (every machine on PostgreSQL:
``engine.ratelimit.postgres``).

**The guarantee: never more than N requests in any window of length W** (``--rate-limit N/W``).
A GCRA stream holds at most ``floor((L + tau) / T) + 1`` grants in any closed interval of
length L. We choose

    B + (W + J) / T <= N,   i.e.  T = (W + J) / (N - B),   tau = (B - 1) * T

where ``J`` is a jitter allowance (``--rate-margin``, ``Rate.jitter_s``; by default 2 % of W,
at least 0.1 s, at most 2 s). A request reaches the server some time after its grant (the
sleep overshoots, the event loop is busy, packets queue, the server's process is not
scheduled); if every request arrives less than ``J + T`` after its grant, the requests *as
the server sees them* still hold at most N in any window of length W. The cost is
throughput: the long-run rate is ``1/T = (N - B) / (W + J)``, e.g. 0.993 of the limit for
3000/5m, 0.98 for 12000/1m, 0.95 for 200/2s, 0.90 for 100/1s. Measured on two busy cores,
sends left their grants within 8 ms, but the sim's server process was sometimes descheduled
for more than 50 ms: 50 ms was not enough for a 1 s window, 100 ms was. The default burst
is 1 (no burst): the safe choice when the server's own window is unknown.

Acquire is async and returns the time to wait; ``Gate`` is what a worker uses: it keeps a
few reservations in flight per key and process (about 50 ms of the schedule, so it never runs
far ahead of what is being sent and a stop does not wait on a long queue) and sleeps.
A 429 calls ``penalize``: the key's TAT moves past ``Retry-After``, so every worker of every
process slows down, not only the one that was refused.

Which limiter a process uses depends on its deployment, which a job kind cannot see: the
worker's boot (``engine.queue``) builds one per process — the mmap'd file for pool workers of
a DuckDB coordinator, the database on PostgreSQL, a ``MemoryLimiter`` for a process alone —
and the worker hands it to every executor in ``engine.jobs.base.WorkerEnv``. No globals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` requests in any window of ``window_s`` seconds."""

    limit: int
    window_s: float
    burst: int = 1
    jitter_s: float | None = None

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError("the window of a rate limit must be longer than zero")
        if self.burst < 1:
            raise ValueError("the burst must be at least 1")
        if self.limit <= self.burst:
            raise ValueError(
                f"a limit of {self.limit} per window leaves no room after a burst of "
                f"{self.burst}: the limit must exceed the burst (e.g. 2/2h rather than 1/1h)"
            )

    @classmethod
    def parse(cls, text: str, burst: int = 1, jitter_s: float | None = None) -> Rate:
        """``'3000/5m'``, ``'10/1s'``, ``'100/s'``, ``'5/2h'`` → Rate."""
        m = _RATE_RE.fullmatch(text or "")
        if not m:
            raise ValueError(
                f"rate limit {text!r}: write N/period, e.g. 3000/5m, 10/1s or 500/2h "
                "(period units ms, s, m, h, d)"
            )
        limit = int(m[1])
        window = float(m[2] or 1) * _UNITS[m[3]]
        if limit < 1 or window <= 0:
            raise ValueError(f"rate limit {text!r}: N and the period must be more than zero")
        if jitter_s is not None and not 0 <= jitter_s < window:
            raise ValueError(f"rate margin {jitter_s}s: must be at least 0 and below the window")
        return cls(limit=limit, window_s=window, burst=burst, jitter_s=jitter_s)

    @property
    def jitter(self) -> float:
        if self.jitter_s is not None:
            return self.jitter_s
        return min(2.0, max(0.1, 0.02 * self.window_s))

    @property
    def interval_s(self) -> float:
        """Emission interval T."""
        return (self.window_s + self.jitter) / (self.limit - self.burst)

    @property
    def tau_s(self) -> float:
        """Burst tolerance."""
        return (self.burst - 1) * self.interval_s

    @property
    def per_second(self) -> float:
        """The stated limit as a rate (N / W)."""
        return self.limit / self.window_s

    @property
    def utilisation(self) -> float:
        """The best long-run fraction of the stated limit this schedule achieves."""
        return (1.0 / self.interval_s) / self.per_second

    def describe(self) -> str:
        return f"{self.limit}/{format_seconds(self.window_s)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "window_s": self.window_s,
            "burst": self.burst,
            "jitter_s": self.jitter_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rate:
        jitter = d.get("jitter_s")
        return cls(
            limit=int(d["limit"]),
            window_s=float(d["window_s"]),
            burst=int(d.get("burst") or 1),
            jitter_s=None if jitter is None else float(jitter),
        )


def format_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size and math.isclose(s / size, round(s / size)):
            return f"{round(s / size)}{unit}"
    return f"{s:g}s"


MAX_PENALTY_S = 3600.0


def bounded_penalty(seconds: float, rate: Rate) -> float:
    """A server's "not before" as a finite penalty: between 0 and an hour (or the window).

    A junk ``Retry-After`` (``nan``, ``inf``, ``1e300``, a negative) must not reach a TAT: NaN
    wins PostgreSQL's ``greatest()`` and every later wait is 0 (the limit is off for good, in
    every run that shares the key); an infinite or huge one stops the key for ever. An hour
    costs a server that really wants a day one request an hour, which it refuses again.
    """
    if math.isnan(seconds) or seconds <= 0:
        return 0.0
    return min(seconds, max(MAX_PENALTY_S, rate.window_s))


def sane_tat(tat: float) -> float:
    """A stored TAT that is not a finite number (written before ``bounded_penalty``) restarts
    the schedule instead of disabling or stopping it."""
    return tat if math.isfinite(tat) else 0.0


def gcra(tat: float, now: float, interval: float, tau: float) -> tuple[float, float]:
    """Reserve the next slot: ``(new TAT, seconds to wait)``."""
    tat = sane_tat(tat)
    return max(tat, now) + interval, max(0.0, tat - tau - now)


def penalized(tat: float, now: float, seconds: float, rate: Rate) -> float:
    """TAT after the server said 'not before now + seconds'."""
    return max(sane_tat(tat), now + bounded_penalty(seconds, rate) + rate.tau_s)


class RateLimiter(Protocol):
    """One implementation per place the state can live; all share ``gcra``."""

    async def acquire(self, key: str, rate: Rate) -> float:
        """Reserve the next slot of ``key``; returns seconds to wait before sending."""
        ...

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        """The server refused (429): no grant for ``key`` before ``seconds`` from now."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimiter:
    """One process (unit tests, a single worker). ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire_now(self, key: str, rate: Rate) -> float:
        with self._lock:
            tat, wait = gcra(self._tat.get(key, 0.0), self.clock(), rate.interval_s, rate.tau_s)
            self._tat[key] = tat
            return wait

    async def acquire(self, key: str, rate: Rate) -> float:
        return self.acquire_now(key, rate)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        with self._lock:
            now = self.clock()
            self._tat[key] = penalized(self._tat.get(key, 0.0), now, seconds, rate)

    async def aclose(self) -> None:
        return None


class Gate:
    """A worker's way through a limiter: a few reservations in flight per key, then sleep.

    Each process keeps at most ``depth`` future slots reserved per key, enough to cover
    ``horizon_s`` of the schedule (at least one): the shared schedule never runs far ahead of
    what is being sent, so a pause or a crash wastes almost nothing and fairness between
    processes comes from the shared state. One slot per process is too few at high rates:
    GCRA does not bank idle time (burst 1), so every millisecond a busy event loop takes to
    ask for the next slot would be lost throughput.

    A slot used late eats into the margin the guarantee rests on (requests must reach the
    server less than J + T after their slot, see the module docstring). When this process
    wakes more than half of that after its slot (a starved CPU, a database answer slower than
    the fastest recent one),
    it does not send on it: the slot is dropped and a new one taken, leaving the other half
    for the network and the server.
    That costs throughput, never the limit; ``late_slots`` counts them.
    """

    def __init__(self, limiter: RateLimiter, horizon_s: float = 0.05) -> None:
        self.limiter = limiter
        self.horizon_s = horizon_s
        self.late_slots = 0
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._rtts: deque[float] = deque(maxlen=32)  # the limiter's recent round trips

    def _round_trip_excess(self, rtt: float) -> float:
        """How much longer this answer took than the fastest recent one.

        The limiter's clock starts a slot somewhere inside the round trip; a delay every grant
        shares (a distant database) shifts every send alike and keeps their spacing, so only
        what varies eats into the margin. Counting the whole round trip as lateness dropped
        every slot once it exceeded half the margin (a slow database stopped all sending).
        """
        self._rtts.append(rtt)
        return rtt - min(self._rtts)

    def depth(self, rate: Rate) -> int:
        return max(1, min(64, math.ceil(self.horizon_s / rate.interval_s)))

    async def wait(self, key: str, rate: Rate) -> float:
        """Wait for a slot of ``key``; returns the seconds waited."""
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self.depth(rate))
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with slots:
            while True:
                asked = loop.time()
                wait = await self.limiter.acquire(key, rate)
                answered = loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                late = loop.time() - (answered + wait) + self._round_trip_excess(answered - asked)
                if late <= (rate.jitter + rate.interval_s) / 2:  # half of what the limit allows
                    return loop.time() - began
                self.late_slots += 1
                if self.late_slots in (1, 10, 100) or self.late_slots % 1000 == 0:
                    log.warning(
                        "rate limit %s: %d slot(s) dropped, this process woke up to %.0f ms "
                        "after its slot (CPU starved?); the limit holds, throughput drops",
                        key,
                        self.late_slots,
                        late * 1000,
                    )


class LazyLimiter:
    """A limiter opened when a job first takes a slot, not when its worker starts: a pool
    worker that only validates proxies never creates the shared rate-limit file."""

    def __init__(self, open_limiter: Callable[[], RateLimiter]) -> None:
        self._open = open_limiter
        self._limiter: RateLimiter | None = None
        self._lock = threading.Lock()

    @property
    def limiter(self) -> RateLimiter:
        if self._limiter is None:
            with self._lock:
                if self._limiter is None:
                    self._limiter = self._open()
        return self._limiter

    async def acquire(self, key: str, rate: Rate) -> float:
        return await self.limiter.acquire(key, rate)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        await self.limiter.penalize(key, rate, seconds)

    async def aclose(self) -> None:
        if self._limiter is not None:
            await self._limiter.aclose()
