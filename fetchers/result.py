"""What a fetch returns: `FetchResult` with every `Attempt` the cascade made.

Both are plain dataclasses, safe to log, print and store: a proxy appears only redacted
(`user:***@host:port`), API tokens never appear at all, and a block page is never the
`content` of a result (a failed result has empty content and says why in `blocked_reason`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fetchers.errors import ErrorType, RateLimitedError, error_class

__all__ = ["Attempt", "FetchResult"]


@dataclass(slots=True)
class Attempt:
    """One request made by one method (a retry is another attempt)."""

    method: str
    status: int | None = None  # HTTP status of the final answer; None when there was none
    error_type: ErrorType | None = None  # None: this attempt succeeded
    blocked_reason: str | None = None  # which signature matched, or what was invalid
    ms: float = 0.0
    proxy: str | None = None  # redacted
    bytes: int = 0
    message: str | None = None  # what went wrong, for people
    retry_after: float | None = None  # seconds the site asked us to wait (429)
    explored: bool = False  # a cheaper method tried again on purpose (domain learning)
    # on a page got without a browser: the browser it would have needed but for what the
    # cascade learned on its domain (cookies handed to http, a learned order); cost accounting
    avoided: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["error_type"] = str(self.error_type) if self.error_type else None
        d["ms"] = round(self.ms, 1)
        return d


@dataclass(slots=True)
class FetchResult:
    """The outcome of `fetchers.fetch(url, ...)`.

    `content` is the page (bytes; `text` decodes it) only when `success` is true.
    `method_used` is the method that produced the content (or the last one tried).
    `error_type` is the reason of the final failure (see `ErrorType`), None on success.
    """

    url: str
    success: bool
    status: int | None = None
    content: bytes = b""
    final_url: str | None = None
    method_used: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error_type: ErrorType | None = None
    error: str | None = None
    blocked_reason: str | None = None
    from_cache: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0
    country: str | None = None

    @property
    def text(self) -> str:
        """The content decoded (charset from Content-Type, else UTF-8, bad bytes replaced)."""
        charset = "utf-8"
        ctype = self.headers.get("content-type", "")
        for part in ctype.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip("\"'")
        try:
            return self.content.decode(charset, "replace")
        except LookupError:
            return self.content.decode("utf-8", "replace")

    def raise_for_error(self) -> FetchResult:
        """Raise the `fetchers.errors` class matching `error_type`; return self on success."""
        if self.success:
            return self
        etype = self.error_type or ErrorType.NETWORK
        message = self.error or f"fetch of {self.url} failed ({etype})"
        if etype == ErrorType.RATE_LIMITED:
            last = self.attempts[-1].retry_after if self.attempts else None
            raise RateLimitedError(message, retry_after=last)
        raise error_class(etype)(message, error_type=etype)

    def to_dict(self, *, content: bool = False) -> dict[str, Any]:
        """JSON-ready; the content only when asked (as text), else its length."""
        d: dict[str, Any] = {
            "url": self.url,
            "success": self.success,
            "status": self.status,
            "final_url": self.final_url,
            "method_used": self.method_used,
            "error_type": str(self.error_type) if self.error_type else None,
            "error": self.error,
            "blocked_reason": self.blocked_reason,
            "from_cache": self.from_cache,
            "country": self.country,
            "bytes": len(self.content),
            "elapsed_ms": round(self.elapsed_ms, 1),
            "attempts": [a.to_dict() for a in self.attempts],
        }
        if content:
            d["content"] = self.text
        return d
