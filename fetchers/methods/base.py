"""The one small interface every fetch method implements, and the registry of methods.

A method turns a `FetchRequest` into a `RawResponse` (whatever the status or body: judging
it is the validator's job) or raises a `fetchers.errors.AttemptError` subclass for a
transport failure (timeout, proxy, network) or when it cannot run (`MethodUnavailable`).

Methods are built by name, lazily (`create_method`): importing `fetchers` never imports
curl_cffi, Playwright, Selenium or stem. A method whose package or binary is missing says
so in `unavailable_reason()` (Scrapy's NotConfigured) and the cascade moves on.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fetchers.errors import MethodUnavailable

if TYPE_CHECKING:
    from fetchers.config import FetchSettings
    from fetchers.methods.api import ApiSpec

__all__ = [
    "BROWSER_METHODS",
    "METHOD_NAMES",
    "FetchMethod",
    "FetchRequest",
    "RawResponse",
    "Requirement",
    "create_method",
    "method_class",
]

METHOD_NAMES: tuple[str, ...] = ("http", "playwright", "selenium", "tor", "api")
# the methods that drive a browser (``FetchMethod.browser``): their wall time is the costly one
BROWSER_METHODS: tuple[str, ...] = ("playwright", "selenium")
_MODULES = {
    "http": ("fetchers.methods.http", "HttpMethod"),
    "playwright": ("fetchers.methods.playwright", "PlaywrightMethod"),
    "selenium": ("fetchers.methods.selenium", "SeleniumMethod"),
    "tor": ("fetchers.methods.tor", "TorMethod"),
    "api": ("fetchers.methods.api", "ApiMethod"),
}


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """One request, as the cascade hands it to a method."""

    url: str
    timeout_s: float = 20.0
    proxy: str | None = None  # full proxy URL with credentials: never log it
    headers: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    user_agent: str | None = None  # with cookies a browser earned: its User-Agent
    wait_selector: str | None = None  # browsers: wait until this CSS selector appears
    api: ApiSpec | None = None  # the api method: how to call the JSON endpoint
    # a bigger body is refused (Content-Length) or cut off while it arrives: `TooLarge`
    max_bytes: int | None = None
    # browsers: (status, headers, HTML) → keep a screenshot of this answer? Asked once the
    # page settled, before it closes; set by the cascade only while error snapshots are
    # wanted (`fetchers.snapshots`), true only for a refused answer of a kind not kept yet
    capture: Callable[[int, Mapping[str, str], bytes], bool] | None = None


@dataclass(slots=True)
class RawResponse:
    """What came back, before validation. Header names are lower-case."""

    status: int
    content: bytes
    headers: dict[str, str]
    final_url: str
    cookies: dict[str, str] = field(default_factory=dict)  # what the client holds afterwards
    user_agent: str | None = None  # the User-Agent the client sent
    screenshot: bytes | None = None  # PNG, only when `FetchRequest.capture` asked for it


@dataclass(frozen=True, slots=True)
class Requirement:
    """Something a method needs: a Python package, a binary, or a running service."""

    what: str
    kind: str  # "python", "binary" or "service"
    target: str  # module name, binary name or path, or host:port
    install: str  # how to get it

    def found(self) -> str | None:
        """Where it is (module file, binary path, address), or None."""
        if self.kind == "python":
            module = sys.modules.get(self.target)
            spec = getattr(module, "__spec__", None) if module is not None else None
            if spec is not None:  # imported already: what find_spec would answer, without it
                return spec.origin or self.target
            try:
                spec = importlib.util.find_spec(self.target)
            except (ImportError, ValueError):
                return None
            return (spec.origin or self.target) if spec else None
        if self.kind == "binary":
            return shutil.which(self.target) or (
                self.target if Path(self.target).is_file() else None
            )
        return None  # services are checked by their method (a connection attempt)


class FetchMethod(ABC):
    """One way to fetch a page. Instances are cheap; heavy resources start on first use."""

    name: ClassVar[str]
    #: a browser (its cookies may be handed to http; slow, so learned per domain)
    browser: ClassVar[bool] = False
    #: takes proxies from the caller or the pool (tor brings its own path)
    uses_proxy: ClassVar[bool] = True

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings

    def requirements(self) -> list[Requirement]:
        """What this method needs (the doctor lists it)."""
        return []

    def unavailable_reason(self) -> str | None:
        """Why this method cannot run here, or None. Cheap: looks, does not launch."""
        for need in self.requirements():
            if need.kind != "service" and need.found() is None:
                return f"{need.what} is missing: install {need.install}"
        return None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise MethodUnavailable(f"{self.name}: {reason}")

    @abstractmethod
    async def fetch(self, request: FetchRequest) -> RawResponse:
        """Fetch one URL; raise an AttemptError subclass for transport failures."""

    async def on_blocked(self) -> bool:
        """Called after this method was blocked; True if a retry now may fare better
        (tor: a new identity was granted)."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release here
        """Release what the method holds (sessions, browsers, a launched tor)."""


def method_class(name: str) -> type[FetchMethod]:
    """The class of a method by name (imports its module, not its heavy dependency)."""
    try:
        module_name, class_name = _MODULES[name]
    except KeyError:
        raise ValueError(
            f"unknown fetch method {name!r}: use one of {', '.join(METHOD_NAMES)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)


def create_method(name: str, settings: FetchSettings) -> FetchMethod:
    return method_class(name)(settings)
