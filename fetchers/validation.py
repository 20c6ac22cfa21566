"""Is this answer the page we wanted? Status, length, selectors and block-page signatures.

`validate(status, headers, content, rules)` returns a `Verdict`; the cascade acts on its
`error_type` (see `fetchers.errors.ErrorType`). The signatures are the ones public anti-bot
tooling uses (shared/reference/block-signatures.md): a challenge can arrive with status
200, so the body is always read, and a vendor header alone only corroborates.

Two strengths of body marker:

- **strong** markers only occur on block pages (Cloudflare's challenge platform and
  `_cf_chl_opt`, "Just a moment...", DataDome's captcha host, "Pardon Our Interruption",
  PerimeterX's block text, Imperva's `_Incapsula_Resource`, Cloudflare error 1020): blocked
  at any status;
- **weak** markers are captcha and widget names (`g-recaptcha`, `h-captcha`,
  `cf-turnstile`, an "Access denied" title) that an ordinary page may also carry (a login
  form with a captcha): on a 2xx page they block unless every required selector matched —
  when the caller said what the page must contain and it is there, the page is what was
  wanted. Without required selectors they block: a captcha page is never returned as content.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fetchers.errors import ErrorType

__all__ = [
    "STRONG_MARKERS",
    "WEAK_MARKERS",
    "ValidationRules",
    "Verdict",
    "detect_block",
    "parse_retry_after",
    "validate",
]

# (marker as lower-case bytes, reason) — matched against the lower-cased body
STRONG_MARKERS: tuple[tuple[bytes, str], ...] = (
    (b"/cdn-cgi/challenge-platform/", "cloudflare challenge-platform"),
    (b"window._cf_chl_opt", "cloudflare challenge (_cf_chl_opt)"),
    (b"__cf_chl_f_tk=", "cloudflare challenge token (__cf_chl_f_tk)"),
    (b"__cf_chl_rt_tk=", "cloudflare challenge token (__cf_chl_rt_tk)"),
    (b"<title>just a moment...</title>", "cloudflare challenge ('Just a moment...')"),
    (b"attention required! | cloudflare", "cloudflare block ('Attention Required!')"),
    (b'id="cf-challenge-running"', "cloudflare challenge (#cf-challenge-running)"),
    (b'id="challenge-spinner"', "cloudflare challenge (#challenge-spinner)"),
    (b'class="cf-error-code">1020<', "cloudflare firewall (error 1020)"),
    (b"captcha-delivery.com", "datadome captcha"),
    (b"captcha.px-cdn.net", "perimeterx captcha"),
    (b"access to this page has been blocked", "perimeterx block page"),
    (b"pardon our interruption", "akamai block ('Pardon Our Interruption')"),
    (b"sec-if-cpt-container", "akamai captcha (sec-if-cpt-container)"),
    (b"_incapsula_resource", "imperva (_Incapsula_Resource)"),
)

WEAK_MARKERS: tuple[tuple[bytes, str], ...] = (
    (b"g-recaptcha", "recaptcha"),
    (b"google.com/recaptcha", "recaptcha"),
    (b"h-captcha", "hcaptcha"),
    (b"hcaptcha.com", "hcaptcha"),
    (b"cf-turnstile", "cloudflare turnstile"),
    (b"challenges.cloudflare.com/turnstile", "cloudflare turnstile"),
    (b"window._pxappid", "perimeterx"),
)

# <title> texts of access-denied and rate-limit pages (weak: a shop may sell "Access Denied")
BLOCK_TITLES: tuple[tuple[str, str], ...] = (
    ("access denied", "access denied page"),
    ("403 forbidden", "forbidden page"),
    ("forbidden", "forbidden page"),
    ("too many requests", "rate-limit page"),
    ("rate limit", "rate-limit page"),
    ("are you a robot", "captcha page"),
    ("captcha", "captcha page"),
    ("security check", "challenge page"),
)

VENDOR_HEADERS: tuple[tuple[str, str | None, str], ...] = (
    ("server", "cloudflare", "cloudflare"),
    ("cf-ray", None, "cloudflare"),
    ("x-datadome", None, "datadome"),
    ("x-dd-b", None, "datadome"),
    ("x-akamai-session-info", None, "akamai"),
    ("x-iinfo", None, "imperva"),
)

# A page that holds none of these holds no marker: each marker contains one of them (the
# shared infixes stand for several markers each, the rest are markers themselves), so an
# ordinary page is scanned 12 times instead of 22; a page that holds one is then checked
# marker by marker, in order, as before.
_SHARED_INFIXES: tuple[bytes, ...] = (b"captcha", b"challenge", b"cf_chl_")
_PREFILTER: tuple[bytes, ...] = _SHARED_INFIXES + tuple(
    marker
    for marker, _ in STRONG_MARKERS + WEAK_MARKERS
    if not any(infix in marker for infix in _SHARED_INFIXES)
)

_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.S)
_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """What a good answer looks like. The defaults accept any non-empty 2xx page that
    carries no block signature."""

    min_length: int = 1
    required_selectors: tuple[str, ...] = ()  # CSS, all must match
    expect_json: bool = False
    detect_blocks: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    error_type: ErrorType | None = None
    reason: str | None = None
    retry_after: float | None = None

    @classmethod
    def good(cls) -> Verdict:
        return _GOOD


_GOOD = Verdict(True)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent/bad.

    Bad includes what ``float()`` accepts but no server means: ``nan``, ``inf``, negatives.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _vendor(headers: Mapping[str, str]) -> str | None:
    for name, value, vendor in VENDOR_HEADERS:
        got = headers.get(name)
        if got is not None and (value is None or value in got.lower()):
            return vendor
    cookies = headers.get("set-cookie", "").lower()
    for cookie, vendor in (
        ("_abck=", "akamai"),
        ("datadome=", "datadome"),
        ("_px3=", "perimeterx"),
        ("_pxhd=", "perimeterx"),
    ):
        if cookie in cookies:
            return vendor
    return None


def _title(low: bytes) -> str:
    m = _TITLE.search(low[:_HEAD_BYTES])
    return m.group(1).decode("utf-8", "replace").strip() if m else ""


def detect_block(
    status: int, headers: Mapping[str, str], content: bytes
) -> tuple[str | None, bool]:
    """(reason, strong) of the first block signature found, or (None, False).

    `headers` keys must be lower-case. `strong` says the signature blocks whatever else
    the page holds; a weak one (captcha widget, blocking title) may sit on a real page.
    """
    mitigated = headers.get("cf-mitigated", "").lower()
    if mitigated:
        return f"cloudflare cf-mitigated: {mitigated}", True
    low = content.lower()
    for needle in _PREFILTER:
        if needle in low:
            for marker, reason in STRONG_MARKERS:
                if marker in low:
                    return reason, True
            for marker, reason in WEAK_MARKERS:
                if marker in low:
                    return reason, False
            break
    title = _title(low)
    if title:
        for text, reason in BLOCK_TITLES:
            if text in title:
                return f"{reason} (title {title[:60]!r})", False
    return None, False


def _selectors_missing(content: bytes, selectors: Sequence[str]) -> list[str]:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(content)
    return [sel for sel in selectors if tree.css_first(sel) is None]


def validate(
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    rules: ValidationRules | None = None,
) -> Verdict:
    """The verdict on one answer. `headers` keys must be lower-case."""
    rules = rules or ValidationRules()
    reason, strong = detect_block(status, headers, content) if rules.detect_blocks else (None, 0)
    vendor = _vendor(headers)
    by = f" ({vendor})" if vendor else ""

    if status == 429:
        if reason and strong:  # a challenge served as 429 does not clear by waiting
            return Verdict(False, ErrorType.BLOCKED, f"{reason}, status 429{by}")
        retry_after = parse_retry_after(headers.get("retry-after"))
        return Verdict(False, ErrorType.RATE_LIMITED, f"status 429{by}", retry_after)
    if status in (401, 403):
        return Verdict(
            False, ErrorType.BLOCKED, f"{reason or 'access denied'}, status {status}{by}"
        )
    if status in (404, 410):
        return Verdict(False, ErrorType.NOT_FOUND, f"status {status}")
    if status >= 500:
        if reason:
            return Verdict(False, ErrorType.BLOCKED, f"{reason}, status {status}{by}")
        retry_after = parse_retry_after(headers.get("retry-after")) if status == 503 else None
        return Verdict(False, ErrorType.SERVER_ERROR, f"status {status}", retry_after)
    if not 200 <= status < 300:
        return Verdict(False, ErrorType.HTTP_ERROR, f"status {status}")

    if reason and strong:
        return Verdict(False, ErrorType.BLOCKED, f"{reason}, status {status}{by}")
    missing: list[str] = []
    if rules.required_selectors:
        missing = _selectors_missing(content, rules.required_selectors)
    if reason and (missing or not rules.required_selectors):
        return Verdict(False, ErrorType.BLOCKED, f"{reason}, status {status}{by}")
    if len(content) < rules.min_length:
        return Verdict(
            False,
            ErrorType.INVALID,
            f"{len(content)} bytes, fewer than the minimum {rules.min_length}",
        )
    if missing:
        return Verdict(False, ErrorType.INVALID, "selector not found: " + ", ".join(missing))
    if rules.expect_json:
        try:
            json.loads(content)
        except ValueError as exc:
            return Verdict(False, ErrorType.INVALID, f"not JSON: {exc}")
    return _GOOD
