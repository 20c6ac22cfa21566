"""Deploy: the project's committed tree to a host's work directory, its version, its install.

1. **source**: resolve the ref (``HEAD``) to a commit of this checkout; warn when tracked
   files differ from it (they are not shipped: runs started from this edited tree have a
   ``-dirty`` version that the host's workers will not serve, see ``engine.version``).
2. **copy**: ``git archive COMMIT | ssh HOST 'mkdir -p WORKDIR && tar -x -C WORKDIR'``,
   streamed over the fleet's ssh runner (no temporary file, nothing held in memory). Only
   committed files go: no ``.venv``, no ``data/``, no secret that is not committed. Files
   that the previous deploy brought and this commit no longer has are removed (the tree
   carries its file list, ``.fetchfleet-files``); ``.venv`` and ``data/`` stay. The commit
   id is written to ``.fetchfleet-version`` last, so a copy cut short has no version. A
   work directory that is a git checkout is refused: update it with git there.
3. **install**: the README's install, ``./run.sh install`` (a ``.venv`` with
   ``requirements.txt``): only the package registries the host's pip is configured for.

``deploy`` reports each step to a ``progress`` callback (the CLI prints them, the console
shows them) and raises ``DeployError`` naming the step that failed, with the last lines of
its output.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.fleet.hosts import FleetError, get_host
from engine.fleet.ssh import SshError, SshRunner
from engine.version import ROOT, VERSION_FILE, git_version, short
from storage.db import Database

FILES = ".fetchfleet-files"
TAIL_LINES = 15
INSTALL_TIMEOUT_S = 1800.0
COPY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DeployStep:
    """One progress event: ``status`` is ``start``, ``ok``, ``warning``, ``skipped`` or
    ``failed``; ``message`` says what happened in words an operator acts on."""

    step: str  # source, copy, install
    status: str
    message: str


class DeployError(FleetError):
    """A step failed: ``step`` names it, ``tail`` holds the last lines of its output."""

    def __init__(self, step: str, message: str, tail: list[str] | None = None) -> None:
        self.step = step
        self.tail = tail or []
        text = f"{step}: {message}"
        if self.tail:
            text += "\n" + "\n".join(f"  | {line}" for line in self.tail)
        super().__init__(text)


@dataclass
class DeployResult:
    host: str
    workdir: str
    commit: str
    version: str  # what the host runs now (written to its VERSION_FILE)
    installed: bool
    warnings: list[str] = field(default_factory=list)


Progress = Callable[[DeployStep], None]


def _tail(text: str, n: int = TAIL_LINES) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-n:]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError("source", f"git does not run here: {exc}") from None


def resolve_source(root: Path, ref: str) -> tuple[str, list[str]]:
    """(commit id of ``ref`` in the checkout at ``root``, warnings)."""
    if _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise DeployError(
            "source",
            f"{root} is not a git checkout: deploy ships a commit (git archive); "
            "deploy from a clone of the project",
        )
    done = _git(root, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
    if done.returncode != 0:
        raise DeployError("source", f"{ref!r} is not a commit of {root}")
    commit = done.stdout.strip()
    warnings = []
    local = git_version(root) or commit
    if local != commit and local.startswith(commit):  # HEAD with uncommitted changes
        warnings.append(
            f"tracked files differ from {short(commit)} (uncommitted changes): they are not "
            f"deployed; runs started from this tree (version {short(local)}) will not be "
            "served there until you commit and deploy again"
        )
    elif not local.startswith(commit):
        warnings.append(
            f"deploying {short(commit)}, not this checkout's version {short(local)}: runs "
            "started from here will not be served there"
        )
    return commit, warnings


def copy_script(workdir: str, commit: str) -> str:
    """The remote side of the copy: extract stdin's tar into ``workdir``, remove what the
    previous deploy brought and this one does not, then write the version."""
    w = shlex.quote(workdir)
    return (
        f"mkdir -p {w} && cd {w} || exit 11; "
        f'if [ -e .git ]; then echo "{workdir} is a git checkout: update it with git there, '
        f'or deploy to another --workdir" >&2; exit 20; fi; '
        f"rm -f {VERSION_FILE}; "
        f"if [ -f {FILES} ]; then cp {FILES} {FILES}.old; else : > {FILES}.old; fi; "
        f"tar -x -f - || exit 21; "
        f'grep -Fxv -f {FILES} {FILES}.old | while IFS= read -r f; do rm -f -- "$f"; done; '
        f"rm -f {FILES}.old; "
        f"printf '%s\\n' {shlex.quote(commit)} > {VERSION_FILE}.tmp && "
        f"mv {VERSION_FILE}.tmp {VERSION_FILE} && cat {VERSION_FILE}"
    )


def copy_tree(ssh: SshRunner, target: str, workdir: str, root: Path, commit: str) -> str:
    """Stream ``git archive`` of ``commit`` into ``workdir`` there; returns the version the
    host reports back."""
    files = _git(root, "ls-tree", "-r", "--name-only", "-z", commit)
    if files.returncode != 0:
        raise DeployError("source", f"cannot list {short(commit)}: {files.stderr.strip()}")
    names = [n for n in files.stdout.split("\0") if n]
    manifest = "\n".join([*names, FILES]) + "\n"
    archive = subprocess.Popen(
        [
            "git", "-C", str(root), "archive", "--format=tar",
            f"--add-virtual-file={FILES}:{manifest}", commit,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert archive.stdout is not None
    try:
        done = ssh.run_stream(target, copy_script(workdir, commit), archive.stdout, COPY_TIMEOUT_S)
    except SshError as exc:
        raise DeployError("copy", str(exc)) from None
    finally:
        archive.stdout.close()
        err = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
        archive.wait(60)
    # the host's answer first: one that stopped reading early leaves git archive a broken pipe
    if done.returncode == 20:
        raise DeployError("copy", _tail(done.stderr)[-1])
    if done.returncode != 0:
        what = {11: f"cannot create {workdir} there", 21: "tar failed there"}.get(
            done.returncode, f"the copy failed there (exit {done.returncode})"
        )
        raise DeployError("copy", what, _tail(done.stderr))
    if archive.returncode != 0:
        raise DeployError("copy", "git archive failed", _tail(err))
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def install_command(workdir: str, base_python: str) -> str:
    """The README's install (``./run.sh install``), its output merged for the tail."""
    w = shlex.quote(workdir)
    return f"cd {w} || exit 11; PYTHON={shlex.quote(base_python)} ./run.sh install 2>&1"


