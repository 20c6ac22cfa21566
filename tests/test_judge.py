"""Judge answers (httpbin, azenv, bare IP) and anonymity classification, on recorded bodies."""

from __future__ import annotations

import ipaddress

import pytest

from fetchers.errors import FetchError, JudgeFormatError
from fetchers.judge import (
    PROXY_HEADERS,
    Anonymity,
    JudgeView,
    classify_anonymity,
    exit_address,
    extract_ips,
    parse_judge_response,
)

OWN = {ipaddress.ip_address("203.0.113.45")}
PROXY_IP = "198.51.100.23"

# Recorded from httpbin.org/get (addresses replaced by documentation ranges).
HTTPBIN_BODY = b"""{
  "args": {
    "ffp": "4f1c2a9e0b7d3365"
  },
  "headers": {
    "Accept": "*/*",
    "Host": "httpbin.org",
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "X-Amzn-Trace-Id": "Root=1-6745a1b2-3c4d5e6f708192a3b4c5d6e7",
    "X-Fetchfleet-Probe": "4f1c2a9e0b7d3365"
  },
  "origin": "198.51.100.23",
  "url": "http://httpbin.org/get?ffp=4f1c2a9e0b7d3365"
}
"""

# httpbin behind a transparent proxy: origin lists the forwarded-for chain.
HTTPBIN_TRANSPARENT = b"""{
  "args": {},
  "headers": {
    "Host": "httpbin.org",
    "Via": "1.1 squid-3 (squid/3.5.27)",
    "X-Forwarded-For": "203.0.113.45"
  },
  "origin": "203.0.113.45, 198.51.100.23",
  "url": "http://httpbin.org/get"
}"""

# Recorded from an azenv.php judge (the classic page, HTML-wrapped).
AZENV_BODY = b"""<html>
<head>
<title>AZ Environment variables 1.04</title>
</head>
<body>
<pre>
REMOTE_ADDR = 198.51.100.23
REMOTE_PORT = 51234
REQUEST_METHOD = GET
REQUEST_URI = /azenv.php?ffp=4f1c2a9e0b7d3365
REQUEST_TIME_FLOAT = 1732300000.1234
REQUEST_TIME = 1732300000
HTTP_HOST = azenv.net
HTTP_USER_AGENT = Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0
HTTP_ACCEPT = */*
HTTP_X_FETCHFLEET_PROBE = 4f1c2a9e0b7d3365
HTTP_VIA = 1.1 proxy.example (squid/4.10)
HTTP_X_FORWARDED_FOR = 203.0.113.45
HTTP_CLIENT_IP = 203.0.113.45
HTTP_CONNECTION = close
</pre>
</body>
</html>
"""

# The sim's /azenv (plain text, no HTML).
AZENV_PLAIN = b"""HTTP_HOST = 127.0.0.2:8080
HTTP_USER_AGENT = x
HTTP_X_FETCHFLEET_PROBE = abc
REMOTE_ADDR = 127.1.0.9
REMOTE_PORT = 40000
REQUEST_METHOD = GET
REQUEST_URI = /azenv?ffp=abc
QUERY_STRING = ffp=abc
"""


def view(headers: dict[str, str] | None = None, remote: str | None = PROXY_IP) -> JudgeView:
    return JudgeView(remote, {k.lower(): v for k, v in (headers or {}).items()}, "", ())


# --------------------------------------------------------------------------- parsing


def test_httpbin() -> None:
    v = parse_judge_response(200, {"Content-Type": "application/json"}, HTTPBIN_BODY)
    assert v.remote_addr == PROXY_IP
    assert v.origin == (PROXY_IP,)
    assert v.headers["host"] == "httpbin.org"
    assert v.headers["x-fetchfleet-probe"] == "4f1c2a9e0b7d3365"
    assert all(k == k.lower() for k in v.headers)
    assert "4f1c2a9e0b7d3365" in v.raw_text
    assert classify_anonymity(v, OWN) == Anonymity.ELITE


def test_httpbin_with_multi_address_origin() -> None:
    v = parse_judge_response(200, {}, HTTPBIN_TRANSPARENT)
    assert v.remote_addr == "203.0.113.45"
    assert v.origin == ("203.0.113.45", PROXY_IP)
    assert v.headers["via"].startswith("1.1 squid")
    assert classify_anonymity(v, OWN) == "transparent"


