"""Reaching a target through one member: a tunnel (HTTP CONNECT, SOCKS4, SOCKS5, with the
member's credentials) or, for a plain-HTTP request through an `http` member, a connection to
the member itself for an absolute-URI request; then one response read back whole (bounded),
or the bytes relayed to the client.

Written as an `asyncio.Protocol` whose handshakes and response framing work on the buffered
bytes (as the sim's proxies do): a relayed chunk costs one callback, not two task wake-ups and
a StreamReader copy. The caller is told by a callback (`on_done(result, exc)`), called from
the protocol's own callbacks: the connection made → the handshake written at once → its
reply parsed → the caller goes on, all in the callbacks of the I/O that made them possible,
with no Task, future or coroutine resumed in between (each of those cost a loop iteration
and Python frames per request; this is the hot path of every request). The connection itself
comes from `loop.create_connection`, a coroutine, which `dial` drives step by step from its
futures' callbacks (see `_drive`).

Errors are sorted by whose fault they are, since the caller acts on it:

- `MemberDown`: the member did not answer, refused, timed out, hung up during the handshake
  or rejected its credentials — a failure of the member (its breaker counts it);
- `TargetUnreachable`: the member answered and said it could not reach the target (SOCKS
  reply code, CONNECT status) — the member works; that target is not reachable through it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine.gateway.budget import BufferBudget
from engine.gateway.http import (
    HEAD_END,
    Framing,
    HttpError,
    Response,
    complete_body,
    framing_of,
    parse_response_head,
    persistent,
)
from fetchers.proxy_parse import ProxySpec

if TYPE_CHECKING:
    from engine.gateway.client import ClientConn
    from engine.gateway.keepalive import IdlePool

MAX_REPLY_HEAD = 16 * 1024
HOLD, HANDSHAKE, RESPONSE, RELAY, CONNECTING = range(5)


class UpstreamError(Exception):
    """Base: the attempt through this member did not give a usable connection."""


class MemberDown(UpstreamError):
    pass


class TargetUnreachable(UpstreamError):
    pass


class StaleConnection(ConnectionError):
    """A kept-alive connection ended before any byte of the answer: the member closed it
    while it was idle (a race every connection pool has). The request was not seen through;
    the caller retries it once on a fresh connection and does not blame the member."""


def basic_auth(spec: ProxySpec) -> str | None:
    if spec.username is None:
        return None
    raw = f"{spec.username}:{spec.password or ''}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


Done = Callable[[object, BaseException | None], None]


class Upstream(asyncio.Protocol):
    """One connection to a member. Modes: CONNECTING, HANDSHAKE (a tunnel being set up),
    RESPONSE (one answer being read), HOLD (bytes kept until the caller decides), RELAY
    (bytes straight to the client connection)."""

    __slots__ = (
        "ahead",
        "body_start",
        "budget",
        "buf",
        "client",
        "closed",
        "connecting",
        "coro",
        "eof",
        "framing",
        "held",
        "idle_pool",
        "idle_since",
        "key",
        "lease_release",
        "limits",
        "loop",
        "method",
        "mode",
        "on_done",
        "parse",
        "pending",
        "resolving",
        "resp",
        "reusable",
        "reused",
        "transport",
        "want",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # the loop given once: asyncio.get_running_loop() per wait is a getpid() syscall
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.mode = HOLD
        self.on_done: Done | None = None  # the caller's, while it waits for a result
        self.parse: Callable[[], bool] | None = None
        # while connecting: the coroutine of `create_connection`, the future it waits on,
        # and the handshake to write once connected (None: the member itself is the peer)
        self.coro: Coroutine[Any, None, Any] | None = None
        self.connecting: asyncio.Future[object] | None = None
        self.pending: tuple[str, ProxySpec, str, int] | None = None
        self.resolving: asyncio.Task[None] | None = None  # a SOCKS4 target's name, looked up
        self.client: ClientConn | None = None
        self.lease_release: Callable[[], None] | None = None
        self.eof = self.closed = False
        self.resp: Response | None = None
        self.method = "GET"
        self.limits = (0, 0)
        self.framing = self.want = self.body_start = self.held = 0
        self.budget: BufferBudget | None = None
        self.key: str | None = None  # the member's, when the upstream pool manages it
        self.idle_pool: IdlePool | None = None  # set while idle in it
        self.idle_since = 0.0
        self.reusable = self.reused = False
        self.ahead = False  # opened ahead, before a request needed it (standby.py)

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport is no asyncio.Transport subclass (and cast() is a call)
        self.transport = transport  # type: ignore[assignment]
        if self.mode != CONNECTING:
            return
        if self.on_done is None:  # aborted while connecting
            self.transport.abort()
            return
        pending, self.pending = self.pending, None
        if pending is None:
            self._resolve(None)  # a connection to the member itself: ready
            return
        try:
            self._handshake(*pending)  # written now, not after another loop iteration
        except UpstreamError as e:
            self._resolve(exc=e)

    def data_received(self, data: bytes) -> None:
        if self.mode == RELAY:  # the hot path of a tunnel: `ClientConn.from_upstream` inlined
            client = self.client
            client.activity += 1  # type: ignore[union-attr]
            ms = client.ms  # type: ignore[union-attr]
            if ms is not None:
                ms.bytes_down += len(data)
            client.transport.write(data)  # type: ignore[union-attr]
            return
        if self.idle_pool is not None:  # an idle connection has nothing to say
            self.idle_pool.drop(self, "closed_idle")
            return
        self.buf += data
        self._progress()

    def eof_received(self) -> bool:
        self.eof = True
        if self.idle_pool is not None:
            self.idle_pool.drop(self, "closed_idle")
        elif self.mode == RELAY:
            self._relay_ended()
        else:
            self._progress()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self.release_budget()
        if self.idle_pool is not None:
            self.idle_pool.drop(self, "closed_idle")
        elif self.mode == RELAY:
            self._relay_ended()
        else:
            self._progress()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    # -- the caller's side ----------------------------------------------------------------------

    def abort(self) -> None:
        """Close at once; whoever waited on this connection is no longer told."""
        self.on_done = None
        self.release_budget()
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()  # `create_connection` then closes what it opened
        if self.resolving is not None:
            self.resolving.cancel()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def release_budget(self) -> None:
        """Give back what this connection's buffered body took from the budget."""
        if self.held:
            assert self.budget is not None
            self.budget.release(self.held)
            self.held = 0

    def take_reservation(self) -> int:
        """The bytes reserved for the body just read, now the caller's to release (a block
        page kept while the next members are tried)."""
        held, self.held = self.held, 0
        return held

    def _resolve(self, result: object = None, exc: BaseException | None = None) -> None:
        """Tell the caller (once): the step it waited for is done, or failed with `exc`."""
        done, self.on_done = self.on_done, None
        self.mode = HOLD
        self.parse = None  # a bound method of this object: a cycle only the collector breaks
        if done is not None:
            done(result, exc)

    def _progress(self) -> None:
        if self.parse is None or self.on_done is None:
            return
        try:
            done = self.parse()
        except (UpstreamError, HttpError, ConnectionError) as e:
            self._resolve(exc=e)
            return
        if done:
            self._resolve(self.resp if self.mode == RESPONSE else None)
        elif self.eof:
            self._resolve(exc=self._hung_up())

    def _hung_up(self) -> BaseException:
        if self.reused and self.resp is None and not self.buf:
            # a connection that waited (kept alive, or opened ahead) closed by the member
            # before a byte of the answer: the member's own timeout, not a failure
            return StaleConnection("the connection that waited was closed before the answer")
        if self.mode == HANDSHAKE:
            return MemberDown("the member hung up during the handshake")
        return ConnectionError("the upstream closed before answering")

    def park(self, pool: IdlePool, now: float) -> None:
        """Idle in `pool` until taken again: nothing pending, the budget given back."""
        self.release_budget()
        self.mode = HOLD
        self.parse = None
        self.on_done = None
        self.resp = None
        self.reusable = False
        self.idle_pool, self.idle_since = pool, now

    def dial(
        self,
        spec: ProxySpec,
        protocol: str,
        host: str,
        port: int,
        forward: bool,
        on_done: Done,
    ) -> None:
        """Connect to the member; unless `forward` (an `http` member taking an absolute-URI
        request itself), set up a tunnel to host:port through it (its reply consumed, later
        bytes held). `on_done(None, exc)` when ready or failed; no timeout here (the caller's
        deadline ends it with `abort`)."""
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        self.on_done = on_done
        self.mode = CONNECTING
        if protocol == "socks4" and not forward and not is_ipv4(host):
            # plain SOCKS4 carries an address, not a name: resolved first (a rare path, so
            # a task of its own)
            self.resolving = loop.create_task(self._resolve_then_dial(spec, host, port))
            return
        self.pending = None if forward else (protocol, spec, host, port)
        self.coro = loop.create_connection(self._protocol, spec.host, spec.port)
        self._drive()

    def tunnel(self, spec: ProxySpec, protocol: str, host: str, port: int, on_done: Done) -> None:
        """On a connection already made (opened ahead, engine/gateway/standby.py): set up a
        tunnel to host:port through the member, as `dial` does once connected."""
        self.on_done = on_done
        try:
            self._handshake(protocol, spec, host, port)
        except UpstreamError as e:
            self._resolve(exc=e)

    def _protocol(self) -> Upstream:
        return self

    def _drive(self, _done: object = None) -> None:
        """One step of `create_connection`: run until it waits on a future, go on when that
        is done (what a Task does, without a Task: no task object, no wake-up between the
        connection and its first bytes: `connection_made` writes the handshake)."""
        self.connecting = None
        coro = self.coro
        if coro is None:
            return
        try:
            waiting = coro.send(None)
        except StopIteration:  # connected: `connection_made` already went on
            self.coro = None
            return
        except asyncio.CancelledError:  # aborted: the coroutine closed what it opened
            self.coro = None
            return
        except OSError as e:
            self.coro = None
            self._resolve(exc=MemberDown(f"connect failed: {e.strerror or e}"))
            return
        except Exception as e:
            self.coro = None
            self._resolve(exc=MemberDown(f"connect failed: {e}"))
            return
        if waiting is None:  # a bare yield: go on at the next iteration
            assert self.loop is not None
            self.loop.call_soon(self._drive)
            return
        if self.on_done is None and self.transport is None:  # aborted meanwhile
            waiting.cancel()
        self.connecting = waiting
        waiting.add_done_callback(self._drive)

    async def _resolve_then_dial(self, spec: ProxySpec, host: str, port: int) -> None:
        try:
            address = await _resolve_v4(host)
        except UpstreamError as e:
            self._resolve(exc=e)
            return
        self.resolving = None
        if self.on_done is not None:  # not aborted meanwhile
            self.dial(spec, "socks4", address, port, False, self.on_done)

    def _handshake(self, protocol: str, spec: ProxySpec, host: str, port: int) -> None:
        """The tunnel request written; `on_done` when the member's reply is parsed."""
        assert self.transport is not None
        self.mode = HANDSHAKE
        if protocol in ("http", "https"):
            self.parse = self._http_connect_reply
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            auth = basic_auth(spec)
            self.transport.write(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode()
                + (f"Proxy-Authorization: {auth}\r\n".encode() if auth else b"")
                + b"\r\n"
            )
        elif protocol == "socks5":
            self.parse = Socks5Client(self.transport, self.buf, spec, host, port).step
            self.transport.write(
                b"\x05\x02\x00\x02" if spec.username is not None else b"\x05\x01\x00"
            )
        elif protocol == "socks4":
            user = (spec.username or "").encode()
            self.parse = self._socks4_reply
            self.transport.write(
                struct.pack("!BBH", 4, 1, port) + socket.inet_aton(host) + user + b"\0"
            )
        else:
            raise MemberDown(f"unknown member protocol {protocol!r}")
        self._progress()  # bytes that came early

    def start_exchange(
        self,
        data: bytes,
        method: str,
        max_buffer: int,
        max_head: int,
        budget: BufferBudget,
        on_done: Done,
    ) -> None:
        """Send one request; `on_done(response, exc)` gives its response: whole when its
        body fits in `max_buffer` and in the process's `budget` (framing by Content-Length,
        chunked, or the end of the stream); otherwise `complete=False` with the bytes so
        far, the rest held for `ClientConn.splice`. The body's bytes stay reserved until
        `abort`, `relay_to` or `take_reservation`."""
        assert self.transport is not None
        self.on_done = on_done
        self.mode = RESPONSE
        self.budget = budget
        self.method, self.limits = method, (max_buffer, max_head)
        self.resp = None
        self.reusable = False
        self.parse = self._response
        self.transport.write(data)
        self._progress()

    # -- parsers (True: done; False: more bytes needed) -----------------------------------------

    def _http_connect_reply(self) -> bool:
        buf = self.buf
        end = buf.find(HEAD_END)
        if end < 0:
            if len(buf) > MAX_REPLY_HEAD:
                raise MemberDown("not an HTTP proxy reply (no end of head)")
            return False
        status_line = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
        del buf[: end + len(HEAD_END)]
        parts = status_line.split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if code == 200:
            return True
        if code is None:
            raise MemberDown(f"not an HTTP proxy reply: {status_line[:60]!r}")
        if code == 407:
            raise MemberDown("the member rejected its credentials (407)")
        raise TargetUnreachable(f"the member could not reach the target: {status_line[:80]}")

    def _socks4_reply(self) -> bool:
        if len(self.buf) < 8:
            return False
        code = self.buf[1]
        del self.buf[:8]
        if code == 0x5A:
            return True
        if code in (0x5C, 0x5D):
            raise MemberDown(f"the member rejected its credentials (SOCKS4 {code:#x})")
        raise TargetUnreachable(f"the member could not reach the target (SOCKS4 {code:#x})")

    def _response(self) -> bool:
        buf = self.buf
        max_buffer, max_head = self.limits
        resp = self.resp
        if resp is None:
            end = buf.find(HEAD_END)
            if end < 0 or end + len(HEAD_END) > max_head:
                if len(buf) > max_head or end >= 0:
                    raise HttpError(502, "the origin's response head is too large")
                return False
            self.body_start = end + len(HEAD_END)
            resp = self.resp = parse_response_head(bytes(buf[: self.body_start]))
            if resp.status == 408 and self.reused:  # some servers say so as they close idle
                raise StaleConnection("the member timed the kept-alive connection out (408)")
            self.framing, self.want = framing_of(resp, self.method)
            del buf[: self.body_start]
        more = len(buf) - self.held
        if more > 0:  # body bytes not yet reserved: buffer them only if the budget allows
            budget = self.budget
            assert budget is not None
            if len(buf) > max_buffer or not budget.reserve(more):
                if len(buf) <= max_buffer:
                    budget.fallbacks += 1
                resp.body, resp.complete = bytes(buf), False  # stream it as it comes
                buf.clear()
                return True
            self.held = len(buf)
        used = complete_body(resp, self.framing, self.want, buf, self.eof)
        if used < 0:
            return False
        # the connection may carry another request: the body's end was known (not the
        # stream's end), nothing came after it, and the member did not end the connection
        self.reusable = (
            used == len(buf)
            and not self.eof
            and self.framing != Framing.EOF
            and resp.status >= 200
            and persistent(resp)
        )
        buf.clear()
        return True

    # -- relaying -------------------------------------------------------------------------------

    def relay_to(self, client: ClientConn, release: Callable[[], None] | None) -> None:
        """From now on every byte goes to `client`; what was held goes first."""
        self.client, self.lease_release = client, release
        self.mode = RELAY
        self.release_budget()  # from here the client's flow control bounds what is held
        if self.buf:
            held = bytes(self.buf)
            self.buf.clear()
            client.from_upstream(held)
        if self.eof:
            self._relay_ended()

    def _relay_ended(self) -> None:
        release, self.lease_release = self.lease_release, None
        if release is not None:
            release()
        client, self.client = self.client, None  # it points back here: no cycle left
        if client is not None:
            client.upstream_ended()


