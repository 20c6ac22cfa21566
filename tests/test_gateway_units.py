"""The gateway's parts that need no network: the shared pool's membership updates, per-site
quality, filters and stickiness; request parsing limits; usernames; cache rules."""

from __future__ import annotations

import pytest

from engine.gateway.auth import Authenticator, Credentials, Routing, parse_username
from engine.gateway.cache import request_cacheable, response_cacheable
from engine.gateway.http import HttpError, Response, parse_request
from fetchers.pool import BreakerState, NoProxyAvailable, ProxyPool

A, B, C = "http://10.0.0.1:8080", "http://10.0.0.2:8080", "socks5://u:pw@10.0.0.3:1080"


def test_update_keeps_what_was_learnt_and_drops_the_gone() -> None:
    pool = ProxyPool([], "round_robin", failure_threshold=1, allow_empty=True)
    with pytest.raises(NoProxyAvailable, match="empty"):
        pool.acquire()
    assert pool.update([(A, "a"), (B, "b")]) == (2, 0)
    lease = next(lease for lease in (pool.acquire() for _ in range(2)) if lease.url == A)
    lease.release("failed")
    assert pool.update([(A, "a2"), (C, "c")]) == (1, 1)
    a = next(p for p in pool.proxies if p.url == A)
    assert a.state == BreakerState.OPEN and a.meta == "a2"  # the breaker survived the reload
    assert {pool.acquire().url for _ in range(3)} == {C}


def test_site_block_avoids_the_proxy_for_that_site_only() -> None:
    pool = ProxyPool([A, B], "round_robin")
    first = pool.acquire(site="shop:80")
    first.release("blocked", 5)
    assert all(pool.acquire(site="shop:80").url != first.url for _ in range(6))
    assert {pool.acquire(site="other:80").url for _ in range(4)} == {A, B}
    assert first.state.success_ewma == 1.0  # the proxy itself is fine
    # when every candidate is avoided for the site, it is still served
    for p in pool.proxies:
        p.in_flight = 0
    other = next(p for p in pool.proxies if p is not first.state)
    pool.acquire(site="shop:80", exclude=[first.state]).release("blocked", 5)
    assert pool.acquire(site="shop:80").state in (first.state, other)


def test_accept_exclude_and_prefer() -> None:
    pool = ProxyPool([A, B, C], "round_robin")
    for p, country in zip(pool.proxies, ["MY", "IN", "MY"], strict=True):
        p.meta = country
    picks = {pool.acquire(accept=lambda p: p.meta == "MY").url for _ in range(4)}
    assert picks == {A, C}
    assert pool.acquire(exclude=pool.proxies[:2]).url == C
    key = pool.proxies[1].spec.key
    assert all(pool.acquire(prefer=key).url == B for _ in range(3))
    with pytest.raises(NoProxyAvailable, match="matches"):
        pool.acquire(accept=lambda p: p.meta == "AR")


