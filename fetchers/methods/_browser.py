"""What the two browser methods share: launch flags, the User-Agent, proxy settings,
challenge waiting, and the memory of a browser's process tree (for tests and benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fetchers.errors import TooLarge
from fetchers.methods.base import FetchRequest, Requirement

#: Chromium flags for a headless worker: no GPU, no background traffic of its own
#: (component updates, sync, metrics would try to reach the internet), /tmp instead of a
#: small /dev/shm in containers, no sandbox (containers run us as root).
CHROMIUM_ARGS: tuple[str, ...] = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
)

_VERSION = re.compile(r"(\d+)\.\d+\.\d+\.\d+")


#: the page's HTML length in characters, measured in the browser: a page bigger than the
#: limit is refused before its HTML is copied out (UTF-8 has at least a byte a character)
HTML_CHARS_JS = "document.documentElement ? document.documentElement.outerHTML.length : 0"


def page_limit(request: FetchRequest, max_page_bytes: int) -> int:
    """The most HTML a browser method keeps for this request."""
    return request.max_bytes or max_page_bytes


def check_page_size(method: str, size: int, limit: int, status: int | None) -> None:
    """Raise `TooLarge` when a page's HTML (`size` characters or bytes) is over `limit`."""
    if size > limit:
        raise TooLarge(
            f"{method}: page over max_page_bytes {limit:,} ({size:,} characters of HTML; "
            "raise FETCHFLEET_MAX_PAGE_BYTES to keep such pages)",
            limit=limit,
            received=size,
            status=status,
        )


def chromium_requirement(path: Path) -> Requirement:
    return Requirement("Chromium", "binary", str(path), "the Debian package `chromium`")


def chromium_major(path: Path) -> str | None:
    """The major version of a Chromium binary (`chromium --version`), None if unknown."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(out)
    return m.group(1) if m else None


def desktop_user_agent(major: str | None) -> str:
    """The User-Agent of a desktop Chromium on Linux of that version, without the
    "HeadlessChrome" token headless mode would send (a give-away every bot check reads)."""
    version = f"{major}.0.0.0" if major else "131.0.0.0"
    return (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/{version} Safari/537.36"
    )


def split_proxy(proxy: str) -> tuple[str, str | None, str | None]:
    """(server URL without credentials, username, password) of a proxy URL."""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    scheme = parts.scheme.lower()
    scheme = {"socks5h": "socks5", "socks4a": "socks4"}.get(scheme, scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    server = f"{scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return server, user, password


def looks_like_challenge(reason: str | None) -> bool:
    """A block that a browser may clear by waiting (a JS challenge), not a hard block."""
    if not reason:
        return False
    low = reason.lower()
    return any(
        word in low
        for word in ("challenge", "just a moment", "cf-mitigated", "turnstile", "_cf_chl")
    )


#: a block page that is not a JS challenge (captcha, access denied) is given this long to
#: turn into the page (its own script may reload it) before the browser gives up on it
BLOCK_GRACE_S = 2.0


class Settle:
    """When is a loading page final? Fed one look at a time (`done(...)`):

    - the wanted selector is there → final;
    - a JS challenge → wait for it to clear itself, up to `limit_s`;
    - another block page (captcha, access denied) → final once it stayed one for
      `BLOCK_GRACE_S` (a page's script may still replace it), not after the full timeout;
    - neither, without a wanted selector → final; with one → wait for it up to `limit_s`.
    """

    def __init__(self, wait_selector: bool, limit_s: float, clock=time.monotonic) -> None:
        self.wait_selector = wait_selector
        self.clock = clock
        self.until = clock() + limit_s
        self.blocked_since: float | None = None

    def expired(self) -> bool:
        return self.clock() >= self.until

    def done(self, has_selector: bool, reason: str | None) -> bool:
        now = self.clock()
        if now >= self.until or (self.wait_selector and has_selector):
            return True
        if reason is None:
            self.blocked_since = None
            return not self.wait_selector
        if looks_like_challenge(reason):
            self.blocked_since = None
            return False
        if self.blocked_since is None:
            self.blocked_since = now
        return now - self.blocked_since >= BLOCK_GRACE_S


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size (shared pages split among their users), from smaps_rollup."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_table() -> tuple[dict[int, int], dict[int, str]]:
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        head, _, rest = stat.rpartition(")")
        comm[int(entry)] = head.partition("(")[2]
        parent[int(entry)] = int(rest.split()[1])
    return parent, comm


def process_tree_memory(root_pid: int) -> dict[str, int]:
    """Memory of a process and all its descendants: `rss` (sum of resident sets — counts
    pages shared between Chromium's processes once per process, an upper bound), `pss`
    (shared pages split among their users — what the tree really costs) and `processes`."""
    parent, _ = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    rss = pss = count = 0
    stack = [root_pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        rss += resident * page
        pss += _pss_bytes(pid) or resident * page
        count += 1
        stack.extend(children.get(pid, ()))
    return {"rss": rss, "pss": pss, "processes": count}


def browser_tree_memory(
    names: tuple[str, ...] = ("chrome", "chromium", "chromedriver"),
) -> dict[str, int]:
    """`process_tree_memory` summed over the browsers (and chromedrivers) this process
    started, however deep: Playwright's node driver or chromedriver sits in between."""
    me = os.getpid()
    parent, comm = _proc_table()

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = parent.get(pid, 0)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    def browserish(pid: int) -> bool:
        return any(n in comm.get(pid, "") for n in names)

    roots = [pid for pid in comm if browserish(pid) and not browserish(parent.get(pid, 0))]
    total = {"rss": 0, "pss": 0, "processes": 0}
    for pid in roots:
        if descends(pid):
            for key, value in process_tree_memory(pid).items():
                total[key] += value
    return total