def test_azenv_html() -> None:
    v = parse_judge_response(200, {"content-type": "text/html"}, AZENV_BODY)
    assert v.remote_addr == PROXY_IP
    assert v.headers["x-forwarded-for"] == "203.0.113.45"
    assert v.headers["client-ip"] == "203.0.113.45"
    assert v.headers["via"] == "1.1 proxy.example (squid/4.10)"
    assert v.headers["host"] == "azenv.net"
    assert "remote-addr" not in v.headers and "request-uri" not in v.headers
    assert classify_anonymity(v, OWN) == "transparent"
    assert classify_anonymity(v, {ipaddress.ip_address("192.0.2.1")}) == "anonymous"


def test_azenv_plain_text() -> None:
    v = parse_judge_response(200, {}, AZENV_PLAIN)
    assert v.remote_addr == "127.1.0.9"
    assert v.headers["x-fetchfleet-probe"] == "abc"
    assert classify_anonymity(v, {"127.0.0.1"}) == "elite"


@pytest.mark.parametrize("body", [b"198.51.100.23", b"198.51.100.23\n", b"  2001:db8::5 \r\n"])
def test_bare_ip(body: bytes) -> None:
    v = parse_judge_response(200, {"Content-Type": "text/plain"}, body)
    assert v.remote_addr == body.decode().strip()
    assert v.headers == {}
    assert classify_anonymity(v, OWN) == "elite"
    assert classify_anonymity(v, {body.decode().strip()}) == "transparent"


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (200, b"<html><body>Welcome to our hotspot! Please log in.</body></html>", "neither"),
        (200, b"", "neither"),
        (200, b"[1, 2, 3]", "neither"),
        (200, b'{"status": "ok"}', "neither"),
        (200, b"198.51.100.999", "neither"),
        (200, b"\x89PNG\r\n\x1a\n\x00\x00", "neither"),
        (502, HTTPBIN_BODY, "HTTP 502"),
        (407, b"", "HTTP 407"),
    ],
)
def test_unknown_formats_raise(status: int, body: bytes, match: str) -> None:
    with pytest.raises(JudgeFormatError, match=match) as info:
        parse_judge_response(status, {"Content-Type": "text/html"}, body)
    assert isinstance(info.value, FetchError)


def test_httpbin_list_valued_headers_are_joined() -> None:
    v = parse_judge_response(
        200, {}, b'{"headers": {"Via": ["1.1 a", "1.1 b"]}, "origin": "1.2.3.4"}'
    )
    assert v.headers["via"] == "1.1 a, 1.1 b"


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("headers", "remote", "expected"),
    [
        ({}, PROXY_IP, "elite"),
        ({"Via": "1.1 squid"}, PROXY_IP, "anonymous"),
        # headers that give the proxy away without any word "via" or "proxy" in them
        ({"X-Forwarded-For": PROXY_IP}, PROXY_IP, "anonymous"),
        ({"X-Forwarded-For": "unknown"}, PROXY_IP, "anonymous"),
        ({"Forwarded": "for=unknown;proto=http"}, PROXY_IP, "anonymous"),
        ({"Forwarded": 'for="[2001:db8::9]:4711"'}, PROXY_IP, "anonymous"),
        ({"X-Real-IP": PROXY_IP}, PROXY_IP, "anonymous"),
        ({"X-Client-IP": "10.0.0.1"}, PROXY_IP, "anonymous"),
        ({"Client-IP": "10.0.0.1"}, PROXY_IP, "anonymous"),
        ({"X-Proxy-ID": "1234"}, PROXY_IP, "anonymous"),
        ({"Proxy-Connection": "keep-alive"}, PROXY_IP, "anonymous"),
        ({"X-Forwarded-Host": "judge.example"}, PROXY_IP, "anonymous"),
        ({"X-Forwarded-Proto": "http"}, PROXY_IP, "anonymous"),
        ({"X-BlueCoat-Via": "abc"}, PROXY_IP, "anonymous"),
        ({"X-Originating-IP": "10.0.0.1"}, PROXY_IP, "anonymous"),
        # our own address, anywhere, in any notation
        ({"X-Forwarded-For": "203.0.113.45"}, PROXY_IP, "transparent"),
        ({"X-Forwarded-For": "10.0.0.7, 203.0.113.45"}, PROXY_IP, "transparent"),
        ({"Forwarded": 'for="203.0.113.45:51234";by=198.51.100.23'}, PROXY_IP, "transparent"),
        ({"Forwarded": "for=203.0.113.45"}, PROXY_IP, "transparent"),
        ({"X-Real-IP": "::ffff:203.0.113.45"}, PROXY_IP, "transparent"),
        ({"X-Anything": "client 203.0.113.45 via gw"}, PROXY_IP, "transparent"),
        ({}, "203.0.113.45", "transparent"),
        ({}, "::ffff:203.0.113.45", "transparent"),
        # look-alikes are not our address (a substring test would say they are)
        ({"X-Forwarded-For": "203.0.113.4"}, PROXY_IP, "anonymous"),
        ({"X-Forwarded-For": "203.0.113.456"}, PROXY_IP, "anonymous"),
        ({"X-Request-Id": "1203.0.113.45"}, PROXY_IP, "elite"),
        # words are not headers
        ({"User-Agent": "ProxyChecker via curl"}, PROXY_IP, "elite"),
        ({"Accept": "text/html", "X-Note": "served via the proxy"}, PROXY_IP, "elite"),
    ],
)
def test_classification(headers: dict[str, str], remote: str, expected: str) -> None:
    assert classify_anonymity(view(headers, remote), OWN) == expected


