"""The gateway's listener: HTTP (absolute-URI and CONNECT) and SOCKS5 on one port (a first
byte of 0x05 is SOCKS5), each request sent out through a member of the pool with failover.

Per connection: at most one upstream connection at a time, every wait bounded (the request
head, the answer, an idle tunnel), every client or member failure contained to its own
connection. `stop()` closes the listener, closes idle kept-alive connections, lets busy ones
finish within the grace period and cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from engine.gateway import socks5
from engine.gateway.auth import ANY, Authenticator, Routing, basic_credentials
from engine.gateway.cache import GatewayCache, lookup_allowed, request_cacheable
from engine.gateway.config import GatewayConfig
from engine.gateway.http import (
    HttpError,
    Request,
    Response,
    error_response,
    onward_head,
    parse_request,
    read_body,
    read_head,
    read_response,
    render_response,
    streamed_head,
)
from engine.gateway.members import member_of
from engine.gateway.stats import GatewayStats, MemberStats
from engine.gateway.upstream import (
    MemberDown,
    TargetUnreachable,
    UpstreamError,
    basic_auth,
    open_member,
    open_tunnel,
)
from fetchers.pool import NoProxyAvailable, ProxyLease, ProxyPool, ProxyState
from fetchers.validation import detect_block

log = logging.getLogger(__name__)

MAX_SESSIONS = 100_000
PIPE_CHUNK = 64 * 1024
BLOCK_STATUSES = frozenset({403, 429})
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Conn:
    __slots__ = ("idle", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.idle = True


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
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.port = 0
        self.draining = False
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], _Conn] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self._server = await asyncio.start_server(
            self._on_client, c.host, c.port, limit=c.max_head_bytes, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, drain: idle connections close now, busy ones get the grace."""
        grace = self.config.grace_s if grace_s is None else grace_s
        self.draining = True
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._conns.items()):
            if conn.idle:
                task.cancel()
        busy = [t for t in self._conns if not t.done()]
        if busy:
            _done, late = await asyncio.wait(busy, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot(
            self.pool.stats(), None if self.cache is None else len(self.cache)
        )
        snap["strategy"] = self.pool.strategy.name
        snap["members_total"] = len(self.pool)
        snap["sessions"] = len(self.sessions)
        return snap

    # -- one client connection --------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        st = self.stats
        if len(self._conns) >= self.config.max_connections or self.draining:
            st.connections_refused += 1
            writer.transport.abort()
            return
        conn = self._conns[task] = _Conn(writer)
        st.connections_open += 1
        st.connections_total += 1
        try:
            first = await asyncio.wait_for(reader.read(1), self.config.head_timeout_s)
            if first == b"\x05":
                conn.idle = False
                await self._socks(reader, writer)
            elif first:
                await self._http(reader, writer, first, conn)
        except asyncio.CancelledError:
            pass  # drained
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client went away or stalled: its connection alone ends
        except Exception:
            log.exception("gateway: unexpected error on a client connection")
        finally:
            st.connections_open -= 1
            self._conns.pop(task, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that stopped reading holds nothing of ours
            else:
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def _reject(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        self.stats.client_errors[str(status)] += 1
        extra = {"Proxy-Authenticate": 'Basic realm="fetchfleet"'} if status == 407 else None
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(
                self._send(writer, error_response(status, message, extra=extra)), 5
            )

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, conn: _Conn
    ) -> None:
        c = self.config
        pending = first
        while True:
            conn.idle = not pending
            if self.draining and conn.idle:
                return
            try:
                timeout = c.head_timeout_s if pending else c.idle_timeout_s
                head = await asyncio.wait_for(read_head(reader, pending), timeout)
            except TimeoutError:
                if pending:
                    await self._reject(writer, 408, "the request head did not arrive in time")
                return
            except HttpError as e:
                await self._reject(writer, e.status, str(e))
                return
            if head is None:
                return
            conn.idle = False
            try:
                req = parse_request(head)
                routing = self._http_routing(req)
                if not req.is_connect:
                    await asyncio.wait_for(
                        read_body(reader, req, c.max_body_bytes), c.head_timeout_s
                    )
            except TimeoutError:
                await self._reject(writer, 408, "the request body did not arrive in time")
                return
            except HttpError as e:
                await self._reject(writer, e.status, str(e))
                return
            if req.is_connect:
                await self._connect(req, routing, reader, writer)
                return
            if not await self._forward(req, routing, writer) or not req.keep_alive:
                return
            pending = b""

    def _http_routing(self, req: Request) -> Routing:
        creds = basic_credentials(req.header("proxy-authorization"))
        routing = self.auth.check(*creds) if creds else self.auth.check(None, None)
        if routing is None:
            raise HttpError(407, "proxy credentials required (or the username's options are bad)")
        return routing

    async def _connect(
        self,
        req: Request,
        routing: Routing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            (up_r, up_w), lease, ms = await self._dial(req.host, req.port, routing)
        except NoRoute as e:
            self.stats.requests[("connect", str(e.status))] += 1
            await self._reject(writer, e.status, str(e))
            return
        self.stats.requests[("connect", "ok")] += 1
        try:
            await self._send(writer, CONNECT_OK)
            await self._relay(reader, writer, up_r, up_w, ms)
        finally:
            lease.release("ok", None)
            up_w.transport.abort()

    async def _forward(self, req: Request, routing: Routing, writer: asyncio.StreamWriter) -> bool:
        """One plain-HTTP request; True when the client connection may carry another."""
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
                    await self._send(
                        writer, render_response(hit, keep_alive=keep, extra={"X-Cache": "HIT"})
                    )
                    return keep
                st.cache.misses += 1
            else:
                st.cache.bypassed += 1
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
            ms = st.member(lease.redacted)
            ms.requests += 1
            t0 = self.clock()
            up_w = None
            try:
                resp, up_r, up_w, sent = await asyncio.wait_for(
                    self._exchange(req, lease.state), c.response_timeout_s
                )
            except (UpstreamError, HttpError, ConnectionError, TimeoutError, OSError) as e:
                if up_w is not None:
                    up_w.transport.abort()
                self._attempt_failed(lease, ms, routing, e)
                status, message = _failure_status(e)
                continue
            latency = (self.clock() - t0) * 1000
            ms.bytes_up += sent
            ms.bytes_down += len(resp.raw_head) + len(resp.body)
            blocked = resp.complete and _is_block(resp)
            if blocked:
                ms.blocked += 1
                lease.release("blocked", latency)
                self._unstick(routing, lease)
                if attempt < c.retries:
                    up_w.transport.abort()
                    last_blocked = resp
                    continue
            else:
                lease.release("ok", latency)
                ms.latencies_ms.append(latency)
                self._stick(routing, lease)
            if not resp.complete:
                st.requests[("http", "streamed")] += 1
                try:
                    await self._send(writer, streamed_head(resp) + resp.body)
                    await self._pipe(up_r, writer, ms, "bytes_down")
                finally:
                    up_w.transport.abort()
                return False
            up_w.transport.abort()
            if cache_key is not None and not blocked:
                st.cache.origin_fetches += 1
                if self.cache is not None and self.cache.put(cache_key, resp):
                    st.cache.stores += 1
            st.requests[("http", "blocked" if blocked else "ok")] += 1
            keep = req.keep_alive and not self.draining
            await self._send(writer, render_response(resp, keep_alive=keep))
            return keep
        if last_blocked is not None:  # every member was blocked: the client sees the page
            st.requests[("http", "blocked")] += 1
            await self._send(writer, render_response(last_blocked, keep_alive=False))
            return False
        st.requests[("http", str(status))] += 1
        await self._reject(writer, status, message)
        return False

    async def _exchange(
        self, req: Request, state: ProxyState
    ) -> tuple[Response, asyncio.StreamReader, asyncio.StreamWriter, int]:
        c = self.config
        m = member_of(state)
        if m.protocol == "http":
            up_r, up_w = await open_member(state.spec, c.connect_timeout_s)
            data = onward_head(req, absolute=True, proxy_auth=basic_auth(state.spec))
        else:
            up_r, up_w = await open_tunnel(
                state.spec, m.protocol, req.host, req.port, c.connect_timeout_s
            )
            data = onward_head(req, absolute=False)
        try:
            up_w.write(data)
            await up_w.drain()
            resp = await read_response(up_r, req.method, c.max_buffer_bytes, c.max_head_bytes)
        except BaseException:
            up_w.transport.abort()
            raise
        if m.protocol == "http" and resp.status == 407:
            up_w.transport.abort()
            raise MemberDown("the member rejected its credentials (407)")
        return resp, up_r, up_w, len(data)

    # -- SOCKS5 -------------------------------------------------------------------------------

    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        routing: list[Routing] = []

        def check(user: str, password: str) -> bool:
            r = self.auth.check(user, password)
            if r is not None:
                routing.append(r)
            return r is not None

        try:
            req = await asyncio.wait_for(
                socks5.handshake(reader, writer, need_auth=self.auth.required, check=check),
                self.config.head_timeout_s,
            )
        except socks5.SocksError as e:
            self.stats.client_errors["socks"] += 1
            if e.code is not None:
                writer.write(socks5.reply(e.code))
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 5)
            return
        try:
            (up_r, up_w), lease, ms = await self._dial(
                req.host, req.port, routing[0] if routing else ANY
            )
        except NoRoute as e:
            self.stats.requests[("socks5", str(e.status))] += 1
            writer.write(socks5.reply(e.socks))
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 5)
            return
        self.stats.requests[("socks5", "ok")] += 1
        try:
            await self._send(writer, socks5.reply(socks5.SUCCEEDED))
            await self._relay(reader, writer, up_r, up_w, ms)
        finally:
            lease.release("ok", None)
            up_w.transport.abort()

    # -- members ------------------------------------------------------------------------------

    def _acquire(self, routing: Routing, site: str, tried: list[ProxyState]) -> ProxyLease:
        accept = None
        if routing.country:
            country = routing.country
            accept = lambda p: member_of(p).country == country  # noqa: E731
        prefer = self.sessions.get(routing.session) if routing.session else None
        lease = self.pool.acquire(site=site, accept=accept, exclude=tried, prefer=prefer)
        outcome = "sticky" if prefer is not None and lease.state.spec.key == prefer else "chosen"
        self.stats.decisions[(self.pool.strategy.name, outcome)] += 1
        return lease

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
        self, host: str, port: int, routing: Routing
    ) -> tuple[Stream, ProxyLease, MemberStats]:
        """A tunnel to host:port through the first member that gives one (failover)."""
        c = self.config
        tried: list[ProxyState] = []
        failure: NoRoute = NoRoute(502, socks5.GENERAL_FAILURE, "no member could connect")
        for _ in range(c.retries + 1):
            try:
                lease = self._acquire(routing, site_of(host, port), tried)
            except NoProxyAvailable as e:
                failure = NoRoute(503, socks5.GENERAL_FAILURE, str(e))
                break
            tried.append(lease.state)
            ms = self.stats.member(lease.redacted)
            ms.requests += 1
            t0 = self.clock()
            protocol = member_of(lease.state).protocol
            try:
                stream = await open_tunnel(
                    lease.state.spec, protocol, host, port, c.connect_timeout_s
                )
            except UpstreamError as e:
                self._attempt_failed(lease, ms, routing, e)
                if isinstance(e, TargetUnreachable):
                    failure = NoRoute(
                        502, socks5.HOST_UNREACHABLE, f"{host}:{port} unreachable: {e}"
                    )
                else:
                    failure = NoRoute(502, socks5.GENERAL_FAILURE, f"members failed: {e}")
                continue
            ms.latencies_ms.append((self.clock() - t0) * 1000)
            self._stick(routing, lease)
            return stream, lease, ms
        raise failure

    # -- relaying -----------------------------------------------------------------------------

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, ms: MemberStats, counter: str
    ) -> None:
        idle = self.config.tunnel_idle_s
        try:
            while data := await asyncio.wait_for(src.read(PIPE_CHUNK), idle):
                setattr(ms, counter, getattr(ms, counter) + len(data))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
        except (ConnectionError, TimeoutError, OSError):
            pass

    async def _relay(
        self,
        c_r: asyncio.StreamReader,
        c_w: asyncio.StreamWriter,
        u_r: asyncio.StreamReader,
        u_w: asyncio.StreamWriter,
        ms: MemberStats,
    ) -> None:
        """Bytes both ways until the target side ends (a client's half-close is passed on
        and the answer still awaited), a side fails, or the tunnel idles out."""
        up = asyncio.ensure_future(self._pipe(c_r, u_w, ms, "bytes_up"))
        down = asyncio.ensure_future(self._pipe(u_r, c_w, ms, "bytes_down"))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and not down.done():
                await down
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)


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
