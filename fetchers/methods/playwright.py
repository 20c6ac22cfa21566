"""`playwright`: the system Chromium driven by Playwright, headless.

- **Never a downloaded browser**: `executable_path` is the system Chromium
  (`settings.chromium_path`, Debian package `chromium`); `playwright install` is not needed.
  It is started so that it dies with Playwright's driver (`fetchers.lifeline`).
- **One browser per process, a fresh context per page**: launching costs ~0.4–1.5 s, a
  context a few ms; contexts share nothing (cookies, storage, cache), so pages do not leak
  into each other, and closing one frees its renderer.
- **Bounded memory**: at most `browser_pages` pages at once; after
  `browser_relaunch_every` pages the browser is retired (new pages go to a fresh one, the old
  one closes when its last page is done). Chromium's own caches and the renderer processes of
  closed contexts otherwise grow over thousands of pages.
- **Waiting** (`_browser.Settle`): for `wait_selector` when given (looked for again after
  the reload a JS challenge does), else for network idle; a JS challenge gets up to
  `challenge_wait_s` to clear itself, another block page a short grace (its script may
  still replace it). Status and headers are those of the last main-frame navigation.
- The context's User-Agent is the desktop Chromium one of the same version (no
  "HeadlessChrome"), so cookies handed to the http method go with a consistent User-Agent.
- Proxies per context (`http`, `https`, `socks5`; Chromium cannot authenticate to SOCKS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fetchers.errors import AttemptError, FetchTimeout, NetworkFailure, ProxyFailure
from fetchers.lifeline import browser_command
from fetchers.methods._browser import (
    CHROMIUM_ARGS,
    HTML_CHARS_JS,
    Settle,
    check_page_size,
    chromium_requirement,
    desktop_user_agent,
    page_limit,
    split_proxy,
)
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse, Requirement
from fetchers.methods.http import scrub
from fetchers.validation import detect_block

if TYPE_CHECKING:
    from fetchers.config import FetchSettings

__all__ = ["PlaywrightMethod"]

log = logging.getLogger(__name__)

_POLL_S = 0.1


@dataclass(eq=False)
class _Slot:
    """One launched browser and its page counters."""

    browser: Any
    pages: int = 0
    in_flight: int = 0
    retired: bool = False


class PlaywrightMethod(FetchMethod):
    name = "playwright"
    browser = True

    def __init__(self, settings: FetchSettings) -> None:
        super().__init__(settings)
        self._pw: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _Slot | None = None
        self._slots: set[_Slot] = set()
        self._launch_lock: asyncio.Lock | None = None
        self._pages: asyncio.Semaphore | None = None
        self.user_agent: str | None = None
        self.launches = 0
        self.pages_served = 0

    def requirements(self) -> list[Requirement]:
        return [
            Requirement("Playwright for Python", "python", "playwright", "pip: playwright"),
            chromium_requirement(self.settings.chromium_path),
        ]

    # -- the browser ------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # objects of another loop cannot be used (or closed) here
            self._loop = loop
            self._pw = None
            self._current = None
            self._slots = set()
            self._launch_lock = asyncio.Lock()
            self._pages = asyncio.Semaphore(self.settings.browser_pages)

    async def _launch(self) -> _Slot:
        if self._pw is None:
            from playwright.async_api import async_playwright

            self._pw = await async_playwright().start()
        # Chromium dies with Playwright's driver (which ends with this process) however that
        # dies: see fetchers.lifeline.
        executable, env = browser_command(self.settings.chromium_path)
        browser = await self._pw.chromium.launch(
            executable_path=executable,
            env=env,
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=60_000,
        )
        self.launches += 1
        if self.user_agent is None:
            self.user_agent = desktop_user_agent(browser.version.split(".")[0])
        slot = _Slot(browser)
        self._slots.add(slot)
        log.info("playwright: launched chromium %s (launch #%d)", browser.version, self.launches)
        return slot

    async def _acquire(self) -> _Slot:
        assert self._launch_lock is not None
        async with self._launch_lock:
            slot = self._current
            if slot is not None and (
                slot.pages >= self.settings.browser_relaunch_every
                or not slot.browser.is_connected()
            ):
                slot.retired = True
                self._current = slot = None
                await self._close_idle()
            if slot is None:
                slot = self._current = await self._launch()
            slot.pages += 1
            slot.in_flight += 1
            return slot

    async def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        if slot.retired and slot.in_flight == 0:
            await self._close_idle()

    async def _close_idle(self) -> None:
        for slot in [s for s in self._slots if s.retired and s.in_flight == 0]:
            self._slots.discard(slot)
            try:
                await slot.browser.close()
            except Exception as exc:  # already gone (crashed): nothing to free
                log.debug("playwright: closing a retired browser: %s", exc)

    # -- one page ---------------------------------------------------------------------------

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.check_available()
        self._bind_loop()
        assert self._pages is not None
        async with self._pages:
            try:
                slot = await self._acquire()
            except Exception as exc:
                raise self._translate(exc, request) from None
            try:
                return await self._fetch_page(slot, request)
            except AttemptError:
                raise
            except Exception as exc:
                if not slot.browser.is_connected():
                    slot.retired = True
                raise self._translate(exc, request) from None
            finally:
                self.pages_served += 1
                await self._release(slot)

    async def _fetch_page(self, slot: _Slot, request: FetchRequest) -> RawResponse:
        options: dict[str, Any] = {
            "user_agent": request.user_agent or self.user_agent,
            "locale": "en-US",
            "viewport": {"width": 1366, "height": 768},
        }
        if request.proxy:
            server, user, password = split_proxy(request.proxy)
            options["proxy"] = {"server": server}
            if user is not None:
                options["proxy"].update(username=user, password=password or "")
        if request.headers:
            options["extra_http_headers"] = dict(request.headers)
        deadline = time.monotonic() + request.timeout_s
        context = await slot.browser.new_context(**options)
        try:
            if request.cookies:
                await context.add_cookies(
                    [
                        {"name": k, "value": v, "url": request.url}
                        for k, v in request.cookies.items()
                    ]
                )
            page = await context.new_page()
            navigations: list[Any] = []

            def on_response(response: Any) -> None:
                if response.request.is_navigation_request() and response.frame == page.main_frame:
                    navigations.append(response)

            page.on("response", on_response)
            timeout_ms = max(1.0, request.timeout_s * 1000)
            first = await page.goto(request.url, wait_until="domcontentloaded", timeout=timeout_ms)
            if first is None:
                raise NetworkFailure(f"playwright: no response for {request.url}")
            content = await self._settle(page, navigations, first, request, deadline)
            last = navigations[-1] if navigations else first
            headers = {k.lower(): v for k, v in (await last.all_headers()).items()}
            cookies = {c["name"]: c["value"] for c in await context.cookies()}
            body = content.encode("utf-8")
            return RawResponse(
                status=last.status,
                content=body,
                headers=headers,
                final_url=page.url,
                cookies=cookies,
                user_agent=options["user_agent"],
                screenshot=await self._screenshot(page, request, last.status, headers, body),
            )
        finally:
            try:
                await context.close()
            except Exception as exc:
                log.debug("playwright: context close: %s", exc)

    async def _screenshot(
        self, page: Any, request: FetchRequest, status: int, headers: dict[str, str], body: bytes
    ) -> bytes | None:
        """A PNG of the viewport when the cascade wants one (an error snapshot); a failed
        screenshot never fails the fetch."""
        if request.capture is None or not request.capture(status, headers, body):
            return None
        try:
            return await page.screenshot(type="png", timeout=5_000)
        except Exception as exc:
            log.debug("playwright: screenshot of %s: %s", request.url, exc)
            return None

    async def _settle(
        self, page: Any, navigations: list[Any], first: Any, request: FetchRequest, deadline: float
    ) -> str:
        """The page's HTML once it is final (see `Settle`): the wanted selector is there, a
        JS challenge cleared, or a block page stayed one; without a selector, after network
        idle (bounded: long-polling pages never go idle)."""
        from playwright.async_api import TimeoutError as PwTimeout

        if not request.wait_selector:
            left_ms = max(1.0, (deadline - time.monotonic()) * 1000)
            with contextlib.suppress(PwTimeout):
                await page.wait_for_load_state(
                    "networkidle", timeout=min(left_ms, 1000 + self.settings.network_idle_ms * 4)
                )
        limit = max(0.0, min(deadline - time.monotonic(), self.settings.challenge_wait_s))
        settle = Settle(bool(request.wait_selector), limit)
        max_bytes = page_limit(request, self.settings.max_page_bytes)
        content = ""
        while True:
            chars = 0
            try:  # selector first: once it is there the document stays, and is what we read
                has = bool(request.wait_selector) and (
                    await page.query_selector(request.wait_selector) is not None
                )
                chars = int(await page.evaluate(f"() => {HTML_CHARS_JS}") or 0)
                content = await page.content() if chars <= max_bytes else ""
            except Exception:  # navigating right now: the document is being replaced
                content, has = "", False
            status = (navigations[-1] if navigations else first).status
            check_page_size(self.name, chars, max_bytes, status)
            check_page_size(self.name, len(content.encode("utf-8")), max_bytes, status)
            if content:
                last = navigations[-1] if navigations else first
                headers = await last.all_headers()
                reason, _ = detect_block(last.status, headers, content.encode("utf-8"))
                if settle.done(has, reason):
                    return content
            elif settle.expired():
                return content
            await asyncio.sleep(_POLL_S)

    def _translate(self, exc: BaseException, request: FetchRequest) -> AttemptError:
        from playwright.async_api import Error as PwError
        from playwright.async_api import TimeoutError as PwTimeout

        message = scrub(f"playwright: {type(exc).__name__}: {exc}", request.proxy)
        message = message.split("\n", 1)[0][:500]
        if isinstance(exc, PwTimeout | asyncio.TimeoutError):
            return FetchTimeout(message)
        text = str(exc)
        if "ERR_PROXY" in text or "ERR_TUNNEL" in text or "ERR_SOCKS" in text:
            return ProxyFailure(message)
        if "socks5 proxy authentication" in text.lower():
            return ProxyFailure(message)
        if isinstance(exc, PwError | OSError):
            return NetworkFailure(message)
        return NetworkFailure(message)

    async def aclose(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            return
        for slot in list(self._slots):
            slot.retired = True
            slot.in_flight = 0
        await self._close_idle()
        self._current = None
        if self._pw is not None:
            try:
                await self._pw.stop()
            except Exception as exc:
                log.debug("playwright: stop: %s", exc)
            self._pw = None
