"""Hosts: add, list, test, remove. What ``hosts test`` checks is what a worker needs there."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace

from engine.countries import countries_text, parse_countries
from engine.fleet.remote import env_payload, probe_command
from engine.fleet.ssh import SshError, SshRunner, target_args
from engine.version import code_version, short
from storage import hosts as store
from storage.db import Database
from storage.hosts import HostRow


class FleetError(Exception):
    """A fleet operation that cannot go on; the message says what to do."""


# The name labels the host's workers and names its log files: no spaces, slashes or quotes.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_COUNTRY = re.compile(r"^[\w][\w .'-]*$")


def host_problems(host: HostRow) -> dict[str, str]:
    """What is wrong with a host before it is stored, by field (``HostRow``'s names), each
    message saying what to write instead; empty when nothing is."""
    e: dict[str, str] = {}
    if not _NAME.match(host.name or ""):
        e["name"] = (
            f"host name {host.name!r}: use only letters, digits, '.', '_' or '-' (at most 63 "
            "characters, no spaces): it labels the host's workers and names their logs"
            if host.name
            else "a host needs a name (letters, digits, '.', '_' or '-'), e.g. gpu1"
        )
    try:
        target_args(host.ssh_target)
    except ValueError as exc:
        e["ssh_target"] = str(exc)
    if not (host.python or "").strip():
        e["python"] = "the Python there is needed, e.g. .venv/bin/python (relative to the workdir)"
    if not (host.workdir or "").strip():
        e["workdir"] = "the project directory there is needed, e.g. fetchfleet or /srv/fetchfleet"
    bad = [
        c for c in (host.countries or "").split(",") if c.strip() and not _COUNTRY.match(c.strip())
    ]
    if bad:
        e["countries"] = (
            f"countries {bad[0].strip()!r}: write names separated by commas, e.g. India,Malaysia"
        )
    return e


def add_host(db: Database, host: HostRow) -> None:
    problems = host_problems(host)
    if problems:
        raise FleetError("; ".join(problems.values()))
    host = replace(host, countries=countries_text(parse_countries(host.countries)))
    with db.begin() as conn:
        if not store.add_host(conn, host):
            raise FleetError(f"host {host.name!r} exists already (hosts remove {host.name})")


def get_host(db: Database, name: str) -> HostRow:
    with db.connect() as conn:
        host = store.get_host(conn, name)
    if host is None:
        raise FleetError(f"no host {name!r}: add it with `hosts add {name} --ssh TARGET`")
    return host


def list_hosts(db: Database) -> list[HostRow]:
    with db.connect() as conn:
        return store.list_hosts(conn)


def remove_host(db: Database, name: str) -> None:
    with db.begin() as conn:
        if store.live_workers(conn, [name]):
            raise FleetError(f"host {name!r} has live workers: `fleet stop {name}` first")
        if not store.remove_host(conn, name):
            raise FleetError(f"no host {name!r}")


@dataclass(frozen=True)
class HostCheck:
    """``ok`` when every check passed; ``problem`` names the first that failed."""

    name: str
    reachable: bool
    python: str | None = None
    project: bool = False
    db: str | None = None
    problem: str | None = None
    version: str | None = None  # the project's code version there
    local_version: str | None = None  # this checkout's: runs started here carry it

    @property
    def version_ok(self) -> bool:
        """Workers there serve runs started from here (``engine.version``)."""
        return self.version is not None and self.version == self.local_version

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "version_ok": self.version_ok, "ok": self.ok}


def test_host(ssh: SshRunner, host: HostRow, worker_env: dict[str, str]) -> HostCheck:
    """Reachable over ssh, its Python, the project importable in its workdir, and the
    database reachable from there (with the URL the workers will get)."""
    try:
        done = ssh.run(
            host.ssh_target, probe_command(host.python, host.workdir), stdin=env_payload(worker_env)
        )
    except SshError as exc:
        return HostCheck(host.name, False, problem=str(exc))
    lines = done.stdout.strip().splitlines()
    version = lines[0] if lines else None
    if done.returncode == 10 or not version:
        return HostCheck(host.name, True, problem=f"{host.python} does not run there")
    if done.returncode == 11:
        return HostCheck(host.name, True, version, problem=f"no directory {host.workdir} there")
    try:
        probe = json.loads(lines[-1])
    except (ValueError, IndexError):
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return HostCheck(
            host.name,
            True,
            version,
            problem=f"the project is not importable in {host.workdir}: {tail[0]}",
        )
    db = str(probe.get("db"))
    there = str(probe["version"]) if probe.get("version") else None
    here = code_version()
    problem = None if db == "ok" else f"database not reachable from there: {db}"
    if problem is None and there != here:
        problem = (
            f"version {short(there)} there, {short(here)} here: its workers will not take "
            f"tasks of runs started here; `deploy {host.name}`"
        )
    return HostCheck(host.name, True, version, True, db, problem, there, here)