class Socks5Client:
    """The client side of a SOCKS5 handshake (RFC 1928/1929) over the buffered reply bytes;
    the target is sent as a name (the member resolves it) unless it is an address."""

    __slots__ = ("buf", "host", "port", "spec", "stage", "transport")

    def __init__(
        self, transport: asyncio.Transport, buf: bytearray, spec: ProxySpec, host: str, port: int
    ) -> None:
        self.transport, self.buf, self.spec = transport, buf, spec
        self.host, self.port = host, port
        self.stage = 0

    def _request(self) -> bytes:
        try:
            ip = ipaddress.ip_address(self.host)
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            name = self.host.encode("idna")
            addr = b"\x03" + bytes([len(name)]) + name
        return b"\x05\x01\x00" + addr + struct.pack("!H", self.port)

    def step(self) -> bool:
        buf = self.buf
        while True:
            if self.stage == 0:  # method choice
                if len(buf) < 2:
                    return False
                version, method = buf[0], buf[1]
                del buf[:2]
                if version != 5:
                    raise MemberDown("not a SOCKS5 reply")
                if method == 0x02 and self.spec.username is not None:
                    user = self.spec.username.encode()
                    pw = (self.spec.password or "").encode()
                    self.transport.write(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw)
                    self.stage = 1
                elif method == 0x00:
                    self.transport.write(self._request())
                    self.stage = 2
                else:
                    raise MemberDown("the member accepts none of our SOCKS5 login methods")
            elif self.stage == 1:  # login result
                if len(buf) < 2:
                    return False
                ok = buf[1] == 0
                del buf[:2]
                if not ok:
                    raise MemberDown("the member rejected its credentials (SOCKS5 login)")
                self.transport.write(self._request())
                self.stage = 2
            else:  # the reply to CONNECT
                if len(buf) < 5:
                    return False
                atyp = buf[3]
                size = {1: 4, 4: 16}.get(atyp, buf[4] + 1)
                if len(buf) < 4 + size + 2:
                    return False
                version, code = buf[0], buf[1]
                del buf[: 4 + size + 2]
                if version != 5:
                    raise MemberDown("not a SOCKS5 reply")
                if code != 0:
                    raise TargetUnreachable(
                        f"the member could not reach {self.host}:{self.port} (SOCKS5 {code})"
                    )
                return True


def is_ipv4(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


async def _resolve_v4(host: str) -> str:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TargetUnreachable(f"cannot resolve {host} for a SOCKS4 member: {e}") from None
    return str(infos[0][4][0])
