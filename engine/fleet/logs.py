"""A worker launch's log, read from its host over the same ssh runner.

Each ``fleet start`` writes one log on the host (``WORKDIR/data/fleet/NAME-<time>.log``,
recorded in ``host_launches``); ``tail`` there reads it: the last lines (the console, ``fleet
logs``) or the last lines and then what follows (``fleet logs --follow``). The log never gets
a secret (workers print the database URL with its password hidden), and what is shown is
scrubbed of the launch's secrets all the same (``engine.fleet.env.scrub``).
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from engine.fleet.env import scrub
from engine.fleet.hosts import FleetError, get_host
from engine.fleet.ssh import SshError, SshRunner, explain
from storage import hosts as store
from storage.db import Database
from storage.hosts import HostRow

MAX_LINES = 10_000
_NO_LOG = 13  # the exit status of the remote line when the log file is not there


@dataclass(frozen=True)
class Launch:
    host: str
    pid: int  # the launch's session leader there (its process group)
    log_path: str


def launches(db: Database, name: str) -> list[Launch]:
    """The host's recorded launches, oldest first (``fleet stop`` forgets them)."""
    get_host(db, name)  # a host that is not there says so
    with db.connect() as conn:
        return [Launch(name, pid, path) for pid, path in store.launches(conn, name)]


def find_launch(
    db: Database,
    ssh: SshRunner,
    name: str,
    launch_pid: int | None = None,
    worker_pid: int | None = None,
) -> Launch:
    """The launch asked for: by its pid, by the pid of one of its workers (a worker is its
    launch's process or a child in its process group), else the newest."""
    found = launches(db, name)
    if not found:
        raise FleetError(f"{name}: no launch recorded: `fleet start {name}` first")
    if launch_pid is None and worker_pid is None:
        return found[-1]
    by_pid = {launch.pid: launch for launch in found}
    pid = launch_pid if launch_pid is not None else worker_pid
    if pid in by_pid:
        return by_pid[pid]
    if worker_pid is not None:
        host = get_host(db, name)
        done = ssh.run(host.ssh_target, f"ps -o pgid= -p {int(worker_pid)}; true")
        group = done.stdout.strip()
        if group.isdigit() and int(group) in by_pid:
            return by_pid[int(group)]
        raise FleetError(
            f"{name}: no running worker with pid {worker_pid} in a recorded launch "
            f"(launches: {', '.join(str(p) for p in by_pid)}); `fleet status` lists the workers"
        )
    raise FleetError(
        f"{name}: no launch with pid {launch_pid} (launches: {', '.join(str(p) for p in by_pid)})"
    )


def tail_command(log_path: str, lines: int, follow: bool = False) -> str:
    """The remote shell line: the last ``lines`` lines; with ``follow``, then every new line
    until this side closes the channel: ``tail`` runs in the background and ``cat`` waits for
    the end of stdin, then ends it, so no ``tail -F`` is left behind on the host (GNU tail
    notices a closed pipe by itself; BusyBox and BSD tails only when they next write)."""
    if not 1 <= lines <= MAX_LINES:
        raise FleetError(f"--lines must be between 1 and {MAX_LINES:,}")
    path = shlex.quote(log_path)
    if not follow:
        return f"[ -f {path} ] || exit {_NO_LOG}; exec tail -n {int(lines)} -- {path}"
    return (
        f"tail -n {int(lines)} -F -- {path} 2>&1 & _t=$!; "
        'cat > /dev/null; kill "$_t" 2>/dev/null; wait "$_t" 2>/dev/null; true'
    )


def last_lines(
    ssh: SshRunner, host: HostRow, launch: Launch, lines: int = 100, hide: Iterable[str] = ()
) -> list[str]:
    """The log's last ``lines`` lines, secrets in ``hide`` replaced by ``***``."""
    done = ssh.run(host.ssh_target, tail_command(launch.log_path, lines))
    if done.returncode == _NO_LOG:
        raise FleetError(f"{host.name}: no log at {launch.log_path} there (removed?)")
    if done.returncode != 0:
        raise FleetError(f"{host.name}: reading {launch.log_path} failed: {done.stderr.strip()}")
    secrets = list(hide)
    return [scrub(line, secrets) for line in done.stdout.splitlines()]


def follow(
    ssh: SshRunner, host: HostRow, launch: Launch, lines: int = 10, hide: Iterable[str] = ()
) -> Iterator[str]:
    """The last ``lines`` lines, then each new one as it is written, until the caller stops
    iterating (closing the generator ends the remote ``tail`` and ssh) or the link drops
    (SshError)."""
    secrets = list(hide)
    proc = ssh.stream(host.ssh_target, tail_command(launch.log_path, lines, follow=True))
    assert proc.stdout is not None and proc.stdin is not None
    try:
        for line in proc.stdout:
            yield scrub(line.rstrip("\n"), secrets)
        if proc.wait(10) == 255:
            err = proc.stderr.read() if proc.stderr else ""
            raise SshError(f"{host.ssh_target}: {explain(err)}")
    finally:
        _end(proc)


def _end(proc: subprocess.Popen[str]) -> None:
    """Close the channel's stdin (the remote side ends its tail), then make sure ssh is gone."""
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            if pipe:
                pipe.close()
