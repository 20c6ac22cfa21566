"""The simulated JSON API for backfills: records by ID behind a server-side rate limit.

`GET /users/{id}` (or `/records/{id}`) answers a JSON record after a latency with jitter.
A sliding window admits at most `limit` requests in any `window_s` seconds; every request
beyond it gets `429` with `Retry-After` and is **counted** (`rate_limited`), which is how
tests and the benchmark prove a client kept its limit. Some IDs fail for good (404, 500), a
few fail once (503, then succeed), optionally some answer non-JSON — all decided by a hash
of the ID, so `expected_outcome(id, config)` tells a test what each ID should end as.

`GET /stats` returns the counters and the busiest window seen, `GET /stats/timeline` the
admitted requests of each second since the first, `GET /stats/headers` the request headers of
the last data requests (with `record_headers`); `POST /reset` zeroes them.
`/__sim/hold?after=N` lets N more data answers go and holds every later one (`held` in the
stats) until `/__sim/release` (``sim.hold``): a test acts while a run waits on them.
None of these counts toward the limit. With `token` set, data requests need
`Authorization: Bearer <token>` (401 otherwise; the check runs after the rate limit, as on
real APIs, so a refused request still counts).

The hostile cases a client must survive, each off by default:
- `redirect_slash`: `/users/ID` answers 301 to `/users/ID/` (as many REST frameworks do),
  where the record is; both requests count toward the limit.
- `redirect_to`: every data request answers 302 to the same path on another origin.
- `echo_auth`: records carry the request's `Authorization` value, and 404 pages
  (`not_found_page`) quote it, as debugging endpoints do.
- `huge_per_mille`: IDs answered 200 with a chunked JSON body of `huge_bytes` (no
  Content-Length); `streams_cut` counts the clients that hung up before its end.

A raw asyncio Protocol with keep-alive, like the judge: the benchmark shares two cores between
the workers under test and this server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import random
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

from sim.hold import Hold
from sim.http11 import HEAD_END, MAX_HEAD, BadRequest, RequestHead, parse_head, response

log = logging.getLogger(__name__)

API_HOST = "127.0.0.3"
KEEP_ALIVE_IDLE_S = 30.0
ROUTES = ("/users/", "/records/")


@dataclass(frozen=True)
class ApiConfig:
    """The API's behaviour. Outcome shares are per mille of IDs, chosen by a hash of the ID."""

    limit: int | None = None  # at most this many requests in any window (None: no limit)
    window_s: float = 1.0
    latency_ms: tuple[float, float] = (5.0, 25.0)  # uniform per request
    not_found_per_mille: int = 5  # 404 forever
    server_error_per_mille: int = 5  # 500 forever
    flaky_per_mille: int = 10  # 503 on the first request, then 200
    bad_json_per_mille: int = 0  # 200 with an HTML page, forever
    huge_per_mille: int = 0  # 200 with a chunked body of huge_bytes, forever
    huge_bytes: int = 64 * 2**20
    token: str | None = None  # require `Authorization: Bearer <token>`
    redirect_slash: bool = False  # 301 /users/ID -> /users/ID/ (served there)
    redirect_to: str | None = None  # 302 every data request to this origin, same path
    echo_auth: bool = False  # records and 404 pages quote the Authorization header
    record_headers: bool = False  # keep the headers of the last data requests (/stats/headers)
    seed: int = 1
    port: int = 0  # 0: any free port on API_HOST

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiConfig:
        return cls(**{**d, "latency_ms": tuple(d.get("latency_ms", (5.0, 25.0)))})


def expected_outcome(item_id: str, config: ApiConfig) -> str:
    """``ok``, ``not_found``, ``server_error``, ``flaky`` (fails once), ``bad_json`` or
    ``too_large`` (a ``huge_bytes`` body)."""
    h = zlib.crc32(f"{config.seed}:{item_id}".encode()) % 1000
    for outcome, share in (
        ("not_found", config.not_found_per_mille),
        ("server_error", config.server_error_per_mille),
        ("flaky", config.flaky_per_mille),
        ("bad_json", config.bad_json_per_mille),
        ("too_large", config.huge_per_mille),
    ):
        if h < share:
            return outcome
        h -= share
    return "ok"


def generate_ids(n: int, seed: int = 1) -> Iterator[str]:
    """``did:plc:<24 base32 chars>``, deterministic by (seed, index), distinct."""
    for i in range(n):
        digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=15).digest()
        yield "did:plc:" + base64.b32encode(digest).decode().lower()


def write_ids(path: Path, n: int, seed: int = 1) -> Path:
    """Stream ``n`` IDs to ``path``, one a line (any size: nothing is held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        batch: list[str] = []
        for item in generate_ids(n, seed):
            batch.append(item)
            if len(batch) >= 10_000:
                fh.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            fh.write("\n".join(batch) + "\n")
    return path


def not_found_page(item_id: str, auth: str | None) -> bytes:
    """The 404 body; with ``echo_auth`` it quotes the request's Authorization value."""
    text = f"no record {item_id}"
    if auth is not None:
        text += f"; you sent Authorization: {auth}"
    return (json.dumps({"error": text}) + "\n").encode()


