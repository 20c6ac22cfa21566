"""The exceptions of `fetchers`, one small hierarchy.

Everything `fetchers` raises on purpose derives from `FetchError`, so a caller (the engine, a
page) can catch one class and show `str(exc)`: every message says what was wrong and what to
do about it. Exceptions of the libraries underneath (OSError, python-socks, ssl) are translated
at the boundary where they occur; the proxy checker does not raise for a dead or bad proxy at
all — that is a normal `CheckResult` with an outcome.

    FetchError
    ├── ProxyParseError    a proxy list line or file cannot be read as proxies
    ├── JudgeFormatError   a proxy judge's answer is in no format we understand
    └── AttemptError       one fetch attempt failed; `error_type` says how (the cascade
        │                  decides on it: retry, next method, or stop)
        ├── MethodUnavailable  the method cannot run here (no Chromium, no tor, no API spec)
        ├── FetchTimeout       no complete answer in time
        ├── ProxyFailure       the proxy refused, failed or is unreachable
        ├── NetworkFailure     connection refused/reset, DNS, TLS, empty reply
        ├── BlockedError       a block page: challenge, captcha, access denied
        ├── RateLimitedError   429 (or a rate-limit page); `retry_after` when the site said
        ├── InvalidContent     an answer, but not the page wanted (too short, selector missing)
        └── TooLarge           the body is over the caller's `max_bytes` or the fetchers'
                               `max_page_bytes` (transfer stopped)

Fetch methods raise the transport classes (unavailable, timeout, proxy, network) and
`TooLarge`; the validator turns answers into verdicts (blocked, rate limited, invalid).
`FetchResult` never raises on its own: `result.raise_for_error()` raises the class matching
its `error_type`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AttemptError",
    "BlockedError",
    "ErrorType",
    "FetchError",
    "FetchTimeout",
    "InvalidContent",
    "JudgeFormatError",
    "MethodUnavailable",
    "NetworkFailure",
    "ProxyFailure",
    "ProxyParseError",
    "RateLimitedError",
    "TooLarge",
    "error_class",
]


class FetchError(Exception):
    """Base class of every error raised on purpose by `fetchers`."""


class ProxyParseError(FetchError, ValueError):
    """A proxy line (or a whole proxy list file) cannot be parsed.

    `field` names the part that is wrong (`"scheme"`, `"host"`, `"port"`, `"credentials"`,
    `"line"` or `"file"`); the message says what was found and what is expected. Messages
    never contain the password of the line.
    """

    def __init__(self, message: str, *, field: str = "line") -> None:
        super().__init__(message)
        self.field = field


class JudgeFormatError(FetchError):
    """A proxy judge answered something that is not httpbin JSON, azenv text or a bare IP.

    Usually the proxy returned its own page (a login portal, an error page, an ad) instead of
    relaying the judge, or the judge URL does not point at a judge.
    """


class ErrorType(StrEnum):
    """How one attempt (or a whole fetch) failed. The cascade's decisions hang on it:

    - transient, retried on the same method with backoff: `timeout`, `network`, `proxy`
      (with another proxy when a pool is used), `server_error` (5xx without block markers),
      `rate_limited` (after its Retry-After, when that is short enough);
    - the method cannot get this page, try the next one: `blocked`, `invalid`, `http_error`
      (other 4xx), `unavailable`;
    - final, no other method will do better: `not_found` (404, 410), `too_large` (the body
      is over the `max_bytes` the caller set, or over `max_page_bytes`).
    """

    BLOCKED = "blocked"
    RATE_LIMITED = "rate_limited"
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    HTTP_ERROR = "http_error"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    PROXY = "proxy"
    NETWORK = "network"
    UNAVAILABLE = "unavailable"
    TOO_LARGE = "too_large"

    @property
    def transient(self) -> bool:
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {
        ErrorType.TIMEOUT,
        ErrorType.NETWORK,
        ErrorType.PROXY,
        ErrorType.SERVER_ERROR,
        ErrorType.RATE_LIMITED,
    }
)


class AttemptError(FetchError):
    """One attempt failed; the subclass (and `error_type`) says how."""

    error_type: ErrorType = ErrorType.NETWORK

    def __init__(self, message: str, *, error_type: ErrorType | None = None) -> None:
        super().__init__(message)
        if error_type is not None:
            self.error_type = error_type


class MethodUnavailable(AttemptError):
    """The method cannot run on this machine or for this request (Scrapy's NotConfigured):
    a package or binary is missing, no tor answers, no API was described. The message says
    what to install or set."""

    error_type = ErrorType.UNAVAILABLE


class FetchTimeout(AttemptError):
    """No complete answer within the timeout: raise the timeout or try later."""

    error_type = ErrorType.TIMEOUT


class ProxyFailure(AttemptError):
    """The proxy failed (refused, authentication, unreachable, bad handshake)."""

    error_type = ErrorType.PROXY


class NetworkFailure(AttemptError):
    """The site could not be reached or hung up (refused, reset, DNS, TLS, empty reply)."""

    error_type = ErrorType.NETWORK


class BlockedError(AttemptError):
    """The site answered a block page (challenge, captcha, access denied)."""

    error_type = ErrorType.BLOCKED


class RateLimitedError(AttemptError):
    """The site said slow down (429); `retry_after` in seconds when it said how long."""

    error_type = ErrorType.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidContent(AttemptError):
    """An answer that is not the page wanted: too short, required selectors missing, bad
    JSON, or an HTTP status that is not success."""

    error_type = ErrorType.INVALID


class TooLarge(AttemptError):
    """The body is larger than the caller's `max_bytes`: refused when its Content-Length said
    so (nothing read), else the transfer was stopped as soon as more arrived. Raise the limit
    to keep such files.

    `announced` is the Content-Length when the server sent one, `received` the body bytes read
    before stopping; `status` and `headers` (lower-case names) are the answer's.
    """

    error_type = ErrorType.TOO_LARGE

    def __init__(
        self,
        message: str,
        *,
        error_type: ErrorType | None = None,
        limit: int = 0,
        received: int = 0,
        announced: int | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, error_type=error_type)
        self.limit = limit
        self.received = received
        self.announced = announced
        self.status = status
        self.headers = headers or {}


_CLASSES: dict[ErrorType, type[AttemptError]] = {
    ErrorType.BLOCKED: BlockedError,
    ErrorType.RATE_LIMITED: RateLimitedError,
    ErrorType.TIMEOUT: FetchTimeout,
    ErrorType.PROXY: ProxyFailure,
    ErrorType.NETWORK: NetworkFailure,
    ErrorType.UNAVAILABLE: MethodUnavailable,
    ErrorType.TOO_LARGE: TooLarge,
}


def error_class(error_type: ErrorType) -> type[AttemptError]:
    """The exception class for an error type (`InvalidContent` for the HTTP-status kinds)."""
    return _CLASSES.get(error_type, InvalidContent)
