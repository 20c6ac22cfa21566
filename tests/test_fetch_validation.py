"""Response validation and block detection (fetchers/validation.py): the signatures of
shared/reference/block-signatures.md, status rules, selectors, Retry-After."""

from __future__ import annotations

import email.utils
import time

import pytest

from fetchers.errors import ErrorType
from fetchers.validation import ValidationRules, detect_block, parse_retry_after, validate

PAGE = (
    b"<html><head><title>Shop</title></head><body><ul><li class=product>x</li></ul></body></html>"
)


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason_part"),
    [
        (403, {"server": "cloudflare"}, b"<title>Just a moment...</title>", "just a moment"),
        (
            503,
            {},
            b"<script src='/cdn-cgi/challenge-platform/h/b/orchestrate/jsch/v1'>",
            "platform",
        ),
        (200, {}, b"<script>window._cf_chl_opt={cType:'managed'}</script>", "_cf_chl_opt"),
        (429, {"cf-mitigated": "challenge"}, b"", "cf-mitigated"),
        (200, {"cf-mitigated": "challenge"}, PAGE, "cf-mitigated"),
        (403, {"server": "cloudflare"}, b'<span class="cf-error-code">1020</span>', "1020"),
        (403, {}, b"<div class='cf-turnstile'></div>", "turnstile"),
        (403, {}, b"<script src='https://geo.captcha-delivery.com/captcha/'>", "datadome"),
        (403, {}, b"Access to This Page Has Been Blocked", "perimeterx"),
        (200, {}, b"<title>Pardon Our Interruption</title>", "akamai"),
        (200, {}, b"<iframe src='/_Incapsula_Resource?x'>", "imperva"),
        (200, {}, b"<div class='g-recaptcha' data-sitekey='k'></div>", "recaptcha"),
        (200, {}, b"<div class='h-captcha'></div>", "hcaptcha"),
        (200, {}, b"<html><title>Access Denied</title></html>", "access denied"),
    ],
)
def test_block_signatures_are_blocked(status, headers, body, reason_part):
    reason, _ = detect_block(status, headers, body)
    assert reason and reason_part in reason.lower()
    verdict = validate(status, headers, body)
    assert not verdict.ok
    assert verdict.error_type == ErrorType.BLOCKED
    assert reason_part in verdict.reason.lower()


def test_a_vendor_header_alone_does_not_block():
    verdict = validate(200, {"server": "cloudflare", "cf-ray": "abc"}, PAGE)
    assert verdict.ok


def test_vendor_header_corroborates_a_status():
    verdict = validate(403, {"server": "cloudflare"}, b"<html>nope</html>")
    assert verdict.error_type == ErrorType.BLOCKED
    assert "cloudflare" in verdict.reason


def test_weak_marker_on_a_page_with_the_wanted_content_is_not_a_block():
    page = PAGE.replace(b"</body>", b"<form><div class='g-recaptcha'></div></form></body>")
    rules = ValidationRules(required_selectors=("li.product",))
    assert validate(200, {}, page, rules).ok
    # without the wanted content it is a captcha page, never content
    assert validate(200, {}, page.replace(b"product", b"x"), rules).error_type == ErrorType.BLOCKED
    assert validate(200, {}, page).error_type == ErrorType.BLOCKED


def test_strong_marker_blocks_even_with_the_selectors():
    page = PAGE + b"<script>window._cf_chl_opt={}</script>"
    rules = ValidationRules(required_selectors=("li.product",))
    assert validate(200, {}, page, rules).error_type == ErrorType.BLOCKED


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (404, ErrorType.NOT_FOUND),
        (410, ErrorType.NOT_FOUND),
        (401, ErrorType.BLOCKED),
        (403, ErrorType.BLOCKED),
        (500, ErrorType.SERVER_ERROR),
        (502, ErrorType.SERVER_ERROR),
        (503, ErrorType.SERVER_ERROR),
        (400, ErrorType.HTTP_ERROR),
        (302, ErrorType.HTTP_ERROR),
    ],
)
def test_status_rules(status, expected):
    assert validate(status, {}, b"<html>plain</html>").error_type == expected


def test_429_is_rate_limited_with_retry_after():
    v = validate(429, {"retry-after": "3"}, b"<title>429 Too Many Requests</title>")
    assert v.error_type == ErrorType.RATE_LIMITED
    assert v.retry_after == 3.0


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True)) == 0.0


def test_length_selectors_and_json():
    assert validate(200, {}, b"").error_type == ErrorType.INVALID
    assert validate(200, {}, b"short", ValidationRules(min_length=100)).error_type == (
        ErrorType.INVALID
    )
    v = validate(200, {}, PAGE, ValidationRules(required_selectors=("li.product", "a.next")))
    assert v.error_type == ErrorType.INVALID and "a.next" in v.reason
    assert validate(200, {}, b'{"a": 1}', ValidationRules(expect_json=True)).ok
    assert validate(200, {}, b"<html>", ValidationRules(expect_json=True)).error_type == (
        ErrorType.INVALID
    )


def test_ordinary_pages_pass():
    assert validate(200, {"content-type": "text/html"}, PAGE).ok
    # a shop selling a product called "Captcha" is not a block page by its body text alone
    assert validate(200, {}, b"<html><title>Shop</title><p>Captcha Cat toy</p></html>").ok


def test_every_marker_is_found_anywhere_in_a_page_in_any_case():
    # detect_block scans a page for a few shared infixes first (a page without any holds no
    # marker); each marker must still be found wherever it sits, whatever its case
    from fetchers.validation import STRONG_MARKERS, WEAK_MARKERS

    filler = b"<p class='product'>An ordinary product description.</p>" * 200
    for markers, strong in ((STRONG_MARKERS, True), (WEAK_MARKERS, False)):
        for marker, reason in markers:
            for body in (marker.upper() + filler, filler + marker.upper(), filler + marker):
                assert detect_block(200, {}, PAGE + body) == (reason, strong), marker
    assert detect_block(200, {}, PAGE + filler) == (None, False)
