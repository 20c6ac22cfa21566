"""Just enough HTTP/1.1 for the judge and the HTTP proxies.

A full server (aiohttp, http.server) costs several times the CPU per request, and the benchmark
shares two cores between the checker under test and this world; the judge and the proxies only
need a request head parsed and a small response written.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024
METHOD_FIRST_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")

REASONS = {
    200: "OK",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(Exception):
    """The bytes received are not an HTTP/1.x request head."""


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # as received, in order
    index: dict[str, str]  # lower-cased name -> first value

    def get(self, name: str) -> str | None:
        """First value of a header, name compared case-insensitively."""
        return self.index.get(name.lower())

    @property
    def keep_alive(self) -> bool:
        connection = (self.get("Connection") or "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"

    @property
    def content_length(self) -> int:
        raw = self.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError as exc:
            raise BadRequest(f"bad Content-Length {raw!r}") from exc
        if length < 0:
            raise BadRequest(f"bad Content-Length {raw!r}")
        return length


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request head (request line and header lines, the final CRLFCRLF included or not)."""
    lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    headers = []
    index: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:80]!r}")
        value = value.strip()
        headers.append((name, value))
        index.setdefault(name.lower(), value)
    return RequestHead(parts[0], parts[1], parts[2], headers, index)


def response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    extra: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = False,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with Content-Length (and Connection: close unless kept)."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        "Server: fetchfleet-sim",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