def record_for(item_id: str, echo: str | None = None) -> bytes:
    h = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")
    record = {
        "id": item_id,
        "handle": f"user{h % 1_000_000}.sim.test",
        "followers": h % 50_000,
        "posts": (h >> 20) % 10_000,
        "created_at": f"20{10 + (h >> 8) % 15}-0{1 + (h >> 4) % 9}-1{(h >> 12) % 9}T00:00:00Z",
    }
    if echo is not None:
        record["echo"] = {"authorization": echo}
    return json.dumps(record).encode()


@dataclass
class ApiState:
    """Shared by every connection of one server: the window and the counters."""

    config: ApiConfig
    rng: random.Random = field(default_factory=random.Random)
    window: deque[float] = field(default_factory=deque)
    counts: dict[str, int] = field(default_factory=dict)
    peak_window: int = 0
    first_at: float | None = None
    last_at: float | None = None
    failed_once: set[str] = field(default_factory=set)
    per_second: list[int] = field(default_factory=list)  # admitted, by second since first_at
    started: float = field(default_factory=time.monotonic)
    headers_seen: deque[list[tuple[str, str]]] = field(
        default_factory=lambda: deque(maxlen=1000)
    )  # with record_headers: the headers of the last data requests, in order
    hold: Hold = field(default_factory=Hold)  # a test's grip on the pace (/__sim/hold)

    def reset(self) -> None:
        self.window.clear()
        self.counts.clear()
        self.peak_window = 0
        self.first_at = self.last_at = None
        self.failed_once.clear()
        self.per_second.clear()
        self.headers_seen.clear()

    def bump(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def admit(self, now: float) -> float | None:
        """Count a request against the sliding window; None if admitted, else Retry-After."""
        cfg = self.config
        horizon = now - cfg.window_s
        window = self.window
        while window and window[0] <= horizon:
            window.popleft()
        self.bump("requests")
        if cfg.limit is not None and len(window) >= cfg.limit:
            self.bump("rate_limited")
            return max(1.0, math.ceil(window[0] + cfg.window_s - now))
        window.append(now)
        self.peak_window = max(self.peak_window, len(window))
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        second = int(now - self.first_at)
        if second >= len(self.per_second):
            self.per_second.extend([0] * (second + 1 - len(self.per_second)))
        self.per_second[second] += 1
        return None

    def stats(self) -> dict[str, Any]:
        cfg = self.config
        admitted = self.counts.get("requests", 0) - self.counts.get("rate_limited", 0)
        span = (self.last_at - self.first_at) if self.first_at is not None and self.last_at else 0
        return {
            "requests": self.counts.get("requests", 0),
            "admitted": admitted,
            "rate_limited": self.counts.get("rate_limited", 0),
            "ok": self.counts.get("ok", 0),
            "not_found": self.counts.get("not_found", 0),
            "server_error": self.counts.get("server_error", 0),
            "flaky_503": self.counts.get("flaky", 0),
            "bad_json": self.counts.get("bad_json", 0),
            "unauthorized": self.counts.get("unauthorized", 0),
            "redirected": self.counts.get("redirected", 0),
            "too_large": self.counts.get("too_large", 0),
            "streams_cut": self.counts.get("streams_cut", 0),
            "held": len(self.hold.held),
            "held_total": self.hold.held_total,
            "limit": cfg.limit,
            "window_s": cfg.window_s,
            "peak_window": self.peak_window,
            "span_s": round(span, 6),
            "admitted_per_s": round((admitted - 1) / span, 3) if span > 0 else 0.0,
        }


def _json(status: int, doc: Any, keep: bool, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = (json.dumps(doc) + "\n").encode()
    return response(status, body, "application/json", extra=extra, keep_alive=keep)


class ApiConnection(asyncio.Protocol):
    """One client connection; requests are answered in order, one at a time."""

    __slots__ = ("buf", "busy", "paused", "state", "stream", "timer", "transport")

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.buf = bytearray()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.paused: asyncio.Future[None] | None = None
        self.stream: asyncio.Task[None] | None = None  # a huge body being written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_IDLE_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport.is_closing():
            return
        end = self.buf.find(HEAD_END)
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._send(response(431, b"request head too large\n"), close=True)
            return
        try:
            head = parse_head(bytes(self.buf[:end]))
            length = head.content_length
        except BadRequest:
            self._send(response(400, b"bad request\n"), close=True)
            return
        start = end + len(HEAD_END)
        if len(self.buf) < start + length:
            return
        del self.buf[: start + length]
        self.busy = True
        self._handle(head)

    def _handle(self, head: RequestHead) -> None:
        state = self.state
        keep = head.keep_alive
        path = head.target.split("?", 1)[0]
        if path == "/stats":
            self._send(_json(200, state.stats(), keep), close=not keep)
            return
        if path == "/stats/timeline":  # admitted requests per second since the first one
            self._send(_json(200, state.per_second, keep), close=not keep)
            return
        if path == "/stats/headers":
            self._send(_json(200, list(state.headers_seen), keep), close=not keep)
            return
        if path == "/__sim/hold":
            query = head.target.partition("?")[2]
            after = dict(p.partition("=")[::2] for p in query.split("&") if p).get("after", "0")
            if not after.isdigit():
                self._send(_json(400, {"error": "after is a number"}, keep), close=not keep)
                return
            state.hold.hold(int(after))
            self._send(_json(200, {"holding": True}, keep), close=not keep)
            return
        if path == "/__sim/release":
            self._send(_json(200, {"released": state.hold.release()}, keep), close=not keep)
            return
        if path == "/reset" and head.method in ("POST", "GET"):
            state.reset()
            self._send(_json(200, {"reset": True}, keep), close=not keep)
            return
        prefix = next((p for p in ROUTES if path.startswith(p)), None)
        if prefix is None or head.method != "GET" or len(path) == len(prefix):
            self._send(_json(404, {"error": "no such route"}, keep), close=not keep)
            return
        cfg = state.config
        slash = path.endswith("/")
        item_id = unquote(path[len(prefix) :].rstrip("/"))
        if cfg.record_headers:
            state.headers_seen.append(list(head.headers))
        retry_after = state.admit(time.monotonic())
        if retry_after is not None:
            reply = _json(
                429,
                {"error": "rate limited"},
                keep,
                extra=(("Retry-After", str(int(retry_after))),),
            )
            self._send(reply, close=not keep)
            return
        if cfg.redirect_to is not None or (cfg.redirect_slash and not slash):
            state.bump("redirected")
            status, where = (
                (302, cfg.redirect_to.rstrip("/") + head.target)
                if cfg.redirect_to is not None
                else (301, path + "/")
            )
            self._later(response(status, b"", extra=(("Location", where),), keep_alive=keep), keep)
            return
        if cfg.token is not None and head.get("Authorization") != f"Bearer {cfg.token}":
            state.bump("unauthorized")
            reply = _json(401, {"error": "missing or wrong token"}, keep)
            self._later(reply, keep)
            return
        echo = head.get("Authorization") if cfg.echo_auth else None
        outcome = expected_outcome(item_id, cfg)
        if outcome == "flaky" and item_id not in state.failed_once:
            state.failed_once.add(item_id)
            state.bump("flaky")
            reply = _json(503, {"error": "try again"}, keep)
        elif outcome == "not_found":
            state.bump("not_found")
            reply = response(
                404, not_found_page(item_id, echo), "application/json", keep_alive=keep
            )
        elif outcome == "server_error":
            state.bump("server_error")
            reply = response(500, b"internal error\n", keep_alive=keep)
        elif outcome == "bad_json":
            state.bump("bad_json")
            reply = response(200, b"<html>maintenance</html>", "text/html", keep_alive=keep)
        elif outcome == "too_large":
            state.bump("too_large")
            self.stream = asyncio.get_running_loop().create_task(self._stream_huge())
            return
        else:
            state.bump("ok")
            reply = response(200, record_for(item_id, echo), "application/json", keep_alive=keep)
        self._later(reply, keep)

    async def _stream_huge(self) -> None:
        """A JSON body of ``huge_bytes``, chunked (no Content-Length to refuse it by), written
        as fast as the client reads; then the connection closes."""
        total = self.state.config.huge_bytes
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\nServer: fetchfleet-sim\r\n\r\n"
        )
        filler = b"x" * 65536
        parts = [b'{"pad": "', *([filler] * max(0, (total - 11) // len(filler))), b'"}']
        sent = 0
        for part in parts:
            if self.transport.is_closing():
                break
            self.transport.write(b"%x\r\n%s\r\n" % (len(part), part))
            sent += 1
            if self.paused is not None:
                await self.paused
        self.state.bump("streams_cut" if sent < len(parts) else "streams_done")
        if not self.transport.is_closing():
            self.transport.write(b"0\r\n\r\n")
            self.transport.close()

    def _later(self, reply: bytes, keep: bool) -> None:
        lo, hi = self.state.config.latency_ms
        delay = self.state.rng.uniform(lo, hi) / 1000
        loop = asyncio.get_running_loop()
        self.state.hold.send_or_hold(lambda: loop.call_later(delay, self._send, reply, not keep))

    def _send(self, reply: bytes, close: bool = False) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(reply)
        self.busy = False
        if close:
            self.transport.close()
            return
        self._arm_idle()
        if self.buf:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.resume_writing()  # a stream waiting for room sees the hang-up

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None


async def start_api(config: ApiConfig, sock: Any | None = None) -> tuple[asyncio.Server, ApiState]:
    """Serve on ``sock`` (bound) or on API_HOST:config.port; returns (server, state)."""
    loop = asyncio.get_running_loop()
    state = ApiState(config=config, rng=random.Random(config.seed))
    if sock is not None:
        server = await loop.create_server(lambda: ApiConnection(state), sock=sock, backlog=4096)
    else:
        server = await loop.create_server(
            lambda: ApiConnection(state), API_HOST, config.port, backlog=4096
        )
    return server, state
