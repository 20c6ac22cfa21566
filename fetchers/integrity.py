"""Does this proxy hand content on as it got it? The canary check behind `tampering`.

An alive proxy may still inject ads or miners into HTML, rewrite values in JSON, strip
scripts or recompress images. Nothing in a judge's echo shows that, so after a proxy is found
alive the checker fetches a *canary* through it — known content from a server we trust — and
compares the bytes. Three resources, because tampering proxies pick their victims by
Content-Type: ``page.html`` (an HTML page with an inline script), ``data.json`` and
``pixel.png``, all under one base URL (the sim's judge serves them under ``/canary/``; any
static file server will do: see the README). They are fetched concurrently, one connection
each, over the protocol the proxy answered in, so the check costs three small requests per
alive proxy and about one round trip of latency.

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
    CheckResult,
    Outcome,
    ProxyChecker,
    _close,
    _Fail,
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
        self, path: str, accept: str, *, absolute: bool, proxy_auth: str | None = None
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
            "Connection: close\r\n\r\n"
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
        answers = await asyncio.gather(
            *(self._through(spec, result.protocol or "http", r, budget) for r in self.resources)
        )
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

    async def _through(
        self, spec: ProxySpec, protocol: str, res: _Resource, budget: float
    ) -> tuple[bool | None, str]:
        """(True, "") same bytes; (False, what changed); (None, why we cannot tell)."""
        try:
            async with asyncio.timeout(budget):
                if protocol == "http":
                    status, headers, body = await self._forward(spec, res)
                else:
                    status, headers, body = await self._tunnel(spec, res, protocol, budget)
            if status != 200:
                return None, f"HTTP {status}"
            change = describe_change(res.expected, _decoded(headers, body))
        except _Fail as f:
            return None, f.message
        except TimeoutError:
            return None, f"no complete answer within {budget:.3g} s"
        except (OSError, ProxyError, zlib.error, ssl.SSLError) as e:
            return None, f"{type(e).__name__}: {str(e)[:80]}"
        return (True, "") if change is None else (False, change)

    async def _forward(self, spec: ProxySpec, res: _Resource) -> tuple[int, dict[str, str], bytes]:
        auth = ProxyChecker._basic_auth(spec)
        writer = None
        try:
            reader, writer = await asyncio.open_connection(spec.host, spec.port)
            writer.write(self._request(res.path, res.accept, absolute=True, proxy_auth=auth))
            answer = await _read_http_response(reader, _Progress())
        except BaseException:
            _close(writer, abort=True)
            raise
        _close(writer)
        return answer

    async def _tunnel(
        self, spec: ProxySpec, res: _Resource, protocol: str, budget: float
    ) -> tuple[int, dict[str, str], bytes]:
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
        stream = None
        try:
            try:
                stream = await proxy.connect(host, self._port, timeout=budget)
            except ProxyTimeoutError:
                raise TimeoutError from None
            stream.writer.write(self._request(res.path, res.accept, absolute=False))
            answer = await _read_http_response(stream.reader, _Progress())
        except BaseException:
            if stream is not None:
                _close(stream.writer, abort=True)
            raise
        _close(stream.writer)
        return answer


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
