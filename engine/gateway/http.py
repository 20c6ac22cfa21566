"""HTTP/1.x for the gateway: request heads (absolute-URI and CONNECT) read under limits, the
head sent onward, responses read back whole (bounded) so a block page can be judged and a
GET cached, and the error answers a client sees.

Why our own parser: the gateway only needs request heads and response framing, and it must
enforce its limits (head size, header count, a head that never ends) before anything is
allocated for a request; a full HTTP server library would hide those.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HEAD_END = b"\r\n\r\n"
MAX_HEADERS = 100
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class HttpError(Exception):
    """A request the gateway answers itself with `status` (and closes the connection)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    target: str  # as sent: absolute URI, authority (CONNECT) or origin-form
    version: str
    headers: list[tuple[str, str]]
    host: str = ""
    port: int = 80
    path: str = "/"  # origin-form, for a tunnel to the origin
    body: bytes = b""

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("proxy-connection") or self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    @property
    def url(self) -> str:
        default = self.port == 80
        return f"http://{_netloc(self.host)}{'' if default else f':{self.port}'}{self.path}"


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = True  # False: `body` is only the start; the rest is still on the wire
    raw_head: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def lower_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers}


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """'host:port' / '[v6]:port' / 'host' → (host, port); HttpError 400 when malformed."""
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise HttpError(400, f"bad authority {authority[:100]!r}") from None
    if not host or any(c in authority for c in " /?#@"):
        raise HttpError(400, f"bad authority {authority[:100]!r}")
    return host, port or default_port


async def read_head(reader: asyncio.StreamReader, first: bytes = b"") -> bytes | None:
    """The bytes up to the blank line; None when the client closed before sending anything.
    The reader's `limit` bounds the head (HttpError 431 beyond it)."""
    try:
        rest = await reader.readuntil(HEAD_END)
    except asyncio.IncompleteReadError as e:
        if not first and not e.partial:
            return None
        raise HttpError(400, "the request head ended early") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    return first + rest


def parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise HttpError(400, "malformed header field")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return headers


def parse_request(head: bytes) -> Request:
    """A request head (absolute-URI or CONNECT) → `Request`; HttpError 400/501 otherwise."""
    lines = head[: -len(HEAD_END)].split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not method.isupper():
        raise HttpError(400, "malformed request line")
    req = Request(method, target, version, parse_headers(lines[1:]))
    if req.is_connect:
        req.host, req.port = split_authority(target, 443)
        return req
    if target.startswith("/"):
        raise HttpError(
            400, "this is a proxy: send the absolute URI (curl -x http://HOST:PORT URL)"
        )
    try:
        url = urlsplit(target)
    except ValueError:
        raise HttpError(400, "malformed request URI") from None
    if url.scheme.lower() != "http":
        raise HttpError(501, f"scheme {url.scheme!r}: plain http here; https goes through CONNECT")
    req.host, req.port = split_authority(url.netloc, 80)
    req.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return req


async def read_body(reader: asyncio.StreamReader, req: Request, limit: int) -> None:
    """The request body into `req.body` (Content-Length or chunked), at most `limit` bytes."""
    te = (req.header("transfer-encoding") or "").lower()
    length = req.header("content-length")
    if "chunked" in te:
        req.body = await _read_chunked(reader, limit)
    elif length is not None:
        if not length.isdigit():
            raise HttpError(400, "bad Content-Length")
        if int(length) > limit:
            raise HttpError(413, f"request body over {limit} bytes")
        try:
            req.body = await reader.readexactly(int(length))
        except asyncio.IncompleteReadError:
            raise HttpError(400, "the request body ended early") from None


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    out = bytearray()
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(out)
            if len(out) + size > limit:
                raise HttpError(413, f"request body over {limit} bytes")
            out += (await reader.readexactly(size + 2))[:-2]
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise HttpError(400, "the chunked body ended early") from None