def test_host_header_is_not_a_leak() -> None:
    # checker and judge on the same address (one machine, or loopback): Host names the judge
    own = {ipaddress.ip_address("127.0.0.1")}
    v = view({"Host": "127.0.0.1:8080"}, "127.1.0.5")
    assert classify_anonymity(v, own) == "elite"
    v = view({"Host": "127.0.0.1:8080", "Via": "1.1 p"}, "127.1.0.5")
    assert classify_anonymity(v, own) == "anonymous"
    v = view({"Host": "127.0.0.2:8080", "X-Forwarded-For": "127.0.0.1"}, "127.1.0.5")
    assert classify_anonymity(v, own) == "transparent"


def test_ipv6_own_address() -> None:
    own = {ipaddress.ip_address("2001:db8:abcd::17")}
    assert classify_anonymity(view({"Forwarded": 'for="[2001:db8:abcd::17]:4711"'}), own) == (
        "transparent"
    )
    assert classify_anonymity(view({"X-Forwarded-For": "2001:DB8:ABCD:0::17"}), own) == (
        "transparent"
    )
    assert classify_anonymity(view({"X-Forwarded-For": "2001:db8:abcd::171"}), own) == "anonymous"


def test_own_ips_may_be_strings_and_empty() -> None:
    v = view({"X-Forwarded-For": "203.0.113.45"})
    assert classify_anonymity(v, {"203.0.113.45"}) == "transparent"
    assert classify_anonymity(v, []) == "anonymous"  # nothing to leak, but still a proxy


def test_baseline_headers_added_by_the_judge_itself_do_not_count() -> None:
    # judge behind a load balancer that adds X-Forwarded-For / X-Forwarded-Proto to everything
    v = view({"X-Forwarded-For": PROXY_IP, "X-Forwarded-Proto": "https"})
    base = {"x-forwarded-for", "x-forwarded-proto"}
    assert classify_anonymity(v, OWN, base) == "elite"
    # ...but our address in them is still a leak
    v = view({"X-Forwarded-For": f"203.0.113.45, {PROXY_IP}"})
    assert classify_anonymity(v, OWN, base) == "transparent"


def test_extract_ips() -> None:
    got = [
        str(ip)
        for ip in extract_ips(
            'for="[2001:db8::1]:4711", for=192.0.2.60:80, by=10.1.2.3;'
            " host=example.com ::ffff:198.51.100.1 999.1.1.1 fe80::1%eth0"
        )
    ]
    assert got == [
        "192.0.2.60",
        "10.1.2.3",
        "198.51.100.1",
        "2001:db8::1",
        "198.51.100.1",
        "fe80::1",
    ]


def test_proxy_headers_cover_the_required_list() -> None:
    required = {
        "via",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "x-proxy-id",
        "proxy-connection",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-bluecoat-via",
        "x-originating-ip",
    }
    assert required <= PROXY_HEADERS


