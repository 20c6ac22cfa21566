"""Child processes that never outlive the process that owns them (Linux).

Two mechanisms, because neither is enough alone:

- **Parent-death signal** (``PR_SET_PDEATHSIG``): the kernel signals a child the moment its
  parent dies, however it dies (``kill -9``, ``os._exit``), with nobody left to clean up.
  ``die_with_parent`` is a ``preexec_fn`` for the children we start ourselves (chromedriver,
  pipeline scripts); ``browser_command`` runs a browser through ``browser-with-parent``
  (util-linux ``setpriv --pdeathsig``), since Playwright's driver and chromedriver start
  Chromium, not us. Chromium's own helpers (zygote, renderers, crash handler) end with it.
- **Lineage tags**: a process group does not hold a tree together (Playwright starts
  Chromium in a session of its own, Chromium's crash handler double-forks into another, a
  script may ``setsid``), and a parent-death signal reaches one generation only. So an
  owner puts a tag in ``FETCHFLEET_LINEAGE``, every descendant inherits it whatever its
  group or parent, and ``end_lineage`` finds them all in ``/proc`` and kills them: the
  coordinator for a dead worker, a pipeline for its script's leftovers.

Signals go through pidfds: a pid that was reused meanwhile is never hit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "LINEAGE_ENV",
    "browser_command",
    "die_with_parent",
    "end_lineage",
    "end_own_lineage",
    "lineage_env",
    "lineage_pids",
    "mark_lineage",
]

log = logging.getLogger(__name__)

LINEAGE_ENV = "FETCHFLEET_LINEAGE"
_PREFIX = f"{LINEAGE_ENV}=".encode()
PR_SET_PDEATHSIG = 1
#: the wrapper reads the browser to run from this variable (its callers pass only flags)
BROWSER_ENV = "FETCHFLEET_BROWSER_BINARY"
BROWSER_WRAPPER = Path(__file__).with_name("browser-with-parent")


# --- the parent-death signal -------------------------------------------------------------


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``signum`` to the child when its parent dies
    (None elsewhere). Linux ties it to the parent *thread*: start the child from a thread
    that lives as long as the child should."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not after the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + int(signum))

    return preexec


def browser_command(
    binary: Path | str, env: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """(executable, environment) that start ``binary`` so it dies with whoever starts it
    (Playwright's driver, chromedriver): the wrapper when ``setpriv`` is there, else the
    binary itself."""
    env = dict(os.environ if env is None else env)
    if (
        sys.platform.startswith("linux")
        and os.access(BROWSER_WRAPPER, os.X_OK)
        and shutil.which("setpriv")
    ):
        env[BROWSER_ENV] = str(binary)
        return str(BROWSER_WRAPPER), env
    return str(binary), env


# --- lineage tags ------------------------------------------------------------------------


def lineage_env(env: Mapping[str, str], tag: str) -> dict[str, str]:
    """``env`` with ``tag`` added to the lineage (kept: the tags of the owners above)."""
    out = dict(env)
    tags = out.get(LINEAGE_ENV, "").split()
    if tag not in tags:
        tags.append(tag)
    out[LINEAGE_ENV] = " ".join(tags)
    return out


_own: list[str] = []  # the tags this process put on its descendants


def mark_lineage(tag: str) -> None:
    """Tag every process this one starts from now on (they inherit ``os.environ``)."""
    os.environ[LINEAGE_ENV] = lineage_env(os.environ, tag)[LINEAGE_ENV]
    if tag not in _own:
        _own.append(tag)


def _tags_of(pid: int) -> set[str]:
    """The lineage tags a process was started with (none for a zombie or a stranger's)."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    for entry in data.split(b"\0"):
        if entry.startswith(_PREFIX):
            return set(entry[len(_PREFIX) :].decode("utf-8", "replace").split())
    return set()


def lineage_pids(tags: Iterable[str]) -> list[int]:
    """Live processes (not this one) started with any of ``tags``."""
    wanted = set(tags)
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [int(e) for e in entries if e.isdigit() and int(e) != me and wanted & _tags_of(int(e))]


class _Sweep:
    """The processes of some lineages, held by pidfd while they are being ended."""

    def __init__(self, tags: Iterable[str]) -> None:
        self.tags = set(tags)
        self.fds: dict[int, int] = {}  # pid → pidfd
        self.ended = 0

    def scan(self) -> int:
        """Take hold of tagged processes not held yet; returns how many were new."""
        new = 0
        for pid in lineage_pids(self.tags):
            if pid in self.fds:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already (or no pidfds: nothing we can end safely)
                continue
            if self.tags & _tags_of(pid):  # still the same tagged process behind that pid
                self.fds[pid] = fd
                new += 1
            else:
                os.close(fd)
        return new

    def signal(self, signum: int) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, signum)

    def wait(self, deadline: float) -> bool:
        """Wait (on the pidfds) until every held process ended or ``deadline``."""
        while self.fds:
            poller = select.poll()
            for fd in self.fds.values():
                poller.register(fd, select.POLLIN)
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                return False
            ready = {fd for fd, _ in poller.poll(left_ms)}
            for pid, fd in list(self.fds.items()):
                if fd in ready:
                    os.close(self.fds.pop(pid))
                    self.ended += 1
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def end_lineage(tags: Iterable[str], *, grace_s: float = 0.0, timeout_s: float = 5.0) -> int:
    """End every process started with one of ``tags`` (but this one): SIGTERM first when
    ``grace_s`` > 0, SIGKILL to those left after it; scans again until a scan finds none
    (a process may fork while we kill), for at most ``timeout_s`` after the grace.
    Returns how many ended."""
    tags = [t for t in tags if t]
    if not tags or not sys.platform.startswith("linux"):
        return 0
    sweep = _Sweep(tags)
    try:
        if grace_s > 0 and sweep.scan():
            sweep.signal(signal.SIGTERM)
            sweep.wait(time.monotonic() + grace_s)
        deadline = time.monotonic() + timeout_s
        for _ in range(50):
            sweep.scan()
            if not sweep.fds:
                break
            sweep.signal(signal.SIGKILL)
            if not sweep.wait(deadline):
                log.warning("processes of %s still running %.0fs after SIGKILL", tags, timeout_s)
                break
        return sweep.ended
    finally:
        sweep.close()


def end_own_lineage(timeout_s: float = 5.0) -> int:
    """End every descendant of this process that carries a tag it marked (``mark_lineage``):
    its last act before exiting, so nothing it started outlives it."""
    return end_lineage(_own, timeout_s=timeout_s)
