"""Webhook URLs — where they come from, what may be stored, how they are shown — and one POST.

A webhook URL often *is* the secret (Slack's token is in its path), so:
- ``--url-env VAR`` stores the variable's name; each deliverer reads it from its own
  environment when it sends;
- a literal ``--url`` with credentials (``user:pass@``) is refused; one with a query string
  is accepted with a warning (it is stored as given);
- logs, errors and listings show only ``origin()`` (scheme, host, port): never a path, a
  query or credentials.

Sent with the standard library (``urllib``): one small POST per delivery from a thread.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

USER_AGENT = "fetchfleet-alerts/1"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WebhookError(Exception):
    """A URL that cannot be used; the message says what to do and never holds the URL."""


def check_literal(url: str) -> list[str]:
    """Raise WebhookError for a URL that must not be stored; returns warnings."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError("the webhook URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError(
            "the webhook URL holds credentials (user:password@): they would be stored in the "
            "database. Put the URL in an environment variable and give its name with "
            "--url-env VAR instead"
        )
    warnings = []
    if parts.query:
        warnings.append(
            "the webhook URL has a query string, stored in the database as given; if it holds "
            "a token, use --url-env VAR instead"
        )
    return warnings


def check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name or ""):
        raise WebhookError(
            f"--url-env {name!r}: give the name of an environment variable (e.g. "
            "FETCHFLEET_SLACK_URL), not its value"
        )


def resolve(url: str | None, url_env: str | None) -> str:
    """The URL to send to, read from this process's environment for ``url_env``."""
    if url_env:
        value = os.environ.get(url_env, "").strip()
        if not value:
            raise WebhookError(
                f"environment variable {url_env} is not set in this process: set it where "
                "the console's server or `engine.run scheduler` runs"
            )
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookError(f"environment variable {url_env} does not hold an http(s) URL")
        return value
    if not url:
        raise WebhookError("the alert has no URL")
    return url


def origin(url: str) -> str:
    """scheme://host[:port] — all of a URL that may be shown or logged."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{host}{port}"


def describe(url: str | None, url_env: str | None) -> str:
    """How an alert's target is listed: the variable's name, or the origin and "/…"."""
    if url_env:
        return f"${url_env}"
    return origin(url or "") + "/…"


@dataclass(frozen=True)
class Sent:
    """What one POST did: ``status`` (None: no answer) and an error safe to store/log."""

    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def permanent(self) -> bool:
        """The receiver refused the request itself (a wrong URL, a revoked hook): retrying
        the same body cannot help. 408 and 429 are worth another try."""
        return (
            self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)
        )


def post(url: str, body: dict[str, Any], timeout_s: float) -> Sent:
    """POST ``body`` as JSON. Errors name the failure and the origin, never the URL."""
    data = json.dumps(body, default=str).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(65536)
            return Sent(resp.status, None)
    except urllib.error.HTTPError as exc:
        return Sent(exc.code, f"{origin(url)} answered HTTP {exc.code} {_scrub(exc.reason, url)}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)  # URLError wraps the socket's error
        kind = type(reason if isinstance(reason, BaseException) else exc).__name__
        return Sent(None, f"{origin(url)}: {kind}: {_scrub(reason, url)}")


def _scrub(text: Any, url: str) -> str:
    """A message with the URL (and its path and query) cut out, should a library echo it."""
    out = str(text)
    parts = urlsplit(url)
    for secret in (url, parts.path, parts.query):
        if secret and secret != "/":
            out = out.replace(secret, "…")
    return out[:500]