def deploy(
    db: Database,
    ssh: SshRunner,
    name: str,
    ref: str = "HEAD",
    install: bool = True,
    progress: Progress | None = None,
    root: Path = ROOT,
    base_python: str = "python3",
) -> DeployResult:
    """Deploy ``ref`` of the checkout at ``root`` to host ``name`` (see the module
    docstring). ``base_python``: the host's Python that creates ``.venv`` on install."""
    say = progress or (lambda step: None)
    host = get_host(db, name)

    def step(which: str, status: str, message: str) -> None:
        say(DeployStep(which, status, message))

    step("source", "start", f"resolving {ref} in {root}")
    try:
        commit, warnings = resolve_source(root, ref)
    except DeployError as exc:
        step("source", "failed", str(exc))
        raise
    for w in warnings:
        step("source", "warning", w)
    step("source", "ok", f"{ref} is {short(commit)}")

    step("copy", "start", f"copying {short(commit)} to {host.ssh_target}:{host.workdir}")
    try:
        version = copy_tree(ssh, host.ssh_target, host.workdir, root, commit)
    except DeployError as exc:
        step("copy", "failed", str(exc))
        raise
    if version != commit:
        err = DeployError("copy", f"the host reports version {version!r} after the copy")
        step("copy", "failed", str(err))
        raise err
    step("copy", "ok", f"{host.workdir} holds {short(commit)} ({VERSION_FILE})")

    if not install:
        step("install", "skipped", "--no-install: the host's Python and packages as they are")
        return DeployResult(name, host.workdir, commit, version, False, warnings)
    step("install", "start", f"./run.sh install in {host.workdir} (a .venv, requirements.txt)")
    try:
        done = ssh.run(
            host.ssh_target, install_command(host.workdir, base_python), timeout_s=INSTALL_TIMEOUT_S
        )
    except SshError as exc:
        step("install", "failed", str(exc))
        raise DeployError("install", str(exc)) from None
    if done.returncode != 0:
        err = DeployError(
            "install", f"./run.sh install failed (exit {done.returncode})", _tail(done.stdout)
        )
        step("install", "failed", str(err))
        raise err
    step("install", "ok", "installed")
    return DeployResult(name, host.workdir, commit, version, True, warnings)
