"""One plain-HTTP request (absolute URI): from the cache, or through the members with failover
(a connect error, a timeout or a block page moves it to the next one, up to `--retries`),
answered whole or streamed to the client.

Driven by callbacks, no task (see engine/gateway/job.py): the request parsed → a member
chosen and the request written on a kept-alive connection to it (the upstream pool) or on a
new one once connected → its answer parsed → judged and written to the client, each step in
the callback of the I/O that allowed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.gateway.auth import Routing
from engine.gateway.cache import lookup_allowed, request_cacheable
from engine.gateway.http import (
    IDEMPOTENT,
    Request,
    Response,
    onward_head,
    render_response,
    streamed_head,
)
from engine.gateway.job import Job
from engine.gateway.members import member_of
from engine.gateway.tunnel import site_of
from engine.gateway.upstream import (
    RESPONSE,
    MemberDown,
    TargetUnreachable,
    Upstream,
    basic_auth,
)
from fetchers.pool import NoProxyAvailable
from fetchers.proxy_parse import ProxySpec
from fetchers.validation import detect_block

if TYPE_CHECKING:
    from engine.gateway.client import ClientConn
    from engine.gateway.server import Gateway

BLOCK_STATUSES = frozenset({403, 429})


class Forward(Job):
    __slots__ = (
        "cache_key",
        "data",
        "kept",
        "key",
        "last_blocked",
        "message",
        "req",
        "sent",
        "started",
        "status",
    )

    def __init__(self, gw: Gateway, conn: ClientConn, req: Request, routing: Routing) -> None:
        super().__init__(gw, conn, routing, site_of(req.host, req.port))
        self.req = req
        self.cache_key: str | None = None
        self.kept = 0  # budget bytes of the block page kept while the next members are tried
        self.last_blocked: Response | None = None
        self.status, self.message = 502, "no member could fetch it"
        self.data = b""  # the request as the current member gets it
        self.key: str | None = None  # the member's upstream-pool key (`http` members)
        self.sent = 0
        self.started = 0.0  # loop time the current attempt started: its deadlines count from it

    def start(self) -> None:
        try:
            if self.gw.cache is None or not self._from_cache():
                self._next()
        except Exception:
            self._crash()

    def _from_cache(self) -> bool:
        """Answered from the cache (True), or noted as a miss or a bypass."""
        gw, req, st = self.gw, self.req, self.gw.stats
        cache = gw.cache
        assert cache is not None
        if not request_cacheable(req):
            st.cache.bypassed += 1
            return False
        self.cache_key = cache.key(req, self.routing.country)
        hit = cache.get(self.cache_key) if lookup_allowed(req) else None
        if hit is None:
            st.cache.misses += 1
            return False
        st.cache.hits += 1
        st.cache.bytes_saved += len(hit.body)
        st.requests[("http", "cache")] += 1
        keep = req.keep_alive and not gw.draining
        self.conn.write(render_response(hit, keep_alive=keep, extra={"X-Cache": "HIT"}))
        self.conn.finish(keep)
        return True

    # -- one attempt ----------------------------------------------------------------------------

    def _next(self) -> None:
        """The next member: the request sent on a kept-alive connection to it when the
        upstream pool has one, else on a new connection once it is made."""
        gw, req = self.gw, self.req
        if len(self.tried) > gw.config.retries:
            self._exhausted()
            return
        try:
            lease = self._take()
        except NoProxyAvailable as e:
            self.status, self.message = 503, str(e)
            self._exhausted()
            return
        state = lease.state
        self.started = gw.loop.time()
        self.sent = 0
        protocol = member_of(state).protocol
        if protocol != "http":  # a tunnel to the origin, one request on it
            self.key = None
            self.data = onward_head(req, absolute=False)
            self._dial(state.spec, protocol, False)
            return
        pool = gw.upstreams
        self.key = gw.named(state)[2]
        self.data = onward_head(
            req, absolute=True, proxy_auth=basic_auth(state.spec), keep_alive=pool.enabled
        )
        # a request that is not idempotent never goes on a kept connection: if that one
        # turned out stale, sending it again could repeat its effect (RFC 9110 9.2.2)
        up = pool.take(self.key) if pool.enabled and req.method in IDEMPOTENT else None
        if up is None:
            self._dial(state.spec, "http", True)
        else:
            self.up = up
            self._send()

    def _dial(self, spec: ProxySpec, protocol: str, forward: bool, fresh: bool = False) -> None:
        c = self.gw.config
        self.conn.job_deadline = self.started + min(c.connect_timeout_s, c.response_timeout_s)
        req = self.req
        self._connect(spec, protocol, req.host, req.port, forward, self._reached, fresh)

    def _reached(self, _result: object, exc: BaseException | None) -> None:
        """Connected to the member (and through it, for a tunnel to the origin)."""
        self.conn.job_deadline = 0.0
        try:
            if exc is not None:
                self._failed(exc)
                return
            if self.key is not None:  # managed by the upstream pool from now on
                assert self.up is not None
                self.up.key = self.key
                self.gw.upstreams.opened += 1
            self._send()
        except Exception:
            self._crash()

    def _send(self) -> None:
        c = self.gw.config
        up = self.up
        assert up is not None
        self.conn.job_deadline = self.started + c.response_timeout_s
        self.sent += len(self.data)
        up.start_exchange(
            self.data,
            self.req.method,
            c.max_buffer_bytes,
            c.max_head_bytes,
            self.gw.budget,
            self._answered,
        )

    def _answered(self, resp: object, exc: BaseException | None) -> None:
        """The member's answer, read (in its connection's callback)."""
        self.conn.job_deadline = 0.0
        try:
            if exc is None:
                assert isinstance(resp, Response)
                if resp.status == 407 and self.key is not None:
                    self._failed(MemberDown("the member rejected its credentials (407)"))
                else:
                    self._judged(resp)
            else:
                self._failed(exc)
        except Exception:
            self._crash()

    def _redial(self) -> None:
        assert self.lease is not None
        state = self.lease.state
        protocol = member_of(state).protocol
        self._dial(state.spec, protocol, protocol == "http", fresh=True)

    def _timed_out(self) -> None:
        up = self.up
        if up is not None and up.mode == RESPONSE:
            self._failed(TimeoutError("the member did not answer in time"))
        else:
            self._failed(MemberDown("connect or handshake timed out"))

    def _record_failure(self, e: BaseException) -> None:
        self.status, self.message = _failure_status(e)

    # -- the answer -----------------------------------------------------------------------------

    def _judged(self, resp: Response) -> None:
        """A block page moves the request on (while members are left); anything else is the
        client's answer."""
        gw = self.gw
        lease, ms, up = self.lease, self.ms, self.up
        assert lease is not None and ms is not None and up is not None
        self.lease = None
        latency = (gw.clock() - self.t0) * 1000
        ms.bytes_up += self.sent
        ms.bytes_down += len(resp.raw_head) + len(resp.body)
        blocked = resp.complete and _is_block(resp)
        if blocked:
            ms.blocked += 1
            lease.release("blocked", latency)
            gw.unstick(self.routing, lease)
            if len(self.tried) <= gw.config.retries:
                gw.budget.release(self.kept)  # an earlier block page is replaced
                self.kept = up.take_reservation()
                self._drop_up("blocked")
                self.last_blocked = resp
                self._next()
                return
        else:
            lease.release("ok", latency)
            ms.latencies_ms.append(latency)
            gw.stick(self.routing, lease)
        self.up = None
        if resp.complete:
            self._answer(resp, up, blocked)
        else:
            self._stream(resp, up)

    def _answer(self, resp: Response, up: Upstream, blocked: bool) -> None:
        gw, st = self.gw, self.gw.stats
        gw.done_with(up, blocked)
        if self.cache_key is not None and not blocked:
            st.cache.origin_fetches += 1
            if gw.cache is not None and gw.cache.put(self.cache_key, resp):
                st.cache.stores += 1
        st.requests[("http", "blocked" if blocked else "ok")] += 1
        keep = self.req.keep_alive and not gw.draining
        self._ended()
        self.conn.write(render_response(resp, keep_alive=keep))
        self.conn.finish(keep)

    def _stream(self, resp: Response, up: Upstream) -> None:
        """Too big to hold: relayed as it comes (the client connection closes after it)."""
        gw = self.gw
        gw.stats.requests[("http", "streamed")] += 1
        self._ended()
        self.conn.write(streamed_head(resp) + resp.body)
        if up.key is not None and gw.upstreams.enabled:
            gw.upstreams.discarded["streamed"] += 1
        assert self.ms is not None
        self.conn.splice(up, self.ms, None, stream=True)

    def _exhausted(self) -> None:
        """No member is left: the last block page if every one was blocked, else an error."""
        st = self.gw.stats
        self._ended()
        if self.last_blocked is not None:
            st.requests[("http", "blocked")] += 1
            self.conn.write(render_response(self.last_blocked, keep_alive=False))
            self.conn.finish(False)
            return
        st.requests[("http", str(self.status))] += 1
        self.conn.reject(self.status, self.message)

    def _ended(self) -> None:
        kept, self.kept = self.kept, 0
        self.gw.budget.release(kept)


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
