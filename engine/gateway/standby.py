"""Connections opened ahead to the members requests are using, so the next tunnel through a
member (CONNECT, SOCKS5, plain HTTP through a SOCKS/https member) starts on a connection that
is already there: squid's `cache_peer … standby=N`, for every member protocol. (Plain HTTP
through an `http` member reuses kept-alive connections instead: keepalive.py.)

Why: every tunnel needs a new connection to its member. A member on the internet is a round
trip away, so that is one round trip per tunnel spent before its request can be written.
Opened ahead, that round trip is off the request's path.

Bounded three ways, like the kept-alive pool it extends: per member, in all (counted in the
open-file limit), and in time: one not used within `timeout_s` is closed and not replaced.
Refilled one per use (each use of a member takes one if there is one and opens one, up to
`per_member` for it), so only members in use keep any and no member gets a burst of
connections at once (squid avoids that too). A connection the member closes while it waits
leaves at once (`Upstream` calls `drop`); one whose close crosses the request's first bytes
ends in `StaleConnection`, and the request goes once more on a fresh connection to the same
member, not counted against it. An opening that fails or does not connect in time is
counted and given up (a failing member is the health checks' business, not this pool's).

Used from the event loop's thread only (no locks).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from engine.gateway.keepalive import IdlePool
from engine.gateway.upstream import Upstream

if TYPE_CHECKING:
    from fetchers.proxy_parse import ProxySpec


class StandbyPool(IdlePool):
    def __init__(self, per_member: int, total: int, timeout_s: float, connect_s: float) -> None:
        super().__init__(per_member, total, timeout_s)
        self.connect_s = connect_s
        # being opened: its member's key and the time it must have connected by (the
        # gateway's sweep gives up on it then: no timer per connection)
        self.opening: dict[Upstream, tuple[str, float]] = {}
        self.per_key_opening: dict[str, int] = {}
        self.misses = self.failed = 0
        self.stopped = False

    def take(self, key: str) -> Upstream | None:
        """A connection made ahead to the member, unused (no longer the pool's), or None."""
        up = super().take(key)
        if up is None:
            self.misses += 1
        else:
            up.key = None  # whoever takes it decides what manages it next
            up.ahead = True
        return up

    def refill(self, key: str, spec: ProxySpec, loop: asyncio.AbstractEventLoop) -> None:
        """Open one more connection to the member unless it has its `per_member` (waiting
        or being opened) or the pool is full."""
        if not self.enabled or self.stopped:
            return
        opening = self.per_key_opening.get(key, 0)
        if len(self.idle.get(key, ())) + opening >= self.per_member:
            return
        if self.count + len(self.opening) >= self.total:
            return
        up = Upstream(loop)
        self.per_key_opening[key] = opening + 1
        self.opening[up] = (key, loop.time() + self.connect_s)
        up.dial(spec, "http", "", 0, True, lambda _r, exc: self._made(up, exc))

    def _settled(self, up: Upstream) -> str | None:
        entry = self.opening.pop(up, None)
        if entry is None:
            return None
        key = entry[0]
        left = self.per_key_opening[key] - 1
        if left:
            self.per_key_opening[key] = left
        else:
            del self.per_key_opening[key]
        return key

    def _made(self, up: Upstream, exc: BaseException | None) -> None:
        key = self._settled(up)
        if key is None:
            return
        if exc is not None or self.stopped:
            if exc is not None:
                self.failed += 1
            up.abort()
            return
        self.opened += 1
        up.key = key
        self.put(up, up.loop.time() if up.loop is not None else 0.0)

    def sweep(self, now: float) -> None:
        """Close the ones unused for `timeout_s`; give up on openings past their time."""
        super().sweep(now)
        late = [up for up, (_, by) in self.opening.items() if by <= now]
        for up in late:
            self._settled(up)
            self.failed += 1
            up.abort()

    @property
    def busy(self) -> bool:
        """Anything for the sweep to look at."""
        return bool(self.count or self.opening)

    def close_all(self, reason: str = "stopping") -> None:
        """Closed for good (the gateway stops): waiting ones closed, openings given up."""
        self.stopped = True
        for up in list(self.opening):
            self._settled(up)
            up.abort()
        super().close_all(reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "idle": self.count,
            "opening": len(self.opening),
            "opened": self.opened,
            "used": self.reused,
            "misses": self.misses,
            "failed": self.failed,
            "stale_retries": self.stale_retries,
            "discarded": dict(sorted(self.discarded.items())),
            "limits": {
                "per_member": self.per_member,
                "total": self.total,
                "timeout_s": self.timeout_s,
            },
        }
