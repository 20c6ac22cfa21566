"""The synchronous `fetchers.fetch()` closes its methods before the interpreter tears down
its executors: a script that fetched with Selenium (whose driver lives on an executor
thread) exits without "closing fetch method selenium: cannot schedule new futures after
shutdown" or any other complaint on stderr, and leaves no browser behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from tests.conftest import require_tool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    with ShopWorld(ShopsConfig((ShopSpec("plain", "Malaysia", n_products=40),))) as world:
        yield world


@pytest.mark.parametrize("method", ["http", "selenium", "playwright"])
def test_a_script_using_fetch_exits_quietly(shops: ShopWorld, method: str) -> None:
    if method != "http":
        require_tool("/usr/bin/chromium", "chromium")
    if method == "selenium":
        require_tool("/usr/bin/chromedriver", "chromium-driver")
    url = shops["plain"].catalog_url(1)
    script = (
        "import fetchers\n"
        f"r = fetchers.fetch({url!r}, method={method!r}, selectors=['li.product'])\n"
        "print(r.success, r.method_used)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", method]
    assert "cannot schedule new futures" not in done.stderr
    assert "closing fetch method" not in done.stderr
    assert done.stderr.strip() == ""
