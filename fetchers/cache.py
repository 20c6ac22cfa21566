"""An optional in-memory response cache: `ttl` (entries expire) or `lru` (least recently used
goes first), both bounded in entries, with hit/miss/eviction counters.

Only successful results are stored. A hit returns a copy marked `from_cache=True` with no
attempts (no request was made). The key is the URL (plus the API template, when one is
used): the same page fetched by another method is the same page.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from fetchers.result import FetchResult

__all__ = ["CacheStats", "ResponseCache"]


@dataclass(frozen=True, slots=True)
class CacheStats:
    kind: str
    size: int
    maxsize: int
    hits: int
    misses: int
    evictions: int
    expired: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ResponseCache:
    def __init__(
        self,
        kind: Literal["ttl", "lru"] = "lru",
        maxsize: int = 1024,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kind not in ("ttl", "lru"):
            raise ValueError(f"cache kind {kind!r}: use ttl or lru")
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.kind = kind
        self.maxsize = maxsize
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, FetchResult]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.expired = 0

    def get(self, key: str) -> FetchResult | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += 1
                return None
            stored_at, result = entry
            if self.kind == "ttl" and self.clock() - stored_at > self.ttl_s:
                del self._data[key]
                self.expired += 1
                self.misses += 1
                return None
            if self.kind == "lru":
                self._data.move_to_end(key)
            self.hits += 1
        return replace(result, from_cache=True, attempts=[], elapsed_ms=0.0)

    def put(self, key: str, result: FetchResult) -> None:
        if not result.success:
            return
        with self._lock:
            self._data[key] = (self.clock(), result)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)  # ttl: the oldest; lru: the least recently used
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> CacheStats:
        return CacheStats(
            self.kind,
            len(self._data),
            self.maxsize,
            self.hits,
            self.misses,
            self.evictions,
            self.expired,
        )
