"""The proxy judge: echoes what reached it, so a checker can see what a proxy changed.

Three formats, because checkers in the field use all three:

- `/get` like httpbin.org/get (JSON with args, headers, origin, url),
- `/azenv` like the classic azenv.php (`KEY = value` lines, one `HTTP_*` line per header),
- `/ip` the bare client address, like checkip.amazonaws.com (what proxy-scraper-cli wants).

It also serves the canary (sim/canary.py) under `/canary/`: known HTML, JSON and PNG that a
checker fetches through a proxy to catch one that tampers with content.

The origin is always the TCP peer address: behind a proxy that is the proxy's own address,
because every simulated proxy connects onward from the address it listens on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import cast
from urllib.parse import parse_qsl, urlsplit

from sim import canary
from sim.http11 import HEAD_END, MAX_HEAD, BadRequest, RequestHead, parse_head, response

log = logging.getLogger(__name__)

JUDGE_HOST = "127.0.0.2"
KEEP_ALIVE_IDLE_S = 15.0
ROUTES = ("/get", "/azenv", "/azenv.php", "/ip", canary.CANARY_PREFIX)


def title_case(name: str) -> str:
    """`x-forwarded-for` -> `X-Forwarded-For`, as httpbin presents header names."""
    return name.title()


def split_target(head: RequestHead) -> tuple[str, str, str]:
    """(path, query, full url) for an origin-form or absolute-form request target."""
    target = head.target
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        return parts.path or "/", parts.query, target
    path, _, query = target.partition("?")
    return path, query, f"http://{head.get('Host') or JUDGE_HOST}{target}"


def httpbin_get(head: RequestHead, peer_ip: str) -> bytes:
    """httpbin.org/get: repeated query keys become lists, header names Title-Cased."""
    _, query, url = split_target(head)
    args: dict[str, str | list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in args:
            args[key] = value
        elif isinstance(seen := args[key], list):
            seen.append(value)
        else:
            args[key] = [seen, value]
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = title_case(name)
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    document = {"args": args, "headers": headers, "origin": peer_ip, "url": url}
    return (json.dumps(document) + "\n").encode()


def azenv(head: RequestHead, peer_ip: str, peer_port: int) -> bytes:
    """azenv.php: the CGI environment as `KEY = value` lines."""
    path, query, _ = split_target(head)
    request_uri = f"{path}?{query}" if query else path
    lines = [f"HTTP_{name.upper().replace('-', '_')} = {value}" for name, value in head.headers]
    lines += [
        f"REMOTE_ADDR = {peer_ip}",
        f"REMOTE_PORT = {peer_port}",
        f"REQUEST_METHOD = {head.method}",
        f"REQUEST_URI = {request_uri}",
        f"QUERY_STRING = {query}",
        f"REQUEST_TIME = {int(time.time())}",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def answer(head: RequestHead, peer_ip: str, peer_port: int) -> bytes:
    """The full response to one request (keep-alive decided by the request)."""
    keep = head.keep_alive
    if head.method not in ("GET", "HEAD"):
        return response(405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
    head_only = head.method == "HEAD"
    path = split_target(head)[0]
    if path == "/get":
        body, ctype = httpbin_get(head, peer_ip), "application/json"
    elif path in ("/azenv", "/azenv.php"):
        body, ctype = azenv(head, peer_ip, peer_port), "text/plain; charset=utf-8"
    elif path == "/ip":
        body, ctype = peer_ip.encode(), "text/plain; charset=utf-8"
    elif path.startswith(canary.CANARY_PREFIX):
        name = path[len(canary.CANARY_PREFIX) :]
        if name == "":
            body, ctype = canary.INDEX, "text/plain; charset=utf-8"
        elif name in canary.RESOURCES:
            body, ctype = canary.RESOURCES[name]
        else:
            return response(404, b"not found\n", keep_alive=keep, head_only=head_only)
    elif path == "/":
        body, ctype = ("fetchfleet sim judge: " + " ".join(ROUTES) + "\n").encode(), "text/plain"
    else:
        return response(404, b"not found\n", keep_alive=keep, head_only=head_only)
    return response(200, body, ctype, keep_alive=keep, head_only=head_only)


class JudgeConnection(asyncio.Protocol):
    """One client connection: requests in sequence until close or keep-alive idle timeout.

    A Protocol rather than streams: no task per connection, the cheapest way asyncio offers.
    """

    __slots__ = ("buf", "peer_ip", "peer_port", "timer", "transport")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peer_ip, self.peer_port = transport.get_extra_info("peername")[:2]
        self.timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_IDLE_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.transport.is_closing():
            end = self.buf.find(HEAD_END)
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.finish(response(431, b"request head too large\n"))
                return
            try:
                head = parse_head(bytes(self.buf[:end]))
                length = head.content_length
            except BadRequest as exc:
                log.debug("judge: bad request from %s: %s", self.peer_ip, exc)
                self.finish(response(400, b"bad request\n"))
                return
            start = end + len(HEAD_END)
            if len(self.buf) < start + length:
                return
            del self.buf[: start + length]
            reply = answer(head, self.peer_ip, self.peer_port)
            if not head.keep_alive:
                self.finish(reply)
                return
            self.transport.write(reply)
            if self.timer is not None:
                self.timer.cancel()
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(KEEP_ALIVE_IDLE_S, self.transport.close)

    def finish(self, reply: bytes) -> None:
        self.transport.write(reply)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
