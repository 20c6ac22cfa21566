"""A proxy pool for the cascade: selection strategies and a circuit breaker per proxy.

The caller hands in the proxies (e.g. the active ones of the validated pool, read by the
engine from storage — this module imports neither); the pool picks one per attempt and
learns from how it went:

- strategies (one small base class, one class each): `round_robin`, `least_connections`
  (fewest in flight), `weighted` (random, proportional to a weight the caller gives, e.g.
  inverse latency from the last validation), `adaptive` (score from an EWMA of success and
  of latency, with a little exploration so a recovered proxy gets a chance);
- a circuit breaker per proxy: `closed` → `open` after `failure_threshold` consecutive
  transport failures (refused, timeout, proxy error) → `half_open` after `cooldown_s`,
  when exactly one trial request may use it → `closed` again on success, `open` on failure.

A block (the site refused the proxy's address) lowers the proxy's success EWMA but does not
trip the breaker: the proxy works, that site dislikes it. When the caller names the site
(`acquire(site=…)`), the block is also kept per (proxy × site): that proxy is then avoided
for that site only, for `site_cooldown_s` (unless no other candidate is left), and the
weighted and adaptive strategies score it by its success on that site.

The cascade (one proxy per attempt) and the rotating gateway (`engine/gateway`, whose
membership changes as validation runs change the stored pool: `update()`, filters per request:
`accept=`, sticky sessions: `prefer=`) share this one implementation.
"""

from __future__ import annotations

import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from fetchers.errors import ProxyFailure
from fetchers.proxy_parse import ProxySpec, parse_proxy_line

__all__ = [
    "AdaptiveStrategy",
    "BreakerState",
    "LeastConnectionsStrategy",
    "NoProxyAvailable",
    "ProxyLease",
    "ProxyPool",
    "ProxyState",
    "RoundRobinStrategy",
    "SelectionStrategy",
    "SiteQuality",
    "WeightedStrategy",
    "make_strategy",
]

EWMA_WEIGHT = 0.3  # weight of the newest sample (as the proxy table's latency EWMA)
MAX_SITES = 1024  # per proxy: the sites whose quality is kept

Outcome = Literal["ok", "blocked", "failed"]


class NoProxyAvailable(ProxyFailure):
    """Every proxy's circuit is open; the message says when the first one reopens."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class SiteQuality:
    """How one proxy fares with one site (the gateway's per-domain quality)."""

    success_ewma: float = 1.0
    blocked: int = 0
    avoid_until: float = 0.0  # blocked recently: other proxies first until then


@dataclass(eq=False)
class ProxyState:
    spec: ProxySpec
    weight: float = 1.0
    meta: Any = None  # the caller's facts about the proxy (the gateway's country, anonymity)
    sites: dict[str, SiteQuality] = field(default_factory=dict)
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    blocked: int = 0
    consecutive_failures: int = 0
    latency_ewma_ms: float | None = None
    success_ewma: float = 1.0  # optimistic start: an untried proxy is worth a try
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    trial_in_flight: bool = False

    @property
    def url(self) -> str:
        return self.spec.url(self.spec.scheme or "http")

    def quality(self, site: str | None) -> float:
        """Success EWMA, times the one on `site` when the caller named a site."""
        q = self.sites.get(site) if site else None
        return self.success_ewma * (q.success_ewma if q else 1.0)

    @property
    def redacted(self) -> str:
        return self.spec.redacted() if self.spec.scheme else f"http://{self.spec.redacted()}"

    def to_dict(self) -> dict[str, object]:
        return {
            "proxy": self.redacted,
            "state": str(self.state),
            "in_flight": self.in_flight,
            "successes": self.successes,
            "failures": self.failures,
            "blocked": self.blocked,
            "consecutive_failures": self.consecutive_failures,
            "latency_ewma_ms": None
            if self.latency_ewma_ms is None
            else round(self.latency_ewma_ms, 1),
            "success_ewma": round(self.success_ewma, 3),
            "weight": self.weight,
        }


class SelectionStrategy(ABC):
    """Picks one proxy among those whose breaker lets a request through (never empty);
    `site` is the target the request goes to, when the caller said."""

    name: str

    @abstractmethod
    def choose(self, candidates: Sequence[ProxyState], site: str | None = None) -> ProxyState: ...


class RoundRobinStrategy(SelectionStrategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[ProxyState], site: str | None = None) -> ProxyState:
        # rotate over the pool's order, skipping proxies that are not candidates now
        pick = candidates[self._next % len(candidates)]
        self._next += 1
        return pick


class LeastConnectionsStrategy(SelectionStrategy):
    name = "least_connections"

    def __init__(self) -> None:
        self._tie = 0

    def choose(self, candidates: Sequence[ProxyState], site: str | None = None) -> ProxyState:
        fewest = min(p.in_flight for p in candidates)
        tied = [p for p in candidates if p.in_flight == fewest]
        self._tie += 1
        return tied[self._tie % len(tied)]


class WeightedStrategy(SelectionStrategy):
    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[ProxyState], site: str | None = None) -> ProxyState:
        weights = [max(p.weight, 0.0) * (p.quality(site) if site else 1.0) for p in candidates]
        if sum(weights) <= 0:
            return self.rng.choice(list(candidates))
        return self.rng.choices(list(candidates), weights=weights, k=1)[0]


