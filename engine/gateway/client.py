"""One client connection to the gateway, as an `asyncio.Protocol`: the request head (or the
SOCKS5 handshake) parsed from the buffered bytes, one job of callbacks per request for the
member selection and failover (`tunnel.Tunnel`, `forward.Forward`), then either an answer
and the next request (keep-alive) or a relay spliced to the member's connection.

Why callbacks and not streams or tasks: a request then costs no task, no StreamReader
copies, and a relayed chunk one callback. Every wait is a deadline on the connection: the
head (`head_timeout_s`), an idle kept-alive connection (`idle_timeout_s`), a relay with no
byte either way (`tunnel_idle_s`), a close that does not flush (`LINGER_S`), and the request
job's current step (reaching a member, its answer: `job_deadline`).

Why deadlines and not timers: a loop timer per wait cost four timer creations and
cancellations per request (about 9 % of the gateway's CPU under load); a deadline is a float,
and the gateway's sweep (`Gateway._sweep`, a few times a second) acts on the expired ones.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from engine.gateway import socks5
from engine.gateway.auth import ANY, Routing
from engine.gateway.forward import Forward
from engine.gateway.http import (
    HEAD_END,
    HttpError,
    Request,
    error_response,
    parse_request,
    request_body_end,
)
from engine.gateway.stats import MemberStats
from engine.gateway.tunnel import Tunnel

if TYPE_CHECKING:
    from engine.gateway.job import Job
    from engine.gateway.server import Gateway
    from engine.gateway.upstream import Upstream

HEAD, BODY, BUSY, SOCKS, RELAY, STREAM, CLOSED = range(7)
LINGER_S = 5.0  # a closed connection whose last bytes the client does not take


class ClientConn(asyncio.Protocol):
    __slots__ = (
        "activity",
        "buf",
        "deadline",
        "eof",
        "gw",
        "job",
        "job_deadline",
        "ms",
        "paused",
        "refused",
        "req",
        "routing",
        "seen",
        "socks",
        "state",
        "transport",
        "up",
    )

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.buf = bytearray()
        self.state = HEAD
        self.deadline = 0.0  # loop time when `_timeout` runs; 0: none
        self.job_deadline = 0.0  # loop time when the request job's step has failed
        self.job: Job | None = None  # the request's, while it waits on members
        self.up: Upstream | None = None
        self.ms: MemberStats | None = None
        self.req: Request | None = None
        self.routing: Routing = ANY
        self.socks: socks5.Handshake | None = None
        self.activity = self.seen = 0
        self.eof = self.paused = self.refused = False

    @property
    def idle(self) -> bool:
        """Between requests: a drain may close it at once."""
        return self.state == HEAD and not self.buf

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport is no asyncio.Transport subclass (and cast() is a call)
        self.transport = transport  # type: ignore[assignment]
        if not self.gw.admit(self):
            self.refused = True
            self.transport.abort()
            return
        self._arm(self.gw.config.head_timeout_s)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == RELAY:  # set by splice: up, its transport and ms are there
            self.activity += 1
            self.ms.bytes_up += len(data)  # type: ignore[union-attr]
            self.up.transport.write(data)  # type: ignore[union-attr]
        elif state in (HEAD, BODY):
            self.buf += data
            self._parse()
        elif state == SOCKS:
            self.buf += data
            self._socks_step()
        elif state == BUSY:
            self.buf += data  # a pipelined request: parsed when this one is answered
            if len(self.buf) > self.gw.config.max_head_bytes and not self.paused:
                self.paused = True
                self.transport.pause_reading()
        # STREAM / CLOSED: the client has nothing more to say that we need

    def eof_received(self) -> bool:
        state = self.state
        if state == RELAY:
            up = self.up.transport if self.up is not None else None
            if up is not None and up.can_write_eof() and not up.is_closing():
                up.write_eof()  # the client is done sending; the answer may still come
            return True
        if state in (BUSY, STREAM):
            self.eof = True  # answer, then close
            return True
        if state == HEAD and self.buf:
            self.reject(400, "the request head ended early")
            return True
        if state == BODY:
            self.reject(400, "the request body ended early")
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.state = CLOSED
        self.deadline = self.job_deadline = 0.0
        job, self.job = self.job, None
        up, self.up = self.up, None  # it points back here: no cycle left
        try:
            if job is not None:
                job.cancel()
            if up is not None:
                up.abort()
        finally:
            self.gw.conn_lost(self)  # counted as closed whatever happened above

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    # -- deadlines (run by Gateway._sweep) ------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self.deadline = self.gw.loop.time() + delay

    def expire_job(self) -> None:
        """The request job's current step is past its deadline: it fails over or answers."""
        self.job_deadline = 0.0
        if self.job is not None:
            self.job.expired()

    def _timeout(self) -> None:
        self.deadline = 0.0
        state = self.state
        if state in (RELAY, STREAM):
            if self.activity != self.seen:  # bytes moved since the last look: keep going
                self.seen = self.activity
                self._arm(self.gw.config.tunnel_idle_s)
                return
        elif state == HEAD and self.buf:
            self.reject(408, "the request head did not arrive in time")
            return
        elif state == BODY:
            self.reject(408, "the request body did not arrive in time")
            return
        self.transport.abort()

    # -- requests -------------------------------------------------------------------------------

    def _parse(self) -> None:
        c = self.gw.config
        buf = self.buf
        if self.state == HEAD:
            if buf[0] == 5:
                self._start_socks()
                return
            end = buf.find(HEAD_END)
            if end < 0 or end + len(HEAD_END) > c.max_head_bytes:
                if len(buf) > c.max_head_bytes or end >= 0:
                    self.reject(431, "request head too large")
                return
            try:
                req = parse_request(bytes(buf[: end + len(HEAD_END)]))
                self.routing = self.gw.http_routing(req)
            except HttpError as e:
                self.reject(e.status, str(e))
                return
            del buf[: end + len(HEAD_END)]
            self.req = req
            if req.is_connect:  # what follows is the tunnel's
                self._dispatch()
                return
            self.state = BODY
            self._arm(c.head_timeout_s)
        assert self.req is not None
        try:
            end = request_body_end(buf, self.req, c.max_body_bytes)
        except HttpError as e:
            self.reject(e.status, str(e))
            return
        if end is None:
            return
        del buf[:end]
        self._dispatch()

    def _dispatch(self) -> None:
        req = self.req
        assert req is not None
        self.state = BUSY
        self.deadline = 0.0
        if req.is_connect:
            job: Job = Tunnel(self.gw, self, req.host, req.port, self.routing, "connect")
        else:
            job = Forward(self.gw, self, req, self.routing)
        self.job = job
        job.start()

    def finish(self, keep: bool) -> None:
        """The answer is written: read the next request, or close."""
        if self.state != BUSY:
            return
        self.job = None
        self.req = None
        if not keep or self.eof:
            self.close(self.gw.config.idle_timeout_s)
            return
        self.state = HEAD
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buf:
            # a pipelined request: parsed at the next iteration, not inside the callback
            # that answered this one (a cached answer is written synchronously: requests
            # pipelined back to back would otherwise nest one call deeper each)
            self._arm(self.gw.config.head_timeout_s)
            self.gw.loop.call_soon(self._pipelined)
        else:
            self._arm(self.gw.config.idle_timeout_s)

    def _pipelined(self) -> None:
        if self.state == HEAD and self.buf:
            self._parse()

    # -- SOCKS5 ---------------------------------------------------------------------------------

    def _start_socks(self) -> None:
        self.state = SOCKS

        def check(user: str, password: str) -> bool:
            r = self.gw.auth.check(user, password)
            if r is not None:
                self.routing = r
            return r is not None

        self.socks = socks5.Handshake(
            self.transport.write, need_auth=self.gw.auth.required, check=check
        )
        self._socks_step()

    def _socks_step(self) -> None:
        assert self.socks is not None
        try:
            req = self.socks.step(self.buf)
        except socks5.SocksError as e:
            self.gw.stats.client_errors["socks"] += 1
            if e.reply:
                self.transport.write(e.reply)
            self.close(LINGER_S)
            return
        if req is not None:
            self.state = BUSY
            self.deadline = 0.0
            job = self.job = Tunnel(self.gw, self, req.host, req.port, self.routing, "socks5")
            job.start()

    # -- answers and relays ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def reject(self, status: int, message: str) -> None:
        """Answer the request with an error of ours and close."""
        self.gw.stats.client_errors[str(status)] += 1
        extra = {"Proxy-Authenticate": 'Basic realm="fetchfleet"'} if status == 407 else None
        self.write(error_response(status, message, extra=extra))
        self.close(LINGER_S)

    def close(self, linger: float) -> None:
        """Close once what was written is out; abort if the client does not take it."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.job = None
        self.transport.close()
        self._arm(linger)  # nothing to flush: connection_lost comes first

    def splice(self, up: Upstream, ms: MemberStats, release: object, *, stream: bool) -> None:
        """Relay between the client and `up` until either side ends: both ways for a tunnel,
        the answer's rest only when `stream` (the client then closes)."""
        if self.state != BUSY:
            up.abort()
            return
        self.job = None
        self.up, self.ms = up, ms
        self.state = STREAM if stream else RELAY
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._arm(self.gw.config.tunnel_idle_s)
        up.relay_to(self, release)  # type: ignore[arg-type]
        if not stream and self.buf and self.state == RELAY:  # the tunnel's first bytes
            held = bytes(self.buf)
            self.buf.clear()
            self.data_received(held)
        if self.eof and self.state == RELAY:
            self.eof_received()

    def from_upstream(self, data: bytes) -> None:
        self.activity += 1
        if self.ms is not None:
            self.ms.bytes_down += len(data)
        self.transport.write(data)

    def upstream_ended(self) -> None:
        """The member's side is done: the client gets what is in flight, then a close."""
        if self.state in (RELAY, STREAM):
            self.close(self.gw.config.tunnel_idle_s)
