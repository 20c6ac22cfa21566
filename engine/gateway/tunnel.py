"""A tunnel for an HTTP CONNECT or a SOCKS5 CONNECT: the first member that gives one (failover
up to `--retries`), then the client's connection spliced to it.

The member's handshake is finished in its connection's callbacks (`Upstream.dial`) and the
client is answered from the callback that parsed the member's reply: a tunnel's whole set-up
runs without a task (see engine/gateway/job.py for why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.gateway import socks5
from engine.gateway.auth import Routing
from engine.gateway.job import Job
from engine.gateway.members import member_of
from engine.gateway.upstream import MemberDown, TargetUnreachable
from fetchers.pool import NoProxyAvailable, ProxyState

if TYPE_CHECKING:
    from engine.gateway.client import ClientConn
    from engine.gateway.server import Gateway

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


class NoRoute(Exception):
    """Every attempt failed: `status` for an HTTP client, `socks` code for a SOCKS one."""

    def __init__(self, status: int, socks: int, message: str) -> None:
        super().__init__(message)
        self.status, self.socks = status, socks


def site_of(host: str, port: int) -> str:
    """The key of per-site quality: the authority (another port may be another service)."""
    return f"{host.lower()}:{port}"


class Tunnel(Job):
    __slots__ = ("failure", "host", "kind", "port")

    def __init__(
        self, gw: Gateway, conn: ClientConn, host: str, port: int, routing: Routing, kind: str
    ) -> None:
        super().__init__(gw, conn, routing, site_of(host, port))
        self.host, self.port = host, port
        self.kind = kind  # "connect" or "socks5": its counters and its answers
        self.failure: NoRoute | None = None

    def _next(self) -> None:
        gw = self.gw
        c = gw.config
        if len(self.tried) > c.retries:
            failure = self.failure or NoRoute(
                502, socks5.GENERAL_FAILURE, "no member could connect"
            )
            self._give_up(failure)
            return
        try:
            lease = self._take()
        except NoProxyAvailable as e:
            self._give_up(NoRoute(503, socks5.GENERAL_FAILURE, str(e)))
            return
        self._dial(lease.state, fresh=False)

    def _dial(self, state: ProxyState, fresh: bool) -> None:
        c = self.gw.config
        self.conn.job_deadline = self.gw.loop.time() + min(
            c.connect_timeout_s, c.response_timeout_s
        )
        protocol = member_of(state).protocol
        self._connect(state.spec, protocol, self.host, self.port, False, self._reached, fresh)

    def _reached(self, _result: object, exc: BaseException | None) -> None:
        """The member's reply to the tunnel request, parsed (in its connection's callback)."""
        self.conn.job_deadline = 0.0
        try:
            if exc is None:
                self._established()
            else:
                self._failed(exc)
        except Exception:
            self._crash()

    def _redial(self) -> None:
        assert self.lease is not None
        self._dial(self.lease.state, fresh=True)

    def _timed_out(self) -> None:
        self._failed(MemberDown("connect or handshake timed out"))

    def _record_failure(self, e: BaseException) -> None:
        if isinstance(e, TargetUnreachable):
            where = f"{self.host}:{self.port}"
            self.failure = NoRoute(502, socks5.HOST_UNREACHABLE, f"{where} unreachable: {e}")
        else:
            self.failure = NoRoute(502, socks5.GENERAL_FAILURE, f"members failed: {e}")

    def _established(self) -> None:
        gw, conn = self.gw, self.conn
        lease, ms, up = self.lease, self.ms, self.up
        assert lease is not None and ms is not None and up is not None
        self.lease = self.up = None  # the relay's from here
        ms.latencies_ms.append((gw.clock() - self.t0) * 1000)
        gw.stick(self.routing, lease)
        gw.stats.requests[(self.kind, "ok")] += 1
        conn.write(CONNECT_OK if self.kind == "connect" else socks5.reply(socks5.SUCCEEDED))
        conn.splice(up, ms, lease.release_ok, stream=False)

    def _give_up(self, e: NoRoute) -> None:
        self.gw.stats.requests[(self.kind, str(e.status))] += 1
        if self.kind == "connect":
            self.conn.reject(e.status, str(e))
        else:
            self.conn.write(socks5.reply(e.socks))
            self.conn.close(5.0)
