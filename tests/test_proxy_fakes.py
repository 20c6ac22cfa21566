"""Tiny real servers on loopback for the proxy checker's tests and micro-benchmark.

A judge (httpbin `/get` JSON or azenv text), an HTTP proxy (forwarding and/or CONNECT, with
an anonymity behaviour and optional Basic auth), SOCKS4 and SOCKS5 servers (optional
user/pass), a canned-page "proxy", and a black hole. Every proxy connects onward from its
own loopback address, as real proxies connect from theirs, so the judge sees the proxy's
address and never the checker's unless the proxy leaks it.

These are deliberately small and strict; `sim/` is the full simulated world. The tests at
the bottom check the fakes themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

JUDGE_IP = "127.0.0.2"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_head(reader: asyncio.StreamReader, limit: int = 65536) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return b""


def _headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    out = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out.append((k.strip(), v.strip()))
    return lines[0], out


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _relay(r1, w1, r2, w2) -> None:  # type: ignore[no-untyped-def]
    try:
        await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))
    finally:
        _close(w1)
        _close(w2)


# --------------------------------------------------------------------------- judge


def judge_handler(fmt: str = "httpbin") -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await _read_head(reader)
            if not head:
                return
            request_line, hdrs = _headers(head)
            peer = writer.get_extra_info("peername")[0]
            target = request_line.split(" ")[1] if " " in request_line else "/"
            query = target.partition("?")[2]
            if fmt == "httpbin":
                args = dict(p.partition("=")[::2] for p in query.split("&") if p)
                body = json.dumps(
                    {
                        "args": args,
                        "headers": {k.title(): v for k, v in hdrs},
                        "origin": peer,
                        "url": f"http://{dict(hdrs).get('Host', '')}{target}",
                    }
                ).encode()
                ctype = "application/json"
            else:
                lines = [f"{'HTTP_' + k.upper().replace('-', '_')} = {v}" for k, v in hdrs]
                lines += [
                    f"REQUEST_URI = {target}",
                    f"QUERY_STRING = {query}",
                    f"REMOTE_ADDR = {peer}",
                    f"REMOTE_PORT = {writer.get_extra_info('peername')[1]}",
                ]
                body = (
                    "<html><body><pre>\n" + "\n".join(lines) + "\n</pre></body></html>"
                ).encode()
                ctype = "text/html"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: "
                + ctype.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            _close(writer)

    return handle


# --------------------------------------------------------------------------- http proxy


@dataclass
class HttpProxyConf:
    behaviour: str = "elite"  # elite | anonymous | transparent | xff_self | forwarded
    forward: bool = True
    connect: bool = True
    auth: tuple[str, str] | None = None


def _basic_ok(hdrs: list[tuple[str, str]], auth: tuple[str, str] | None) -> bool:
    if auth is None:
        return True
    import base64

    want = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    return any(k.lower() == "proxy-authorization" and v == want for k, v in hdrs)


def http_proxy_handler(bind_ip: str | None, conf: HttpProxyConf) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_w = None
        try:
            head = await _read_head(reader)
            if not head:
                _close(writer)
                return
            request_line, hdrs = _headers(head)
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                await writer.drain()
                _close(writer)
                return
            method, target, _ = parts
            if not _basic_ok(hdrs, conf.auth):
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="fake"\r\nContent-Length: 0\r\n'
                    b"Connection: close\r\n\r\n"
                )
                await writer.drain()
                _close(writer)
                return
            client_ip = writer.get_extra_info("peername")[0]
            if method == "CONNECT":
                if not conf.connect:
                    writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    _close(writer)
                    return
                host, _, port = target.rpartition(":")
                ur, upstream_w = await asyncio.open_connection(
                    host.strip("[]"), int(port), local_addr=(bind_ip, 0) if bind_ip else None
                )
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _relay(reader, writer, ur, upstream_w)
                return
            if not conf.forward or not target.startswith("http://"):
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                _close(writer)
                return
            hostport, _, path = target[len("http://") :].partition("/")
            host, _, port = hostport.rpartition(":")
            ur, upstream_w = await asyncio.open_connection(
                host.strip("[]"), int(port or 80), local_addr=(bind_ip, 0) if bind_ip else None
            )
            out = [f"{method} /{path} HTTP/1.1"]
            for k, v in hdrs:
                if k.lower() in ("proxy-authorization", "proxy-connection"):
                    continue
                out.append(f"{k}: {v}")
            if conf.behaviour == "anonymous":
                out.append("Via: 1.1 fakeproxy")
            elif conf.behaviour == "transparent":
                out.append(f"X-Forwarded-For: {client_ip}")
            elif conf.behaviour == "xff_self":
                out.append(f"X-Forwarded-For: {bind_ip}")
            elif conf.behaviour == "forwarded":
                out.append(f'Forwarded: for="{client_ip}:4711";proto=http')
            upstream_w.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            await _relay(reader, writer, ur, upstream_w)
        except (ConnectionError, OSError):
            pass
        finally:
            _close(writer)
            if upstream_w is not None:
                _close(upstream_w)

    return handle


def canned_handler(body: bytes | None = None) -> Handler:
    """A "proxy" that answers every request with the same page (a fake IP-check JSON)."""
    body = body or json.dumps({"origin": "203.0.113.9", "headers": {"Host": "x"}}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        with contextlib.suppress(Exception):
            await writer.drain()
        _close(writer)

    return handle


def blackhole_handler() -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            _close(writer)

    return handle


def garbage_handler() -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(100)
            writer.write(b"\x17\x03\x03 garbage that is not any protocol\r\n")
            await writer.drain()
        _close(writer)

    return handle


# --------------------------------------------------------------------------- socks


def socks5_handler(bind_ip: str, auth: tuple[str, str] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_w = None
        try:
            ver, n = await reader.readexactly(2)
            if ver != 5:
                _close(writer)
                return
            methods = await reader.readexactly(n)
            want = 2 if auth else 0
            if want not in methods:
                writer.write(b"\x05\xff")
                await writer.drain()
                _close(writer)
                return
            writer.write(bytes([5, want]))
            if auth:
                _v, ulen = await reader.readexactly(2)
                user = (await reader.readexactly(ulen)).decode()
                (plen,) = await reader.readexactly(1)
                pw = (await reader.readexactly(plen)).decode()
                ok = (user, pw) == auth
                writer.write(b"\x01\x00" if ok else b"\x01\x01")
                if not ok:
                    await writer.drain()
                    _close(writer)
                    return
            _v, _cmd, _rsv, atyp = await reader.readexactly(4)
            if atyp == 1:
                host = socket.inet_ntoa(await reader.readexactly(4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
            else:
                (hl,) = await reader.readexactly(1)
                host = (await reader.readexactly(hl)).decode()
            (port,) = struct.unpack("!H", await reader.readexactly(2))
            try:
                ur, upstream_w = await asyncio.open_connection(host, port, local_addr=(bind_ip, 0))
            except OSError:
                writer.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
                await writer.drain()
                _close(writer)
                return
            writer.write(b"\x05\x00\x00\x01" + socket.inet_aton(bind_ip) + b"\x00\x00")
            await _relay(reader, writer, ur, upstream_w)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            _close(writer)
            if upstream_w is not None:
                _close(upstream_w)

    return handle


def socks4_handler(bind_ip: str) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_w = None
        try:
            # Like most servers, read the fixed 8-byte request first, then check the version:
            # a 3-byte SOCKS5 greeting leaves it waiting.
            ver, cmd, port, raw_ip = struct.unpack("!BBH4s", await reader.readexactly(8))
            if ver != 4 or cmd != 1:
                _close(writer)
                return
            host = socket.inet_ntoa(raw_ip)
            await reader.readuntil(b"\x00")  # user id
            try:
                ur, upstream_w = await asyncio.open_connection(host, port, local_addr=(bind_ip, 0))
            except OSError:
                writer.write(b"\x00\x5b" + b"\x00" * 6)
                await writer.drain()
                _close(writer)
                return
            writer.write(b"\x00\x5a" + b"\x00" * 6)
            await _relay(reader, writer, ur, upstream_w)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            _close(writer)
            if upstream_w is not None:
                _close(upstream_w)

    return handle


# --------------------------------------------------------------------------- the bed


@dataclass
class LoopbackBed:
    """Servers started on loopback inside the running loop; `close()` stops them all."""

    judge_url: str = ""
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _next_ip: int = 0

    def next_ip(self) -> str:
        self._next_ip += 1
        return str(ipaddress.IPv4Address("127.250.0.0") + self._next_ip)

    async def serve(self, handler: Handler, ip: str, port: int = 0) -> int:
        server = await asyncio.start_server(handler, ip, port, backlog=1024)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def start_judge(self, fmt: str = "httpbin", ip: str = JUDGE_IP) -> str:
        port = await self.serve(judge_handler(fmt), ip)
        path = "/get" if fmt == "httpbin" else "/azenv.php"
        self.judge_url = f"http://{ip}:{port}{path}"
        return self.judge_url

    async def http_proxy(self, listen_ip: str | None = None, **conf: object) -> str:
        """An HTTP proxy on its own address; `listen_ip="::1"` listens on IPv6 and connects
        onward from the default source address (IPv6 loopback has only one address)."""
        ip = listen_ip or self.next_ip()
        source = None if ":" in ip else ip
        handler = http_proxy_handler(source, HttpProxyConf(**conf))  # type: ignore[arg-type]
        port = await self.serve(handler, ip)
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    async def socks5(self, auth: tuple[str, str] | None = None) -> str:
        ip = self.next_ip()
        port = await self.serve(socks5_handler(ip, auth), ip)
        return f"{ip}:{port}"

    async def socks4(self) -> str:
        ip = self.next_ip()
        port = await self.serve(socks4_handler(ip), ip)
        return f"{ip}:{port}"

    async def simple(self, handler: Handler) -> str:
        ip = self.next_ip()
        port = await self.serve(handler, ip)
        return f"{ip}:{port}"

    def refused(self) -> str:
        ip = self.next_ip()
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"{ip}:{port}"

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)
        self.servers.clear()


# --------------------------------------------------------------------------- self-tests


async def _get(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    data = await reader.read()
    writer.close()
    return data


def test_fake_judge_echoes_origin_and_headers() -> None:
    async def main() -> None:
        bed = LoopbackBed()
        try:
            url = await bed.start_judge()
            port = int(url.split(":")[2].split("/")[0])
            raw = await _get(
                JUDGE_IP, port, b"GET /get?ffp=abc HTTP/1.1\r\nHost: j\r\nX-A: 1\r\n\r\n"
            )
            body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert body["origin"] == "127.0.0.1"
            assert body["args"] == {"ffp": "abc"}
            assert body["headers"]["X-A"] == "1"
        finally:
            await bed.close()

    asyncio.run(main())


def test_fake_http_proxy_connects_from_its_own_address() -> None:
    async def main() -> None:
        bed = LoopbackBed()
        try:
            url = await bed.start_judge()
            proxy = await bed.http_proxy(behaviour="transparent")
            ip, port = proxy.split(":")
            req = f"GET {url}?ffp=x HTTP/1.1\r\nHost: j\r\n\r\n".encode()
            body = json.loads((await _get(ip, int(port), req)).split(b"\r\n\r\n", 1)[1])
            assert body["origin"] == ip
            assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"
        finally:
            await bed.close()

    asyncio.run(main())
