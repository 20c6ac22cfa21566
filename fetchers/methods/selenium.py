"""`selenium`: Selenium with the system ChromeDriver and Chromium, headless.

- `Service(executable_path=settings.chromedriver_path)` (Debian `chromium-driver`) and
  `binary_location=settings.chromium_path`: Selenium Manager is never asked to download a
  driver or a browser (and `SE_OFFLINE=true` is set for the process, in case it runs).
- chromedriver and Chromium die with their parent (`fetchers.lifeline`): a worker killed
  with -9 leaves no driver or browser behind.
- `--headless=new` with the same flags and the same desktop User-Agent as the Playwright
  method.
- Selenium's API is blocking: one driver runs in its own thread (`asyncio.to_thread` on a
  one-thread executor, since a WebDriver is not thread-safe), so pages through Selenium are
  one at a time per process — it is the slow fallback, and memory stays bounded.
- A page starts clean: cookies cleared through CDP (`Network.clearBrowserCookies`) and the
  tab sent to `about:blank` afterwards; the driver (and its browser) is replaced after
  `browser_relaunch_every` pages and whenever the proxy changes (Chromium takes its proxy
  at launch: `--proxy-server`, loopback included; no proxy passwords).
- WebDriver does not expose the status code: it is read from the page's
  `PerformanceNavigationTiming.responseStatus` (Chromium 109+).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fetchers.errors import AttemptError, FetchTimeout, NetworkFailure, ProxyFailure
from fetchers.lifeline import browser_command, die_with_parent
from fetchers.methods._browser import (
    CHROMIUM_ARGS,
    HTML_CHARS_JS,
    Settle,
    check_page_size,
    chromium_major,
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

__all__ = ["SeleniumMethod"]

log = logging.getLogger(__name__)

_POLL_S = 0.1
_STATUS_JS = (
    "const e = performance.getEntriesByType('navigation');"
    "return e.length ? (e[e.length - 1].responseStatus || 0) : 0;"
)


class SeleniumMethod(FetchMethod):
    name = "selenium"
    browser = True

    def __init__(self, settings: FetchSettings) -> None:
        super().__init__(settings)
        self._executor: ThreadPoolExecutor | None = None
        self._driver: Any = None
        self._driver_proxy: str | None = None
        self._driver_pages = 0
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.user_agent: str | None = None
        self.launches = 0
        self.pages_served = 0

    def requirements(self) -> list[Requirement]:
        return [
            Requirement("Selenium", "python", "selenium", "pip: selenium"),
            chromium_requirement(self.settings.chromium_path),
            Requirement(
                "ChromeDriver",
                "binary",
                str(self.settings.chromedriver_path),
                "the Debian package `chromium-driver`",
            ),
        ]

    # -- driver lifecycle (runs in the driver thread) ---------------------------------------

    def _start_driver(self, proxy: str | None) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
        if self.user_agent is None:
            self.user_agent = desktop_user_agent(chromium_major(self.settings.chromium_path))
        options = Options()
        options.add_argument("--headless=new")
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument(f"--user-agent={self.user_agent}")
        options.add_argument("--window-size=1366,768")
        options.add_argument("--lang=en-US")
        if proxy:
            server, user, _ = split_proxy(proxy)
            if user is not None:
                raise ProxyFailure(
                    "selenium: Chromium cannot send proxy credentials from the command line;"
                    " use the playwright method for this proxy, or a proxy without a password"
                )
            options.add_argument(f"--proxy-server={server}")
            options.add_argument("--proxy-bypass-list=<-loopback>")
        # Both die with their parent (Linux), so a worker killed with -9 leaves neither:
        # chromedriver with this process (started from this thread, which lives as long as
        # the driver), Chromium with chromedriver.
        browser, env = browser_command(self.settings.chromium_path)
        options.binary_location = browser
        service = Service(
            executable_path=str(self.settings.chromedriver_path),
            env=env,
            popen_kw={"preexec_fn": die_with_parent()},
        )
        self._driver = webdriver.Chrome(service=service, options=options)
        self._driver_proxy = proxy
        self._driver_pages = 0
        self.launches += 1
        log.info("selenium: started chromedriver + chromium (launch #%d)", self.launches)

    def _quit_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()

    def _fetch_blocking(self, request: FetchRequest) -> RawResponse:
        if self._driver is not None and (
            self._driver_pages >= self.settings.browser_relaunch_every
            or self._driver_proxy != request.proxy
        ):
            self._quit_driver()
        if self._driver is None:
            self._start_driver(request.proxy)
        driver = self._driver
        self._driver_pages += 1
        deadline = time.monotonic() + request.timeout_s
        try:
            driver.set_page_load_timeout(request.timeout_s)
            driver.set_script_timeout(min(request.timeout_s, 10))
            driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
            ua = request.user_agent or self.user_agent
            if request.user_agent and request.user_agent != self.user_agent:
                driver.execute_cdp_cmd("Network.setUserAgentOverride", {"userAgent": ua})
            if request.headers:
                driver.execute_cdp_cmd("Network.enable", {})
                driver.execute_cdp_cmd(
                    "Network.setExtraHTTPHeaders", {"headers": dict(request.headers)}
                )
            for name, value in request.cookies.items():
                driver.execute_cdp_cmd(
                    "Network.setCookie", {"name": name, "value": value, "url": request.url}
                )
            driver.get(request.url)
            content, status = self._settle(driver, request, deadline)
            cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
            final_url = driver.current_url
            body = content.encode("utf-8")
            return RawResponse(
                status=status or 200,
                content=body,
                headers={},
                final_url=final_url,
                cookies=cookies,
                user_agent=ua,
                screenshot=_screenshot(driver, request, status or 200, body),
            )
        finally:
            with contextlib.suppress(Exception):
                if request.user_agent and request.user_agent != self.user_agent:
                    driver.execute_cdp_cmd(
                        "Network.setUserAgentOverride", {"userAgent": self.user_agent}
                    )
                if request.headers:
                    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
                driver.get("about:blank")

    def _settle(self, driver: Any, request: FetchRequest, deadline: float) -> tuple[str, int]:
        """(HTML, status) once the page is final (see `_browser.Settle`)."""
        from selenium.webdriver.common.by import By

        limit = max(0.0, min(deadline - time.monotonic(), self.settings.challenge_wait_s))
        settle = Settle(bool(request.wait_selector), limit)
        max_bytes = page_limit(request, self.settings.max_page_bytes)
        content, status = "", 0
        while True:
            chars = 0
            try:  # selector first: once it is there the document stays, and is what we read
                has = bool(request.wait_selector) and bool(
                    driver.find_elements(By.CSS_SELECTOR, request.wait_selector)
                )
                status = int(driver.execute_script(_STATUS_JS) or 0)
                chars = int(driver.execute_script(f"return {HTML_CHARS_JS}") or 0)
                content = driver.page_source if chars <= max_bytes else ""
            except Exception:  # the document is being replaced (a challenge reloading)
                content, has = "", False
            check_page_size(self.name, chars, max_bytes, status or None)
            check_page_size(self.name, len(content.encode("utf-8")), max_bytes, status or None)
            if content:
                reason, _ = detect_block(status or 200, {}, content.encode("utf-8"))
                if settle.done(has, reason):
                    return content, status
            elif settle.expired():
                return content, status
            time.sleep(_POLL_S)

    # -- the async face ---------------------------------------------------------------------

    async def fetch(self, request: FetchRequest) -> RawResponse:
        self.check_available()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._lock = asyncio.Lock()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="selenium")
        assert self._lock is not None
        async with self._lock:
            try:
                return await loop.run_in_executor(self._executor, self._fetch_blocking, request)
            except AttemptError:
                raise
            except Exception as exc:
                raise self._translate(exc, request) from None
            finally:
                self.pages_served += 1

    def _translate(self, exc: BaseException, request: FetchRequest) -> AttemptError:
        from selenium.common.exceptions import TimeoutException, WebDriverException

        text = str(getattr(exc, "msg", None) or exc)
        message = scrub(f"selenium: {type(exc).__name__}: {text}", request.proxy)
        message = message.split("\n", 1)[0][:500]
        if isinstance(exc, TimeoutException):
            return FetchTimeout(message)
        if "ERR_PROXY" in text or "ERR_TUNNEL" in text or "ERR_SOCKS" in text:
            return ProxyFailure(message)
        broken = ("invalid session", "not reachable", "crash")
        driver_gone = isinstance(exc, WebDriverException) and any(w in text.lower() for w in broken)
        if driver_gone and self._executor is not None:  # the next page starts a new driver
            self._executor.submit(self._quit_driver)
        return NetworkFailure(message)

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._quit_driver)
        executor.shutdown(wait=False)

    def close_sync(self) -> None:
        """Quit the driver from outside an event loop (atexit, tests)."""
        if self._executor is not None:
            self._executor.submit(self._quit_driver).result(timeout=30)
            self._executor.shutdown(wait=False)
            self._executor = None


def _screenshot(driver: Any, request: FetchRequest, status: int, body: bytes) -> bytes | None:
    """A PNG of the window when the cascade wants one (an error snapshot); a failed
    screenshot never fails the fetch."""
    if request.capture is None or not request.capture(status, {}, body):
        return None
    try:
        return driver.get_screenshot_as_png()
    except Exception as exc:
        log.debug("selenium: screenshot of %s: %s", request.url, exc)
        return None
