"""The gateway's listener: HTTP (absolute-URI and CONNECT) and SOCKS5 on one port (a first
byte of 0x05 is SOCKS5), each request sent out through a member of the pool with failover.

The bytes are handled by `client.ClientConn` and `upstream.Upstream` (protocol callbacks);
this module decides: one task per request picks members, fails over, judges block pages,
serves and fills the cache, and counts. Per connection at most one upstream connection at a
time (plus the idle ones the upstream pool keeps for `http` members), every wait bounded,
every client or member failure contained to its own connection.
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
from typing import Any, cast

from engine.gateway import socks5
from engine.gateway.auth import Authenticator, Routing, basic_credentials
from engine.gateway.budget import BufferBudget
from engine.gateway.cache import GatewayCache, lookup_allowed, request_cacheable
from engine.gateway.client import ClientConn
from engine.gateway.config import GatewayConfig
from engine.gateway.http import (
    IDEMPOTENT,
    HttpError,
    Request,
    Response,
    onward_head,
    render_response,
    streamed_head,
)
from engine.gateway.keepalive import IdlePool
from engine.gateway.members import member_of
from engine.gateway.stats import GatewayStats, MemberStats
from engine.gateway.upstream import (
    MemberDown,
    StaleConnection,
    TargetUnreachable,
    Upstream,
    UpstreamError,
    basic_auth,
    open_through,
)
from fetchers.pool import BreakerState, NoProxyAvailable, ProxyLease, ProxyPool, ProxyState
from fetchers.proxy_parse import ProxySpec
from fetchers.validation import detect_block

log = logging.getLogger(__name__)

MAX_SESSIONS = 100_000
BLOCK_STATUSES = frozenset({403, 429})
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
SWEEP_S = 0.25


class NoRoute(Exception):
    """Every attempt failed: `status` for an HTTP client, `socks` code for a SOCKS one."""

    def __init__(self, status: int, socks: int, message: str) -> None:
        super().__init__(message)
        self.status, self.socks = status, socks


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
            if 0.0 < conn.task_deadline <= now:
                conn.expire_task()
        if self.upstreams.count:
            self.upstreams.sweep(now)
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, drain: idle connections close now, busy ones get the grace."""
        grace = self.config.grace_s if grace_s is None else grace_s
        self.draining = True
        self._all_closed = asyncio.Event()
        if self._server is not None:
            self._server.close()
        self.upstreams.close_all()
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

    async def serve_socks(
        self, conn: ClientConn, req: socks5.SocksRequest, routing: Routing
    ) -> None:
        """The task of one SOCKS5 CONNECT."""
        try:
            try:
                up, lease, ms = await self._dial(conn, req.host, req.port, routing)
            except NoRoute as e:
                self.stats.requests[("socks5", str(e.status))] += 1
                conn.write(socks5.reply(e.socks))
                conn.close(5.0)
                return
            self.stats.requests[("socks5", "ok")] += 1
            conn.write(socks5.reply(socks5.SUCCEEDED))
            conn.splice(up, ms, lease.release_ok, stream=False)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("gateway: unexpected error on a SOCKS5 connection")
            conn.transport.abort()

    async def serve_connect(self, conn: ClientConn, req: Request, routing: Routing) -> None:
        """The task of one HTTP CONNECT (a coroutine of its own: one level less to resume)."""
        try:
            try:
                up, lease, ms = await self._dial(conn, req.host, req.port, routing)
            except NoRoute as e:
                self.stats.requests[("connect", str(e.status))] += 1
                conn.reject(e.status, str(e))
                return
            self.stats.requests[("connect", "ok")] += 1
            conn.write(CONNECT_OK)
            conn.splice(up, ms, lease.release_ok, stream=False)
        except asyncio.CancelledError:
            pass  # the client left, or a drain ran out of time
        except Exception:
            log.exception("gateway: unexpected error on a client connection")
            conn.transport.abort()

    # -- HTTP ---------------------------------------------------------------------------------

    def _named(self, state: ProxyState) -> tuple[ProxyState, str, str]:
        """(state, redacted URL, key) of a member: both strings built once, not per request."""
        named = self._names.get(id(state))
        if named is None or named[0] is not state:
            if len(self._names) > 4 * len(self.pool) + 64:  # members come and go: bounded
                self._names.clear()
            named = self._names[id(state)] = (state, state.redacted, state.spec.key)
        return named

    def member_stats(self, state: ProxyState) -> MemberStats:
        """The counters of the member (by its redacted URL)."""
        return self.stats.member(self._named(state)[1])

    async def serve_http(self, conn: ClientConn, req: Request, routing: Routing) -> None:
        """The task of one plain-HTTP request, answered (or streamed) to the client (a
        CONNECT goes to `serve_connect`)."""
        if req.is_connect:
            await self.serve_connect(conn, req, routing)
            return
        try:
            st, c = self.stats, self.config
            cache_key = None
            if self.cache is not None:
                if request_cacheable(req):
                    cache_key = self.cache.key(req, routing.country)
                    hit = self.cache.get(cache_key) if lookup_allowed(req) else None
                    if hit is not None:
                        st.cache.hits += 1
                        st.cache.bytes_saved += len(hit.body)
                        st.requests[("http", "cache")] += 1
                        keep = req.keep_alive and not self.draining
                        conn.write(render_response(hit, keep_alive=keep, extra={"X-Cache": "HIT"}))
                        conn.finish(keep)
                        return
                    st.cache.misses += 1
                else:
                    st.cache.bypassed += 1
            kept = 0  # budget bytes of the block page kept while the next members are tried
            try:
                tried: list[ProxyState] = []
                last_blocked: Response | None = None
                status, message = 502, "no member could fetch it"
                for attempt in range(c.retries + 1):
                    try:
                        lease = self._acquire(routing, site_of(req.host, req.port), tried)
                    except NoProxyAvailable as e:
                        status, message = 503, str(e)
                        break
                    tried.append(lease.state)
                    ms = self.member_stats(lease.state)
                    ms.requests += 1
                    t0 = self.clock()
                    holder: list[Upstream] = []
                    try:
                        resp, sent = await self._exchange(conn, req, lease.state, holder)
                    except (UpstreamError, HttpError, ConnectionError, TimeoutError, OSError) as e:
                        if holder:
                            self.upstreams.close(holder[0], "error")
                        self._attempt_failed(lease, ms, routing, e)
                        status, message = _failure_status(e)
                        continue
                    except BaseException:
                        if holder:
                            self.upstreams.close(holder[0], "error")
                        lease.release("failed", None)
                        raise
                    up = holder[0]
                    latency = (self.clock() - t0) * 1000
                    ms.bytes_up += sent
                    ms.bytes_down += len(resp.raw_head) + len(resp.body)
                    blocked = resp.complete and _is_block(resp)
                    if blocked:
                        ms.blocked += 1
                        lease.release("blocked", latency)
                        self._unstick(routing, lease)
                        if attempt < c.retries:
                            self.budget.release(kept)  # an earlier block page is replaced
                            kept = up.take_reservation()
                            self.upstreams.close(up, "blocked")
                            last_blocked = resp
                            continue
                    else:
                        lease.release("ok", latency)
                        ms.latencies_ms.append(latency)
                        self._stick(routing, lease)
                    if not resp.complete:
                        st.requests[("http", "streamed")] += 1
                        conn.write(streamed_head(resp) + resp.body)
                        if up.key is not None and self.upstreams.enabled:
                            self.upstreams.discarded["streamed"] += 1
                        conn.splice(up, ms, None, stream=True)
                        return
                    self._done_with(up, blocked)
                    if cache_key is not None and not blocked:
                        st.cache.origin_fetches += 1
                        if self.cache is not None and self.cache.put(cache_key, resp):
                            st.cache.stores += 1
                    st.requests[("http", "blocked" if blocked else "ok")] += 1
                    keep = req.keep_alive and not self.draining
                    conn.write(render_response(resp, keep_alive=keep))
                    conn.finish(keep)
                    return
                if last_blocked is not None:  # every member was blocked: the client sees the page
                    st.requests[("http", "blocked")] += 1
                    conn.write(render_response(last_blocked, keep_alive=False))
                    conn.finish(False)
                    return
                st.requests[("http", str(status))] += 1
                conn.reject(status, message)
            finally:
                self.budget.release(kept)
        except asyncio.CancelledError:
            pass  # the client left, or a drain ran out of time
        except Exception:
            log.exception("gateway: unexpected error on a client connection")
            conn.transport.abort()

    async def _exchange(
        self, conn: ClientConn, req: Request, state: ProxyState, holder: list[Upstream]
    ) -> tuple[Response, int]:
        """The request through one member within `response_timeout_s` (reaching it within
        `connect_timeout_s`); its connection is put in `holder` at once (the caller closes,
        relays or pools it). Through an `http` member a kept-alive connection is used when
        the upstream pool has one (engine/gateway/keepalive.py)."""
        m = member_of(state)
        start = self.loop.time()
        if m.protocol != "http":  # a tunnel to the origin, one request on it
            up = await self._reach(conn, state.spec, m.protocol, req.host, req.port, False, start)
            holder.append(up)
            data = onward_head(req, absolute=False)
            return await self._send(conn, up, data, req, start), len(data)
        pool = self.upstreams
        key = self._named(state)[2]
        # a request that is not idempotent never goes on a kept connection: if that one
        # turned out stale, sending it again could repeat its effect (RFC 9110 9.2.2)
        up = pool.take(key) if pool.enabled and req.method in IDEMPOTENT else None
        if up is None:
            up = await self._open(conn, state.spec, key, req, start)
        holder.append(up)
        data = onward_head(
            req, absolute=True, proxy_auth=basic_auth(state.spec), keep_alive=pool.enabled
        )
        sent = len(data)
        try:
            resp = await self._send(conn, up, data, req, start)
        except StaleConnection:
            # the member closed it while idle: once more on a fresh connection, not a
            # failure of the member
            holder.clear()
            pool.close(up, "stale")
            pool.stale_retries += 1
            up = await self._open(conn, state.spec, key, req, start)
            holder.append(up)
            resp = await self._send(conn, up, data, req, start)
            sent += len(data)
        if resp.status == 407:
            raise MemberDown("the member rejected its credentials (407)")
        return resp, sent

    async def _open(
        self, conn: ClientConn, spec: ProxySpec, key: str, req: Request, start: float
    ) -> Upstream:
        """A new connection to an `http` member (`key`: its spec's), managed by the upstream
        pool."""
        up = await self._reach(conn, spec, "http", req.host, req.port, True, start)
        up.key = key
        self.upstreams.opened += 1
        return up

    async def _send(
        self, conn: ClientConn, up: Upstream, data: bytes, req: Request, start: float
    ) -> Response:
        """`data` sent on `up`, its answer read within `response_timeout_s` of `start`."""
        c = self.config
        conn.step_deadline(start + c.response_timeout_s)
        try:
            return cast(
                Response,
                await up.start_exchange(
                    data, req.method, c.max_buffer_bytes, c.max_head_bytes, self.budget
                ),
            )
        except asyncio.CancelledError:
            if conn.took_too_long():
                raise TimeoutError("the member did not answer in time") from None
            raise
        finally:
            conn.step_deadline(0.0)

    def _done_with(self, up: Upstream, blocked: bool) -> None:
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

    async def _reach(
        self,
        conn: ClientConn,
        spec: ProxySpec,
        protocol: str,
        host: str,
        port: int,
        forward: bool,
        start: float,
    ) -> Upstream:
        """`upstream.dial` within `connect_timeout_s` (and the answer's own deadline)."""
        c = self.config
        conn.step_deadline(start + min(c.connect_timeout_s, c.response_timeout_s))
        try:
            return await open_through(self.loop, spec, protocol, host, port, forward)
        except asyncio.CancelledError:
            if conn.took_too_long():
                raise MemberDown("connect or handshake timed out") from None
            raise
        finally:
            conn.step_deadline(0.0)

    # -- members ------------------------------------------------------------------------------

    def _acquire(self, routing: Routing, site: str, tried: list[ProxyState]) -> ProxyLease:
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

    def _stick(self, routing: Routing, lease: ProxyLease) -> None:
        if routing.session:
            self.sessions[routing.session] = lease.state.spec.key
            self.sessions.move_to_end(routing.session)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)

    def _unstick(self, routing: Routing, lease: ProxyLease) -> None:
        if routing.session and self.sessions.get(routing.session) == lease.state.spec.key:
            del self.sessions[routing.session]

    def _attempt_failed(
        self, lease: ProxyLease, ms: MemberStats, routing: Routing, e: BaseException
    ) -> None:
        ms.failures += 1
        # the member answered but could not reach the target: it works, that target is not
        # reachable through it (per-site quality); anything else counts against the member
        lease.release("blocked" if isinstance(e, TargetUnreachable | HttpError) else "failed", None)
        self._unstick(routing, lease)
        log.debug("gateway: attempt through %s failed: %s", lease.redacted, e)

    async def _dial(
        self, conn: ClientConn, host: str, port: int, routing: Routing
    ) -> tuple[Upstream, ProxyLease, MemberStats]:
        """A tunnel to host:port through the first member that gives one (failover);
        `_reach` inlined (the path of every CONNECT)."""
        c = self.config
        tried: list[ProxyState] = []
        failure: NoRoute | None = None
        site = site_of(host, port)
        reach_s = min(c.connect_timeout_s, c.response_timeout_s)
        for _ in range(c.retries + 1):
            try:
                lease = self._acquire(routing, site, tried)
            except NoProxyAvailable as e:
                failure = NoRoute(503, socks5.GENERAL_FAILURE, str(e))
                break
            state = lease.state
            tried.append(state)
            ms = self.member_stats(state)
            ms.requests += 1
            t0 = self.clock()
            conn.task_deadline = self.loop.time() + reach_s
            try:
                up = await open_through(
                    self.loop, state.spec, member_of(state).protocol, host, port, False
                )
            except asyncio.CancelledError:
                conn.task_deadline = 0.0
                if not conn.took_too_long():
                    lease.release("failed", None)
                    raise
                e: UpstreamError = MemberDown("connect or handshake timed out")
            except UpstreamError as err:
                conn.task_deadline = 0.0
                e = err
            except BaseException:
                conn.task_deadline = 0.0
                lease.release("failed", None)
                raise
            else:
                conn.task_deadline = 0.0
                ms.latencies_ms.append((self.clock() - t0) * 1000)
                self._stick(routing, lease)
                return up, lease, ms
            self._attempt_failed(lease, ms, routing, e)
            if isinstance(e, TargetUnreachable):
                failure = NoRoute(502, socks5.HOST_UNREACHABLE, f"{host}:{port} unreachable: {e}")
            else:
                failure = NoRoute(502, socks5.GENERAL_FAILURE, f"members failed: {e}")
        raise failure or NoRoute(502, socks5.GENERAL_FAILURE, "no member could connect")


def site_of(host: str, port: int) -> str:
    """The key of per-site quality: the authority (another port may be another service)."""
    return f"{host.lower()}:{port}"


def _is_block(resp: Response) -> bool:
    if resp.status in BLOCK_STATUSES:
        return True
    reason, _strong = detect_block(resp.status, resp.lower_headers(), resp.body)
    return reason is not None


def _failure_status(e: BaseException) -> tuple[int, str]:
    if isinstance(e, TimeoutError):
        return 504, "the members did not answer in time"
    if isinstance(e, TargetUnreachable):
        return 502, f"the target is unreachable: {e}"
    return 502, f"the members failed: {e}"
