"""Country lookup: offline data shipped in the geoip2fast wheel, never the network."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fetchers.geo import country_of


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("8.8.8.8", "US"),
        ("81.2.69.142", "GB"),  # MaxMind's own test address
        ("2a00:1450:4001:80b::200e", "DE"),
        ("::ffff:8.8.8.8", "US"),
        ("[2a00:1450:4001:80b::200e]", "DE"),
        ("127.0.0.1", None),
        ("127.1.0.5", None),
        ("10.1.2.3", None),
        ("192.168.0.1", None),
        ("172.16.5.4", None),
        ("100.64.0.1", None),  # carrier-grade NAT
        ("169.254.1.1", None),
        ("::1", None),
        ("fe80::1", None),
        ("203.0.113.5", None),  # documentation range
        ("0.0.0.0", None),
        ("999.1.1.1", None),
        ("not an ip", None),
        ("", None),
    ],
)
def test_country_of(ip: str, expected: str | None) -> None:
    assert country_of(ip) == expected


def test_lookup_needs_no_network() -> None:
    """In a fresh process that forbids every socket operation, loading and lookups work."""
    code = textwrap.dedent(
        """
        import sys

        def forbid(event, args):
            if event.startswith("socket.") or event == "urllib.Request":
                raise RuntimeError(f"network access attempted: {event} {args!r}")

        sys.addaudithook(forbid)
        from fetchers.geo import country_of
        assert country_of("8.8.8.8") == "US", country_of("8.8.8.8")
        assert country_of("2a00:1450:4001:80b::200e") == "DE"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
