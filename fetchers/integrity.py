"""Does this proxy hand content on as it got it? The canary check behind `tampering`.

An alive proxy may still inject ads or miners into HTML, rewrite values in JSON, strip
scripts or recompress images. Nothing in a judge's echo shows that, so after a proxy is found
alive the checker fetches a *canary* through it — known content from a server we trust — and
compares the bytes. Three resources, because tampering proxies pick their victims by
Content-Type: ``page.html`` (an HTML page with an inline script), ``data.json`` and
``pixel.png``, all under one base URL (the sim's judge serves them under ``/canary/``; any
static file server will do: see the README). They are fetched over the protocol the proxy
answered in, the three requests pipelined down one connection (one tunnel for CONNECT and
SOCKS, to a canary server that keeps connections alive): a proxy that keeps it open answers
all three on it, for one connection and about one round trip. One that closes after an
answer (tinyproxy, privoxy without keep-alive) gets the files still unanswered on fresh
connections, one each, side by side: three connections and a second round trip, as before
but for that round trip. Connections, not bytes, were what the check cost the validation
(the proxy's and ours: accepts, handshakes, tunnels).

The expected bytes are learnt at ``start()`` by fetching each resource directly, twice: a
canary whose two answers differ is refused (a dynamic page would make every proxy look like
a tamperer). A plain-HTTP canary only: through a tunnel, TLS already stops a proxy from
changing content unnoticed.

Verdicts never guess: a resource that came back complete (HTTP 200) with other bytes is
tampering (injected / stripped / rewritten, which resource, where); a resource that could
not be fetched (timeout, reset, an error status, an unknown Content-Encoding) leaves the
integrity *unknown* and the proxy alive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio.v2 import Proxy as SocksProxy

from fetchers.errors import FetchError
from fetchers.proxy_check import (
    _USER_AGENT,
    MAX_RESPONSE_BYTES,
    CheckResult,
    Outcome,
    ProxyChecker,
    _close,
    _Fail,
    _parse_http_head,
    _Progress,
    _read_http_response,
)

if TYPE_CHECKING:
    from fetchers.proxy_parse import ProxySpec

__all__ = [
    "CANARY_PATH",
    "RESOURCES",
    "CanaryError",
    "IntegrityCheck",
    "canary_for_judge",
    "describe_change",
    "resolve_canary",
]

log = logging.getLogger(__name__)

CANARY_PATH = "/canary/"
#: (name shown in verdicts, file under the canary URL, Accept header a browser would send)
RESOURCES: tuple[tuple[str, str, str], ...] = (
    ("html", "page.html", "text/html,application/xhtml+xml,*/*;q=0.8"),
    ("json", "data.json", "application/json,*/*;q=0.8"),
    ("image", "pixel.png", "image/avif,image/webp,image/png,*/*;q=0.8"),
)
OFF = "off"
_TUNNEL_TYPES = {"https": ProxyType.HTTP, "socks4": ProxyType.SOCKS4, "socks5": ProxyType.SOCKS5}


class CanaryError(FetchError):
    """The canary cannot be used (not served, not deterministic, not plain HTTP)."""


# --------------------------------------------------------------------------- comparison


def _json_path(a: object, b: object, path: str = "$") -> str | None:
    """Where two JSON documents first differ, with both values (None: equal)."""
    if type(a) is not type(b):
        return f"{path} ({json.dumps(a)[:40]} → {json.dumps(b)[:40]})"
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{path}.{key} ({'added' if key in b else 'removed'})"
            if (found := _json_path(a[key], b[key], f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} ({len(a)} → {len(b)} items)"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (found := _json_path(x, y, f"{path}[{i}]")) is not None:
                return found
        return None
    return None if a == b else f"{path} ({json.dumps(a)[:40]} → {json.dumps(b)[:40]})"


def describe_change(expected: bytes, got: bytes) -> str | None:
    """None when identical, else what changed: ``injected N bytes (a <script>) at byte P``,
    ``stripped N bytes … at byte P`` or ``rewritten …`` (a JSON path when both parse)."""
    if got == expected:
        return None
    short = min(len(expected), len(got))
    p = 0
    while p < short and expected[p] == got[p]:
        p += 1
    s = 0
    while s < short and expected[-1 - s] == got[-1 - s]:
        s += 1
    # One inserted (or removed) block if prefix and suffix cover the shorter side; placed as
    # far left as it fits, so `<script>` injected before `</body>` starts at its `<`.
    if p + s >= short:
        at = short - s
        if len(got) > len(expected):
            part, verb = got[at : at + len(got) - len(expected)], "injected"
        else:
            part, verb = expected[at : at + len(expected) - len(got)], "stripped"
        p = at
    else:
        try:
            where = _json_path(json.loads(expected), json.loads(got))
        except ValueError:
            where = None
        if where is not None:
            return f"rewritten at {where}"
        return f"rewritten from byte {p} ({len(expected)} → {len(got)} bytes)"
    what = " (a <script>)" if b"<script" in part.lower() else ""
    return f"{verb} {len(part)} bytes{what} at byte {p}"


def _decoded(headers: dict[str, str], body: bytes) -> bytes:
    """The body without a Content-Encoding a proxy may add on its own (we ask for identity)."""
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise _Fail(Outcome.BAD_RESPONSE, f"answered in Content-Encoding {coding!r}")


# --------------------------------------------------------------------------- the check


def canary_for_judge(judge_url: str) -> str | None:
    """The canary a judge's own server would serve (``/canary/`` beside it), for http judges."""
    u = urlsplit(judge_url)
    if u.scheme != "http" or not u.netloc:
        return None
    return f"http://{u.netloc}{CANARY_PATH}"


