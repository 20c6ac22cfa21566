"""Is this proxy alive, which protocol does it speak, how fast and how anonymous is it?

One `ProxyChecker` per worker process, many concurrent `check()` calls inside its asyncio
(uvloop) loop. Each check is a single HTTP/1.1 request to a *judge* (see `fetchers.judge`)
through the proxy, written by hand over asyncio streams — no HTTP client stack per check:

* `http`   — a forwarded request (`GET http://judge/...` in absolute form) sent to the proxy;
  anonymity is judged from what the judge saw (the proxy may add or leak headers). With an
  https judge the request names the https:// URL, which only some proxies fetch: prefer an
  http judge (the token still proves the answer is genuine).
* `https`  — a CONNECT tunnel to the judge (python-socks), then the GET through it (TLS when
  the judge URL is https). A tunnel cannot add headers, so anonymity comes from one extra
  forwarded GET if the proxy accepts it, else from the remote address alone.
* `socks4` / `socks5` — the python-socks handshake, then the GET through the tunnel;
  anonymity from the remote address alone.

A line without a scheme is tried as http, then (if the port speaks HTTP but will not forward)
as a CONNECT proxy, else as socks5 then socks4. We stop at the first failure that says the
port is dead for every protocol — connection refused, unreachable, connect timeout, or a
timeout without a single byte back — and continue only on a protocol mismatch (garbage, a
malformed handshake reply, or the server hanging up on our greeting). One exception: silence
at the SOCKS5 greeting moves on to SOCKS4, because a SOCKS4 server typically reads its fixed
8-byte request before it looks at the version byte, and our greeting is 3 bytes.

Proof of a real answer: every request carries a fresh random token in the query string
(`?ffp=<token>`) and in a header (`X-Fetchfleet-Probe`); the judge echoes both, and an
answer without the token — a captive portal, a canned page, a fake "your IP" JSON — is
`bad_response`, never alive.

Outcomes: `alive`, `refused` (ECONNREFUSED), `timeout`, `auth_failed` (HTTP 407, SOCKS auth
rejected), `bad_response` (no token, non-2xx from the judge, unparseable, protocol
mismatch), `tls` (ssl errors), `unreachable` (no route to the proxy), `error` (anything
else: the message starts with the exception type). Error messages never contain the
proxy's password. With an integrity check attached (`fetchers.integrity`), an alive proxy
that modifies the canary's content is `tampering` instead of alive.

Every socket is closed on every path, including cancellation: a worker that is told to
stop can cancel in-flight checks without leaking descriptors.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio.v2 import Proxy as SocksProxy

from fetchers.errors import FetchError, JudgeFormatError
from fetchers.geo import country_of
from fetchers.judge import (
    PROXY_HEADERS,
    Anonymity,
    JudgeView,
    classify_anonymity,
    exit_address,
    forwarded_for,
    parse_ip,
    parse_judge_response,
)
from fetchers.proxy_parse import ProxySpec

if TYPE_CHECKING:
    from fetchers.integrity import IntegrityCheck

__all__ = ["MAX_RESPONSE_BYTES", "CheckResult", "Outcome", "ProxyChecker"]

log = logging.getLogger(__name__)

#: Largest judge answer (headers + body) we read; anything bigger is not our judge.
MAX_RESPONSE_BYTES = 64 * 1024
_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
_AUTO_ORDER = ("http", "socks5", "socks4")
_SOCKS_TYPES = {"socks4": ProxyType.SOCKS4, "socks5": ProxyType.SOCKS5}
_SOCKS_AUTH_MESSAGES = (
    "authentication failure",
    "no acceptable authentication",
)
_SOCKS4_AUTH_CODES = {0x5C, 0x5D}
#: Headers a judge must show for a header-based verdict, sent with made-up values once at
#: start to see which ones it hides.
_CANARY = ("via", "x-forwarded-for", "x-real-ip", "forwarded")
_CANARY_HEADERS = (
    "Via: 1.1 fetchfleet-canary\r\nX-Forwarded-For: 192.0.2.1\r\n"
    "X-Real-IP: 192.0.2.1\r\nForwarded: for=192.0.2.1\r\n"
)
_UNREACHABLE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


class Outcome(StrEnum):
    ALIVE = "alive"
    TAMPERING = "tampering"  # answers, but modifies content (fetchers.integrity): never used
    REFUSED = "refused"
    TIMEOUT = "timeout"
    AUTH_FAILED = "auth_failed"
    BAD_RESPONSE = "bad_response"
    TLS = "tls"
    UNREACHABLE = "unreachable"
    ERROR = "error"


@dataclass(slots=True)
class CheckResult:
    """The verdict on one proxy."""

    outcome: Outcome
    alive: bool
    protocol: str | None = None  # the protocol that answered: http, https, socks4, socks5
    latency_ms: float | None = None  # connect + handshake + request + full answer
    anonymity: Anonymity | None = None
    exit_ip: str | None = None
    country: str | None = None
    error: str | None = None  # short, never contains the password
    # alive proxies: intact / unknown / tampering (fetchers.integrity); None: not checked
    integrity: str | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))


# --------------------------------------------------------------------------- attempts


class _Fail(Exception):
    """One attempt failed. `dead`: the port is dead for every protocol; `mismatch`: the port
    answered, but not in this protocol; `http_speaker`: it answered in HTTP; `stalled`: the
    proxy went silent during the handshake."""

    def __init__(
        self,
        outcome: Outcome,
        message: str,
        *,
        dead: bool = False,
        mismatch: bool = False,
        http_speaker: bool = False,
        stalled: bool = False,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.dead = dead
        self.mismatch = mismatch
        self.http_speaker = http_speaker
        self.stalled = stalled


@dataclass(slots=True)
class _Success:
    protocol: str
    view: JudgeView
    latency_ms: float
    local_ip: str | None


class _Progress:
    """Where an attempt is, so a timeout can be classified (dead port or slow proxy)."""

    __slots__ = ("phase", "received")

    def __init__(self) -> None:
        self.phase = "connect"
        self.received = 0


def _oserror_fail(e: OSError, what: str) -> _Fail:
    code = e.errno
    if isinstance(e, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return _Fail(Outcome.REFUSED, f"{what}: connection refused", dead=True)
    if code in _UNREACHABLE_ERRNOS:
        return _Fail(Outcome.UNREACHABLE, f"{what}: {os.strerror(code).lower()}", dead=True)
    if code == errno.ETIMEDOUT:
        return _Fail(Outcome.TIMEOUT, f"{what}: connect timed out", dead=True)
    reason = e.strerror or str(e) or type(e).__name__
    return _Fail(Outcome.ERROR, f"{what}: {type(e).__name__}: {reason}", dead=True)


def _parse_http_head(buf: bytes, head_end: int) -> tuple[int, dict[str, str]]:
    head = buf[:head_end].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _Fail(Outcome.BAD_RESPONSE, f"malformed status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol == -1:
            break
        try:
            size = int(body[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            raise _Fail(Outcome.BAD_RESPONSE, "malformed chunked body") from None
        if size == 0:
            break
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


async def _read_http_response(
    reader: asyncio.StreamReader, progress: _Progress
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.x response (until EOF or Content-Length), at most 64 KB."""
    buf = bytearray()
    head_end = -1
    status = 0
    headers: dict[str, str] = {}
    need: int | None = None
    progress.phase = "response"
    while True:
        try:
            chunk = await reader.read(MAX_RESPONSE_BYTES)
        except ConnectionResetError:
            if not buf:
                raise _Fail(
                    Outcome.BAD_RESPONSE, "connection reset without a reply", mismatch=True
                ) from None
            raise _Fail(Outcome.BAD_RESPONSE, "connection reset mid-reply") from None
        if not chunk:
            break
        if not buf:  # a CONNECT reply's last CRLF may arrive late: skip it
            chunk = chunk.lstrip(b"\r\n")
            if not chunk:
                progress.received += 1
                continue
        buf += chunk
        progress.received = len(buf)
        if head_end < 0:
            if len(buf) >= 5 and not buf.startswith(b"HTTP/"):
                raise _Fail(Outcome.BAD_RESPONSE, "reply is not HTTP", mismatch=True)
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                status, headers = _parse_http_head(buf, head_end)
                cl = headers.get("content-length")
                if cl is not None and cl.isdigit():
                    need = head_end + 4 + int(cl)
        if need is not None and len(buf) >= need:
            break
        if len(buf) > MAX_RESPONSE_BYTES:
            raise _Fail(Outcome.BAD_RESPONSE, "reply larger than 64 KB: not the judge")
    if not buf:
        raise _Fail(Outcome.BAD_RESPONSE, "connection closed without a reply", mismatch=True)
    if head_end < 0:
        if not buf.startswith(b"HTTP/"[: len(buf)]):
            raise _Fail(Outcome.BAD_RESPONSE, "reply is not HTTP", mismatch=True)
        raise _Fail(Outcome.BAD_RESPONSE, "reply ended inside the HTTP headers")
    body = bytes(buf[head_end + 4 : need])
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return status, headers, body


