"""The ``validate`` kind's parameters: the one place for their bounds, defaults and flags."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import field_validator

from engine.jobs.params import TaskParams, param, timeout_param

STATUSES = ("untested", "active", "inactive", "tampering")
PROTOCOLS = ("http", "https", "socks4", "socks5")
REVALIDATE_MINUTES = 60.0  # --revalidate alone: proxies checked more than an hour ago


class ValidateParams(TaskParams):
    """Check a proxy list (``proxies_file``) or stored proxies chosen by the filters."""

    kind = "validate"

    judge_url: str = param(
        description="judge URL: httpbin-style /get JSON or an azenv page",
        flag="--judge",
        label="the judge URL",
        setting="judge_url",
        metavar="URL",
        missing="a judge URL is required (an httpbin-style /get or an azenv page): give one "
        "or set FETCHFLEET_JUDGE_URL; `python -m sim` starts one on loopback",
    )
    timeout_s: float = timeout_param(5.0, "seconds per check attempt", setting="check_timeout_s")
    canary_url: str | None = param(
        None,
        description="canary for the tampering check: a plain http:// base URL serving "
        "page.html, data.json and pixel.png (static); 'off' skips the check; default: the "
        "judge's server's /canary/ when it serves one (the sim's judge does)",
        flag="--canary",
        label="the canary URL",
        metavar="URL",
    )
    proxies_file: str | None = param(
        None,
        description="proxy list (text or CSV): ip:port, scheme://[user:pass@]host:port or "
        "ip:port:user:pass; schemes http, https, socks4, socks5",
        flag="--proxies",
        metavar="FILE",
    )
    status: Literal["untested", "active", "inactive", "tampering"] | None = param(
        None, description="stored proxies with this status", label="the status"
    )
    protocol: Literal["http", "https", "socks4", "socks5"] | None = param(
        None, description="stored proxies of this type", flag="--type", label="the type"
    )
    older_than_hours: float | None = param(
        None,
        description="stored proxies not checked for this long (or never)",
        label="hours",
        metavar="HOURS",
        ge=0,
    )
    minutes_old: float | None = param(
        None,
        description="stored proxies last checked more than this many minutes ago "
        f"({REVALIDATE_MINUTES:g} with --revalidate alone)",
        label="minutes",
        metavar="MINUTES",
        ge=0,
    )
    limit: int | None = param(
        None, description="at most this many stored proxies", label="the limit", metavar="N", ge=0
    )

    @field_validator("judge_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        url = url.strip()
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"{url!r} is not an http(s) URL: write it like http://127.0.0.2:8080/get"
            )
        return url

    @field_validator("canary_url")
    @classmethod
    def _canary(cls, url: str | None) -> str | None:
        if url is None or url.strip().lower() == "off":
            return None if url is None else "off"
        url = url.strip()
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.netloc:
            raise ValueError(
                f"{url!r} is not a plain http:// URL (or 'off'): write it like "
                "http://127.0.0.2:8080/canary/"
            )
        return url

    def filters(self) -> dict[str, object]:
        """The filters given (stored proxies are chosen by these when there is no list)."""
        names = ("status", "protocol", "older_than_hours", "minutes_old", "limit")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}