@dataclass(frozen=True, slots=True)
class _Resource:
    name: str
    path: str  # origin-form target
    accept: str
    expected: bytes


class IntegrityCheck:
    """Fetch the canary through alive proxies and compare (``ProxyChecker(integrity=…)``).

    canary_url: base URL of the three resources (``http://host:port/canary/``).
    timeout: seconds for one direct fetch at ``start()``; checks through a proxy use what is
        left of the checker's budget for that proxy.
    """

    def __init__(self, canary_url: str, timeout: float = 5.0) -> None:
        u = urlsplit(canary_url)
        if u.scheme != "http" or not u.hostname:
            raise CanaryError(
                f"canary URL {canary_url!r} must be a plain http:// URL (a proxy cannot "
                "change TLS content unnoticed), e.g. http://127.0.0.2:8080/canary/"
            )
        self.canary_url = canary_url if canary_url.endswith("/") else canary_url + "/"
        self.timeout = float(timeout)
        self._host = u.hostname
        self._port = u.port or 80
        self._host_header = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        if u.port not in (None, 80):
            self._host_header += f":{u.port}"
        self._base_path = urlsplit(self.canary_url).path
        self._ip = self._host
        self.resources: tuple[_Resource, ...] = ()

    async def start(self) -> None:
        """Learn the expected bytes: each resource fetched directly, twice, must agree."""
        if self.resources:
            return
        learnt = []
        for name, file, accept in RESOURCES:
            path = self._base_path + file
            answers = [await self._direct(path, accept) for _ in range(2)]
            if answers[0] != answers[1]:
                raise CanaryError(
                    f"canary {self.canary_url}{file} changes between requests: it must be "
                    "a static file"
                )
            learnt.append(_Resource(name, path, accept, answers[0]))
        self.resources = tuple(learnt)
        log.info("integrity canary ready", extra={"canary": self.canary_url})

    async def _direct(self, path: str, accept: str) -> bytes:
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self._host, self._port)
                writer.write(self._request(path, accept, absolute=False))
                status, headers, body = await _read_http_response(reader, _Progress())
                peer = writer.get_extra_info("peername")
        except (OSError, TimeoutError, _Fail) as e:
            reason = e.message if isinstance(e, _Fail) else (str(e) or type(e).__name__)
            raise CanaryError(f"cannot fetch the canary {self.canary_url}: {reason}") from e
        finally:
            _close(writer)
        if status != 200:
            raise CanaryError(
                f"canary {self.canary_url} answered HTTP {status} for {path}: serve "
                + ", ".join(f for _, f, _ in RESOURCES)
                + " there"
            )
        if peer:
            self._ip = peer[0]  # SOCKS4 carries no host names
        return _decoded(headers, body)

    def _request(
        self,
        path: str,
        accept: str,
        *,
        absolute: bool,
        proxy_auth: str | None = None,
        keep_alive: bool = False,
    ) -> bytes:
        target = f"http://{self._host_header}{path}" if absolute else path
        auth = f"Proxy-Authorization: {proxy_auth}\r\n" if proxy_auth else ""
        return (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {self._host_header}\r\n"
            f"User-Agent: {_USER_AGENT}\r\n"
            f"Accept: {accept}\r\n"
            "Accept-Encoding: identity\r\n"
            f"{auth}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode("latin-1")

    async def verify(self, spec: ProxySpec, result: CheckResult, deadline: float) -> CheckResult:
        """The verdict on an alive proxy, with its integrity: ``intact``, ``unknown`` (the
        reason in ``error``) or ``tampering`` (outcome ``tampering``, not alive, what changed
        in ``error``)."""
        if not self.resources:
            await self.start()
        budget = min(self.timeout, deadline - asyncio.get_running_loop().time())
        if budget <= 0:
            return _unknown(result, "no time left within the overall cap")
        answers = await self._fetch(spec, result.protocol or "http", budget)
        changed = [f"{r.name} {a}" for r, (same, a) in zip(self.resources, answers, strict=True)
                   if same is False]  # fmt: skip
        if changed:
            result.outcome = Outcome.TAMPERING
            result.alive = False
            result.integrity = "tampering"
            result.error = "content modified: " + "; ".join(changed)
            return result
        unknown = [f"{r.name}: {a}" for r, (same, a) in zip(self.resources, answers, strict=True)
                   if same is None]  # fmt: skip
        if unknown:
            return _unknown(result, "; ".join(unknown))
        result.integrity = "intact"
        return result

    async def _fetch(self, spec: ProxySpec, protocol: str, budget: float) -> list[_Answer]:
        """Every resource's answer, in order: all three requests pipelined down one connection
        to the proxy (one tunnel for CONNECT and SOCKS), so a proxy that keeps connections
        alive costs one connection and one round trip. When the proxy closes after an answer
        (no keep-alive), the ones still unanswered go on fresh connections, one each, side by
        side, as they all did before: the same verdicts for one more round trip (a slow proxy
        whose two round trips outlast the budget is then unknown, never wrongly judged)."""
        end = asyncio.get_running_loop().time() + budget
        answers, why = await self._session(spec, protocol, self.resources, end, budget)
        rest = self.resources[len(answers) :]
        if not rest:
            return answers
        if not answers or why.startswith(_NO_TIME):  # the proxy failed us, or time is up
            return [*answers, *((None, why) for _ in rest)]
        more = await asyncio.gather(
            *(self._session(spec, protocol, (r,), end, budget) for r in rest)
        )
        return answers + [got[0] if got else (None, w) for got, w in more]

    async def _session(
        self,
        spec: ProxySpec,
        protocol: str,
        resources: tuple[_Resource, ...],
        end: float,
        budget: float,
    ) -> tuple[list[_Answer], str]:
        """One connection carrying ``resources`` pipelined: the answers of those answered
        before it ended, and why it ended early ("" when all were)."""
        answers: list[_Answer] = []
        writer: asyncio.StreamWriter | None = None
        why, ended = "", False
        try:
            async with asyncio.timeout_at(end):
                reader, writer = await self._connect(spec, protocol, end)
                auth = ProxyChecker._basic_auth(spec) if protocol == "http" else None
                last = len(resources) - 1
                writer.write(b"".join(
                    self._request(r.path, r.accept, absolute=protocol == "http",
                                  proxy_auth=auth, keep_alive=i < last)
                    for i, r in enumerate(resources)
                ))  # fmt: skip
                for res in resources:
                    status, headers, body, reusable = await _read_one_response(reader)
                    answers.append(_compare(res, status, headers, body))
                    if not reusable:
                        break
            ended = True
        except _Fail as f:
            why = f.message
        except TimeoutError:
            why = f"{_NO_TIME} {budget:.3g} s"
        except (OSError, ProxyError, ssl.SSLError) as e:
            why = f"{type(e).__name__}: {str(e)[:80]}"
        finally:  # cancelled too: never leave a connection open
            _close(writer, abort=not ended)
        if not why and len(answers) < len(resources):
            why = "the proxy closed the connection after an answer"
        return answers, why

    async def _connect(
        self, spec: ProxySpec, protocol: str, end: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the proxy (``http``: it forwards our requests) or a tunnel through
        it to the canary's server (CONNECT, SOCKS)."""
        if protocol == "http":
            return await asyncio.open_connection(spec.host, spec.port)
        proxy_type = _TUNNEL_TYPES[protocol]
        proxy = SocksProxy(
            proxy_type,
            spec.host,
            spec.port,
            spec.username,
            spec.password,
            rdns=True if proxy_type == ProxyType.SOCKS5 else None,
        )
        host = self._ip if proxy_type == ProxyType.SOCKS4 else self._host
        timeout = max(0.001, end - asyncio.get_running_loop().time())
        try:
            stream = await proxy.connect(host, self._port, timeout=timeout)
        except ProxyTimeoutError:
            raise TimeoutError from None
        return stream.reader, stream.writer


_Answer = tuple[bool | None, str]  # (True, "") same bytes; (False, what changed); (None, why not)
_NO_TIME = "no complete answer within"


def _compare(res: _Resource, status: int, headers: dict[str, str], body: bytes) -> _Answer:
    """One resource's answer against the bytes learnt at start."""
    if status != 200:
        return None, f"HTTP {status}"
    try:
        change = describe_change(res.expected, _decoded(headers, body))
    except _Fail as f:
        return None, f.message
    except zlib.error as e:
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    return (True, "") if change is None else (False, change)


def _tokens(headers: dict[str, str], name: str) -> set[str]:
    return {t.strip().lower() for t in headers.get(name, "").split(",")}


async def _read_one_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes, bool]:
    """Exactly one HTTP/1.x response, not a byte more (the next one may follow on the same
    connection): status, headers, body, and whether the connection can carry another
    (framed body, and neither side said ``close``; HTTP/1.0 only with ``keep-alive``)."""
    head = b""
    for _ in range(3):  # a CONNECT reply's last CRLF may arrive late: skip it
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).lstrip(b"\r\n")
        except asyncio.IncompleteReadError as e:
            _no_head(e.partial.lstrip(b"\r\n"))
        except asyncio.LimitOverrunError:
            raise _Fail(Outcome.BAD_RESPONSE, "reply head larger than 64 KB") from None
        except ConnectionResetError:
            raise _Fail(Outcome.BAD_RESPONSE, "connection reset without a reply") from None
        if head:
            break
    if not head.startswith(b"HTTP/"):
        raise _Fail(Outcome.BAD_RESPONSE, "reply is not HTTP")
    status, headers = _parse_http_head(head, len(head) - 4)
    conn = _tokens(headers, "connection") | _tokens(headers, "proxy-connection")
    keep = "keep-alive" in conn if head.startswith(b"HTTP/1.0") else "close" not in conn
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, complete = await _read_chunked(reader)
        elif (length := headers.get("content-length", "")).isdigit():
            body, complete = await _read_upto(reader, int(length))
        elif status in (204, 304) or status < 200:
            body, complete = b"", True
        else:  # delimited by the end of the connection: nothing can follow it
            body, complete = (await _read_upto(reader, MAX_RESPONSE_BYTES + 1))[0], False
            if len(body) > MAX_RESPONSE_BYTES:
                raise _Fail(Outcome.BAD_RESPONSE, "reply larger than 64 KB")
    except ConnectionResetError:
        raise _Fail(Outcome.BAD_RESPONSE, "connection reset mid-reply") from None
    # Cut short by the end of the connection: compared as it came, as when every canary
    # fetch read to the end of its own connection; nothing more comes down this one.
    return status, headers, body, keep and complete


