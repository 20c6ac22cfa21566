"""Idle upstream connections kept for the next plain-HTTP request through the same `http`
member (HTTP/1.1 persistent connections, RFC 9112 9.3).

Why: a member such as squid or tinyproxy keeps its client connections open, and a
connection set-up (and its teardown) per request is a large part of a forwarded request's
cost; squid as a balancer reuses its connections to its cache_peers by default.

Bounded three ways: idle connections per member, idle connections in all, and how long one
may stay idle (closed by the gateway's sweep, before most members' own keep-alive timeouts).
LIFO per member: the most recently used connection is the least likely to have been closed
by the member meanwhile. A connection the member closes (or writes to) while idle leaves the
pool at once (`Upstream` calls `drop`). Only the caller decides that a connection may come
back (`put`): after an answer read whole whose framing was known and that did not end the
connection; everything else is closed and counted in `discarded` by reason.

Used from the event loop's thread only (no locks).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.gateway.upstream import Upstream


class IdlePool:
    def __init__(self, per_member: int, total: int, timeout_s: float) -> None:
        self.per_member, self.total, self.timeout_s = per_member, total, timeout_s
        self.idle: dict[str, list[Upstream]] = {}  # member key → connections, newest last
        self.count = 0
        self.opened = self.reused = self.stale_retries = 0
        self.discarded: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self.per_member > 0 and self.total > 0

    def take(self, key: str) -> Upstream | None:
        """The member's most recently idle connection, or None."""
        stack = self.idle.get(key)
        while stack:
            up = stack.pop()
            self.count -= 1
            up.idle_pool = None
            if not up.closed:
                self.reused += 1
                up.reused = True
                up.ahead = False
                return up
        return None

    def put(self, up: Upstream, now: float) -> None:
        """Keep `up` (its answer read whole, reusable) unless a limit is reached."""
        key = up.key
        assert key is not None
        stack = self.idle.setdefault(key, [])
        if len(stack) >= self.per_member or self.count >= self.total or up.closed:
            self.close(up, "limit")
            return
        up.park(self, now)
        stack.append(up)
        self.count += 1

    def drop(self, up: Upstream, reason: str) -> None:
        """`up` leaves the pool (the member closed it or spoke while it was idle)."""
        stack = self.idle.get(up.key or "")
        if stack is not None and up in stack:
            stack.remove(up)
            self.count -= 1
            if not stack:
                del self.idle[up.key or ""]
        up.idle_pool = None
        self.close(up, reason)

    def close(self, up: Upstream, reason: str) -> None:
        """Close a pool-managed connection that does not come back, counted by reason."""
        up.abort()
        if up.key is not None and self.enabled:
            self.discarded[reason] += 1

    def sweep(self, now: float) -> None:
        """Close the connections idle longer than `timeout_s` (oldest first in each stack)."""
        limit = now - self.timeout_s
        for key in list(self.idle):
            stack = self.idle[key]
            n = 0
            while n < len(stack) and stack[n].idle_since <= limit:
                n += 1
            if n:
                expired, stack[:n] = stack[:n], []
                self.count -= n
                for up in expired:
                    up.idle_pool = None
                    self.close(up, "idle_timeout")
            if not stack:
                del self.idle[key]

    def close_all(self, reason: str = "stopping") -> None:
        for key in list(self.idle):
            for up in self.idle.pop(key):
                up.idle_pool = None
                self.close(up, reason)
        self.count = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "idle": self.count,
            "opened": self.opened,
            "reused": self.reused,
            "stale_retries": self.stale_retries,
            "discarded": dict(sorted(self.discarded.items())),
            "limits": {
                "idle_per_member": self.per_member,
                "idle_total": self.total,
                "idle_timeout_s": self.timeout_s,
            },
        }