class AdaptiveStrategy(SelectionStrategy):
    """Best score = success EWMA / (latency EWMA + 100 ms), in-flight requests counted as
    a penalty; with probability `explore` a random candidate instead."""

    name = "adaptive"

    def __init__(self, rng: random.Random | None = None, explore: float = 0.1) -> None:
        self.rng = rng or random.Random()
        self.explore = explore

    @staticmethod
    def score(p: ProxyState, site: str | None = None) -> float:
        latency = p.latency_ewma_ms if p.latency_ewma_ms is not None else 200.0
        return p.quality(site) / ((latency + 100.0) * (1 + p.in_flight))

    def choose(self, candidates: Sequence[ProxyState], site: str | None = None) -> ProxyState:
        if len(candidates) > 1 and self.rng.random() < self.explore:
            return self.rng.choice(list(candidates))
        return max(candidates, key=lambda p: self.score(p, site))


def make_strategy(name: str, rng: random.Random | None = None) -> SelectionStrategy:
    if name == "round_robin":
        return RoundRobinStrategy()
    if name == "least_connections":
        return LeastConnectionsStrategy()
    if name == "weighted":
        return WeightedStrategy(rng)
    if name == "adaptive":
        return AdaptiveStrategy(rng)
    raise ValueError(
        f"proxy strategy {name!r}: use round_robin, least_connections, weighted or adaptive"
    )


