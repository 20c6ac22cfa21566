"""The exceptions of `fetchers`, one small hierarchy.

Everything `fetchers` raises on purpose derives from `FetchError`, so a caller (the engine, a
page) can catch one class and show `str(exc)`: every message says what was wrong and what to
do about it. Exceptions of the libraries underneath (OSError, python-socks, ssl) are translated
at the boundary where they occur; the proxy checker does not raise for a dead or bad proxy at
all — that is a normal `CheckResult` with an outcome.

    FetchError
    ├── ProxyParseError    a proxy list line or file cannot be read as proxies
    └── JudgeFormatError   a proxy judge's answer is in no format we understand

The fetch cascade adds its own classes (blocked, timeout, proxy, network, invalid content)
under `FetchError` here when it lands.
"""

from __future__ import annotations

__all__ = ["FetchError", "JudgeFormatError", "ProxyParseError"]


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
