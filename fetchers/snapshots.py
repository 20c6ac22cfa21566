"""Error snapshots: the first page of each distinct error kind, kept to see what went wrong.

Crawlee's ``ErrorSnapshotter`` keys a snapshot by the error's class and message signature
and saves the first page (HTML, and a screenshot in a browser) of each key. We do the same
per run, with our error kinds as the key:

- ``blocked:<reason>`` — a block page (``blocked:recaptcha``, ``blocked:http_403``,
  ``blocked:cloudflare_firewall``), from the validator's reason without its variable parts
  (the page title, the status, the vendor);
- ``rate_limited:http_429`` — a rate-limit answer;
- ``validation:<what>`` — an answer that is not the page wanted (``missing_selector``,
  ``too_short``, ``not_json``);
- ``invalid_entity:<field>`` and ``extraction_error:<exception class>`` — made by the
  scrape kind after the page was fetched.

A `Snapshotter` lives in one worker process (one per run's executor). It keeps at most
``limit`` kinds, each once, and hands the pending snapshots over (`take`) with the page
results; the store keeps the first per (run, kind) across workers. A browser method is asked
(``FetchRequest.capture``) whether its answer would be snapshotted before it closes the page,
and takes a screenshot only then: pages that pass, and kinds seen already, cost nothing.

Nothing secret is kept: URLs lose their userinfo, messages and HTML lose the proxy's
password (a page may echo a ``Proxy-Authorization`` header back).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from fetchers.errors import ErrorType

__all__ = [
    "HTML_CAP",
    "PNG_CAP",
    "SNAPSHOT_ERRORS",
    "Snapshot",
    "Snapshotter",
    "fetch_kind",
    "safe_url",
    "slug",
]

HTML_CAP = 512 * 1024  # bytes of HTML kept per snapshot (the rest is cut, and said so)
PNG_CAP = 1024 * 1024  # a bigger screenshot is dropped (a viewport PNG is ~50-300 KB)
MESSAGE_CAP = 2000
#: the verdicts a fetch snapshot is taken for: an answer came back but was refused
SNAPSHOT_ERRORS = frozenset({ErrorType.BLOCKED, ErrorType.RATE_LIMITED, ErrorType.INVALID})

_PARENS = re.compile(r"\([^)]*\)")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_STATUS = re.compile(r"status (\d{3})")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")


def slug(text: str, cap: int = 60) -> str:
    """``'Cloudflare firewall'`` → ``cloudflare_firewall``: a stable, short key part."""
    return _NON_WORD.sub("_", text.lower()).strip("_")[:cap].rstrip("_") or "unknown"


def fetch_kind(error_type: ErrorType | str | None, reason: str | None) -> str | None:
    """The snapshot key of a refused answer, or None when it is not snapshotted.

    The validator's reasons carry variable parts (a page title, the status, the vendor) that
    must not make two pages of one cause two kinds: ``"captcha page (title 'x'), status
    200"`` → ``blocked:captcha_page``; a bare ``"access denied, status 403"`` →
    ``blocked:http_403``; ``"status 429"`` → ``rate_limited:http_429``."""
    if error_type is None:
        return None
    etype = ErrorType(error_type)
    if etype not in SNAPSHOT_ERRORS:
        return None
    reason = reason or ""
    if etype == ErrorType.INVALID:
        if reason.startswith("selector not found"):
            return "validation:missing_selector"
        if "fewer than the minimum" in reason:
            return "validation:too_short"
        if reason.startswith("not JSON"):
            return "validation:not_json"
        return f"validation:{slug(_PARENS.sub('', reason.split(':')[0]))}"
    status = _STATUS.search(reason)
    head = _PARENS.sub("", reason.split(",")[0]).strip()
    if status and (head in ("", "access denied") or head.startswith("status ")):
        return f"{etype}:http_{status.group(1)}"
    return f"{etype}:{slug(head)}"


def safe_url(url: str) -> str:
    """The URL without userinfo (``user:pass@``): never stored, shown or exported."""
    return _USERINFO.sub(r"\1", url)


def _secrets(proxy: str | None) -> list[str]:
    if not proxy or "://" not in proxy:
        return []
    parts = urlsplit(proxy)
    if not parts.password:
        return []
    return [s for s in {parts.password, unquote(parts.password)} if len(s) >= 3]


def scrub_bytes(data: bytes, proxy: str | None) -> bytes:
    for secret in _secrets(proxy):
        data = data.replace(secret.encode(), b"***")
    return data


def scrub_text(text: str, proxy: str | None) -> str:
    for secret in _secrets(proxy):
        text = text.replace(secret, "***")
    return text


@dataclass(slots=True)
class Snapshot:
    """One page kept for its error kind. ``html_bytes`` is the page's size before the cap."""

    kind: str
    url: str
    method: str | None
    message: str
    html: bytes
    html_bytes: int
    screenshot: bytes | None = None
    status: int | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(tzinfo=None))

    def to_wire(self) -> tuple[Any, ...]:
        return (
            self.kind,
            self.url,
            self.method,
            self.message,
            self.html,
            self.html_bytes,
            self.screenshot,
            self.status,
            self.at,
        )

    @classmethod
    def from_wire(cls, t: tuple[Any, ...] | Snapshot) -> Snapshot:
        return t if isinstance(t, Snapshot) else cls(*t)


class Snapshotter:
    """The snapshots of one worker process for one run: each kind once, at most ``limit``.

    Thread-safe (the Selenium method asks from its own thread)."""

    def __init__(self, limit: int = 50, html_cap: int = HTML_CAP, png_cap: int = PNG_CAP) -> None:
        self.limit = limit
        self.html_cap = html_cap
        self.png_cap = png_cap
        self._seen: set[str] = set()
        self._pending: list[Snapshot] = []
        self._lock = threading.Lock()

    def wants(self, kind: str | None) -> bool:
        """Would a page of ``kind`` be kept? (A browser asks before taking a screenshot.)"""
        return kind is not None and kind not in self._seen and len(self._seen) < self.limit

    def add(
        self,
        kind: str,
        url: str,
        method: str | None,
        message: str | None,
        html: bytes,
        *,
        screenshot: bytes | None = None,
        status: int | None = None,
        proxy: str | None = None,
    ) -> bool:
        """Keep this page as the snapshot of ``kind`` unless one is kept already."""
        with self._lock:
            if not self.wants(kind):
                return False
            self._seen.add(kind)
        png = screenshot if screenshot and len(screenshot) <= self.png_cap else None
        snap = Snapshot(
            kind=kind,
            url=safe_url(url)[:2000],
            method=method,
            message=scrub_text(message or "", proxy)[:MESSAGE_CAP],
            html=scrub_bytes(html, proxy)[: self.html_cap],  # scrubbed whole: no half secret
            html_bytes=len(html),
            screenshot=png,
            status=status,
        )
        with self._lock:
            self._pending.append(snap)
        return True

    def take(self) -> list[Snapshot]:
        """The snapshots made since the last call (to travel with a result)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out