def onward_head(req: Request, *, absolute: bool, proxy_auth: str | None = None) -> bytes:
    """The request as sent to a forward member (`absolute`) or through a tunnel to the
    origin: hop-by-hop headers dropped, `Connection: close` (one request per upstream
    connection, so the end of the response is the end of the stream)."""
    target = req.url if absolute else req.path
    lines = [f"{req.method} {target} HTTP/1.1"]
    has_host = False
    for k, v in req.headers:
        low = k.lower()
        if low in HOP_BY_HOP or low == "content-length":
            continue
        has_host = has_host or low == "host"
        lines.append(f"{k}: {v}")
    if not has_host:
        lines.insert(1, f"Host: {_netloc(req.host)}" + ("" if req.port == 80 else f":{req.port}"))
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(req.body)}")
    if proxy_auth:
        lines.append(f"Proxy-Authorization: {proxy_auth}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body


def _chunked_end(buf: bytes | bytearray, start: int = 0) -> int | None:
    """Offset just past the last chunk (and trailers) of a chunked body, or None if the body
    is not complete yet."""
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";")[0].strip(), 16)
        except ValueError:
            raise HttpError(502, "the origin sent a bad chunk size") from None
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            return None if end < 0 else end + 4
        pos += size + 2
        if pos > len(buf):
            return None


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0].strip(), 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


async def read_response(
    reader: asyncio.StreamReader, method: str, max_buffer: int, max_head: int = 65536
) -> Response:
    """The response to one request, whole when its body fits in `max_buffer` (framing by
    Content-Length, chunked, or the end of the stream); otherwise `complete=False` with the
    bytes so far, for the caller to stream the rest."""
    try:
        raw_head = await reader.readuntil(HEAD_END)
    except asyncio.IncompleteReadError:
        raise ConnectionError("the upstream closed before answering") from None
    except asyncio.LimitOverrunError:
        raise HttpError(502, "the origin's response head is too large") from None
    if len(raw_head) > max_head:
        raise HttpError(502, "the origin's response head is too large")
    lines = raw_head[: -len(HEAD_END)].split(b"\r\n")
    try:
        version, code, *reason = lines[0].decode("latin-1").split(" ", 2)
        status = int(code)
        headers = parse_headers(lines[1:])
    except (ValueError, HttpError):
        raise HttpError(502, "the origin's response head is malformed") from None
    resp = Response(status, reason[0] if reason else "", version, headers, raw_head=raw_head)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return resp
    h = resp.lower_headers()
    body = bytearray()
    if "chunked" in h.get("transfer-encoding", "").lower():
        while (end := _chunked_end(body)) is None:
            if len(body) > max_buffer:
                resp.body, resp.complete = bytes(body), False
                return resp
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("the upstream closed inside a chunked body")
            body += chunk
        resp.body = dechunk(bytes(body[:end]))
        resp.headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        return resp
    length = h.get("content-length")
    want = int(length) if length and length.isdigit() else None
    while want is None or len(body) < want:
        if len(body) > max_buffer:
            resp.body, resp.complete = bytes(body), False
            return resp
        chunk = await reader.read(65536 if want is None else min(65536, want - len(body)))
        if not chunk:
            if want is not None:
                raise ConnectionError("the upstream closed before the end of the body")
            break
        body += chunk
    resp.body = bytes(body)
    return resp


def render_response(
    resp: Response, *, keep_alive: bool, extra: dict[str, str] | None = None
) -> bytes:
    """A complete response for the client: hop-by-hop headers replaced, Content-Length set."""
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}".rstrip()]
    for k, v in resp.headers:
        if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
            continue
        lines.append(f"{k}: {v}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    if not (resp.status in (204, 304) or 100 <= resp.status < 200):
        lines.append(f"Content-Length: {len(resp.body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + resp.body


def streamed_head(resp: Response) -> bytes:
    """The head of a response too big to buffer: relayed as the origin framed it (the client
    connection closes after it)."""
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}".rstrip()]
    for k, v in resp.headers:
        low = k.lower()
        if low in HOP_BY_HOP and low != "transfer-encoding":
            continue
        lines.append(f"{k}: {v}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, message: str, *, extra: dict[str, str] | None = None) -> bytes:
    body = f"fetchfleet gateway: {message}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
