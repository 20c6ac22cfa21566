"""`http`: curl_cffi with browser impersonation.

curl_cffi drives curl-impersonate: the TLS handshake, HTTP/2 settings and the default
header set (User-Agent, sec-ch-ua client hints, Accept, Sec-Fetch-*, Accept-Language, in the
browser's order) all come from one browser profile (`settings.impersonate`, default the
newest Chrome it knows), so what the site sees is consistent. Plain `http://` goes out as
HTTP/1.1 (`v2tls`), as a browser does, not with an `Upgrade: h2c` no browser sends.

When the cascade hands over cookies a browser earned, it also hands the browser's
User-Agent: we send that one and rewrite the client hints to match it (same brand, version
and platform), because a clearance cookie is only honoured with the User-Agent it was
issued to (shared/reference/block-signatures.md).

Proxies: `http://`, `https://` (CONNECT), `socks4://`, `socks5://` with optional
`user:pass@`; SOCKS goes as `socks5h`/`socks4a` so names are resolved by the proxy (and
`localhost` never turns into ::1). One `AsyncSession` per event loop, its cookie jar kept
across requests (cookies set by a site come back to it).

A request with `max_bytes` (file downloads) is streamed: refused when its Content-Length is
over the limit, cut off as soon as more than the limit has arrived (`TooLarge`); a 2 GB link
never lands in memory. Without it, a page is bounded by `settings.max_page_bytes`: its body
is collected by curl's write callback (no stream task per request) and the transfer is
aborted once more than the limit has arrived, also `TooLarge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from fetchers.errors import AttemptError, FetchTimeout, NetworkFailure, ProxyFailure, TooLarge
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse, Requirement

if TYPE_CHECKING:
    from fetchers.config import FetchSettings

__all__ = ["CurlClient", "HttpMethod", "client_hints", "curl_proxy_url", "scrub"]

_CHROME = re.compile(r"(?:Chrome|Chromium|CriOS)/(\d+)")
CURL_REQUIREMENT = Requirement(
    "curl_cffi (browser impersonation)", "python", "curl_cffi", "pip: curl_cffi"
)


def curl_proxy_url(proxy: str | None) -> str | None:
    """socks5:// → socks5h://, socks4:// → socks4a:// (DNS through the proxy)."""
    if not proxy:
        return None
    scheme, sep, rest = proxy.partition("://")
    if not sep:
        return f"http://{proxy}"
    scheme = {"socks5": "socks5h", "socks4": "socks4a", "socks": "socks5h"}.get(
        scheme.lower(), scheme.lower()
    )
    return f"{scheme}://{rest}"


def scrub(message: str, *secrets: str | None) -> str:
    """Remove secrets (a proxy URL, its password, a token) from an error message."""
    for secret in secrets:
        if not secret:
            continue
        if "://" in secret:
            parts = urlsplit(secret)
            if parts.password:
                message = message.replace(secret, _redacted_url(secret))
                for pw in {parts.password, unquote(parts.password)}:
                    message = message.replace(pw, "***")
        elif len(secret) >= 3:
            message = message.replace(secret, "***")
    return message


def _redacted_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def client_hints(user_agent: str) -> dict[str, str]:
    """sec-ch-ua headers matching a User-Agent (empty for browsers that send none)."""
    m = _CHROME.search(user_agent)
    if not m:
        return {}
    major = m.group(1)
    if "Edg/" in user_agent:
        brands = f'"Microsoft Edge";v="{major}", "Chromium";v="{major}", "Not_A Brand";v="24"'
    elif "Chrome/" in user_agent and "Chromium/" not in user_agent and "Linux" not in user_agent:
        brands = f'"Google Chrome";v="{major}", "Chromium";v="{major}", "Not_A Brand";v="24"'
    else:
        brands = f'"Chromium";v="{major}", "Not_A Brand";v="24"'
    if "Android" in user_agent:
        platform = "Android"
    elif "Windows" in user_agent:
        platform = "Windows"
    elif "Mac OS X" in user_agent:
        platform = "macOS"
    elif "CrOS" in user_agent:
        platform = "Chrome OS"
    else:
        platform = "Linux"
    return {
        "sec-ch-ua": brands,
        "sec-ch-ua-mobile": "?1" if "Mobile" in user_agent else "?0",
        "sec-ch-ua-platform": f'"{platform}"',
    }


