"""Which plain-HTTP answers the gateway may keep, on top of `fetchers.cache.ResponseCache`
(TTL or LRU, bounded in entries).

Cached: GET requests without credentials or cookies (`Authorization`, `Cookie`), whose answer
is a 200 that does not say `no-store`, `private` or `no-cache`, sets no cookie, does not vary
on everything, and fits in `max_bytes`. A request with `Cache-Control: no-cache`/`no-store`
(or `Pragma: no-cache`) skips the lookup. The key holds the country a request asked for: a
page seen from Malaysia is not served to a request for India.
"""

from __future__ import annotations

from engine.gateway.http import Request, Response
from fetchers.cache import ResponseCache
from fetchers.result import FetchResult

_UNCACHEABLE_RESPONSE = ("no-store", "private", "no-cache")
_STATUS = "\0status"  # the status line, kept among the stored headers


def request_cacheable(req: Request) -> bool:
    if req.method != "GET" or req.body:
        return False
    names = {k.lower() for k, _ in req.headers}
    return not names & {"authorization", "cookie"}


def lookup_allowed(req: Request) -> bool:
    cc = (req.header("cache-control") or "").lower()
    return not (
        "no-cache" in cc or "no-store" in cc or "no-cache" in (req.header("pragma") or "").lower()
    )


def response_cacheable(resp: Response, max_bytes: int) -> bool:
    if resp.status != 200 or not resp.complete or len(resp.body) > max_bytes:
        return False
    h = resp.lower_headers()
    cc = h.get("cache-control", "").lower()
    if any(word in cc for word in _UNCACHEABLE_RESPONSE):
        return False
    return "set-cookie" not in h and h.get("vary", "").strip() != "*"


class GatewayCache:
    def __init__(self, kind: str, size: int, ttl_s: float, max_bytes: int = 1 << 20) -> None:
        self.store = ResponseCache(kind, size, ttl_s)  # type: ignore[arg-type]
        self.max_bytes = max_bytes

    @staticmethod
    def key(req: Request, country: str | None) -> str:
        return f"{country or '*'} {req.url}"

    def get(self, key: str) -> Response | None:
        hit = self.store.get(key)
        if hit is None:
            return None
        status, version, reason = hit.headers[_STATUS].split(" ", 2)
        headers = [(k, v) for k, v in hit.headers.items() if k != _STATUS]
        return Response(int(status), reason, version, headers, hit.content)

    def put(self, key: str, resp: Response) -> bool:
        if not response_cacheable(resp, self.max_bytes):
            return False
        headers = {k: v for k, v in resp.headers}
        headers[_STATUS] = f"{resp.status} {resp.version} {resp.reason or 'OK'}"
        self.store.put(key, FetchResult(url=key, success=True, status=resp.status,
                                        content=resp.body, headers=headers))  # fmt: skip
        return True

    def __len__(self) -> int:
        return len(self.store)
