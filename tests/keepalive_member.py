"""A keep-alive HTTP member for the gateway's upstream pool tests: it answers every
absolute-URI request itself (no origin), keeps its connections open as squid does, and
counts connections and requests, so a test can tell how many upstream connections the
gateway opened and what each request looked like when it arrived.

The path chooses the answer: `/chunked` (a chunked body in three chunks), `/close`
(`Connection: close`, then the member closes), `/http10` (an HTTP/1.0 answer without
keep-alive, then a close), `/block` (403 with a length, connection kept), `/slow` (waits for
`gate`); anything else is 200 with a Content-Length. `drop_reused` makes the next N requests
that arrive on an already used connection end it unanswered: the race of a member closing
an idle connection just as the gateway sends on it.
"""

from __future__ import annotations

import asyncio
import contextlib


class KeepAliveMember:
    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.connections = 0  # accepted
        self.requests = 0  # answered
        self.heads: list[bytes] = []  # every request head received
        self.drop_reused = 0
        self.blocks = False
        self.drop_with = False  # drop_reused answers 408 before closing
        self.dropped = 0
        self.gate = asyncio.Event()
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()

    def close_idle(self) -> None:
        """Close every open connection (the member's keep-alive timeout firing)."""
        for w in list(self.writers):
            w.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_id = self.connections
        self.writers.add(w)
        served = 0
        try:
            while True:  # bounded by the peer: every turn needs a request head
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await r.readexactly(length)
                if served and self.drop_reused:
                    self.drop_reused -= 1
                    self.dropped += 1
                    if self.drop_with:
                        w.write(_answer(408, b"idle too long", b"Connection: close\r\n"))
                        await w.drain()
                    return  # closed unanswered (or with a 408, as some servers do)
                served += 1
                self.requests += 1
                path = head.split(b" ", 2)[1].split(b"/", 3)[-1].decode()
                body = f"{self.name} conn {conn_id} req {served} /{path}".encode()
                if path == "chunked":
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for part in (body[:5], body[5:], b"!"):
                        w.write(b"%x\r\n%s\r\n" % (len(part), part))
                    w.write(b"0\r\n\r\n")
                elif path == "close":
                    w.write(_answer(200, body, b"Connection: close\r\n"))
                    await w.drain()
                    return
                elif path == "http10":
                    w.write(_answer(200, body, version=b"HTTP/1.0"))
                    await w.drain()
                    return
                elif self.blocks:
                    w.write(_answer(403, b"blocked by " + self.name.encode()))
                elif path == "slow":
                    await self.gate.wait()
                    w.write(_answer(200, body))
                else:
                    w.write(_answer(200, body))
                await w.drain()
        finally:
            self.writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _answer(status: int, body: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    reason = {200: b"OK", 403: b"Forbidden", 408: b"Request Timeout"}[status]
    return (
        b"%s %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
        % (version, status, reason, len(body), extra)
        + body
    )


async def get(port: int, urls: list[str], extra: str = "") -> list[tuple[int, bytes, bytes]]:
    """The URLs in turn over one kept-alive client connection to the gateway: (status, head,
    body) each (the gateway always frames its answers with Content-Length)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for url in urls:
            host = url.split("/")[2]
            w.write(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            body = await asyncio.wait_for(r.readexactly(_content_length(head)), 10)
            out.append((int(head.split(b" ")[1]), head, body))
    finally:
        w.close()
    return out