def _headers_dict(raw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    items = raw.multi_items() if hasattr(raw, "multi_items") else raw.items()
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def translate(exc: BaseException, proxy: str | None, *secrets: str | None) -> AttemptError:
    """A curl_cffi exception as one of ours, with secrets scrubbed from the message."""
    from curl_cffi.requests import exceptions as cx

    message = scrub(f"{type(exc).__name__}: {exc}", proxy, *secrets)
    if isinstance(exc, cx.Timeout | asyncio.TimeoutError):
        return FetchTimeout(message)
    if isinstance(exc, cx.ProxyError):
        return ProxyFailure(message)
    if proxy and isinstance(exc, cx.ConnectionError):
        host = urlsplit(proxy).hostname or ""
        text = str(exc)
        if host and host in text and ("connect" in text.lower() or "proxy" in text.lower()):
            return ProxyFailure(message)
        if "SOCKS" in text or "CONNECT" in text:
            return ProxyFailure(message)
    return NetworkFailure(message)


class _Capped:
    """The session as `CurlClient.request` calls it when the request has `max_bytes`.

    `request` streams (curl_cffi `stream=True`): it refuses an answer whose Content-Length is
    over the limit before reading its body, reads the body chunk by chunk (`aiter_content`)
    and stops the transfer as soon as more than the limit has arrived, raising `TooLarge`.
    Under the limit, the response comes back with `content` filled, like a plain request.
    The limit counts the body as `content` holds it (decoded when it came compressed).
    """

    __slots__ = ("headers", "limit", "session")

    def __init__(self, session: Any, limit: int) -> None:
        self.session = session
        self.headers = session.headers  # the session's default headers (User-Agent lookup)
        self.limit = limit

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        r = await self.session.request(method, url, stream=True, **kwargs)
        limit = self.limit
        chunks: list[bytes] = []
        try:
            length = r.headers.get("content-length")
            announced = int(length) if length and length.isdigit() else None
            if announced is not None and announced > limit:
                what = f"Content-Length {announced:,} > max_bytes {limit:,}: not downloaded"
                raise _too_large(r, limit, 0, announced, what)
            received = 0
            async with contextlib.aclosing(r.aiter_content()) as body:
                async for chunk in body:
                    received += len(chunk)
                    if received > limit:
                        what = f"over max_bytes {limit:,}: transfer stopped at {received:,} bytes"
                        raise _too_large(r, limit, received, announced, what)
                    chunks.append(chunk)
        finally:
            await _stop(r)
        r.content = b"".join(chunks)
        return r


def _too_large(r: Any, limit: int, received: int, announced: int | None, what: str) -> TooLarge:
    return TooLarge(
        f"{what} (raise max_bytes to keep such files)",
        limit=limit,
        received=received,
        announced=announced,
        status=r.status_code,
        headers=_headers_dict(r.headers),
    )


_CURL_WRITEFUNC_ERROR = 0xFFFFFFFF  # what a write callback returns to abort the transfer


class _PageBody:
    """curl's write callback for a page: keeps the body until it passes `limit`, then makes
    curl abort the transfer (a write error the client turns into `TooLarge`)."""

    __slots__ = ("chunks", "limit", "received")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes) -> int:
        self.received += len(chunk)
        if self.received > self.limit:
            return _CURL_WRITEFUNC_ERROR
        self.chunks.append(chunk)
        return len(chunk)

    @property
    def over(self) -> bool:
        return self.received > self.limit

    def too_large(self, response: Any) -> TooLarge:
        status = getattr(response, "status_code", None) or None
        headers = _headers_dict(response.headers) if status else {}
        return TooLarge(
            f"page over max_page_bytes {self.limit:,}: transfer stopped at {self.received:,} "
            "bytes (raise FETCHFLEET_MAX_PAGE_BYTES to keep such pages)",
            limit=self.limit,
            received=self.received,
            status=status,
            headers=headers,
        )


