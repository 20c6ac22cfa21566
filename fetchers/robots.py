"""robots.txt: may we fetch this URL, and how slowly (Protego parses; this module fetches
and remembers).

Each origin's robots.txt is fetched once through the caller's `Fetcher` (so through the
same route as the pages: direct, a proxy of the run's pool, or tor), kept in a bounded LRU,
and its `Crawl-delay` for our agent becomes the domain's gap between request starts in the
fetcher's politeness slots. What an answer means (Google's reading of RFC 9309):

- **2xx**: the rules for our agent token (else the `*` group) apply;
- **4xx** (404, 403, 401...): there are no rules — everything is allowed;
- **429, 5xx, no answer** (refused, timed out, blocked): the site could not say, so nothing
  is fetched from it for `error_ttl_s` (5 minutes); then robots.txt is asked again. Pages
  met meanwhile are recorded as disallowed with that reason, not fetched. Google does the
  same (and falls back to the last good copy, which a run does not have).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fetchers.errors import ErrorType
from fetchers.validation import ValidationRules

if TYPE_CHECKING:
    from fetchers.cascade import Fetcher

__all__ = ["MAX_CRAWL_DELAY_S", "MAX_ROBOTS_BYTES", "RobotsCache", "RobotsVerdict"]

log = logging.getLogger(__name__)

MAX_ROBOTS_BYTES = 512 * 1024  # Google reads the first 500 KiB; a larger file: no rules
MAX_CRAWL_DELAY_S = 60.0  # a Crawl-delay above this is taken as this
ROBOTS_METHODS = ("http", "tor")  # the methods that read a text file as it is


@dataclass(frozen=True, slots=True)
class RobotsVerdict:
    allowed: bool
    reason: str | None = None  # why not: for the page's record


@dataclass(slots=True)
class _Entry:
    parser: object | None  # a protego.Protego, or None: one verdict for every path
    allow_all: bool
    reason: str | None  # why everything is disallowed
    expires: float | None  # monotonic time after which robots.txt is asked again


class RobotsCache:
    """robots.txt per origin for one agent token, fetched once and kept (``max_origins``,
    least recently used out). Concurrent checks of one origin share one fetch."""

    def __init__(
        self,
        fetcher: Fetcher,
        agent: str,
        *,
        max_origins: int = 1_000,
        error_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetcher = fetcher
        self.agent = agent
        self.max_origins = max_origins
        self.error_ttl_s = error_ttl_s
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, asyncio.Future[_Entry]] = {}
        self.fetches = 0  # robots.txt requests made (tests, logs)

    async def check(
        self, url: str, country: str | None = None, methods: Sequence[str] | None = None
    ) -> RobotsVerdict:
        """May ``url`` be fetched? ``methods``: the page's method order, whose first
        http or tor method fetches robots.txt (http when it has neither)."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        entry = await self._entry(origin, country, methods)
        if entry.parser is None:
            return RobotsVerdict(entry.allow_all, None if entry.allow_all else entry.reason)
        if entry.parser.can_fetch(url, self.agent):  # type: ignore[attr-defined]
            return RobotsVerdict(True)
        return RobotsVerdict(False, f"disallowed by {origin}/robots.txt for {self.agent}")

    async def _entry(
        self, origin: str, country: str | None, methods: Sequence[str] | None
    ) -> _Entry:
        entry = self._cache.get(origin)
        if entry is not None and (entry.expires is None or entry.expires > self._clock()):
            self._cache.move_to_end(origin)
            return entry
        fut = self._pending.get(origin)
        if fut is None:
            fut = asyncio.ensure_future(self._load(origin, country, methods))
            self._pending[origin] = fut
            fut.add_done_callback(lambda _: self._pending.pop(origin, None))
        return await asyncio.shield(fut)

    async def _load(
        self, origin: str, country: str | None, methods: Sequence[str] | None
    ) -> _Entry:
        from fetchers.cascade import domain_of

        method = next((m for m in methods or () if m in ROBOTS_METHODS), "http")
        self.fetches += 1
        res = await self.fetcher.fetch(
            origin + "/robots.txt",
            country=country,
            method=method,
            rules=ValidationRules(min_length=0, detect_blocks=False),
            use_cache=False,
            max_bytes=MAX_ROBOTS_BYTES,
        )
        status = res.status
        delay: float | None = None
        if res.success:
            from protego import Protego

            parser = Protego.parse(res.content.decode("utf-8", "replace"))
            entry = _Entry(parser, True, None, None)
            delay = parser.crawl_delay(self.agent)
        elif res.error_type == ErrorType.TOO_LARGE or (
            status is not None and 400 <= status < 500 and status != 429
        ):
            entry = _Entry(None, True, None, None)  # no usable file: no rules
        else:
            why = f"HTTP {status}" if status else str(res.error_type or "no answer")
            reason = f"{origin}/robots.txt unavailable ({why}): the site is not crawled for now"
            entry = _Entry(None, False, reason, self._clock() + self.error_ttl_s)
            log.warning("robots.txt of %s: %s", origin, why)
        self.fetcher.politeness.set_delay(
            domain_of(origin + "/"), min(delay, MAX_CRAWL_DELAY_S) if delay else None
        )
        self._cache[origin] = entry
        self._cache.move_to_end(origin)
        while len(self._cache) > self.max_origins:
            old, _ = self._cache.popitem(last=False)
            self.fetcher.politeness.set_delay(domain_of(old + "/"), None)
        return entry
