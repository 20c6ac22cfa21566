"""Reaching a target through one member: a tunnel (HTTP CONNECT, SOCKS4, SOCKS5, with the
member's credentials, through python-socks as the checker does) or, for a plain-HTTP request
through an `http` member, a connection to the member itself for an absolute-URI request.

Errors are sorted by whose fault they are, since the caller acts on it:

- `MemberDown`: the member did not answer, refused, timed out, hung up during the handshake
  or rejected its credentials — a failure of the member (its breaker counts it);
- `TargetUnreachable`: the member answered and said it could not reach the target (SOCKS
  reply code, CONNECT status) — the member works; that target is not reachable through it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio.v2 import Proxy as SocksProxy

from fetchers.proxy_parse import ProxySpec

_TYPES = {
    "http": ProxyType.HTTP,
    "https": ProxyType.HTTP,
    "socks4": ProxyType.SOCKS4,
    "socks5": ProxyType.SOCKS5,
}
STREAM_LIMIT = 64 * 1024


class UpstreamError(Exception):
    """Base: the attempt through this member did not give a usable connection."""


class MemberDown(UpstreamError):
    pass


class TargetUnreachable(UpstreamError):
    pass


def member_protocol(spec: ProxySpec, detected: str | None) -> str:
    return detected or spec.scheme or "http"


def basic_auth(spec: ProxySpec) -> str | None:
    if spec.username is None:
        return None
    raw = f"{spec.username}:{spec.password or ''}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def open_member(
    spec: ProxySpec, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain connection to an `http` member (for a forward, absolute-URI request)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(spec.host, spec.port, limit=STREAM_LIMIT), timeout
        )
    except TimeoutError:
        raise MemberDown("connect timed out") from None
    except OSError as e:
        raise MemberDown(f"connect failed: {e.strerror or e}") from None
    _tune(writer)
    return reader, writer


async def _http_connect(
    spec: ProxySpec, host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through an http/https member, by hand: one write, one read of the reply head
    (python-socks' generic handshake costs several times the CPU, and this is the hot path)."""
    reader, writer = await open_member(spec, timeout)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = basic_auth(spec)
    writer.write(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode()
        + (f"Proxy-Authorization: {auth}\r\n".encode() if auth else b"")
        + b"\r\n"
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except TimeoutError:
        writer.transport.abort()
        raise MemberDown("CONNECT reply timed out") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
        writer.transport.abort()
        raise MemberDown(f"the member hung up during CONNECT: {e!r}") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    if code == 200:
        return reader, writer
    writer.transport.abort()
    if code is None:
        raise MemberDown(f"not an HTTP proxy reply: {status_line[:60]!r}")
    if code == 407:
        raise MemberDown("the member rejected its credentials (407)")
    raise TargetUnreachable(f"the member could not reach {authority}: {status_line[:80]}")


async def open_tunnel(
    spec: ProxySpec, protocol: str, host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A byte stream to host:port through the member."""
    if protocol in ("http", "https"):
        return await _http_connect(spec, host, port, timeout)
    proxy_type = _TYPES[protocol]
    if proxy_type == ProxyType.SOCKS4:
        host = await _resolve_v4(host)  # plain SOCKS4 carries an address, not a name
    proxy = SocksProxy(
        proxy_type,
        spec.host,
        spec.port,
        spec.username,
        spec.password,
        rdns=True if proxy_type == ProxyType.SOCKS5 else None,
    )
    try:
        stream = await proxy.connect(host, port, timeout=timeout)
    except ProxyTimeoutError:
        raise MemberDown("handshake timed out") from None
    except ProxyConnectionError as e:
        raise MemberDown(f"connect failed: {e}") from None
    except ProxyError as e:
        code = e.error_code
        text = str(e).lower()
        if code in (407,) or "auth" in text or "credential" in text or "password" in text:
            raise MemberDown(f"the member rejected its credentials: {e}") from None
        if code is not None:
            raise TargetUnreachable(f"the member could not reach {host}:{port}: {e}") from None
        raise MemberDown(f"bad handshake: {e}") from None
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        raise MemberDown(f"the member hung up during the handshake: {e!r}") from None
    except TimeoutError:
        raise MemberDown("handshake timed out") from None
    _tune(stream.writer)
    return stream.reader, stream.writer


async def _resolve_v4(host: str) -> str:
    try:
        socket.inet_aton(host)
        return host
    except OSError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TargetUnreachable(f"cannot resolve {host} for a SOCKS4 member: {e}") from None
    return str(infos[0][4][0])
