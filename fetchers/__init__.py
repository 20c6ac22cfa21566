"""Everything that touches a remote site: fetch methods, the cascade, validation, the cache,
the proxy pool, proxy parsing and checking.

The entry point:

    from fetchers import fetch
    result = fetch("https://example.com/x", country="Malaysia")
    result.success, result.status, result.content, result.method_used, result.attempts

`fetch()` is synchronous: it runs the cascade on one private event loop thread per process,
so browsers, sessions and what was learned per domain are reused across calls. In async
code use `await afetch(...)` (a default `Fetcher` per event loop), or hold your own
`Fetcher` (`async with Fetcher(settings) as f: await f.fetch(...)`).

Nothing heavy is imported here: curl_cffi, Playwright, Selenium and stem load on first use.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from fetchers.errors import ErrorType, FetchError

if TYPE_CHECKING:
    from fetchers.cascade import DomainMemory, Fetcher, Policy, PolicyError
    from fetchers.config import FetchSettings
    from fetchers.result import Attempt, FetchResult

# Loaded on first use: a proxy check or a pool worker imports `fetchers.<module>`, which
# runs this file first, and the cascade's imports cost ~60 ms per process it does not need.
_LAZY = {
    "DomainMemory": "fetchers.cascade",
    "Fetcher": "fetchers.cascade",
    "Policy": "fetchers.cascade",
    "PolicyError": "fetchers.cascade",
    "FetchSettings": "fetchers.config",
    "Attempt": "fetchers.result",
    "FetchResult": "fetchers.result",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fetchers' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Attempt",
    "DomainMemory",
    "ErrorType",
    "FetchError",
    "FetchResult",
    "FetchSettings",
    "Fetcher",
    "Policy",
    "PolicyError",
    "afetch",
    "close_default",
    "fetch",
]

T = TypeVar("T")

_lock = threading.Lock()
_settings: FetchSettings | None = None
_memory: DomainMemory | None = None
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fetcher] = (
    weakref.WeakKeyDictionary()
)
_runner: _LoopThread | None = None


def _shared() -> tuple[FetchSettings, DomainMemory]:
    """The default settings (from FETCHFLEET_* variables) and the domain memory that every
    default fetcher shares, so learning survives across loops and calls."""
    from fetchers.cascade import DomainMemory
    from fetchers.config import FetchSettings

    global _settings, _memory
    with _lock:
        if _settings is None:
            _settings = FetchSettings()
        if _memory is None:
            _memory = DomainMemory(_settings.explore_rate)
        return _settings, _memory


def default_fetcher() -> Fetcher:
    """The default `Fetcher` of the running event loop."""
    from fetchers.cascade import Fetcher

    loop = asyncio.get_running_loop()
    fetcher = _per_loop.get(loop)
    if fetcher is None:
        settings, memory = _shared()
        fetcher = _per_loop[loop] = Fetcher(settings, memory=memory)
    return fetcher


async def afetch(url: str, **kwargs: Any) -> FetchResult:
    """`Fetcher.fetch` on the default fetcher of the running loop (see `Fetcher.fetch`)."""
    return await default_fetcher().fetch(url, **kwargs)


class _LoopThread:
    """One event loop in a daemon thread, for the synchronous `fetch()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fetchers-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("fetchers.fetch() called from its own loop: use afetch()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        async def shutdown() -> None:
            fetcher = _per_loop.get(self.loop)
            if fetcher is not None:
                await fetcher.aclose()

        with contextlib.suppress(Exception):  # at exit: browsers die with their pipes anyway
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def fetch(url: str, **kwargs: Any) -> FetchResult:
    """Fetch `url` through the cascade and wait for the result.

    Keyword arguments as `Fetcher.fetch`: `country`, `method` (a name or a list), `proxy`,
    `selectors` (CSS that must match), `wait_selector`, `min_length`, `expect_json`,
    `headers`, `cookies`, `api` (an `ApiSpec`), `timeout_s`, `use_cache`.
    """
    global _runner
    with _lock:
        if _runner is None:
            _runner = _LoopThread()
            _close_at_exit()
        runner = _runner

    async def call() -> FetchResult:
        return await default_fetcher().fetch(url, **kwargs)

    return runner.run(call())


def _close_at_exit() -> None:
    """Close the default fetcher at interpreter exit, *before* `concurrent.futures` shuts its
    executors down: closing Selenium runs on its executor thread, and `atexit` handlers run
    too late for that ("cannot schedule new futures after shutdown"). `threading`'s own exit
    hooks run first, newest first, ahead of the join of non-daemon threads; it is the hook
    `concurrent.futures` itself uses. Plain `atexit` where it is missing."""
    # `concurrent.futures.thread` registers its shutdown hook when first imported (lazily,
    # often only when Selenium starts its executor): import it now, so ours is the newer
    # hook and runs first.
    import concurrent.futures.thread  # noqa: F401

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down: nothing to close
            register(close_default)
            return
    atexit.register(close_default)


def close_default() -> None:
    """Close the default fetcher of `fetch()` (browsers, sessions, a launched tor)."""
    global _runner
    with _lock:
        runner, _runner = _runner, None
    if runner is not None:
        runner.close()