async def _read_upto(reader: asyncio.StreamReader, n: int) -> tuple[bytes, bool]:
    """``n`` bytes, or fewer if the connection ends first (then False)."""
    if n > MAX_RESPONSE_BYTES + 1:
        raise _Fail(Outcome.BAD_RESPONSE, "reply larger than 64 KB")
    try:
        return await reader.readexactly(n), True
    except asyncio.IncompleteReadError as e:
        return e.partial, False


def _no_head(partial: bytes) -> None:
    """The connection ended before a complete response head: say how far it got."""
    if not partial:
        raise _Fail(Outcome.BAD_RESPONSE, "connection closed without a reply")
    if not partial.startswith(b"HTTP/"[: len(partial)]):
        raise _Fail(Outcome.BAD_RESPONSE, "reply is not HTTP")
    raise _Fail(Outcome.BAD_RESPONSE, "reply ended inside the HTTP headers")


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body up to and with its last chunk and trailers, at most 64 KB; cut short
    by the end of the connection, what came (then False)."""
    body = bytearray()
    try:
        for _ in range(MAX_RESPONSE_BYTES + 1):  # every chunk holds a byte but the last
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise _Fail(Outcome.BAD_RESPONSE, "malformed chunked body") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return bytes(body), True
            if len(body) + size > MAX_RESPONSE_BYTES:
                raise _Fail(Outcome.BAD_RESPONSE, "reply larger than 64 KB")
            chunk, complete = await _read_upto(reader, size + 2)
            body += chunk[:size]
            if not complete:
                return bytes(body), False
    except asyncio.IncompleteReadError:
        return bytes(body), False
    except asyncio.LimitOverrunError:
        raise _Fail(Outcome.BAD_RESPONSE, "malformed chunked body") from None
    raise _Fail(Outcome.BAD_RESPONSE, "malformed chunked body")


def _unknown(result: CheckResult, why: str) -> CheckResult:
    result.integrity = "unknown"
    result.error = f"integrity unknown: {why}"
    return result


async def resolve_canary(option: str | None, judge_url: str, timeout: float) -> str | None:
    """The canary URL a run uses: ``off`` → None; a URL → that one (CanaryError when it does
    not serve a usable canary); None → the judge's server's ``/canary/`` when it serves one,
    else None (integrity unknown, never a wrong verdict)."""
    if option is not None and option.strip().lower() == OFF:
        return None
    url = option.strip() if option else canary_for_judge(judge_url)
    if url is None:
        return None
    check = IntegrityCheck(url, timeout)
    try:
        await check.start()
    except CanaryError:
        if option:
            raise
        log.info("no canary beside the judge: integrity not checked", extra={"canary": url})
        return None
    return check.canary_url
