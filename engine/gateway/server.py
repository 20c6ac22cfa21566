"""The gateway's listener: HTTP (absolute-URI and CONNECT) and SOCKS5 on one port (a first
byte of 0x05 is SOCKS5), each request sent out through a member of the pool with failover.

The bytes are handled by `client.ClientConn` and `upstream.Upstream` (protocol callbacks);
a request's way through the members is a job of callbacks (`tunnel.Tunnel` for CONNECT and
SOCKS5, `forward.Forward` for plain HTTP: failover, block pages, the cache); this module
holds what they share: member selection, sticky sessions, the counters, the upstream pool,
and the one sweep that acts on every deadline. Per connection at most one upstream
connection at a time (plus the idle ones the upstream pool keeps for `http` members), every
wait bounded, every client or member failure contained to its own connection.
`stop()` closes the listener, closes idle kept-alive connections, lets busy ones finish
within the grace period and aborts what is left.

With `reuse_port` several gateway processes listen on one port (SO_REUSEPORT: the kernel
spreads connections over them); each has its own pool state, see `engine/gateway/workers.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from engine.gateway.auth import Authenticator, Routing, basic_credentials
from engine.gateway.budget import BufferBudget
from engine.gateway.cache import GatewayCache
from engine.gateway.client import ClientConn
from engine.gateway.config import GatewayConfig
from engine.gateway.http import HttpError, Request
from engine.gateway.keepalive import IdlePool
from engine.gateway.members import member_of
from engine.gateway.standby import StandbyPool
from engine.gateway.stats import GatewayStats, MemberStats
from engine.gateway.upstream import TargetUnreachable, Upstream
from fetchers.pool import BreakerState, ProxyLease, ProxyPool, ProxyState

log = logging.getLogger(__name__)

MAX_SESSIONS = 100_000
SWEEP_S = 0.25


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        pool: ProxyPool,
        *,
        auth: Authenticator | None = None,
        cache: GatewayCache | None = None,
        stats: GatewayStats | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.pool = pool
        self.auth = auth or Authenticator(None)
        self.cache = cache
        self.stats = stats or GatewayStats()
        self.clock = clock
        self.budget = BufferBudget(config.buffer_budget_bytes)
        self.upstreams = IdlePool(
            config.upstream_idle_per_member,
            config.upstream_idle_total,
            config.upstream_idle_timeout_s,
        )
        self.standby = StandbyPool(
            config.standby_per_member,
            config.standby_total,
            config.standby_timeout_s,
            config.connect_timeout_s,
        )
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.port = 0
        self.draining = False
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[ClientConn] = set()
        self._all_closed: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # a member's redacted URL (its stats key) by id of its pool state: built once, not
        # per request (the state is kept in the value so a reused id is noticed)
        self._names: dict[int, tuple[ProxyState, str, str]] = {}
        # deadlines are checked this often: a wait ends up to this much late
        self.sweep_s = min(SWEEP_S, config.head_timeout_s / 4, config.connect_timeout_s / 4)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: ClientConn(self), c.host, c.port, backlog=1024,
            reuse_port=c.reuse_port or None,
        )  # fmt: skip
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    def _sweep(self) -> None:
        """Act on the connections' expired deadlines (one timer for all, see client.py)."""
        now = self.loop.time()
        for conn in list(self._conns):
            if 0.0 < conn.deadline <= now:
                conn._timeout()
            if 0.0 < conn.job_deadline <= now:
                conn.expire_job()
        if self.upstreams.count:
            self.upstreams.sweep(now)
        if self.standby.busy:
            self.standby.sweep(now)
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, drain: idle connections close now, busy ones get the grace."""
        grace = self.config.grace_s if grace_s is None else grace_s
        self.draining = True
        self._all_closed = asyncio.Event()
        if self._server is not None:
            self._server.close()
        self.upstreams.close_all()
        self.standby.close_all()
        for conn in list(self._conns):
            if conn.idle:
                conn.transport.abort()
        if self._conns:
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace)
            except TimeoutError:
                for conn in list(self._conns):
                    conn.transport.abort()
                try:
                    await asyncio.wait_for(self._all_closed.wait(), 5)
                except TimeoutError:
                    log.warning("gateway: %d connections did not close", len(self._conns))
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot(
            self.pool.stats(), None if self.cache is None else len(self.cache)
        )
        snap["buffer_budget"] = self.budget.snapshot()
        snap["upstream_pool"] = self.upstreams.snapshot()
        snap["standby"] = self.standby.snapshot()
        snap["strategy"] = self.pool.strategy.name
        snap["members_total"] = len(self.pool)
        snap["sessions"] = len(self.sessions)
        return snap

    # -- connections (called by ClientConn) ---------------------------------------------------

    def admit(self, conn: ClientConn) -> bool:
        st = self.stats
        if len(self._conns) >= self.config.max_connections or self.draining:
            st.connections_refused += 1
            return False
        self._conns.add(conn)
        st.connections_open += 1
        st.connections_total += 1
        return True

    def conn_lost(self, conn: ClientConn) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self.stats.connections_open -= 1
        if self.draining and not self._conns and self._all_closed is not None:
            self._all_closed.set()

    def http_routing(self, req: Request) -> Routing:
        creds = basic_credentials(req.header("proxy-authorization"))
        routing = self.auth.check(*creds) if creds else self.auth.check(None, None)
        if routing is None:
            raise HttpError(407, "proxy credentials required (or the username's options are bad)")
        return routing

    # -- for the requests (engine/gateway/tunnel.py, forward.py) -------------------------------

    def named(self, state: ProxyState) -> tuple[ProxyState, str, str]:
        """(state, redacted URL, key) of a member: both strings built once, not per request."""
        named = self._names.get(id(state))
        if named is None or named[0] is not state:
            if len(self._names) > 4 * len(self.pool) + 64:  # members come and go: bounded
                self._names.clear()
            named = self._names[id(state)] = (state, state.redacted, state.spec.key)
        return named

    def member_stats(self, state: ProxyState) -> MemberStats:
        """The counters of the member (by its redacted URL)."""
        return self.stats.member(self.named(state)[1])

    def done_with(self, up: Upstream, blocked: bool) -> None:
        """An answer read whole: its connection back to the pool when it may carry another
        request, else closed."""
        if up.key is None:
            up.abort()
        elif blocked:
            self.upstreams.close(up, "blocked")
        elif not up.reusable:
            self.upstreams.close(up, "not_reusable")
        elif self.draining or not self.upstreams.enabled:
            self.upstreams.close(up, "stopping")
        else:
            self.upstreams.put(up, self.loop.time())

    # -- members ------------------------------------------------------------------------------

    def acquire(self, routing: Routing, site: str, tried: list[ProxyState]) -> ProxyLease:
        accept = None
        if routing.country:
            country = routing.country
            accept = lambda p: member_of(p).country == country  # noqa: E731
        prefer, kind = None, "sticky"
        if routing.session:
            prefer = self.sessions.get(routing.session)
            if prefer is None:  # a new session (here): its member by rendezvous hashing
                prefer, kind = self._rendezvous(routing.session, accept, tried), "session"
        lease = self.pool.acquire(site=site, accept=accept, exclude=tried, prefer=prefer)
        outcome = kind if prefer is not None and lease.state.spec.key == prefer else "chosen"
        self.stats.decisions[(self.pool.strategy.name, outcome)] += 1
        return lease

    def _rendezvous(
        self, session: str, accept: Callable[[ProxyState], bool] | None, tried: list[ProxyState]
    ) -> str | None:
        """A new session's member: the healthy candidate with the highest hash of (session,
        member). Every gateway process computes the same one without sharing state, and
        the same next one when it fails (`--processes`)."""
        skip = {id(p) for p in tried}
        best, best_score = None, b""
        for p in self.pool.proxies:
            if id(p) in skip or p.state != BreakerState.CLOSED or (accept and not accept(p)):
                continue
            score = hashlib.blake2b(f"{session}\0{p.spec.key}".encode(), digest_size=8).digest()
            if score > best_score:
                best, best_score = p.spec.key, score
        return best

    def stick(self, routing: Routing, lease: ProxyLease) -> None:
        if routing.session:
            self.sessions[routing.session] = lease.state.spec.key
            self.sessions.move_to_end(routing.session)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)

    def unstick(self, routing: Routing, lease: ProxyLease) -> None:
        if routing.session and self.sessions.get(routing.session) == lease.state.spec.key:
            del self.sessions[routing.session]

    def attempt_failed(
        self, lease: ProxyLease, ms: MemberStats, routing: Routing, e: BaseException
    ) -> None:
        ms.failures += 1
        # the member answered but could not reach the target: it works, that target is not
        # reachable through it (per-site quality); anything else counts against the member
        lease.release("blocked" if isinstance(e, TargetUnreachable | HttpError) else "failed", None)
        self.unstick(routing, lease)
        log.debug("gateway: attempt through %s failed: %s", lease.redacted, e)