async def _stop(r: Any) -> None:
    """End a streamed transfer now, whatever the server does next.

    `quit_now` makes curl's write callback refuse the next chunk (curl_cffi's own abort
    flag); cancelling the transfer task takes the handle out of curl's multi handle at once
    (curl_cffi's cleanup releases it), which closes the connection even when no more data
    comes. A finished transfer is left alone.
    """
    task = r.astream_task
    if task is None or task.done():
        return
    if r.quit_now is not None:
        r.quit_now.set()
    task.cancel()
    await asyncio.wait((task,))


class CurlClient:
    """An AsyncSession per event loop, with our request defaults and error translation.

    Shared by the http, tor and api methods.
    """

    def __init__(self, settings: FetchSettings, *, max_clients: int = 64) -> None:
        self.settings = settings
        self.max_clients = max_clients
        self._sessions: dict[asyncio.AbstractEventLoop, Any] = {}

    def session(self) -> Any:
        from curl_cffi.requests import AsyncSession

        loop = asyncio.get_running_loop()
        s = self._sessions.get(loop)
        if s is None:
            for old in [lp for lp in self._sessions if lp.is_closed()]:
                self._sessions.pop(old, None)
            s = AsyncSession(
                impersonate=self.settings.impersonate,
                max_clients=self.max_clients,
                trust_env=False,  # proxies come from the caller, never from the environment
            )
            self._sessions[loop] = s
        return s

    async def request(
        self,
        request: FetchRequest,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        impersonate: bool = True,
        secrets: tuple[str | None, ...] = (),
    ) -> RawResponse:
        proxy = curl_proxy_url(request.proxy)
        send: dict[str, str] = {}
        if request.user_agent:
            send["User-Agent"] = request.user_agent
            send.update(client_hints(request.user_agent))
        send.update(request.headers)
        if headers:
            send.update(headers)
        session = self.session()
        body: _PageBody | None = None
        extra: dict[str, Any] = {}
        if request.max_bytes is not None:
            session = _Capped(session, request.max_bytes)
        else:
            body = _PageBody(self.settings.max_page_bytes)
            extra["content_callback"] = body
        try:
            r = await session.request(
                method,
                request.url,
                headers=send or None,
                cookies=dict(request.cookies) or None,
                proxy=proxy,
                timeout=request.timeout_s,
                allow_redirects=True,
                max_redirects=10,
                http_version="v2tls",
                impersonate=self.settings.impersonate if impersonate else None,
                default_headers=impersonate,
                **extra,
            )
        except Exception as exc:
            if body is not None and body.over:
                raise body.too_large(getattr(exc, "response", None)) from None
            if isinstance(exc, OSError | asyncio.TimeoutError) or type(exc).__module__.startswith(
                "curl_cffi"
            ):
                raise translate(exc, proxy, request.proxy, *secrets) from None
            raise
        ua = send.get("User-Agent")
        if not ua and r.request is not None and (send or session.headers):
            # the request headers are the session's and ours: with neither, no User-Agent to read
            ua = r.request.headers.get("User-Agent")
        return RawResponse(
            status=r.status_code,
            content=r.content if body is None else b"".join(body.chunks),
            headers=_headers_dict(r.headers),
            final_url=str(r.url),
            cookies={k: v for k, v in r.cookies.items()},
            user_agent=ua,
        )

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        loop = asyncio.get_running_loop()
        for lp, s in sessions.items():
            if lp is loop:
                await s.close()


class HttpMethod(FetchMethod):
    """Stealth HTTP: one curl_cffi session, browser impersonation, proxies, cookies."""

    name = "http"

    def __init__(self, settings: FetchSettings) -> None:
        super().__init__(settings)
        self.client = CurlClient(settings, max_clients=settings.http_max_clients)

    def requirements(self) -> list[Requirement]:
        return [CURL_REQUIREMENT]

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.check_available()
        return await self.client.request(request)

    async def aclose(self) -> None:
        await self.client.aclose()
