"""What a client connection's request does while it waits on members: the base of `Tunnel`
(CONNECT, SOCKS5) and `Forward` (plain HTTP).

Why an object of callbacks and not a task: a request's steps are started by the I/O that
makes them possible (the head parsed → a member chosen and its connection asked for; the
member's reply parsed → the client answered), in that I/O's own callback. A Task per request
cost its creation and registration, a coroutine frame per level, a future per wait and a
loop iteration per wake-up, on every request; here each step is one method call.

Every wait has a deadline on the client connection (`ClientConn.job_deadline`), acted on by
the gateway's sweep (`expired`); a client that leaves ends the job (`cancel`). Exactly one
of the job's callbacks runs at a time (the event loop's thread) and each ends with the job
either waiting on one upstream connection or done (the client answered, relayed, or closed).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.gateway.auth import Routing
from engine.gateway.upstream import Done, StaleConnection, Upstream, is_ipv4
from fetchers.pool import ProxyLease, ProxyState
from fetchers.proxy_parse import ProxySpec

if TYPE_CHECKING:
    from engine.gateway.client import ClientConn
    from engine.gateway.server import Gateway
    from engine.gateway.stats import MemberStats

log = logging.getLogger(__name__)


class Job:
    __slots__ = ("conn", "gw", "lease", "ms", "routing", "site", "t0", "tried", "up")

    def __init__(self, gw: Gateway, conn: ClientConn, routing: Routing, site: str) -> None:
        self.gw, self.conn, self.routing, self.site = gw, conn, routing, site
        self.tried: list[ProxyState] = []
        self.lease: ProxyLease | None = None  # the current attempt's, until released
        self.ms: MemberStats | None = None
        self.up: Upstream | None = None  # the connection the current attempt waits on
        self.t0 = 0.0

    # -- the connection's side ------------------------------------------------------------------

    def start(self) -> None:
        """The request parsed: its first step (runs in the client's `data_received`)."""
        try:
            self._next()
        except Exception:
            self._crash()

    def expired(self) -> None:
        """The current step's deadline passed (the gateway's sweep)."""
        try:
            self._timed_out()
        except Exception:
            self._crash()

    def cancel(self) -> None:
        """The client left, or a drain ran out of time: the attempt ends and counts as
        failed for the member, like a cancelled task did; no answer is counted."""
        self._drop_up("error")
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release("failed", None)
        self._ended()

    # -- for the subclasses ---------------------------------------------------------------------

    def _next(self) -> None:
        raise NotImplementedError

    def _timed_out(self) -> None:
        raise NotImplementedError

    def _redial(self) -> None:
        """The current attempt once more, on a fresh connection to the same member."""
        raise NotImplementedError

    def _record_failure(self, e: BaseException) -> None:
        """What the client is told if no later attempt succeeds."""
        raise NotImplementedError

    def _ended(self) -> None:
        """The job holds nothing any more (hook: the plain request's budget)."""

    def _take(self) -> ProxyLease:
        """The next member for this request (NoProxyAvailable when none is left)."""
        gw = self.gw
        lease = self.lease = gw.acquire(self.routing, self.site, self.tried)
        self.tried.append(lease.state)
        ms = self.ms = gw.member_stats(lease.state)
        ms.requests += 1
        self.t0 = gw.clock()
        return lease

    def _connect(
        self,
        spec: ProxySpec,
        protocol: str,
        host: str,
        port: int,
        forward: bool,
        on_done: Done,
        fresh: bool = False,
    ) -> None:
        """The attempt's connection to its member (and, unless `forward`, a tunnel through
        it to host:port); `on_done` when ready. A tunnel starts on a connection opened ahead
        when the member has one (unless `fresh`: a retry after such a one turned out closed),
        and one more is opened for the next, after this one's first bytes are written.
        (A plain request through an `http` member reuses kept-alive connections instead.)"""
        gw = self.gw
        standby = gw.standby if gw.standby.enabled and not forward else None
        up = None
        if standby is not None:
            assert self.lease is not None
            key = gw.named(self.lease.state)[2]
            # plain SOCKS4 needs the target's address first (`dial` looks it up)
            if not fresh and (protocol != "socks4" or is_ipv4(host)):
                up = standby.take(key)
        if up is None:
            up = self.up = Upstream(gw.loop)
            up.dial(spec, protocol, host, port, forward, on_done)
        else:
            self.up = up
            up.tunnel(spec, protocol, host, port, on_done)
        if standby is not None:
            standby.refill(key, spec, gw.loop)

    def _stale(self) -> None:
        """The connection that waited (kept alive, or opened ahead) was closed by the member
        as it was taken: counted, and the attempt goes once more on a fresh connection to
        the same member, not counted against it."""
        up = self.up
        gw = self.gw
        pool = gw.standby if up is not None and up.ahead else gw.upstreams
        pool.stale_retries += 1
        self._drop_up("stale")
        self._redial()

    def _drop_up(self, reason: str) -> None:
        up, self.up = self.up, None
        if up is not None:
            self.gw.upstreams.close(up, reason)

    def _failed(self, e: BaseException) -> None:
        """The current attempt ended in `e`: a connection that waited and was found closed
        is set up again (not a failure); anything else counts against the member, and the
        request moves on to the next one."""
        if isinstance(e, StaleConnection):
            self._stale()
            return
        self._drop_up("error")  # this member did not do it: its connection closed
        lease, self.lease = self.lease, None
        assert lease is not None and self.ms is not None
        self.gw.attempt_failed(lease, self.ms, self.routing, e)
        self._record_failure(e)
        self._next()

    def _crash(self) -> None:
        """A bug must not leave the client waiting: logged, the client's connection ended."""
        log.exception("gateway: unexpected error on a client connection")
        try:
            self.cancel()
        finally:
            self.conn.transport.abort()
