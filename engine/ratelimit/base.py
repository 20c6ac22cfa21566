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
``engine.ratelimit.postgres``). Next to the TAT each key keeps its margin J (below).

**The guarantee: never more than N requests in any window of length W** (``--rate-limit N/W``),
windows counted as servers count them: a sliding log (the sim's API) or fixed windows admit
at most N in every half-open window (t - W, t]. A GCRA stream holds at most
``ceil((L + tau) / T)`` grants in any half-open window of length L. We choose

    B - 1 + (W + J) / T = N,   i.e.  T = (W + J) / (N - B + 1),   tau = (B - 1) * T

If every request reaches the server at most J after its slot (and never before it), the
grants of the requests a server counts in (t - W, t] lie in (t - W - J, t], a half-open
window of length W + J, which holds at most ``ceil((W + J + tau) / T) = N``. The cost is
throughput: the long-run rate is ``(N - B + 1) / (W + J)``, ``W / (W + J)`` of the limit
with the default burst of 1 (no burst: the safe choice when the server's own window is
unknown). The formula before counted closed windows, ``T = (W + J) / (N - B)``: the same
schedule as this one with J larger by one T (50 ms at 20/1s), which is why 20/1s ran at 0.86.
A leaky bucket (nginx's ``limit_req``, rate N/W, burst b) refuses a request only when it comes
more than ``b * W / N`` early on the bucket's own schedule; our slots are at least W/N apart
after our burst, so requests at most J late pass whenever ``J + (B - 1) * W / N <= b * W / N``
(a bucket without a burst refuses any jitter at all: give it one).

**J is measured** (``engine.ratelimit.margin``): each process asks for twice how late it
has recently woken for its slots plus how much its answers' times fell within a window (a
stalled server, a queue on the way), and the key keeps the largest ask, decaying back to a
floor of 0.5 % of W (10 ms to 1 s). On a quiet machine against nginx that is 10–20 ms: 0.98–0.99
of 20/1s, 0.995 of 1500/10s; on a busy one it grows as the machine gets late, which costs
throughput, never the limit. ``--rate-margin`` fixes J instead (the user's word).

Acquire is async and returns the time to wait; ``Gate`` is what a worker uses: it keeps a
few reservations in flight per key and process (about 50 ms of the schedule, so it never runs
far ahead of what is being sent and a stop does not wait on a long queue) and sleeps.
A 429 calls ``penalize``: the key's TAT moves past ``Retry-After``, so every worker of every
process slows down, not only the one that was refused; the refused process also asks for
twice the margin it was sent under.

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

from engine.ratelimit.margin import Lateness, next_margin

log = logging.getLogger(__name__)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` requests in any window of ``window_s`` seconds.

    ``jitter_s`` is the margin J given by the user (``--rate-margin``); None: measured."""

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
    def margin_floor(self) -> float:
        """The least measured margin: 0.5 % of W, 10 ms to 1 s (``engine.ratelimit.margin``)."""
        return min(1.0, max(0.01, 0.005 * self.window_s))

    @property
    def margin_cap(self) -> float:
        """The most a measured margin grows: half the window (a third of the throughput
        gone), and at most 10 s."""
        return max(self.margin_floor, min(0.5 * self.window_s, 10.0))

    def margin(self, measured: float) -> float:
        """The margin a grant uses: the user's, else the key's measured one within bounds."""
        if self.jitter_s is not None:
            return self.jitter_s
        return min(self.margin_cap, max(self.margin_floor, measured))

    @property
    def jitter(self) -> float:
        """The margin a schedule starts from (the user's, else the floor)."""
        return self.margin(0.0)

    def interval_for(self, margin: float) -> float:
        """Emission interval T for margin J: (W + J) / (N - B + 1)."""
        return (self.window_s + margin) / (self.limit - self.burst + 1)

    def tau_for(self, margin: float) -> float:
        return (self.burst - 1) * self.interval_for(margin)

    @property
    def interval_s(self) -> float:
        """Emission interval T at the starting margin."""
        return self.interval_for(self.jitter)

    @property
    def tau_s(self) -> float:
        """Burst tolerance at the starting margin."""
        return self.tau_for(self.jitter)

    @property
    def penalty_tau_s(self) -> float:
        """The largest burst tolerance any grant may use: a penalty adds it, so that no
        grant comes before the server's Retry-After whatever the key's margin."""
        return self.tau_for(self.margin(math.inf))

    @property
    def per_second(self) -> float:
        """The stated limit as a rate (N / W)."""
        return self.limit / self.window_s

    def utilisation_for(self, margin: float) -> float:
        """The long-run fraction of the stated limit a schedule with margin J achieves."""
        return (1.0 / self.interval_for(margin)) / self.per_second

    @property
    def utilisation(self) -> float:
        """The best long-run fraction of the stated limit (at the starting margin)."""
        return self.utilisation_for(self.jitter)

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
    return max(sane_tat(tat), now + bounded_penalty(seconds, rate) + rate.penalty_tau_s)


@dataclass(frozen=True, slots=True)
class Slot:
    """A reservation: send ``wait`` seconds from now; the schedule was spaced for ``margin``."""

    wait: float
    margin: float


@dataclass(slots=True)
class KeyState:
    """Everything a limiter keeps per key: the TAT and the key's margin, with when it was
    last set (seconds on the limiter's clock)."""

    tat: float = 0.0
    margin: float = 0.0
    margin_at: float = 0.0


def reserve_slot(state: KeyState, now: float, rate: Rate, ask: float) -> Slot:
    """One grant on ``state`` (changed in place): the key's margin takes in ``ask`` (and a
    margin the user fixed), then GCRA with the interval for the margin in use."""
    if rate.jitter_s is not None:
        ask = max(ask, rate.jitter_s)
    state.margin = next_margin(
        state.margin, state.margin_at, now, ask, rate.margin_floor, rate.margin_cap
    )
    state.margin_at = now
    used = rate.margin(state.margin)
    state.tat, wait = gcra(state.tat, now, rate.interval_for(used), rate.tau_for(used))
    return Slot(wait, used)


class RateLimiter(Protocol):
    """One implementation per place the state can live; all share ``reserve_slot``."""

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        """Reserve the next slot of ``key``; ``ask`` is the margin this process measured."""
        ...

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        """The server refused (429): no grant for ``key`` before ``seconds`` from now."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimiter:
    """One process (unit tests, a single worker). ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, KeyState] = {}
        self._lock = threading.Lock()

    def reserve_now(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        with self._lock:
            state = self._keys.setdefault(key, KeyState())
            return reserve_slot(state, self.clock(), rate, ask)

    def acquire_now(self, key: str, rate: Rate, ask: float = 0.0) -> float:
        """Seconds to wait for the next slot (``reserve_now``'s wait)."""
        return self.reserve_now(key, rate, ask).wait

    def margin_of(self, key: str) -> float:
        return self._keys[key].margin if key in self._keys else 0.0

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        return self.reserve_now(key, rate, ask)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        with self._lock:
            state = self._keys.setdefault(key, KeyState())
            state.tat = penalized(state.tat, self.clock(), seconds, rate)

    async def aclose(self) -> None:
        return None


MIN_DROP_S = 0.002  # a slot is kept if used this late, whatever the margin (sleep resolution)


async def sleep_until(target: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Sleep until ``clock() >= target``: an event loop may wake a timer up to a millisecond
    early (uvloop counts whole milliseconds), and a request sent before its slot is as far
    outside the schedule as one sent late."""
    for _ in range(1000):
        left = target - clock()
        if left <= 0:
            return
        await asyncio.sleep(left)


class Gate:
    """A worker's way through a limiter: a few reservations in flight per key, then sleep.

    Each process keeps at most ``depth`` future slots reserved per key, enough to cover
    ``horizon_s`` of the schedule (at least one): the shared schedule never runs far ahead of
    what is being sent, so a pause or a crash wastes almost nothing and fairness between
    processes comes from the shared state. One slot per process is too few at high rates:
    GCRA does not bank idle time (burst 1), so every millisecond a busy event loop takes to
    ask for the next slot would be lost throughput.

    A slot used late eats into the margin the guarantee rests on (requests must reach the
    server at most J after their slot, see the module docstring). Of J, the way to the
    server takes up to ``path`` (how much its answers' times fell within a window,
    ``answered``); when this process wakes more than half of the rest after its slot (a starved CPU, a database answer
    slower than the fastest recent one), it does not send on it: the slot is dropped and a new
    one taken. That costs throughput, never the limit; ``late_slots`` counts them. Every
    slot's lateness and every answer's time is measured (``Lateness``) and asked for as the
    key's margin with the next reservation, so the margin follows the machine and the server.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        horizon_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.horizon_s = horizon_s
        self.clock = clock
        self.late_slots = 0
        self.margins: dict[str, float] = {}  # per key: the margin of the last slot used
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._lateness: dict[str, Lateness] = {}
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

    def lateness(self, key: str, rate: Rate | None = None) -> Lateness:
        found = self._lateness.get(key)
        if found is None:
            found = Lateness(self.clock, rate.window_s) if rate else Lateness(self.clock)
            self._lateness[key] = found
        return found

    def answered(self, key: str, seconds: float) -> None:
        """A request of ``key`` was answered ``seconds`` after it was sent (the answer's
        head): how much such times fall within a window is part of the margin."""
        self.lateness(key).answered(seconds)

    def refused(self, key: str) -> None:
        """The server refused a request of ``key`` (429): ask for twice the margin it was
        sent under."""
        self.lateness(key).refused(self.margins.get(key, 0.0))

    async def wait(self, key: str, rate: Rate) -> float:
        """Wait for a slot of ``key``; returns the seconds waited."""
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self.depth(rate))
        lateness = self.lateness(key, rate)
        clock = self.clock
        began = clock()
        async with slots:
            while True:
                asked = clock()
                slot = await self.limiter.reserve(key, rate, lateness.ask())
                answered = clock()
                target = answered + slot.wait
                await sleep_until(target, clock)
                late = clock() - target + self._round_trip_excess(answered - asked)
                lateness.woke(late)
                # half of what the way to the server leaves (see engine.ratelimit.margin)
                if late <= max((slot.margin - lateness.path) / 2, MIN_DROP_S):
                    self.margins[key] = slot.margin
                    return clock() - began
                self.late_slots += 1
                if self.late_slots in (1, 10, 100) or self.late_slots % 1000 == 0:
                    log.warning(
                        "rate limit %s: %d slot(s) dropped, this process woke up to %.0f ms "
                        "after its slot (CPU starved?); the limit holds, throughput drops, "
                        "the margin grows",
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

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        return await self.limiter.reserve(key, rate, ask)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        await self.limiter.penalize(key, rate, seconds)

    async def aclose(self) -> None:
        if self._limiter is not None:
            await self._limiter.aclose()