def test_usernames() -> None:
    assert parse_username("bob-country-my-session-abc") == ("bob", Routing("MY", "abc"))
    assert parse_username("bob") == ("bob", Routing())
    for bad in ("bob-country", "bob-country-Malaysia", "bob-colour-red"):
        with pytest.raises(ValueError):
            parse_username(bad)
    auth = Authenticator(Credentials("bob", "s3cret"))
    assert auth.check("bob-country-IN", "s3cret") == Routing("IN", None)
    assert auth.check("bob", "wrong") is None and auth.check(None, None) is None
    assert Authenticator(None).check(None, None) == Routing()
    with pytest.raises(ValueError, match="GW"):
        Credentials.from_env("GW", {"GW": "nopassword"})


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /relative HTTP/1.1\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET http://x/ HTTP/9.9\r\n\r\n", 400),
        (b"GET ftp://x/ HTTP/1.1\r\n\r\n", 501),
        (b"CONNECT no-port-but@odd HTTP/1.1\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
    ],
)
def test_bad_requests_get_their_status(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        parse_request(head)
    assert e.value.status == status


def test_requests_parse() -> None:
    r = parse_request(b"GET http://Example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (r.host, r.port, r.path, r.keep_alive) == ("example.com", 8080, "/a?b=1", True)
    c = parse_request(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n")
    assert (c.is_connect, c.host, c.port) == (True, "::1", 443)


def test_cache_rules() -> None:
    get = parse_request(b"GET http://x/ HTTP/1.1\r\n\r\n")
    assert request_cacheable(get)
    assert not request_cacheable(parse_request(b"GET http://x/ HTTP/1.1\r\nCookie: a=1\r\n\r\n"))
    assert not request_cacheable(
        parse_request(b"GET http://x/ HTTP/1.1\r\nAuthorization: B x\r\n\r\n")
    )
    assert not request_cacheable(parse_request(b"POST http://x/ HTTP/1.1\r\n\r\n"))

    def resp(*headers: tuple[str, str], status: int = 200) -> Response:
        return Response(status, "OK", "HTTP/1.1", list(headers), b"x")

    assert response_cacheable(resp(("Cache-Control", "max-age=60")), 100)
    for h in (("Cache-Control", "no-store"), ("Cache-Control", "private"), ("Set-Cookie", "a=1")):
        assert not response_cacheable(resp(h), 100)
    assert not response_cacheable(resp(status=404), 100)


@pytest.mark.parametrize(
    "target",
    ["http://Example.com/a?b=1", "http://h:8080", "http://h:0/", "http://h:65536/", "http://h:/x",
     "http://[::1]:80/", "http://u@h/", "http://h/a#f", "http://h?x=1", "http://h/a?",
     "http://127.0.0.1:33/p/q?r=s&t", "http://h:08/x", "http://h:1x/", "HTTP://h/",
     "http://h%41/", "http://h:\u0663/"],
)  # fmt: skip
def test_the_fast_target_split_agrees_with_the_general_parser(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.gateway import http

    def parsed() -> object:
        try:
            r = http.parse_request(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        except http.HttpError as e:
            return e.status
        return (r.host, r.port, r.path)

    fast = parsed()
    monkeypatch.setattr(http, "_plain_absolute", lambda _t: None)
    assert fast == parsed()


@pytest.mark.parametrize(
    "authority",
    ["example.com:443", "Ex.COM:8080", "127.0.0.1:1", "h_x:65535", "x:00443", "h:0", "h:",
     "h:65536", "h:+1", "h:1:2", "[::1]:443", "a b:1", "h:\u0663", "user@h:443", "h%41:1"],
)  # fmt: skip
def test_connect_authority_fast_split_agrees_with_the_general_parser(authority: str) -> None:
    """CONNECT targets are split without urlsplit when they are plain host:port; anything
    else goes to the general parser, so the answer (or the 400) is the same."""
    from engine.gateway.http import split_authority

    head = f"CONNECT {authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    try:
        expected: tuple[str, int] | int = split_authority(authority, 443)
    except HttpError as e:
        expected = e.status
    try:
        req = parse_request(head)
        got: tuple[str, int] | int = (req.host, req.port)
    except HttpError as e:
        got = e.status
    assert got == expected


def test_header_values_lose_only_ascii_whitespace() -> None:
    """Header lines are decoded once (latin-1); the strip stays that of the bytes: NBSP
    (0xA0) and NEL (0x85) are part of the value."""
    req = parse_request(b"GET http://h/ HTTP/1.1\r\nX-A: \x85v\xa0 \t\r\nX-B:\x0cw\r\n\r\n")
    assert req.headers == [("X-A", "\x85v\xa0"), ("X-B", "w")]
    # as before: a name is refused for ASCII space around or in it, not for 0xA0
    assert parse_request(b"GET http://h/ HTTP/1.1\r\nX\xa0: v\r\n\r\n").headers == [("X\xa0", "v")]
    with pytest.raises(HttpError):
        parse_request(b"GET http://h/ HTTP/1.1\r\nX\x0b: v\r\n\r\n")


def test_response_header_index_follows_a_dechunked_body() -> None:
    """The header index is built once; dropping Transfer-Encoding after de-chunking
    resets it, so a later lookup does not see the dropped field."""
    from engine.gateway.http import Framing, complete_body, parse_response_head

    resp = parse_response_head(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    assert resp.header("transfer-encoding") == "chunked"
    buf = bytearray(b"2\r\nhi\r\n0\r\n\r\n")
    assert complete_body(resp, Framing.CHUNKED, 0, buf, False) == len(buf)
    assert resp.body == b"hi"
    assert resp.header("transfer-encoding") is None
    assert resp.header("Connection") == "close"
