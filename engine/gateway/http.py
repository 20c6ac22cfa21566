"""HTTP/1.x for the gateway: request heads (absolute-URI and CONNECT) read under limits, the
head sent onward, responses read back whole (bounded) so a block page can be judged and a
GET cached, and the error answers a client sees.

Why our own parser: the gateway only needs request heads and response framing, and it must
enforce its limits (head size, header count, a head that never ends) before anything is
allocated for a request; a full HTTP server library would hide those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

HEAD_END = b"\r\n\r\n"
MAX_HEADERS = 100
MAX_CHUNK_OVERHEAD = 64 * 1024  # chunk-size lines and trailers beyond the body limit
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
# Methods whose repetition has the effect of one (RFC 9110 9.2.2): only these go on a kept
# connection, which the member may have closed just as the request went out.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
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
    index: dict[str, str] | None = None  # lower-case name → first value, built on first use

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def header(self, name: str) -> str | None:
        """`name` in lower case; the first value, as `headers` were sent."""
        index = self.index
        if index is None:
            index = self.index = {k.lower(): v for k, v in reversed(self.headers)}
        return index.get(name.lower())

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
    # lower-case name → first value, built on first use; None again when `headers` change
    index: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        index = self.index
        if index is None:
            index = self.index = {k.lower(): v for k, v in reversed(self.headers)}
        return index.get(name.lower())

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


_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips


def parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers = []
    append = headers.append
    # one decode per line (latin-1 maps byte for byte; the strip is that of bytes: ASCII
    # whitespace only)
    for raw in lines:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip(_WS) or " " in name:
            raise HttpError(400, "malformed header field")
        append((name, value.strip(_WS)))
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
        req.host, req.port = _plain_authority(target) or split_authority(target, 443)
        return req
    fast = _plain_absolute(target)
    if fast is not None:
        req.host, req.port, req.path = fast
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


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _plain_authority(authority: str) -> tuple[str, int] | None:
    """The common CONNECT target `name-or-ipv4:port` split without urlsplit; None for
    anything else (the general parser decides on it, so both give the same answer)."""
    host, sep, port_text = authority.partition(":")
    if (
        not sep
        or not host
        or not (port_text.isdigit() and port_text.isascii() and len(port_text) <= 5)
        or not _NAME_CHARS.issuperset(host)
    ):
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    return host.lower(), port


def _plain_absolute(target: str) -> tuple[str, int, str] | None:
    """The common target `http://name-or-ipv4[:port][/path[?query]]` split without urlsplit
    (a few % of the gateway's CPU per request); None for anything else, which the general
    parser then decides on, so both give the same answer."""
    if not target.startswith("http://") or "#" in target or "\t" in target:
        return None
    rest = target[7:]
    slash = rest.find("/")
    netloc, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if path.endswith("?") or any(c in netloc for c in "?@[]\\%"):
        return None
    host, sep, port_text = netloc.partition(":")
    if not host:
        return None
    port = 80
    if sep:
        if not (port_text.isdigit() and port_text.isascii() and 0 < len(port_text) <= 5):
            return None
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    return host.lower(), port, path


def request_body_end(buf: bytearray, req: Request, limit: int) -> int | None:
    """Where the request body at the start of `buf` ends (Content-Length or chunked, at most
    `limit` bytes), setting `req.body`; None while more bytes are needed."""
    te = (req.header("transfer-encoding") or "").lower()
    if "chunked" in te:
        end = _chunked_end(buf, 0, status=400)
        if end is None:
            if len(buf) > limit + MAX_CHUNK_OVERHEAD:
                raise HttpError(413, f"request body over {limit} bytes")
            return None
        req.body = dechunk(bytes(buf[:end]))
        if len(req.body) > limit:
            raise HttpError(413, f"request body over {limit} bytes")
        return end
    length = req.header("content-length")
    if length is None:
        return 0
    if not length.isdigit():
        raise HttpError(400, "bad Content-Length")
    n = int(length)
    if n > limit:
        raise HttpError(413, f"request body over {limit} bytes")
    if len(buf) < n:
        return None
    req.body = bytes(buf[:n])
    return n


def connection_tokens(headers: list[tuple[str, str]]) -> frozenset[str]:
    """The lower-case options of the Connection (and Proxy-Connection) fields: the headers
    they name are hop-by-hop for this message too (RFC 9110 7.6.1)."""
    tokens: set[str] = set()
    for k, v in headers:
        if k.lower() in ("connection", "proxy-connection"):
            tokens.update(t.strip().lower() for t in v.split(","))
    return frozenset(tokens)


def onward_head(
    req: Request, *, absolute: bool, proxy_auth: str | None = None, keep_alive: bool = False
) -> bytes:
    """The request as sent to a forward member (`absolute`) or through a tunnel to the
    origin: hop-by-hop headers dropped, and those the client's Connection field names; then
    `Connection: keep-alive` when the connection may go back to the upstream pool, else
    `Connection: close` (the end of the response is then the end of the stream)."""
    target = req.url if absolute else req.path
    lines = [f"{req.method} {target} HTTP/1.1"]
    has_host = False
    named = (
        connection_tokens(req.headers)
        if req.header("connection") or req.header("proxy-connection")
        else frozenset()
    )
    for k, v in req.headers:
        low = k.lower()
        if low in HOP_BY_HOP or low == "content-length" or low in named:
            continue
        has_host = has_host or low == "host"
        lines.append(f"{k}: {v}")
    if not has_host:
        lines.insert(1, f"Host: {_netloc(req.host)}" + ("" if req.port == 80 else f":{req.port}"))
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(req.body)}")
    if proxy_auth:
        lines.append(f"Proxy-Authorization: {proxy_auth}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body


def _chunked_end(buf: bytes | bytearray, start: int = 0, status: int = 502) -> int | None:
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
            raise HttpError(status, "bad chunk size") from None
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


def parse_response_head(raw_head: bytes) -> Response:
    lines = raw_head[: -len(HEAD_END)].split(b"\r\n")
    try:
        version, code, *reason = lines[0].decode("latin-1").split(" ", 2)
        status = int(code)
        headers = parse_headers(lines[1:])
    except (ValueError, HttpError):
        raise HttpError(502, "the origin's response head is malformed") from None
    return Response(status, reason[0] if reason else "", version, headers, raw_head=raw_head)


class Framing:
    """How the end of a response body is found."""

    NONE, LENGTH, CHUNKED, EOF = range(4)


def framing_of(resp: Response, method: str) -> tuple[int, int]:
    """(Framing, length) of the body that follows `resp`'s head (RFC 9112 6.3)."""
    if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        return Framing.NONE, 0
    te = length = None
    for k, v in resp.headers:
        low = k.lower()
        if low == "transfer-encoding":
            te = v.lower()
        elif low == "content-length":
            length = v.strip()
    if te is not None and "chunked" in te:
        return Framing.CHUNKED, 0
    if length is not None and length.isdigit():
        return Framing.LENGTH, int(length)
    return Framing.EOF, 0


def complete_body(resp: Response, framing: int, want: int, buf: bytearray, eof: bool) -> int:
    """Set `resp.body` from `buf` (the bytes after the head) if the body is all there: the
    bytes of `buf` it took, or -1 while more are needed; the upstream's end (`eof`) inside a
    framed body is an error."""
    if framing == Framing.NONE:
        return 0
    if framing == Framing.LENGTH:
        if len(buf) >= want:
            resp.body = bytes(buf[:want])
            return want
    elif framing == Framing.CHUNKED:
        end = _chunked_end(buf)
        if end is not None:
            resp.body = dechunk(bytes(buf[:end]))
            resp.headers = [(k, v) for k, v in resp.headers if k.lower() != "transfer-encoding"]
            resp.index = None
            return end
    elif eof:
        resp.body = bytes(buf)
        return len(buf)
    if eof:
        raise ConnectionError("the upstream closed before the end of the body")
    return -1


def persistent(resp: Response) -> bool:
    """Whether the member keeps the connection open after this answer (RFC 9112 9.3): not
    after `Connection: close`, nor after HTTP/1.0 without `keep-alive`."""
    conn = resp.header("connection")
    tokens = {t.strip().lower() for t in conn.split(",")} if conn else set()
    if "close" in tokens:
        return False
    if resp.version == "HTTP/1.1":
        return True
    return resp.version == "HTTP/1.0" and "keep-alive" in tokens


def render_response(
    resp: Response, *, keep_alive: bool, extra: dict[str, str] | None = None
) -> bytes:
    """A complete response for the client: hop-by-hop headers replaced, Content-Length set."""
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}".rstrip()]
    named = connection_tokens(resp.headers) if resp.header("connection") else frozenset()
    for k, v in resp.headers:
        low = k.lower()
        if low in HOP_BY_HOP or low == "content-length" or low in named:
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
