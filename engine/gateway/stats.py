"""What the gateway counts: per member (requests, failures, blocks, bytes, latency samples for
p50/p90/p99), strategy decisions, cache, connections. Plain counters on the event loop's
thread (no locks needed); `snapshot()` is the JSON view, `metrics.py` the Prometheus one.

Memory is bounded: one entry per member present (pruned on refresh), a fixed ring of latency
samples each.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_SAMPLES = 1024


@dataclass(slots=True)
class MemberStats:
    requests: int = 0
    failures: int = 0
    blocked: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def percentiles(self) -> dict[str, float | None]:
        data = sorted(self.latencies_ms)
        if not data:
            return {"p50": None, "p90": None, "p99": None}
        pick = lambda q: round(data[min(len(data) - 1, int(q * len(data)))], 3)  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    origin_fetches: int = 0
    bytes_saved: int = 0
    bypassed: int = 0  # not cacheable: method, credentials, cookies, no-store


class GatewayStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.members: dict[str, MemberStats] = {}
        self.decisions: Counter[tuple[str, str]] = Counter()  # (strategy, outcome)
        self.requests: Counter[tuple[str, str]] = Counter()  # (kind, result) as clients saw
        self.cache = CacheCounters()
        self.connections_open = 0
        self.connections_total = 0
        self.connections_refused = 0
        self.client_errors: Counter[str] = Counter()  # 400, 407, 408, 431, …

    def member(self, key: str) -> MemberStats:
        s = self.members.get(key)
        if s is None:
            s = self.members[key] = MemberStats()
        return s

    def prune(self, keep: set[str]) -> None:
        for key in list(self.members):
            if key not in keep:
                del self.members[key]

    def snapshot(self, pool_states: list[dict[str, Any]], cache_size: int | None) -> dict[str, Any]:
        states = {s["proxy"]: s for s in pool_states}
        members = []
        for key, st in sorted(self.members.items()):
            p = states.get(key, {})
            members.append(
                {
                    "member": key,
                    "requests": st.requests,
                    "failures": st.failures,
                    "blocked": st.blocked,
                    "bytes_up": st.bytes_up,
                    "bytes_down": st.bytes_down,
                    "latency_ms": st.percentiles(),
                    "breaker": p.get("state"),
                    "in_flight": p.get("in_flight"),
                    "healthy": p.get("state") == "closed" if p else None,
                }
            )
        for key, p in sorted(states.items()):
            if key not in self.members:
                members.append(
                    {"member": key, "requests": 0, "failures": 0, "blocked": 0, "bytes_up": 0,
                     "bytes_down": 0, "latency_ms": MemberStats().percentiles(),
                     "breaker": p["state"], "in_flight": p["in_flight"],
                     "healthy": p["state"] == "closed"}
                )  # fmt: skip
        c = self.cache
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "members": members,
            "decisions": [
                {"strategy": s, "outcome": o, "count": n}
                for (s, o), n in sorted(self.decisions.items())
            ],
            "requests": [
                {"kind": k, "result": r, "count": n} for (k, r), n in sorted(self.requests.items())
            ],
            "client_errors": dict(sorted(self.client_errors.items())),
            "cache": None
            if cache_size is None
            else {
                "size": cache_size,
                "hits": c.hits,
                "misses": c.misses,
                "stores": c.stores,
                "origin_fetches": c.origin_fetches,
                "bytes_saved": c.bytes_saved,
                "bypassed": c.bypassed,
            },
            "connections": {
                "open": self.connections_open,
                "total": self.connections_total,
                "refused": self.connections_refused,
            },
        }
