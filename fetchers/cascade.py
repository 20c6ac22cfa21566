"""The fetcher cascade: try methods in a per-country order until one gets a valid page.

One fetch, step by step (Crawlee's context pipeline, as a loop):

1. **Cache** — with a cache, a stored good answer for the URL is returned at once.
2. **Order** — the methods to try: the call's `method` (one name or a list), else the
   country's row of the policy (`fetchers/policy.toml`, a user file, or a `Policy` passed
   in), else `_default`. **Domain memory** then reorders it: once a domain needed a costlier
   method (a browser), later requests start with the method that last succeeded there, and
   a share `explore_rate` of them (10% by default) try the cheaper order again, so a
   domain moves back down when it no longer needs a browser (Crawlee's adaptive crawler
   does the same).
3. **Each method**: skipped with an `unavailable` attempt if it cannot run here (missing
   package, binary, tor, API spec). Else a request is made inside the domain's politeness
   slot (at most `domain_concurrency` in flight, `domain_delay_s` between starts), through
   the call's proxy or one from the pool (not for tor, which is its own route). For the
   `http` method (and the browsers' fresh contexts), cookies a browser earned on the domain
   go along, with that browser's User-Agent, when the proxy is the same (a clearance cookie
   is bound to both).
4. **Validate** (`fetchers.validation`): status, length, required selectors, block pages.
5. **Decide** on the error type: transient (`timeout`, `network`, `proxy`, `server_error`)
   → retry the same method with exponential backoff and jitter, up to `retries`;
   `rate_limited` → wait for Retry-After (when at most `max_retry_after_s`; the whole
   domain waits with it) then retry, else next method; `blocked` → next method (tor first
   asks for a new identity and retries once); `invalid`, `http_error`, `unavailable` → next
   method; `not_found` → stop: no method will find a page the site says does not exist.
6. **Result** — the first valid answer, with every attempt; or a failure with empty content
   (a block page is never content), the most telling error type and the last block reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
import tomllib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fetchers.cache import ResponseCache
from fetchers.config import FetchSettings
from fetchers.errors import AttemptError, ErrorType, FetchTimeout, TooLarge
from fetchers.methods.base import (
    BROWSER_METHODS,
    METHOD_NAMES,
    FetchMethod,
    FetchRequest,
    create_method,
)
from fetchers.methods.http import scrub
from fetchers.pool import NoProxyAvailable, ProxyLease, ProxyPool
from fetchers.result import Attempt, FetchResult
from fetchers.validation import ValidationRules, Verdict, validate

if TYPE_CHECKING:
    from fetchers.methods.api import ApiSpec
    from fetchers.snapshots import Snapshotter

__all__ = [
    "DEFAULT_POLICY_FILE",
    "DomainMemory",
    "Fetcher",
    "Policy",
    "PolicyError",
    "Politeness",
    "domain_of",
]

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = Path(__file__).with_name("policy.toml")
DEFAULT_KEY = "_default"
_SAFETY_MARGIN_S = 15.0  # a method that ignores its own timeout is cut off after this


class PolicyError(ValueError):
    """A policy file or row that cannot be used; the message names the file and row."""


# an http(s) URL whose netloc urlsplit would take as it is (no tab or newline to drop, no
# IPv6 brackets to check, ASCII)
_PLAIN_NETLOC = re.compile(r"https?://([^/?#\[\]\t\r\n]*)(?=[/?#]|\Z)", re.ASCII)


def domain_of(url: str) -> str:
    """The politeness and learning key: host[:port], lower-case."""
    m = _PLAIN_NETLOC.match(url)
    netloc = m.group(1) if m is not None and m.group(1).isascii() else urlsplit(url).netloc
    return netloc.rpartition("@")[2].lower()


def parse_methods(value: str | Sequence[str]) -> list[str]:
    """'http,playwright' or ['http', 'playwright'] → a checked list of method names."""
    names = value.split(",") if isinstance(value, str) else list(value)
    out = [n.strip().lower() for n in names if n and n.strip()]
    bad = [n for n in out if n not in METHOD_NAMES]
    if bad:
        raise PolicyError(
            f"unknown fetch method(s) {', '.join(bad)}: use {', '.join(METHOD_NAMES)}"
        )
    if not out:
        raise PolicyError("no fetch method given")
    return list(dict.fromkeys(out))


# -- policy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A per-country order of methods. Country names match case-insensitively."""

    orders: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_mapping(
        cls, rows: Mapping[str, Sequence[str] | str], source: str = "policy"
    ) -> Policy:
        orders: dict[str, tuple[str, ...]] = {}
        for country, methods in rows.items():
            try:
                orders[country.strip().lower()] = tuple(parse_methods(methods))
            except PolicyError as exc:
                raise PolicyError(f"{source}, row {country!r}: {exc}") from None
        return cls(orders)

    @classmethod
    def load(cls, path: Path | str | None = None) -> Policy:
        """The built-in policy, with the rows of `path` (if given) replacing its own."""
        policy = cls._read(DEFAULT_POLICY_FILE)
        if path is not None:
            policy = policy.merged(cls._read(Path(path)))
        if DEFAULT_KEY not in policy.orders:
            raise PolicyError(f"the policy has no {DEFAULT_KEY} row")
        return policy

    @classmethod
    def _read(cls, path: Path) -> Policy:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PolicyError(f"policy file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
        rows = data.get("countries", data)
        if not isinstance(rows, Mapping):
            raise PolicyError(f"policy file {path}: expected a [countries] table")
        return cls.from_mapping(rows, source=str(path))

    def merged(self, other: Policy) -> Policy:
        return Policy({**self.orders, **other.orders})

    def order_for(self, country: str | None) -> tuple[str, ...]:
        if country:
            found = self.orders.get(country.strip().lower())
            if found:
                return found
        return self.orders[DEFAULT_KEY]

    def rows(self) -> dict[str, list[str]]:
        return {country: list(methods) for country, methods in self.orders.items()}


# -- per-domain learning -----------------------------------------------------------------------


@dataclass
class DomainState:
    preferred: str | None = None  # the method that last succeeded here
    successes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    cookies: dict[str, str] = field(default_factory=dict)  # earned by a browser
    user_agent: str | None = None  # the browser's, for those cookies
    cookie_proxy: str | None = None  # the proxy the cookies were earned through
    cookies_from: str | None = None
    # the browser a page here last needed (it passed after a cheaper method was blocked): a
    # page later got without one avoided it (``Attempt.avoided``, cost accounting)
    browser_needed: str | None = None


class DomainMemory:
    """What the cascade learned per domain. Bounded (least recently used domains go).
    Thread-safe: the default fetchers of several event loops share one."""

    def __init__(
        self,
        explore_rate: float = 0.1,
        rng: random.Random | None = None,
        max_domains: int = 10_000,
    ) -> None:
        self.explore_rate = explore_rate
        self.rng = rng or random.Random()
        self.max_domains = max_domains
        self._domains: OrderedDict[str, DomainState] = OrderedDict()
        self._lock = threading.RLock()

    def state(self, domain: str) -> DomainState:
        with self._lock:
            return self._state(domain)

    def _state(self, domain: str) -> DomainState:
        st = self._domains.get(domain)
        if st is None:
            st = self._domains[domain] = DomainState()
            while len(self._domains) > self.max_domains:
                self._domains.popitem(last=False)
        else:
            self._domains.move_to_end(domain)
        return st

    def peek(self, domain: str) -> DomainState | None:
        return self._domains.get(domain)

    def plan(self, domain: str, order: Sequence[str]) -> tuple[list[str], bool]:
        """(order to try, explored): start with the learned method, except when exploring."""
        with self._lock:
            st = self._domains.get(domain)
            explore = self.rng.random() < self.explore_rate
        order = list(order)
        if st is None or st.preferred is None or st.preferred not in order:
            return order, False
        if st.preferred == order[0]:
            return order, False
        if explore:
            return order, True  # give the cheaper methods another chance
        return [st.preferred, *[m for m in order if m != st.preferred]], False

    def record(self, domain: str, method: str, ok: bool) -> None:
        with self._lock:
            st = self._state(domain)
            if ok:
                st.successes[method] += 1
                st.preferred = method
            else:
                st.failures[method] += 1

    def needed_browser(self, domain: str, method: str) -> None:
        with self._lock:
            self._state(domain).browser_needed = method

    def browser_needed(self, domain: str) -> str | None:
        with self._lock:
            st = self._domains.get(domain)
            return st.browser_needed if st is not None else None

    def remember_cookies(
        self,
        domain: str,
        cookies: Mapping[str, str],
        user_agent: str | None,
        proxy: str | None,
        method: str,
    ) -> None:
        if not cookies:
            return
        with self._lock:
            st = self._state(domain)
            st.cookies = dict(cookies)
            st.user_agent = user_agent
            st.cookie_proxy = proxy
            st.cookies_from = method

    def handoff(self, domain: str, proxy: str | None) -> tuple[dict[str, str], str | None]:
        """Cookies and User-Agent a browser earned here through the same proxy, if any."""
        with self._lock:
            st = self._domains.get(domain)
            if st is None or not st.cookies or st.cookie_proxy != proxy:
                return {}, None
            return dict(st.cookies), st.user_agent

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per domain: preferred method, successes and failures per method (no cookies)."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            d: {
                "preferred": st.preferred,
                "successes": dict(st.successes),
                "failures": dict(st.failures),
                "has_browser_cookies": bool(st.cookies),
                "browser_needed": st.browser_needed,
            }
            for d, st in self._domains.items()
        }


