"""Protocol handlers of the simulated proxies: HTTP forward/CONNECT, SOCKS4/4a, SOCKS5.

Every proxy connects onward from the address it listens on, so the judge sees that address as
the client (the checker itself connects from 127.0.0.1). Behaviours (fleet.Behaviour) are
applied here: flaky connections are dropped, black holes swallow bytes until the client gives
up, fakes answer a canned page, tampering proxies hold a forwarded response and change it
(sim/tamper.py), and every relaying proxy delays the first byte of the response by its
latency (long for `slow`).

Written as asyncio.Protocol callbacks rather than streams: a relayed byte then costs one
callback instead of two task wake-ups, and the handshake parsers work on the buffered bytes
without a coroutine per step. Under the benchmark's load that is about half the CPU of the
StreamReader version, and the world shares two cores with the checker it is testing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import socket
import struct
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from sim.fleet import TAMPERING, Behaviour, PlannedProxy, ProxyProtocol
from sim.http11 import (
    HEAD_END,
    MAX_HEAD,
    METHOD_FIRST_BYTES,
    BadRequest,
    RequestHead,
    parse_head,
    response,
)
from sim.tamper import tamper

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0
VIA = "1.1 sim-proxy"
DROP_HEADERS = frozenset({"proxy-connection", "proxy-authorization", "connection", "keep-alive"})
FAKE_BODY = (
    json.dumps(
        {
            "args": {},
            "headers": {
                "Accept": "*/*",
                "Host": "httpbin.org",
                "User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
            },
            "origin": "203.0.113.7",
            "url": "http://httpbin.org/get",
        }
    )
    + "\n"
).encode()
FAKE_RESPONSE = response(200, FAKE_BODY, "application/json")
CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
SOCKS4_GRANTED = b"\x00\x5a" + bytes(6)
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)
BAD_GATEWAY = response(502, b"upstream unreachable\n")


def socks5_reply(code: int, ip: str = "0.0.0.0", port: int = 0) -> bytes:
    return struct.pack("!BBBB4sH", 5, code, 0, 1, socket.inet_aton(ip), port)


class Refuse(Exception):
    """The handshake ends here; `reply` (maybe empty) is sent before closing."""

    def __init__(self, reply: bytes = b"") -> None:
        super().__init__()
        self.reply = reply


@dataclass(slots=True)
class Tunnel:
    """A handshake that succeeded: connect to host:port, then say `reply` and relay."""

    host: str
    port: int
    reply: bytes | None  # None: a SOCKS5 success naming the outgoing socket's address
    failure: bytes  # said instead when the upstream cannot be reached
    first: bytes = b""  # sent upstream first (a rewritten HTTP request head and its body)


@dataclass(slots=True)
class Pretend:
    """A fake's handshake: `reply`, then the canned page (at once, or after the next request)."""

    reply: bytes
    wait_for_request: bool


Outcome = Tunnel | Pretend


# -- HTTP ----------------------------------------------------------------------------------------


