"""What each fetch method needs on this machine, and whether it is there.

Looks only (no browser is launched, no package imported): binaries on PATH or at the paths
the fetchers use, and Python packages by ``importlib.util.find_spec``. The cascade that uses
these methods arrives with the scrape job; the table tells an operator today what to install.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Need:
    method: str
    what: str
    kind: str  # "binary" or "python"
    target: str  # binary name/path or module name
    package: str  # how to get it

    def found(self) -> str | None:
        if self.kind == "python":
            spec = importlib.util.find_spec(self.target)
            return spec.origin if spec and spec.origin else None
        return shutil.which(self.target) or (self.target if Path(self.target).exists() else None)


NEEDS: tuple[Need, ...] = (
    Need("http", "curl_cffi (browser impersonation)", "python", "curl_cffi", "pip: curl_cffi"),
    Need("playwright", "Playwright for Python", "python", "playwright", "pip: playwright"),
    Need("playwright", "Chromium", "binary", "chromium", "Debian package `chromium`"),
    Need("selenium", "Selenium", "python", "selenium", "pip: selenium"),
    Need("selenium", "Chromium", "binary", "chromium", "Debian package `chromium`"),
    Need("selenium", "ChromeDriver", "binary", "chromedriver", "Debian package `chromium-driver`"),
    Need("tor", "tor", "binary", "tor", "Debian package `tor`"),
    Need("tor", "stem (control port)", "python", "stem", "pip: stem"),
    Need("api", "curl_cffi (JSON endpoints)", "python", "curl_cffi", "pip: curl_cffi"),
    Need("validate", "python-socks (proxy checks)", "python", "python_socks", "pip: python-socks"),
    Need("validate", "geoip2fast (exit country)", "python", "geoip2fast", "pip: geoip2fast"),
)


def doctor() -> list[dict[str, str]]:
    rows = []
    for need in NEEDS:
        where = need.found()
        rows.append(
            {
                "method": need.method,
                "needs": need.what,
                "status": "ok" if where else "missing",
                "found at": where or "",
                "install": need.package,
            }
        )
    return rows
