"""The cascade's decisions, with fake methods at the method interface (no network):
policy, order, unavailable methods, retries and backoff, Retry-After, blocks, not-found,
domain learning with exploration, cookie hand-off, politeness, cache, secrets."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fetchers import Fetcher, FetchSettings, Policy, PolicyError, fetch
from fetchers.cache import ResponseCache
from fetchers.cascade import DomainMemory, domain_of
from fetchers.errors import ErrorType, FetchTimeout, MethodUnavailable, NetworkFailure
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse

GOOD = b"<html><title>ok</title><ul><li class=product>p</li></ul></html>"
CHALLENGE = b"<html><title>Just a moment...</title></html>"


def ok(body: bytes = GOOD, cookies: dict | None = None, ua: str | None = None) -> RawResponse:
    return RawResponse(200, body, {}, "http://x/", dict(cookies or {}), ua)


def status(code: int, body: bytes = b"<html>x</html>", **headers: str) -> RawResponse:
    return RawResponse(code, body, {k.replace("_", "-"): v for k, v in headers.items()}, "")


Step = RawResponse | Exception | Callable[[FetchRequest], RawResponse]


@dataclass
class Fake(FetchMethod):
    """Answers from a script; the last step repeats. Records every request."""

    fake_name: str
    steps: list[Step] = field(default_factory=list)
    is_browser: bool = False
    unavailable: str | None = None
    delay_s: float = 0.0
    requests: list[FetchRequest] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    blocked_hook: bool = False

    def __post_init__(self) -> None:
        self.name = self.fake_name
        self.browser = self.is_browser
        self.uses_proxy = True

    def unavailable_reason(self) -> str | None:
        return self.unavailable

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.requests.append(request)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            step = self.steps[min(len(self.requests) - 1, len(self.steps) - 1)]
            if isinstance(step, Exception):
                raise step
            return step(request) if callable(step) else step
        finally:
            self.in_flight -= 1

    async def on_blocked(self) -> bool:
        return self.blocked_hook


def fetcher(*fakes: Fake, **settings) -> Fetcher:
    settings.setdefault("backoff_s", 0.01)
    settings.setdefault("explore_rate", 0.0)
    return Fetcher(
        FetchSettings(**settings),
        methods={f.name: f for f in fakes},
        rng=random.Random(7),
    )


def run(coro):
    return asyncio.run(coro)


# -- policy -------------------------------------------------------------------------------------


def test_default_policy_is_the_architecture_table():
    p = Policy.load()
    assert p.order_for("Argentina") == ("tor", "selenium", "playwright")
    assert p.order_for("india") == ("api", "http", "selenium")
    assert p.order_for("RUSSIA") == ("selenium", "playwright", "http")
    assert p.order_for("Malaysia") == ("http", "playwright", "selenium")
    assert p.order_for("Chile") == p.order_for(None) == ("http", "playwright", "selenium")


def test_user_policy_file_overrides_rows(tmp_path: Path):
    f = tmp_path / "policy.toml"
    f.write_text('[countries]\nMalaysia = ["playwright", "http"]\nChile = "tor,http"\n')
    p = Policy.load(f)
    assert p.order_for("malaysia") == ("playwright", "http")
    assert p.order_for("Chile") == ("tor", "http")
    assert p.order_for("India") == ("api", "http", "selenium")  # kept


def test_bad_policy_files_say_what_is_wrong(tmp_path: Path):
    f = tmp_path / "p.toml"
    f.write_text('[countries]\nPeru = ["http", "curl"]\n')
    with pytest.raises(PolicyError, match=r"Peru.*curl"):
        Policy.load(f)
    f.write_text("[countries\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.load(f)
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "missing.toml")


# -- the cascade --------------------------------------------------------------------------------


def test_country_order_and_unavailable_method_skipped():
    api = Fake("api", unavailable="no API is described for this source")
    http = Fake("http", [ok()])
    sel = Fake("selenium", [ok()])
    r = run(fetcher(api, http, sel).fetch("http://shop.in/p", country="India"))
    assert r.success and r.method_used == "http" and r.content == GOOD
    assert [(a.method, a.error_type) for a in r.attempts] == [
        ("api", ErrorType.UNAVAILABLE),
        ("http", None),
    ]
    assert "no API" in r.attempts[0].message
    assert not sel.requests


def test_blocked_moves_to_the_next_method_and_is_never_content():
    http = Fake("http", [status(503, CHALLENGE, cf_mitigated="challenge")])
    pw = Fake("playwright", [status(200, b"<div class=g-recaptcha></div>")], is_browser=True)
    sel = Fake("selenium", [status(403, b"<h1>denied</h1>")], is_browser=True)
    r = run(fetcher(http, pw, sel).fetch("http://a.test/"))
    assert not r.success
    assert r.content == b""
    assert r.error_type == ErrorType.BLOCKED
    assert [a.method for a in r.attempts] == ["http", "playwright", "selenium"]
    assert "recaptcha" in r.attempts[1].blocked_reason
    with pytest.raises(Exception, match="every method failed"):
        r.raise_for_error()


def test_transient_errors_retry_with_backoff_then_move_on():
    http = Fake("http", [NetworkFailure("reset"), FetchTimeout("slow"), ok()])
    r = run(fetcher(http, retries=2).fetch("http://a.test/", method="http"))
    assert r.success
    assert [a.error_type for a in r.attempts] == [ErrorType.NETWORK, ErrorType.TIMEOUT, None]

    http = Fake("http", [status(502)])
    pw = Fake("playwright", [ok()], is_browser=True)
    r = run(fetcher(http, pw, retries=1).fetch("http://a.test/", method=["http", "playwright"]))
    assert r.success and r.method_used == "playwright"
    assert [a.error_type for a in r.attempts] == [
        ErrorType.SERVER_ERROR,
        ErrorType.SERVER_ERROR,
        None,
    ]


def test_429_waits_for_retry_after_before_retrying():
    stamps: list[float] = []

    def stamped(result: RawResponse) -> Callable[[FetchRequest], RawResponse]:
        def step(_: FetchRequest) -> RawResponse:
            stamps.append(time.monotonic())
            return result

        return step

    http = Fake("http", [stamped(status(429, retry_after="1")), stamped(ok())])
    r = run(fetcher(http).fetch("http://a.test/", method="http"))
    assert r.success
    assert r.attempts[0].error_type == ErrorType.RATE_LIMITED
    assert r.attempts[0].retry_after == 1.0
    assert stamps[1] - stamps[0] >= 0.95


def test_429_with_a_long_retry_after_moves_on():
    http = Fake("http", [status(429, retry_after="3600")])
    pw = Fake("playwright", [ok()], is_browser=True)
    t0 = time.monotonic()
    r = run(fetcher(http, pw).fetch("http://a.test/", method="http,playwright"))
    assert r.success and r.method_used == "playwright"
    assert time.monotonic() - t0 < 2


def test_not_found_stops_the_cascade():
    http = Fake("http", [status(404)])
    pw = Fake("playwright", [ok()], is_browser=True)
    r = run(fetcher(http, pw).fetch("http://a.test/gone"))
    assert not r.success and r.error_type == ErrorType.NOT_FOUND
    assert not pw.requests


def test_all_unavailable():
    r = run(fetcher(Fake("tor", unavailable="no tor")).fetch("http://a.test/", method="tor"))
    assert not r.success and r.error_type == ErrorType.UNAVAILABLE
    with pytest.raises(MethodUnavailable):
        r.raise_for_error()


def test_blocked_method_with_a_new_identity_retries_once():
    tor = Fake("tor", [status(403, b"<h1>no</h1>"), ok()], blocked_hook=True)
    r = run(fetcher(tor).fetch("http://a.test/", method="tor"))
    assert r.success and len(tor.requests) == 2


# -- learning per domain ------------------------------------------------------------------------


def test_domain_memory_starts_with_the_method_that_worked():
    http = Fake("http", [status(503, CHALLENGE)])
    pw = Fake("playwright", [ok()], is_browser=True)
    f = fetcher(http, pw, handoff_cookies=False)
    r1 = run(f.fetch("http://guarded.test/1"))
    assert [a.method for a in r1.attempts] == ["http", "playwright"]
    r2 = run(f.fetch("http://guarded.test/2"))
    assert [a.method for a in r2.attempts] == ["playwright"]  # http skipped
    r3 = run(f.fetch("http://other.test/1"))
    assert r3.attempts[0].method == "http"  # other domains unaffected
    assert f.memory.snapshot()["guarded.test"]["preferred"] == "playwright"


def test_exploration_tries_the_cheaper_method_and_moves_back_down():
    memory = DomainMemory(explore_rate=1.0, rng=random.Random(1))
    memory.record("d.test", "playwright", True)
    order, explored = memory.plan("d.test", ["http", "playwright"])
    assert order == ["http", "playwright"] and explored
    memory.record("d.test", "http", True)
    assert memory.plan("d.test", ["http", "playwright"]) == (["http", "playwright"], False)


def test_exploration_share_is_about_the_rate():
    memory = DomainMemory(explore_rate=0.1, rng=random.Random(3))
    memory.record("d.test", "selenium", True)
    explored = sum(memory.plan("d.test", ["http", "selenium"])[1] for _ in range(2000))
    assert 140 <= explored <= 260


def test_browser_cookies_are_handed_to_http_with_the_user_agent():
    def needs_clearance(req: FetchRequest) -> RawResponse:
        if req.cookies.get("cf_clearance") == "t" and req.user_agent == "UA/1":
            return ok()
        return status(503, CHALLENGE)

    http = Fake("http", [needs_clearance])
    pw = Fake("playwright", [ok(cookies={"cf_clearance": "t"}, ua="UA/1")], is_browser=True)
    f = fetcher(http, pw, explore_rate=1.0)
    assert run(f.fetch("http://cf.test/1")).method_used == "playwright"
    r = run(f.fetch("http://cf.test/2"))
    assert r.method_used == "http" and r.attempts[0].explored
    assert f.memory.snapshot()["cf.test"]["preferred"] == "http"
    # not through another proxy: the cookie is bound to the address it was earned from
    r = run(f.fetch("http://cf.test/3", method="http", proxy="http://10.0.0.1:3128"))
    assert not r.success


# -- politeness, cache, secrets, misc -----------------------------------------------------------


def test_per_domain_concurrency_and_delay():
    http = Fake("http", [ok()], delay_s=0.05)
    f = fetcher(http, domain_concurrency=2)

    async def many() -> None:
        await asyncio.gather(*(f.fetch(f"http://p.test/{i}", method="http") for i in range(8)))

    run(many())
    assert http.peak == 2

    http = Fake("http", [ok()])
    f = fetcher(http, domain_delay_s=0.1)

    async def spaced() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(f.fetch(f"http://q.test/{i}", method="http") for i in range(4)))
        return time.monotonic() - t0

    assert run(spaced()) >= 0.28


def test_cache_hits_and_misses():
    http = Fake("http", [ok()])
    f = fetcher(http, cache="lru", cache_size=2)
    run(f.fetch("http://c.test/1", method="http"))
    hit = run(f.fetch("http://c.test/1", method="http"))
    assert hit.from_cache and hit.success and hit.attempts == [] and len(http.requests) == 1
    stats = f.cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)
    run(f.fetch("http://c.test/1", method="http", use_cache=False))
    assert len(http.requests) == 2


def test_ttl_and_lru_eviction():
    now = [0.0]
    cache = ResponseCache("ttl", maxsize=10, ttl_s=5, clock=lambda: now[0])
    from fetchers.result import FetchResult

    cache.put("a", FetchResult("a", True, 200, b"x"))
    cache.put("bad", FetchResult("bad", False))
    assert cache.get("a") is not None and cache.get("bad") is None
    now[0] = 6
    assert cache.get("a") is None and cache.stats().expired == 1
    lru = ResponseCache("lru", maxsize=2)
    for k in "abc":
        lru.put(k, FetchResult(k, True))
        lru.get("a")
    assert lru.get("a") is not None and lru.get("b") is None and lru.stats().evictions == 1


def test_proxy_password_never_appears(caplog: pytest.LogCaptureFixture):
    secret = "s3cr3t-pw"
    http = Fake("http", [NetworkFailure(f"refused by http://u:{secret}@1.2.3.4:8080")])
    caplog.set_level(logging.DEBUG)
    proxy = f"http://u:{secret}@1.2.3.4:8080"
    r = run(fetcher(http, retries=0).fetch("http://a.test/", method="http", proxy=proxy))
    text = repr(r) + str(r.to_dict()) + caplog.text
    assert secret not in text
    assert r.attempts[0].proxy == "http://u:***@1.2.3.4:8080"


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        run(fetcher(Fake("http", [ok()])).fetch("ftp://x/"))
    with pytest.raises(PolicyError):
        run(fetcher(Fake("http", [ok()])).fetch("http://x/", method="curl"))


def test_domain_key():
    assert domain_of("http://User:pw@Shop.Test:8080/a?b") == "shop.test:8080"


def test_sync_fetch_reports_unavailable_without_network(monkeypatch: pytest.MonkeyPatch):
    # the sync wrapper runs on its own loop thread; an unknown port refuses fast
    r = fetch("http://127.0.0.1:9/", method="http", timeout_s=2)
    assert not r.success
    assert r.error_type in (ErrorType.NETWORK, ErrorType.UNAVAILABLE)


def test_browser_settle_rules():
    from fetchers.methods._browser import BLOCK_GRACE_S, Settle

    now = [0.0]
    s = Settle(wait_selector=True, limit_s=12, clock=lambda: now[0])
    assert not s.done(False, None)  # selector not there yet
    assert not s.done(False, "cloudflare challenge ('Just a moment...')")
    now[0] = 5
    assert not s.done(False, "cloudflare challenge ('Just a moment...')")  # still clearing
    assert s.done(True, None)
    s = Settle(wait_selector=True, limit_s=12, clock=lambda: now[0])
    assert not s.done(False, "recaptcha")  # a captcha page may still reload itself
    now[0] += BLOCK_GRACE_S
    assert s.done(False, "recaptcha")  # ...but not for the whole timeout
    s = Settle(wait_selector=False, limit_s=12, clock=lambda: now[0])
    assert s.done(False, None)
    now[0] += 12
    assert s.done(False, "cloudflare challenge") and s.expired()