def basic_auth_ok(head: RequestHead, proxy: PlannedProxy) -> bool:
    if proxy.username is None:
        return True
    scheme, _, encoded = (head.get("Proxy-Authorization") or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:
        return False
    return decoded == f"{proxy.username}:{proxy.password}"


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """`host:port` / `[v6]:port` / `host` -> (host, port)."""
    parts = urlsplit(f"//{authority}")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise BadRequest(f"bad port in {authority!r}") from exc
    if not parts.hostname:
        raise BadRequest(f"no host in {authority!r}")
    return parts.hostname, port


def forwarded_head(
    head: RequestHead, proxy: PlannedProxy, client_ip: str
) -> tuple[str, int, bytes]:
    """(host, port, origin-form head) for an absolute-form request, headers per behaviour.

    Hop-by-hop headers go (Proxy-*, Connection, Keep-Alive) and `Connection: close` is sent, as
    most forward proxies do: one request per upstream connection keeps the relay a byte pipe.
    """
    if not head.target.startswith("http://"):
        raise BadRequest(f"a forward proxy needs an absolute http:// target, not {head.target!r}")
    parts = urlsplit(head.target)
    host, port = split_authority(parts.netloc.rpartition("@")[2], 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [(k, v) for k, v in head.headers if k.lower() not in DROP_HEADERS]
    if head.get("Host") is None:
        headers.insert(0, ("Host", parts.netloc))
    if proxy.behaviour == Behaviour.ANONYMOUS:
        headers.append(("Via", VIA))
    elif proxy.behaviour == Behaviour.TRANSPARENT:
        earlier = [v for k, v in headers if k.lower() == "x-forwarded-for"]
        headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
        headers.append(("X-Forwarded-For", ", ".join([*earlier, client_ip])))
    headers.append(("Connection", "close"))
    lines = [f"{head.method} {path} {head.version}", *(f"{k}: {v}" for k, v in headers)]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_http(buf: bytearray, proxy: PlannedProxy, client_ip: str) -> Outcome | None:
    """An HTTP proxy request (CONNECT or absolute-form) from the buffer; None: need more."""
    if buf[0] not in METHOD_FIRST_BYTES:  # SOCKS or TLS bytes: say so at once
        raise Refuse(response(400, b"not an HTTP request\n"))
    end = buf.find(HEAD_END)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise Refuse(response(431, b"request head too large\n"))
        return None
    try:
        head = parse_head(bytes(buf[:end]))
        body_length = head.content_length
    except BadRequest:
        raise Refuse(response(400, b"bad request\n")) from None
    start = end + len(HEAD_END)
    if len(buf) < start + body_length:
        return None
    body = bytes(buf[start : start + body_length])
    del buf[: start + body_length]
    if not basic_auth_ok(head, proxy):
        challenge = (("Proxy-Authenticate", 'Basic realm="sim-proxy"'),)
        raise Refuse(response(407, b"proxy authentication required\n", extra=challenge))
    fake = proxy.behaviour == Behaviour.FAKE
    if head.method == "CONNECT":
        try:
            host, port = split_authority(head.target, 443)
        except BadRequest:
            raise Refuse(response(400, b"bad CONNECT target\n")) from None
        return Pretend(CONNECT_OK, True) if fake else Tunnel(host, port, CONNECT_OK, BAD_GATEWAY)
    if proxy.protocol == ProxyProtocol.HTTPS:
        raise Refuse(response(405, b"CONNECT only\n", extra=(("Allow", "CONNECT"),)))
    if fake:
        return Pretend(b"", False)
    try:
        host, port, outgoing = forwarded_head(head, proxy, client_ip)
    except BadRequest:
        raise Refuse(response(400, b"absolute http:// URL expected\n")) from None
    return Tunnel(host, port, b"", BAD_GATEWAY, outgoing + body)


# -- SOCKS ---------------------------------------------------------------------------------------


def parse_socks4(buf: bytearray, proxy: PlannedProxy) -> Outcome | None:
    """SOCKS4 / SOCKS4a CONNECT; the userid must be the proxy's username when it has one."""
    if buf[0] != 4:
        raise Refuse()
    if len(buf) < 9:
        return None
    user_end = buf.find(b"\x00", 8)
    if user_end < 0:
        return None
    command, port = buf[1], int.from_bytes(buf[2:4], "big")
    raw_ip = bytes(buf[4:8])
    end = user_end + 1
    host = socket.inet_ntoa(raw_ip)
    if raw_ip[:3] == b"\x00\x00\x00" and raw_ip[3]:  # SOCKS4a: a host name follows
        name_end = buf.find(b"\x00", end)
        if name_end < 0:
            return None
        host = buf[end:name_end].decode("idna")
        end = name_end + 1
    userid = buf[8:user_end].decode("latin-1")
    del buf[:end]
    if command != 1 or (proxy.username is not None and userid != proxy.username):
        raise Refuse(SOCKS4_REJECTED)
    if proxy.behaviour == Behaviour.FAKE:
        return Pretend(SOCKS4_GRANTED, True)
    return Tunnel(host, port, SOCKS4_GRANTED, SOCKS4_REJECTED)


class Socks5Parser:
    """SOCKS5 in three steps (methods, RFC 1929 login, request), each answered as it completes."""

    __slots__ = ("proxy", "step", "transport")

    def __init__(self, proxy: PlannedProxy, transport: asyncio.Transport) -> None:
        self.proxy = proxy
        self.transport = transport
        self.step = 0

    def __call__(self, buf: bytearray) -> Outcome | None:
        if self.step == 0 and not self._methods(buf):
            return None
        if self.step == 1 and not self._login(buf):
            return None
        return self._request(buf)

    def _methods(self, buf: bytearray) -> bool:
        if buf[0] != 5:
            raise Refuse()
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return False
        methods = bytes(buf[2 : 2 + buf[1]])
        del buf[: 2 + buf[1]]
        wanted = 2 if self.proxy.username is not None else 0
        if wanted not in methods:
            raise Refuse(b"\x05\xff")
        self.transport.write(bytes((5, wanted)))
        self.step = 1 if wanted == 2 else 2
        return True

    def _login(self, buf: bytearray) -> bool:
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return False
        ulen = buf[1]
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return False
        username = buf[2 : 2 + ulen].decode("utf-8", "replace")
        password = buf[3 + ulen : 3 + ulen + plen].decode("utf-8", "replace")
        version = buf[0]
        del buf[: 3 + ulen + plen]
        if version != 1 or (username, password) != (self.proxy.username, self.proxy.password):
            raise Refuse(b"\x01\x01")
        self.transport.write(b"\x01\x00")
        self.step = 2
        return True

    def _request(self, buf: bytearray) -> Outcome | None:
        if len(buf) < 5:
            return None
        if buf[0] != 5:
            raise Refuse()
        command, atyp = buf[1], buf[3]
        if atyp == 1:
            start, length = 4, 4
        elif atyp == 3:
            start, length = 5, buf[4]
        elif atyp == 4:
            start, length = 4, 16
        else:
            raise Refuse(socks5_reply(8))  # address type not supported
        end = start + length + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[start : start + length])
        port = int.from_bytes(buf[end - 2 : end], "big")
        del buf[:end]
        if atyp == 1:
            host = socket.inet_ntoa(raw)
        elif atyp == 3:
            host = raw.decode("idna")
        else:
            host = socket.inet_ntop(socket.AF_INET6, raw)
        if command != 1:
            raise Refuse(socks5_reply(7))  # command not supported
        if self.proxy.behaviour == Behaviour.FAKE:
            return Pretend(socks5_reply(0), True)
        return Tunnel(host, port, None, socks5_reply(5))  # 5: connection refused


# -- the connection --------------------------------------------------------------------------------


HANDSHAKE, CONNECTING, RELAY, FAKE_WAIT, SWALLOW, DONE = range(6)


class Upstream(asyncio.Protocol):
    """The proxy's connection to the target: hands everything to its ProxyConnection."""

    __slots__ = ("client",)

    def __init__(self, client: ProxyConnection) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def eof_received(self) -> bool:
        self.client.upstream_finished()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_finished()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class ProxyConnection(asyncio.Protocol):
    """One client connection to one proxy, from handshake to relay."""

    __slots__ = (
        "buf",
        "client_ip",
        "delay_s",
        "delayed",
        "held",
        "parser",
        "pending",
        "proxy",
        "rng",
        "state",
        "task",
        "timer",
        "transport",
        "up",
        "upstream_done",
    )

    def __init__(self, proxy: PlannedProxy, rng: random.Random) -> None:
        self.proxy = proxy
        self.rng = rng
        self.delay_s = (proxy.latency_ms or 0) / 1000
        self.buf = bytearray()
        self.state = HANDSHAKE
        self.up: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[bytes] | None = None  # response bytes held back by the latency
        self.delayed = False
        self.upstream_done = False
        self.held: list[bytes] | None = None  # a tampering proxy's forwarded response

    # asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        behaviour = self.proxy.behaviour
        if behaviour == Behaviour.FLAKY and self.rng.random() < 0.5:
            self.state = DONE
            transport.close()  # accepted, closed unanswered
            return
        if behaviour == Behaviour.BLACKHOLE:
            self.state = SWALLOW
            return
        self.client_ip = transport.get_extra_info("peername")[0]
        protocol = self.proxy.protocol
        if protocol in (ProxyProtocol.HTTP, ProxyProtocol.HTTPS):
            self.parser = lambda buf: parse_http(buf, self.proxy, self.client_ip)
        elif protocol == ProxyProtocol.SOCKS4:
            self.parser = lambda buf: parse_socks4(buf, self.proxy)
        else:
            self.parser = Socks5Parser(self.proxy, transport)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(HANDSHAKE_TIMEOUT_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == RELAY:
            assert self.up is not None
            self.up.write(data)
        elif state == HANDSHAKE:
            self.buf += data
            try:
                outcome = self.parser(self.buf)
            except Refuse as refusal:
                self.finish(refusal.reply)
            except Exception:
                log.exception("proxy %s: handshake failed", self.proxy.host)
                self.finish(b"")
            else:
                if outcome is not None:
                    self.act(outcome)
        elif state == CONNECTING:
            self.buf += data  # pipelined early: sent once the upstream is there
        elif state == FAKE_WAIT:
            self.state = DONE
            self.later(self.finish, FAKE_RESPONSE)

    def eof_received(self) -> bool:
        if self.state == RELAY and self.up is not None and self.up.can_write_eof():
            self.up.write_eof()  # the client is done sending; the response may still come
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = DONE
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.up is not None:
            self.up.close()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    # steps -----------------------------------------------------------------------------------

    def finish(self, reply: bytes) -> None:
        """Say the last words and close."""
        if not self.transport.is_closing():
            if reply:
                self.transport.write(reply)
            self.transport.close()

    def later(self, callback, *args) -> None:
        """Run callback after the proxy's latency (at once if it has none)."""
        if self.delay_s:
            asyncio.get_running_loop().call_later(self.delay_s, callback, *args)
        else:
            callback(*args)

    def act(self, outcome: Outcome) -> None:
        if isinstance(outcome, Pretend):
            if outcome.reply:
                self.transport.write(outcome.reply)
            if outcome.wait_for_request:
                self.state = FAKE_WAIT
                if self.buf:
                    self.data_received(b"")
            else:
                self.state = DONE
                self.later(self.finish, FAKE_RESPONSE)
            return
        self.state = CONNECTING
        self.task = asyncio.get_running_loop().create_task(self.open_upstream(outcome))

    async def open_upstream(self, tunnel: Tunnel) -> None:
        """Connect from the proxy's own address, answer the client, start relaying.

        No timeout of its own: the handshake timer aborts the client, which cancels this.
        """
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(
                lambda: Upstream(self),
                tunnel.host,
                tunnel.port,
                family=socket.AF_INET,
                local_addr=(self.proxy.host, 0),
            )
        except OSError as exc:
            log.debug(
                "proxy %s: upstream %s:%s: %s", self.proxy.host, tunnel.host, tunnel.port, exc
            )
            self.finish(tunnel.failure)
            return
        self.task = None
        if self.state != CONNECTING:  # the client left meanwhile
            up.close()
            return
        self.up = cast(asyncio.Transport, up)
        self.state = RELAY
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        reply = tunnel.reply
        if reply is None:
            bound_ip, bound_port = up.get_extra_info("sockname")[:2]
            reply = socks5_reply(0, bound_ip, bound_port)
        self.transport.write(reply)
        if tunnel.reply == b"" and self.proxy.behaviour in TAMPERING:
            self.held = []  # a forwarded request (not a tunnel): its response is changed
        if tunnel.first or self.buf:
            up.write(tunnel.first + bytes(self.buf))
            self.buf.clear()

    def from_upstream(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif self.pending is not None:
            self.pending.append(data)
        elif self.delay_s and not self.delayed:
            self.delayed = True
            self.pending = [data]
            asyncio.get_running_loop().call_later(self.delay_s, self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        pending, self.pending = self.pending or [], None
        if not self.transport.is_closing():
            self.transport.write(b"".join(pending))
            if self.upstream_done:
                self.transport.close()

    def upstream_finished(self) -> None:
        """The target is done (EOF or closed): close the client once the response is out."""
        if self.held is not None:
            held, self.held = self.held, None
            if held:
                self.from_upstream(tamper(self.proxy.behaviour, b"".join(held)))
        self.upstream_done = True
        if self.pending is None and not self.transport.is_closing():
            self.transport.close()
