"""The code version of this checkout: what a run records and what a worker must match.

A run records the version of the coordinator that created it; a worker takes tasks only of
runs with its own version (``SqlQueue``), because a task executed by other code stores other
results (another parser, another validation) under the same keys, silently.

Where it comes from, first found:
1. ``.fetchfleet-version`` in the project root: written by ``deploy`` (a host gets the
   committed tree from ``git archive``, without ``.git``), one line, the commit id;
2. ``git rev-parse HEAD``, plus ``-dirty.<hash>`` when tracked files differ from it: the hash
   is of ``git diff HEAD``, so two processes started from the same edited tree agree (the
   test suite runs from one; so do standalone workers started beside their coordinator),
   while a tree with other edits, or the committed tree a host got, does not. A dirty
   version matches nothing but itself: ``deploy`` ships commits, so a coordinator running
   uncommitted code gets no remote worker until the change is committed and deployed (or
   the worker is started with ``--ignore-version``);
3. the package version in ``pyproject.toml`` (``package-0.1.0``): no git, no file.

Pool workers never compute it: they get their coordinator's (``WorkerBoot.version``), so a
local pool always serves its own runs even when the tree is edited while it runs.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import tomllib
from pathlib import Path

# absolute, not resolved: a project directory of symlinks (tests) is a project of its own
ROOT = Path(__file__).absolute().parent.parent
VERSION_FILE = ".fetchfleet-version"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None


def git_version(root: Path) -> str | None:
    """HEAD's commit id, with ``-dirty.<hash of the diff>`` when tracked files differ."""
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    if head is None or head.returncode != 0:
        return None
    commit = head.stdout.decode().strip()
    diff = _git(root, "diff", "HEAD", "--binary", "--no-ext-diff", "--no-color")
    if diff is None or diff.returncode != 0 or not diff.stdout:
        return commit
    return f"{commit}-dirty.{hashlib.sha1(diff.stdout).hexdigest()[:8]}"


def package_version(root: Path) -> str:
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text())
        return f"package-{meta['project']['version']}"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def read_version_file(root: Path) -> str | None:
    try:
        text = (root / VERSION_FILE).read_text().strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


def compute_version(root: Path) -> str:
    """The version of the checkout at ``root`` (see the module docstring), computed now."""
    return read_version_file(root) or git_version(root) or package_version(root)


@functools.cache
def code_version() -> str:
    """This process's version: computed once, as the code it imported is the code it runs."""
    return compute_version(ROOT)


def short(version: str | None) -> str:
    """For messages: a commit id cut to 12 characters, its dirty suffix kept."""
    if not version:
        return "unknown"
    commit, sep, rest = version.partition("-dirty")
    return (commit[:12] if len(commit) == 40 else commit) + sep + rest


def is_dirty(version: str) -> bool:
    return "-dirty" in version