# ---------------------------------------------------------------- recorded from real servers
# httpbin 0.10.2 under gunicorn at 127.0.0.40, proxies from Debian (tests/real_proxies.py);
# the checker is 127.0.0.1. httpbin's origin is the X-Forwarded-For header when present.
CHECKER = {"127.0.0.1"}
# squid `forwarded_for off`, plain /get: Via and X-Forwarded-For hidden, origin = "unknown"
SQUID_FF_OFF_PLAIN = b"""{"args":{"ffp":"ab12"},"headers":{"Accept":"*/*",
"Cache-Control":"max-age=259200","Connection":"keep-alive","Host":"127.0.0.40:57829",
"User-Agent":"curl/7.88.1"},"origin":"unknown","url":"http://127.0.0.40:57829/get?ffp=ab12"}"""
# the same with show_env=1
SQUID_FF_OFF_ENV = b"""{"args":{"show_env":"1"},"headers":{"Accept":"*/*",
"Host":"127.0.0.40:57829","Via":"1.1 fetchfleet-test (squid/5.7)",
"X-Forwarded-For":"unknown"},"origin":"unknown","url":"http://127.0.0.40:57829/get"}"""
# squid default behind nginx ($proxy_add_x_forwarded_for): nginx appended the squid's address
SQUID_VIA_NGINX_ENV = b"""{"args":{"show_env":"1"},"headers":{"Host":"127.0.0.41:59331",
"Via":"1.1 fetchfleet-test (squid/5.7)","X-Forwarded-For":"127.0.0.1, 127.0.0.21",
"X-Real-Ip":"127.0.0.21"},"origin":"127.0.0.1, 127.0.0.21","url":"http://127.0.0.41/get"}"""
# squid `forwarded_for delete` + `via off` behind nginx
SQUID_ELITE_VIA_NGINX = b"""{"args":{},"headers":{"Host":"127.0.0.41:59331",
"X-Forwarded-For":"127.0.0.23","X-Real-Ip":"127.0.0.23"},"origin":"127.0.0.23",
"url":"http://127.0.0.41/get"}"""
NGINX_BASE = {"x-forwarded-for", "x-real-ip"}


def test_exit_ip_is_never_a_word_nor_our_own_address() -> None:
    plain = parse_judge_response(200, {}, SQUID_FF_OFF_PLAIN)
    assert exit_address(plain, CHECKER) is None  # origin "unknown"
    own = parse_judge_response(200, {}, SQUID_FF_OFF_PLAIN.replace(b"unknown", b"127.0.0.1"))
    assert exit_address(own, CHECKER) is None  # origin = squid's X-Forwarded-For: us
    chain = parse_judge_response(200, {}, SQUID_VIA_NGINX_ENV)
    assert exit_address(chain, CHECKER, xff_hops=1) == "127.0.0.21"  # what nginx saw
    elite = parse_judge_response(200, {}, SQUID_ELITE_VIA_NGINX)
    assert exit_address(elite, CHECKER, xff_hops=1) == "127.0.0.23"


def test_hidden_headers_make_the_verdict_unknown_never_elite() -> None:
    plain = parse_judge_response(200, {}, SQUID_FF_OFF_PLAIN)
    assert classify_anonymity(plain, CHECKER) == "elite"  # what the old checker said
    hidden = frozenset({"via", "x-forwarded-for"})
    assert classify_anonymity(plain, CHECKER, hidden=hidden) == Anonymity.UNKNOWN
    shown = parse_judge_response(200, {}, SQUID_FF_OFF_ENV)
    assert classify_anonymity(shown, CHECKER) == "anonymous"
    leak = parse_judge_response(200, {}, SQUID_FF_OFF_PLAIN.replace(b"unknown", b"127.0.0.1"))
    assert classify_anonymity(leak, CHECKER, hidden=hidden) == "transparent"  # origin = us


def test_reverse_proxy_entries_are_not_held_against_the_proxy() -> None:
    elite = parse_judge_response(200, {}, SQUID_ELITE_VIA_NGINX)
    assert classify_anonymity(elite, CHECKER, NGINX_BASE, xff_hops=1) == "elite"
    # an X-Forwarded-For entry of the proxy's own before nginx's: anonymous, not elite
    added = parse_judge_response(
        200, {}, SQUID_ELITE_VIA_NGINX.replace(b'"127.0.0.23","X-R', b'"10.9.8.7, 127.0.0.23","X-R')
    )
    assert classify_anonymity(added, CHECKER, NGINX_BASE, xff_hops=1) == "anonymous"