def _is_httpbin(view: JudgeView) -> bool:
    """An httpbin `/get` answer (JSON), which knows the `show_env` switch."""
    return view.raw_text.lstrip().startswith("{")


def _close(writer: asyncio.StreamWriter | None, *, abort: bool = False) -> None:
    if writer is None:
        return
    transport = writer.transport
    if abort:
        transport.abort()
    else:
        transport.close()


def _sockname_ip(writer: asyncio.StreamWriter) -> str | None:
    sockname = writer.get_extra_info("sockname")
    return sockname[0] if sockname else None


# --------------------------------------------------------------------------- the checker


class ProxyChecker:
    """Checks proxies against one judge. Use `async with ProxyChecker(...) as c:` or call
    `start()` / `aclose()` yourself.

    judge_url: http(s) URL of an httpbin `/get` or azenv judge.
    timeout: seconds per attempt (connect, handshake, request and answer together).
    own_ips: addresses that must never be seen by the judge (the checker's own public
        address(es)); `start()` adds every address the judge reports for a direct request.
    overall_timeout: hard cap for one `check()` including protocol detection
        (default 3 × timeout).
    ssl_context: for https judges (default: system trust store).
    verify_echo: require the judge to echo the probe token (turn off only for bare-IP
        judges, which cannot echo; a proxy serving canned pages then passes as alive).
    integrity: a `fetchers.integrity.IntegrityCheck`: alive proxies then fetch its canary,
        and one that modifies it is `tampering` (None: integrity not checked).
    """

    def __init__(
        self,
        judge_url: str,
        timeout: float = 5.0,
        own_ips: set[str] | None = None,
        *,
        overall_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        verify_echo: bool = True,
        integrity: IntegrityCheck | None = None,
    ) -> None:
        u = urlsplit(judge_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise FetchError(
                f"judge URL {judge_url!r} is not an http(s) URL; use e.g. http://127.0.0.2:8080/get"
            )
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.judge_url = judge_url
        self.timeout = float(timeout)
        self.overall_timeout = float(overall_timeout or 3 * timeout)
        self.verify_echo = verify_echo
        self.integrity = integrity
        self._judge_tls = u.scheme == "https"
        self._judge_host = u.hostname
        self._judge_port = u.port or (443 if self._judge_tls else 80)
        host_hdr = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        default_port = 443 if self._judge_tls else 80
        self._host_header = host_hdr if u.port in (None, default_port) else f"{host_hdr}:{u.port}"
        path = u.path or "/"
        self._path_prefix = f"{path}?{u.query}&ffp=" if u.query else f"{path}?ffp="
        self._absolute_prefix = f"{u.scheme}://{self._host_header}"
        self._ssl = ssl_context
        self.own_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        for ip in own_ips or ():
            self._add_own(ip)
        self.baseline_headers: frozenset[str] = frozenset()
        #: proxy-revealing headers this judge never shows (anonymity is then "unknown")
        self.hidden_headers: frozenset[str] = frozenset()
        #: X-Forwarded-For entries the judge's own reverse proxy appends
        self.xff_hops = 0
        self._judge_ip = self._judge_host
        self._started = False
        self._start_lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle

    async def __aenter__(self) -> ProxyChecker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _add_own(self, ip: object) -> None:
        try:
            addr = ipaddress.ip_address(str(ip).strip().strip("[]"))
        except ValueError:
            return
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        self.own_ips.add(addr)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def start(self) -> None:
        """Ask the judge directly (no proxy): learn our own address(es), which
        proxy-revealing headers the judge's own infrastructure adds, how many
        X-Forwarded-For entries it appends, and whether it hides the headers a proxy adds
        (then retry with httpbin's `show_env=1`). Raises FetchError when the judge cannot
        be used."""
        async with self._start_lock:
            if self._started:
                return
            view, local_ip, peer = await self._direct(self._path_prefix)
            hidden = await self._hidden_headers(self._path_prefix)
            if hidden and _is_httpbin(view) and "show_env" not in self._path_prefix:
                # httpbin drops Via / X-Forwarded-For / X-Real-Ip from /get unless asked
                prefix = self._path_prefix.replace("?", "?show_env=1&", 1)
                shown = await self._hidden_headers(prefix)
                if len(shown) < len(hidden):
                    self._path_prefix, hidden = prefix, shown
                    view, local_ip, peer = await self._direct(prefix)
            for addr in (view.remote_addr, *view.origin, local_ip):
                if addr:
                    self._add_own(addr)
            self.hidden_headers = hidden
            self.baseline_headers = frozenset(h for h in view.headers if h in PROXY_HEADERS)
            self.xff_hops = len(forwarded_for(view) or ())
            if peer:  # SOCKS4 carries no host names: give it the address we reached
                self._judge_ip = peer[0]
            self._started = True
            log.info(
                "proxy checker ready",
                extra={
                    "judge": self.effective_judge_url,
                    "own_ips": sorted(map(str, self.own_ips)),
                    "baseline_headers": sorted(self.baseline_headers),
                    "hidden_headers": sorted(self.hidden_headers),
                    "xff_hops": self.xff_hops,
                },
            )

    @property
    def effective_judge_url(self) -> str:
        """The judge URL as the checker asks it (with `show_env=1` where httpbin needs it)."""
        path = self._path_prefix.removesuffix("ffp=").rstrip("?&")
        return f"{self._absolute_prefix}{path}"

    async def _direct(
        self, path_prefix: str, extra_headers: str = ""
    ) -> tuple[JudgeView, str | None, tuple[str, int] | None]:
        """One request to the judge without a proxy: (what it saw, our local address, its
        address)."""
        token = os.urandom(8).hex()
        request = self._request(token, absolute=False, path_prefix=path_prefix)
        if extra_headers:
            request = request[:-2] + extra_headers.encode("latin-1") + b"\r\n"
        progress = _Progress()
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    self._judge_host,
                    self._judge_port,
                    ssl=self._ssl_context() if self._judge_tls else None,
                    server_hostname=self._judge_host if self._judge_tls else None,
                )
                writer.write(request)
                status, headers, body = await _read_http_response(reader, progress)
            local_ip = _sockname_ip(writer)
            peer = writer.get_extra_info("peername")
        except (OSError, TimeoutError, _Fail) as e:
            reason = e.message if isinstance(e, _Fail) else (str(e) or type(e).__name__)
            raise FetchError(
                f"cannot use judge {self.judge_url}: {reason}; "
                "check that it is running and reachable from this machine"
            ) from e
        finally:
            _close(writer)
        try:
            view = parse_judge_response(status, headers, body)
        except JudgeFormatError as e:
            raise JudgeFormatError(f"judge {self.judge_url}: {e}") from e
        if self.verify_echo and token not in view.raw_text:
            raise JudgeFormatError(
                f"judge {self.judge_url} does not echo the request (no probe token in "
                "its answer); use an httpbin /get or azenv judge, or verify_echo=False"
            )
        return view, local_ip, peer

    async def _hidden_headers(self, path_prefix: str) -> frozenset[str]:
        """Which of the headers proxies add most (`_CANARY`) the judge leaves out of what it
        shows, asked with made-up values (documentation addresses, RFC 5737)."""
        view, _, _ = await self._direct(path_prefix, _CANARY_HEADERS)
        return frozenset(name for name in _CANARY if name not in view.headers)

    async def aclose(self) -> None:
        """Release the checker. Checks hold no shared connections, so this only marks it
        closed; in-flight checks finish (or are cancelled by their owner)."""
        self._closed = True

    # -- public checks

    async def check(self, spec: ProxySpec) -> CheckResult:
        """Check one proxy. Never raises for a bad proxy: the verdict is in the result."""
        if self._closed:
            raise FetchError("this ProxyChecker is closed; create a new one")
        if not self._started:
            await self.start()
        started = time.perf_counter()
        # The overall cap is a deadline that bounds every attempt's own timeout (one timer
        # per attempt instead of two nested ones: this is the hot path).
        deadline = asyncio.get_running_loop().time() + self.overall_timeout
        result = await self._check(spec, deadline)
        if result.alive and self.integrity is not None:
            result = await self.integrity.verify(spec, result, deadline)
        if result.error and spec.password and spec.password in result.error:
            result.error = result.error.replace(spec.password, "***")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "proxy checked",
                extra={
                    "proxy": spec.redacted(),
                    "outcome": str(result.outcome),
                    "protocol": result.protocol,
                    "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
                    "error": result.error,
                },
            )
        return result

    async def check_many(
        self, specs: Iterable[ProxySpec], concurrency: int = 500
    ) -> AsyncIterator[tuple[ProxySpec, CheckResult]]:
        """Check many proxies with at most `concurrency` in flight; yields in completion
        order. `specs` is consumed lazily, so it can be a generator over a huge file."""
        it = iter(specs)
        concurrency = max(1, concurrency)
        # bounded: a slow consumer slows the checks down instead of piling up results
        queue: asyncio.Queue[tuple[ProxySpec, CheckResult] | None] = asyncio.Queue(concurrency)

        async def worker() -> None:
            for spec in it:
                try:
                    result = await self.check(spec)
                except Exception as e:  # a closed checker or a bug: report, keep going
                    result = CheckResult(Outcome.ERROR, False, error=f"{type(e).__name__}: {e}")
                await queue.put((spec, result))
            await queue.put(None)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        running = len(workers)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                yield item
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    # -- internals

    def _request(
        self,
        token: str,
        *,
        absolute: bool,
        proxy_auth: str | None = None,
        path_prefix: str | None = None,
    ) -> bytes:
        target = f"{path_prefix or self._path_prefix}{token}"
        if absolute:
            target = self._absolute_prefix + target
        auth = f"Proxy-Authorization: {proxy_auth}\r\n" if proxy_auth else ""
        return (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {self._host_header}\r\n"
            f"User-Agent: {_USER_AGENT}\r\n"
            "Accept: */*\r\n"
            f"X-Fetchfleet-Probe: {token}\r\n"
            f"{auth}"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")

    def _judge_view(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        token: str,
        *,
        via_proxy: bool,
        sent_credentials: bool = False,
    ) -> JudgeView:
        if status == 407 and via_proxy:
            raise _Fail(
                Outcome.AUTH_FAILED,
                "proxy wants credentials (HTTP 407)",
                http_speaker=True,
            )
        if status == 401 and via_proxy and sent_credentials:
            # tinyproxy (1.11) answers wrong credentials with 401, not 407; the judge
            # itself answered 2xx without credentials at start, so the 401 is the proxy's
            raise _Fail(
                Outcome.AUTH_FAILED,
                "proxy rejected the credentials (HTTP 401)",
                http_speaker=True,
            )
        if not 200 <= status < 300:
            who = "proxy or judge" if via_proxy else "judge (through the tunnel)"
            raise _Fail(
                Outcome.BAD_RESPONSE,
                f"{who} answered HTTP {status} instead of the judge's page",
                http_speaker=True,
            )
        try:
            view = parse_judge_response(status, headers, body)
        except JudgeFormatError as e:
            raise _Fail(Outcome.BAD_RESPONSE, str(e), http_speaker=True) from None
        if self.verify_echo and token not in view.raw_text:
            raise _Fail(
                Outcome.BAD_RESPONSE,
                "answer did not come from the judge (probe token missing)",
                http_speaker=True,
            )
        return view

    async def _check(self, spec: ProxySpec, deadline: float) -> CheckResult:
        scheme = spec.scheme
        if scheme == "http":
            return self._verdict(await self._try(deadline, self._forward, spec))
        if scheme == "https":
            r = await self._try(deadline, self._connect, spec)
            if isinstance(r, _Success) and not self._judge_tls:
                # A tunnel cannot add headers; ask once more as a forwarding proxy to see
                # what this proxy adds to plain-HTTP traffic, if it forwards at all.
                probe = await self._try(deadline, self._forward, spec)
                if isinstance(probe, _Success):
                    return self._verdict(r, anon_from=probe)
            return self._verdict(r)
        if scheme in _SOCKS_TYPES:
            return self._verdict(await self._try(deadline, self._socks, spec, scheme))
        return await self._detect(spec, deadline)

    async def _detect(self, spec: ProxySpec, deadline: float) -> CheckResult:
        failures: list[tuple[str, _Fail]] = []
        first = await self._try(deadline, self._forward, spec)
        if isinstance(first, _Success):
            return self._verdict(first)
        failures.append(("http", first))
        if not (first.mismatch or first.http_speaker) or first.outcome == Outcome.AUTH_FAILED:
            return self._verdict(first)
        if first.http_speaker:
            candidates: tuple[str, ...] = ("https",)
        else:
            candidates = _AUTO_ORDER[1:]
        for proto in candidates:
            if proto == "https":
                r = await self._try(deadline, self._connect, spec)
            else:
                r = await self._try(deadline, self._socks, spec, proto)
            if isinstance(r, _Success):
                return self._verdict(r)
            failures.append((proto, r))
            # A SOCKS4 server that reads its fixed 8-byte request before looking at the
            # version byte sits silent at our 3-byte SOCKS5 greeting: after the port has
            # proved it answers (it hung up on HTTP), a SOCKS5 stall means "try SOCKS4".
            socks4_may_follow = proto == "socks5" and r.stalled
            if r.dead or not (r.mismatch or socks4_may_follow):
                break
        # Report the most telling failure: one that got past protocol mismatch, else all.
        for _proto, f in reversed(failures):
            if not f.mismatch:
                return self._verdict(f)
        detail = "; ".join(f"{p}: {f.message}" for p, f in failures)
        return CheckResult(
            Outcome.BAD_RESPONSE, False, error=f"no protocol answered properly ({detail})"
        )

    async def _try(
        self,
        deadline: float,
        attempt: Callable[..., Awaitable[_Success]],
        spec: ProxySpec,
        *args: str,
    ) -> _Success | _Fail:
        now = asyncio.get_running_loop().time()
        budget = min(self.timeout, deadline - now)
        capped = budget < self.timeout
        if budget <= 0:
            return _Fail(
                Outcome.TIMEOUT, f"no verdict within {self.overall_timeout:g} s (overall cap)"
            )
        progress = _Progress()
        try:
            async with asyncio.timeout_at(now + budget):
                return await attempt(spec, progress, budget, *args)
        except _Fail as f:
            return f
        except TimeoutError:
            took = f"{budget:g} s" + (" (overall cap)" if capped else "")
            if progress.phase == "connect":
                return _Fail(Outcome.TIMEOUT, f"connect timed out after {took}", dead=True)
            if progress.phase == "handshake":
                return _Fail(Outcome.TIMEOUT, f"no handshake reply within {took}", stalled=True)
            if progress.received == 0:
                return _Fail(Outcome.TIMEOUT, f"no reply within {took}", dead=True)
            return _Fail(Outcome.TIMEOUT, f"reply incomplete after {took}")
        except ssl.SSLError as e:
            return _Fail(Outcome.TLS, f"TLS with the judge failed: {e.reason or e}")
        except OSError as e:
            return _oserror_fail(e, "proxy")
        except Exception as e:  # a bug or a library surprise: keep the run going
            log.debug("unexpected error while checking", exc_info=True)
            return _Fail(Outcome.ERROR, f"{type(e).__name__}: {str(e)[:200]}")

    def _own_for(self, r: _Success) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Our addresses, plus the one this connection left from (what a proxy would leak)."""
        local = parse_ip(r.local_ip) if r.local_ip else None
        if local is None or local in self.own_ips:
            return self.own_ips
        return self.own_ips | {local}

    def _verdict(self, r: _Success | _Fail, *, anon_from: _Success | None = None) -> CheckResult:
        if isinstance(r, _Fail):
            return CheckResult(r.outcome, False, error=r.message)
        view = r.view
        own = self._own_for(r)
        # Only a forwarded request can carry headers the proxy added: a tunnel's verdict
        # stands on the address alone, whatever the judge hides.
        hidden = self.hidden_headers if r.protocol == "http" else frozenset()
        anonymity = classify_anonymity(
            view, own, self.baseline_headers, xff_hops=self.xff_hops, hidden=hidden
        )
        if anon_from is not None and anonymity != Anonymity.TRANSPARENT:
            anonymity = classify_anonymity(
                anon_from.view,
                self._own_for(anon_from),
                self.baseline_headers,
                xff_hops=self.xff_hops,
                hidden=self.hidden_headers,
            )
        exit_ip = exit_address(view, own, self.xff_hops)
        return CheckResult(
            Outcome.ALIVE,
            True,
            protocol=r.protocol,
            latency_ms=round(r.latency_ms, 2),
            anonymity=anonymity,
            exit_ip=exit_ip,
            country=country_of(exit_ip) if exit_ip else None,
        )

    # -- the three ways to talk to a proxy

    @staticmethod
    def _basic_auth(spec: ProxySpec) -> str | None:
        if spec.username is None:
            return None
        raw = f"{spec.username}:{spec.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    async def _forward(self, spec: ProxySpec, progress: _Progress, budget: float) -> _Success:
        token = os.urandom(8).hex()
        request = self._request(token, absolute=True, proxy_auth=self._basic_auth(spec))
        t0 = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.open_connection(spec.host, spec.port)
            progress.phase = "request"
            writer.write(request)
            status, headers, body = await _read_http_response(reader, progress)
            latency = (time.perf_counter() - t0) * 1000
            local_ip = _sockname_ip(writer)
        except BaseException:
            _close(writer, abort=True)
            raise
        _close(writer)
        view = self._judge_view(
            status, headers, body, token, via_proxy=True, sent_credentials=spec.username is not None
        )
        return _Success("http", view, latency, local_ip)

    async def _tunnel(
        self,
        spec: ProxySpec,
        progress: _Progress,
        budget: float,
        proxy_type: ProxyType,
        protocol: str,
    ) -> _Success:
        token = os.urandom(8).hex()
        request = self._request(token, absolute=False)
        rdns = True if proxy_type == ProxyType.SOCKS5 else None
        proxy = SocksProxy(
            proxy_type, spec.host, spec.port, spec.username, spec.password, rdns=rdns
        )
        t0 = time.perf_counter()
        stream = None
        progress.phase = "handshake"
        try:
            try:
                stream = await proxy.connect(
                    self._judge_ip if proxy_type == ProxyType.SOCKS4 else self._judge_host,
                    self._judge_port,
                    dest_ssl=self._ssl_context() if self._judge_tls else None,
                    timeout=budget,
                )
            except ProxyConnectionError as e:
                raise _oserror_fail(e, "proxy") from None
            except ProxyTimeoutError:
                raise TimeoutError from None
            except ProxyError as e:
                raise self._handshake_fail(e, protocol, spec.username is not None) from None
            except ssl.SSLError:
                raise
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                # the server hung up on (or reset) our greeting: it speaks something else
                name = "CONNECT" if protocol == "https" else protocol.upper()
                why = "reset" if isinstance(e, ConnectionError) else "closed"
                raise _Fail(
                    Outcome.BAD_RESPONSE,
                    f"not a {name} proxy ({why} the connection during the handshake)",
                    mismatch=True,
                ) from None
            progress.phase = "request"
            stream.writer.write(request)
            status, headers, body = await _read_http_response(stream.reader, progress)
            latency = (time.perf_counter() - t0) * 1000
            local_ip = _sockname_ip(stream.writer)
        except BaseException:
            if stream is not None:
                _close(stream.writer, abort=True)
            raise
        _close(stream.writer)
        view = self._judge_view(status, headers, body, token, via_proxy=False)
        return _Success(protocol, view, latency, local_ip)

    @staticmethod
    def _handshake_fail(e: ProxyError, protocol: str, sent_credentials: bool = False) -> _Fail:
        msg = str(e)
        low = msg.lower()
        code = e.error_code
        name = "CONNECT" if protocol == "https" else protocol.upper()
        if protocol == "https":
            if code == 407:
                return _Fail(Outcome.AUTH_FAILED, "proxy wants credentials (HTTP 407)")
            if code == 401 and sent_credentials:  # tinyproxy's answer to wrong ones
                return _Fail(Outcome.AUTH_FAILED, "proxy rejected the credentials (HTTP 401)")
            if code is not None:
                return _Fail(
                    Outcome.BAD_RESPONSE, f"CONNECT refused: {msg[:80]}", http_speaker=True
                )
            return _Fail(Outcome.BAD_RESPONSE, f"CONNECT reply invalid: {msg[:80]}", mismatch=True)
        if any(s in low for s in _SOCKS_AUTH_MESSAGES) or (
            protocol == "socks4" and code in _SOCKS4_AUTH_CODES
        ):
            return _Fail(Outcome.AUTH_FAILED, f"{name} authentication rejected")
        if code is not None:
            return _Fail(Outcome.BAD_RESPONSE, f"{name} proxy could not reach the judge: {msg}")
        return _Fail(Outcome.BAD_RESPONSE, f"not a {name} proxy ({msg[:80]})", mismatch=True)

    async def _connect(self, spec: ProxySpec, progress: _Progress, budget: float) -> _Success:
        return await self._tunnel(spec, progress, budget, ProxyType.HTTP, "https")

    async def _socks(
        self, spec: ProxySpec, progress: _Progress, budget: float, protocol: str
    ) -> _Success:
        return await self._tunnel(spec, progress, budget, _SOCKS_TYPES[protocol], protocol)
