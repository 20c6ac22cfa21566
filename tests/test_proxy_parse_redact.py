"""Malformed lines are stored and shown with their passwords masked."""

from __future__ import annotations

import pytest

from fetchers.proxy_parse import redact_line


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("1.2.3.4:0:user:secretpw", "1.2.3.4:0:user:***"),
        ("http://user:secretpw@1.2.3.4:99999", "http://user:***@1.2.3.4:99999"),
        ("user:secretpw@host", "user:***@host"),
        ("socks5://u:p:w@x", "socks5://u:***@x"),
        ("[::1]:80", "[::1]:80"),
        ("2001:db8::1:80", "2001:db8::1:80"),
        ("garbage line", "garbage line"),
    ],
)
def test_redact_line_masks_passwords(line: str, shown: str) -> None:
    assert redact_line(line) == shown