class ProxyLease:
    """One proxy taken for one attempt; `release()` exactly once with the outcome."""

    __slots__ = ("_done", "_pool", "site", "started", "state")

    def __init__(self, pool: ProxyPool, state: ProxyState, site: str | None = None) -> None:
        self._pool = pool
        self.state = state
        self.site = site
        self.started = pool.clock()
        self._done = False

    @property
    def url(self) -> str:
        return self.state.url

    @property
    def redacted(self) -> str:
        return self.state.redacted

    def release(self, outcome: Outcome, latency_ms: float | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._pool._release(self, outcome, latency_ms)

    def release_ok(self) -> None:
        """`release("ok")`: a bound method to hand over as a callback (no closure each)."""
        self.release("ok", None)


ProxyInput = str | ProxySpec | tuple[str | ProxySpec, float]


def _as_state(item: ProxyInput) -> ProxyState:
    weight = 1.0
    if isinstance(item, tuple):
        item, weight = item
    spec = parse_proxy_line(item) if isinstance(item, str) else item
    return ProxyState(spec, weight=float(weight))


class ProxyPool:
    def __init__(
        self,
        proxies: Iterable[ProxyInput],
        strategy: str | SelectionStrategy = "round_robin",
        *,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        site_cooldown_s: float = 300.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        allow_empty: bool = False,
    ) -> None:
        self.clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.site_cooldown_s = site_cooldown_s
        self.strategy = make_strategy(strategy, rng) if isinstance(strategy, str) else strategy
        self._lock = threading.Lock()
        self.proxies: list[ProxyState] = []
        seen: set[str] = set()
        for item in proxies:
            state = _as_state(item)
            if state.spec.key in seen:
                continue
            seen.add(state.spec.key)
            self.proxies.append(state)
        if not self.proxies and not allow_empty:
            raise ValueError("a proxy pool needs at least one proxy")

    def __len__(self) -> int:
        return len(self.proxies)

    def _admissible(self, p: ProxyState, now: float) -> bool:
        if p.state == BreakerState.CLOSED:
            return True
        if p.state == BreakerState.OPEN and now - p.opened_at >= self.cooldown_s:
            p.state = BreakerState.HALF_OPEN
            p.trial_in_flight = False
        return p.state == BreakerState.HALF_OPEN and not p.trial_in_flight

    def update(self, proxies: Iterable[tuple[ProxyInput, Any]]) -> tuple[int, int]:
        """Replace the membership with (proxy, meta) pairs, keeping what was learnt about the
        proxies that stay (breaker, EWMAs, per-site quality); (added, removed). Leases of a
        removed proxy still release normally."""
        with self._lock:
            old = {p.spec.key: p for p in self.proxies}
            fresh: list[ProxyState] = []
            seen: set[str] = set()
            for item, meta in proxies:
                state = _as_state(item)
                key = state.spec.key
                if key in seen:
                    continue
                seen.add(key)
                kept = old.get(key)
                if kept is not None and kept.spec == state.spec:
                    kept.weight, kept.meta = state.weight, meta
                    fresh.append(kept)
                else:
                    state.meta = meta
                    fresh.append(state)
            added = len(seen - old.keys())
            removed = len(old.keys() - seen)
            self.proxies = fresh
            return added, removed

    def acquire(
        self,
        *,
        site: str | None = None,
        accept: Callable[[ProxyState], bool] | None = None,
        exclude: Iterable[ProxyState] = (),
        prefer: str | None = None,
    ) -> ProxyLease:
        """One proxy for one attempt. `site`: the target (per-site quality, avoidance of
        proxies it blocked); `accept`: the caller's filter (country, type); `exclude`: the
        proxies this request already tried; `prefer`: a proxy key to take if it is a
        candidate (a sticky session)."""
        with self._lock:
            now = self.clock()
            skip = {id(p) for p in exclude}
            if skip or accept is not None:
                members = [
                    p for p in self.proxies if id(p) not in skip and (accept is None or accept(p))
                ]
            else:  # the first attempt of most requests: every member, no copy
                members = self.proxies
            closed = BreakerState.CLOSED
            candidates = [p for p in members if p.state is closed or self._admissible(p, now)]
            if not candidates:
                raise self._none_left(members, now)
            if prefer is not None:
                pick = next((p for p in candidates if p.spec.key == prefer), None)
            else:
                pick = None
            if pick is None:
                if site:
                    welcome = [
                        p
                        for p in candidates
                        if (q := p.sites.get(site)) is None or q.avoid_until <= now
                    ]
                    candidates = welcome or candidates
                pick = self.strategy.choose(candidates, site)
            if pick.state == BreakerState.HALF_OPEN:
                pick.trial_in_flight = True
            pick.in_flight += 1
            return ProxyLease(self, pick, site)

    def _none_left(self, members: Sequence[ProxyState], now: float) -> NoProxyAvailable:
        if not members:
            return NoProxyAvailable(
                f"no proxy available: none of the {len(self.proxies)} proxies matches "
                "(or every one was tried)"
                if self.proxies
                else "no proxy available: the pool is empty"
            )
        reopen = min(p.opened_at + self.cooldown_s for p in members) - now
        return NoProxyAvailable(
            f"no proxy available: all {len(members)} circuits are open "
            f"(the first half-opens in {max(reopen, 0):.1f}s)"
        )

    def mark_healthy(self, state: ProxyState) -> None:
        """A health check passed: close the proxy's circuit now (no need to wait)."""
        with self._lock:
            state.state = BreakerState.CLOSED
            state.consecutive_failures = 0
            state.trial_in_flight = False

    def open_proxies(self) -> list[ProxyState]:
        with self._lock:
            return [p for p in self.proxies if p.state != BreakerState.CLOSED]

    def _release(self, lease: ProxyLease, outcome: Outcome, latency_ms: float | None) -> None:
        with self._lock:
            p = lease.state
            p.in_flight = max(0, p.in_flight - 1)
            if latency_ms is not None and outcome != "failed":
                p.latency_ewma_ms = (
                    latency_ms
                    if p.latency_ewma_ms is None
                    else EWMA_WEIGHT * latency_ms + (1 - EWMA_WEIGHT) * p.latency_ewma_ms
                )
            good = 1.0 if outcome == "ok" else 0.0
            if lease.site and outcome != "failed":  # a transport failure is not the site's
                self._site_outcome(p, lease.site, outcome, good)
            if not (lease.site and outcome == "blocked"):  # that site's dislike stays its own
                p.success_ewma = EWMA_WEIGHT * good + (1 - EWMA_WEIGHT) * p.success_ewma
            if outcome == "failed":
                p.failures += 1
                p.consecutive_failures += 1
                if (
                    p.state == BreakerState.HALF_OPEN
                    or p.consecutive_failures >= self.failure_threshold
                ):
                    p.state = BreakerState.OPEN
                    p.opened_at = self.clock()
                p.trial_in_flight = False
                return
            if outcome == "blocked":
                p.blocked += 1
            else:
                p.successes += 1
            p.consecutive_failures = 0
            p.state = BreakerState.CLOSED
            p.trial_in_flight = False

    def _site_outcome(self, p: ProxyState, site: str, outcome: Outcome, good: float) -> None:
        q = p.sites.get(site)
        if q is None:
            if len(p.sites) >= MAX_SITES:  # bounded memory: forget the oldest site
                p.sites.pop(next(iter(p.sites)))
            q = p.sites[site] = SiteQuality()
        q.success_ewma = EWMA_WEIGHT * good + (1 - EWMA_WEIGHT) * q.success_ewma
        if outcome == "blocked":
            q.blocked += 1
            q.avoid_until = self.clock() + self.site_cooldown_s
        else:
            q.avoid_until = 0.0

    def stats(self) -> list[dict[str, object]]:
        with self._lock:
            return [p.to_dict() for p in self.proxies]