# -- politeness --------------------------------------------------------------------------------


class Politeness:
    """Per-domain slots (Scrapy's downloader slots): a concurrency limit and a minimum gap
    between request starts; `defer` pushes a domain's next start (after a 429); `set_delay`
    gives one domain a longer gap (its robots.txt Crawl-delay)."""

    def __init__(self, concurrency: int = 8, delay_s: float = 0.0, max_domains: int = 10_000):
        self.concurrency = concurrency
        self.delay_s = delay_s
        self.max_domains = max_domains
        self._sems: OrderedDict[str, asyncio.Semaphore] = OrderedDict()
        self._next_start: dict[str, float] = {}
        self._delays: dict[str, float] = {}  # bounded by whoever sets them (the robots cache)

    def set_delay(self, domain: str, seconds: float | None) -> None:
        """The domain's own gap between request starts (None: back to ``delay_s``)."""
        if seconds:
            self._delays[domain] = seconds
        else:
            self._delays.pop(domain, None)

    def delay_for(self, domain: str) -> float:
        """The gap between request starts to ``domain``: its own, at least ``delay_s``."""
        return max(self.delay_s, self._delays.get(domain, 0.0))

    def next_start(self, domain: str) -> float | None:
        """When (time.monotonic) the domain's next request may start, if it must wait."""
        return self._next_start.get(domain)

    def _sem(self, domain: str) -> asyncio.Semaphore:
        sem = self._sems.get(domain)
        if sem is None:
            sem = self._sems[domain] = asyncio.Semaphore(self.concurrency)
            if len(self._sems) > self.max_domains:
                old, old_sem = next(iter(self._sems.items()))
                if not old_sem.locked():
                    self._sems.pop(old)
                    self._next_start.pop(old, None)
        return sem

    def defer(self, domain: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._next_start[domain] = max(self._next_start.get(domain, 0.0), until)

    def slot(self, domain: str) -> _Slot:
        """`async with politeness.slot(domain):` one request start, within the limits."""
        return _Slot(self, domain)


class _Slot:
    """One request's place in a domain's slot (a plain class: no generator per request)."""

    __slots__ = ("_domain", "_politeness", "_sem")

    def __init__(self, politeness: Politeness, domain: str) -> None:
        self._politeness = politeness
        self._domain = domain
        self._sem: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        p, domain = self._politeness, self._domain
        sem = p._sem(domain)
        await sem.acquire()
        try:
            while domain in p._next_start:
                wait = p._next_start[domain] - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
        except BaseException:
            sem.release()
            raise
        self._sem = sem
        delay = p.delay_for(domain)
        if delay:
            p._next_start[domain] = time.monotonic() + delay

    async def __aexit__(self, *exc: object) -> None:
        assert self._sem is not None
        self._sem.release()


# -- the cascade -------------------------------------------------------------------------------


class Fetcher:
    """The cascade with its methods, policy, domain memory, politeness, cache and pool.

    Use one per process (or per event loop): browsers and sessions are reused across
    fetches. `async with Fetcher(...) as f: await f.fetch(url, country=...)`; `aclose()`
    releases browsers, sessions and a launched tor.
    """

    def __init__(
        self,
        settings: FetchSettings | None = None,
        *,
        policy: Policy | None = None,
        methods: Mapping[str, FetchMethod] | None = None,
        memory: DomainMemory | None = None,
        cache: ResponseCache | None = None,
        pool: ProxyPool | None = None,
        rng: random.Random | None = None,
        snapshots: Snapshotter | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        # error snapshots: the first refused answer of each kind (`fetchers.snapshots`)
        self.snapshots = snapshots
        self.policy = policy or Policy.load(self.settings.policy_file)
        self.rng = rng or random.Random()
        self.memory = memory or DomainMemory(self.settings.explore_rate, self.rng)
        if cache is None and self.settings.cache != "off":
            cache = ResponseCache(
                self.settings.cache, self.settings.cache_size, self.settings.cache_ttl_s
            )
        self.cache = cache
        self.pool = pool
        self.politeness = Politeness(self.settings.domain_concurrency, self.settings.domain_delay_s)
        self._methods: dict[str, FetchMethod] = dict(methods or {})
        self.stats: Counter[str] = Counter()  # wins per method, and failures

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def method(self, name: str) -> FetchMethod:
        m = self._methods.get(name)
        if m is None:
            m = self._methods[name] = create_method(name, self.settings)
        return m

    async def aclose(self) -> None:
        for m in list(self._methods.values()):
            try:
                await m.aclose()
            except Exception as exc:  # closing must go on for the others
                log.warning("closing fetch method %s: %s", m.name, exc)

    # -- one fetch ------------------------------------------------------------------------------

    async def fetch(
        self,
        url: str,
        *,
        country: str | None = None,
        method: str | Sequence[str] | None = None,
        proxy: str | None = None,
        selectors: Iterable[str] = (),
        wait_selector: str | None = None,
        min_length: int | None = None,
        expect_json: bool = False,
        rules: ValidationRules | None = None,
        headers: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        api: ApiSpec | None = None,
        timeout_s: float | None = None,
        use_cache: bool = True,
        max_bytes: int | None = None,
    ) -> FetchResult:
        """Fetch `url` through the cascade; never raises for a failed fetch (see
        `FetchResult.success`, `.error_type`, `.raise_for_error()`), only for bad
        arguments (`PolicyError`, `ValueError`).

        `max_bytes`: a larger body is refused by its Content-Length or cut off while it
        arrives (curl-based methods: http, tor, api; a browser's HTML is measured in the page);
        the result fails with `too_large`, the answer's status and headers, and no other
        method is tried. Without it, `settings.max_page_bytes` bounds the page the same way."""
        began = time.monotonic()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        cache_key = url if api is None else f"{url} {api.url_template or ''}"
        if self.cache is not None and use_cache:
            hit = self.cache.get(cache_key)
            if hit is not None and (max_bytes is None or len(hit.content) <= max_bytes):
                return replace(hit, country=country)
        order = parse_methods(method) if method else list(self.policy.order_for(country))
        domain = domain_of(url)
        unlearned = order
        order, explored = self.memory.plan(domain, order) if not method else (order, False)
        if rules is None:
            selectors = tuple(selectors)
            rules = ValidationRules(
                min_length=self.settings.min_length if min_length is None else min_length,
                required_selectors=selectors,
                expect_json=expect_json,
            )
        base = FetchRequest(
            url=url,
            timeout_s=timeout_s or self.settings.fetch_timeout_s,
            headers=dict(headers or {}),
            cookies=dict(cookies or {}),
            wait_selector=wait_selector
            or (rules.required_selectors[0] if rules.required_selectors else None),
            api=api,
            max_bytes=max_bytes,
            capture=self._capture(rules) if self.snapshots is not None else None,
        )
        attempts: list[Attempt] = []
        for index, name in enumerate(order):
            m = self.method(name)
            method_rules = replace(rules, expect_json=True) if name == "api" else rules
            result = await self._run_method(
                m, base, method_rules, domain, proxy, attempts, explored and index == 0
            )
            if result is not None:
                result.elapsed_ms = (time.monotonic() - began) * 1000
                result.country = country
                if not result.success:  # too large: final, and not the method's failure
                    self.stats["failed"] += 1
                    return result
                self.stats[name] += 1
                result.attempts[-1].avoided = self._avoided(
                    domain, unlearned, order != unlearned, result.attempts
                )
                if self.cache is not None and use_cache:
                    self.cache.put(cache_key, result)
                return result
            if attempts and attempts[-1].error_type == ErrorType.NOT_FOUND:
                break  # the site says it does not exist: no other method will find it
        self.stats["failed"] += 1
        return self._failure(url, attempts, began, country)

    async def _run_method(
        self,
        m: FetchMethod,
        base: FetchRequest,
        rules: ValidationRules,
        domain: str,
        proxy: str | None,
        attempts: list[Attempt],
        explored: bool,
    ) -> FetchResult | None:
        """Try one method (with its retries); a result on success or on a final failure
        (too large), else None."""
        reason = m.unavailable_reason()
        if reason:
            attempts.append(
                Attempt(m.name, error_type=ErrorType.UNAVAILABLE, message=reason, explored=explored)
            )
            return None
        s = self.settings
        tries = 0
        retried_after_block = False
        while True:
            lease: ProxyLease | None = None
            proxy_url = proxy if m.uses_proxy else None
            if m.uses_proxy and proxy is None and self.pool is not None:
                try:
                    lease = self.pool.acquire()
                except NoProxyAvailable as exc:
                    attempts.append(Attempt(m.name, error_type=ErrorType.PROXY, message=str(exc)))
                    return None
                proxy_url = lease.url
            request = base if proxy_url == base.proxy else replace(base, proxy=proxy_url)
            if s.handoff_cookies and (m.name == "http" or m.browser):
                jar, ua = self.memory.handoff(domain, proxy_url)
                if jar:
                    request = replace(request, cookies={**jar, **request.cookies}, user_agent=ua)
            attempt = Attempt(
                m.name,
                proxy=(lease.redacted if lease else _redact(proxy_url)),
                explored=explored,
            )
            t0 = time.monotonic()
            raw = None
            refused: TooLarge | None = None
            verdict: Verdict
            try:
                async with self.politeness.slot(domain):
                    t0 = time.monotonic()
                    # asyncio.timeout, not wait_for: no extra task per request
                    async with asyncio.timeout(request.timeout_s * 2 + _SAFETY_MARGIN_S):
                        raw = await m.fetch(request)
                verdict = validate(raw.status, raw.headers, raw.content, rules)
            except AttemptError as exc:
                verdict = Verdict(False, exc.error_type, None)
                attempt.message = scrub(str(exc), proxy_url)
                if isinstance(exc, TooLarge):  # an answer, refused for its size
                    refused = exc
                    attempt.status, attempt.bytes = exc.status, exc.received
            except TimeoutError:
                exc2 = FetchTimeout(f"{m.name}: no answer within the safety timeout")
                verdict = Verdict(False, exc2.error_type, None)
                attempt.message = str(exc2)
            attempt.ms = (time.monotonic() - t0) * 1000
            if raw is not None:
                attempt.status = raw.status
                attempt.bytes = len(raw.content)
            attempt.error_type = verdict.error_type
            attempt.blocked_reason = verdict.reason
            attempt.retry_after = verdict.retry_after
            attempts.append(attempt)
            if raw is not None and not verdict.ok and self.snapshots is not None:
                self._snapshot(m.name, base.url, raw, verdict, proxy_url)
            if lease is not None:
                transport = verdict.error_type in (
                    ErrorType.PROXY,
                    ErrorType.TIMEOUT,
                    ErrorType.NETWORK,
                )
                delivered = verdict.ok or refused is not None
                outcome = "ok" if delivered else ("failed" if transport else "blocked")
                lease.release(outcome, attempt.ms)
            if log.isEnabledFor(logging.INFO):
                self._log(base.url, attempt)

            if verdict.ok:
                assert raw is not None
                self.memory.record(domain, m.name, True)
                if m.browser and any(
                    a.method not in BROWSER_METHODS
                    and a.error_type in (ErrorType.BLOCKED, ErrorType.INVALID)
                    for a in attempts
                ):
                    self.memory.needed_browser(domain, m.name)
                if m.browser and self.settings.handoff_cookies:
                    self.memory.remember_cookies(
                        domain, raw.cookies, raw.user_agent, proxy_url, m.name
                    )
                return FetchResult(
                    url=base.url,
                    success=True,
                    status=raw.status,
                    content=raw.content,
                    final_url=raw.final_url,
                    method_used=m.name,
                    attempts=attempts,
                    headers=raw.headers,
                )
            if refused is not None:  # final: every method would bring the same body
                failure = self._failure(base.url, attempts, t0, None)
                failure.error = f"{m.name}: {attempt.message}"
                failure.headers = refused.headers
                return failure
            self.memory.record(domain, m.name, False)
            etype = verdict.error_type
            if etype == ErrorType.BLOCKED:
                if not retried_after_block and await m.on_blocked():
                    retried_after_block = True
                    continue
                return None
            if etype == ErrorType.RATE_LIMITED:
                wait = verdict.retry_after
                if tries < s.retries and (wait is None or wait <= s.max_retry_after_s):
                    delay = wait if wait is not None else self._backoff(tries)
                    self.politeness.defer(domain, delay)
                    tries += 1
                    continue  # the politeness slot waits for the deferred start
                return None
            if etype is not None and etype.transient and tries < s.retries:
                delay = self._backoff(tries)
                if verdict.retry_after is not None and verdict.retry_after <= s.max_retry_after_s:
                    delay = max(delay, verdict.retry_after)
                await asyncio.sleep(delay)
                tries += 1
                continue
            return None

    def _capture(self, rules: ValidationRules) -> Any:
        """What a browser asks before closing a page: would its answer be snapshotted?"""
        from fetchers.snapshots import fetch_kind

        wants = self.snapshots.wants  # type: ignore[union-attr]

        def capture(status: int, headers: Mapping[str, str], content: bytes) -> bool:
            verdict = validate(status, headers, content, rules)
            return not verdict.ok and wants(fetch_kind(verdict.error_type, verdict.reason))

        return capture

    def _snapshot(
        self, method: str, url: str, raw: Any, verdict: Verdict, proxy: str | None
    ) -> None:
        """Keep a refused answer as its kind's error snapshot, if the kind has none yet."""
        from fetchers.snapshots import fetch_kind

        snaps = self.snapshots
        kind = fetch_kind(verdict.error_type, verdict.reason)
        if snaps is not None and snaps.wants(kind):
            assert kind is not None
            snaps.add(
                kind,
                url,
                method,
                f"{method}: {verdict.error_type} ({verdict.reason})",
                raw.content,
                screenshot=raw.screenshot,
                status=raw.status,
                proxy=proxy,
            )

    def _avoided(
        self, domain: str, unlearned: Sequence[str], reordered: bool, attempts: list[Attempt]
    ) -> str | None:
        """The browser a page got without one would have needed but for domain learning: one
        the unlearned order put before the winner (skipped by a learned order), else the one
        the domain last needed (its cookies let http in, or exploring found http works
        again). None when a browser was tried or the page came by a browser."""
        winner = attempts[-1].method
        tried = {a.method for a in attempts if a.error_type != ErrorType.UNAVAILABLE}
        if tried & set(BROWSER_METHODS):
            return None
        if reordered and winner in unlearned:
            ahead = unlearned[: unlearned.index(winner)]
            skipped = [m for m in ahead if m in BROWSER_METHODS and m not in tried]
            if skipped:
                return skipped[0]
        return self.memory.browser_needed(domain)

    def _backoff(self, tries: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_s * (2**tries)) * self.rng.uniform(0.5, 1.0)

    @staticmethod
    def _log(url: str, a: Attempt) -> None:
        log.info(
            "fetch %s via %s: %s",
            url,
            a.method,
            "ok" if a.ok else f"{a.error_type} ({a.blocked_reason or a.message})",
            extra={
                "url": url,
                "method": a.method,
                "status": a.status,
                "error_type": str(a.error_type) if a.error_type else None,
                "blocked_reason": a.blocked_reason,
                "ms": round(a.ms, 1),
                "proxy": a.proxy,
            },
        )

    @staticmethod
    def _failure(
        url: str, attempts: list[Attempt], began: float, country: str | None
    ) -> FetchResult:
        tried = [a for a in attempts if a.error_type != ErrorType.UNAVAILABLE]
        last = (tried or attempts)[-1] if attempts else None
        blocked = [a.blocked_reason for a in attempts if a.error_type == ErrorType.BLOCKED]
        parts = []
        for a in attempts:
            if parts and parts[-1][0] == a.method:
                parts[-1] = (a.method, a)
            else:
                parts.append((a.method, a))
        summary = "; ".join(
            f"{name}: {a.error_type} ({a.blocked_reason or a.message or a.status})"
            for name, a in parts
        )
        return FetchResult(
            url=url,
            success=False,
            status=last.status if last else None,
            method_used=last.method if last else None,
            attempts=attempts,
            error_type=last.error_type if last else ErrorType.UNAVAILABLE,
            error=f"every method failed — {summary}" if attempts else "no method to try",
            blocked_reason=blocked[-1] if blocked else None,
            elapsed_ms=(time.monotonic() - began) * 1000,
            country=country,
        )


def _redact(proxy: str | None) -> str | None:
    if not proxy:
        return None
    parts = urlsplit(proxy)
    if parts.password is None:
        return proxy
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
