"""What the fleet tests share (tests/test_fleet_*.py, tests/test_console_hosts.py): the
network-namespace lab's helpers and ``Fleet``, one test's fleet on it (the CLI's environment,
its hosts added, workers started over ssh, the SQL it reads stored state with). The ``lab``
fixture itself is in ``tests/conftest.py``, so one lab (two hosts with their own sshd) serves
every test of a session."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from sim.api import ApiConfig
from sim.world import SimWorld, WorldConfig
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import run_cli, start_cli
from tests.netns import SUBNET_HOST, Lab, Relay, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "fleet-pw-Zq81x"  # trust auth ignores it; it must never show in `ps` or a log
TOKEN = "sim-fleet-token-5521"
HOSTS = ("h0", "h1")


@contextlib.contextmanager
def build_lab(directory: Path, n: int = 2) -> Iterator[Lab]:
    """``n`` hosts with sshd, PostgreSQL reachable from them at 10.77.0.1:5432; skips (fails
    under CI=true) where namespaces cannot be made (bench/fleet.py builds three)."""
    from tests.conftest import require_tool

    require_tool("/usr/sbin/sshd", "openssh-server")
    require_tool("ssh", "openssh-client")
    why = netns_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with Lab(n, directory) as built, Relay(SUBNET_HOST, 5432, "127.0.0.1", 5432):
        yield built
        for host in built.hosts:  # end this session's ssh master connections
            runner(built).close(host.alias)


@contextlib.contextmanager
def api_world(config: ApiConfig, n_ids: int, out: Path) -> Iterator[tuple[SimWorld, str]]:
    """The sim's API and its URL template as the hosts reach it (through a relay on the
    bridge: the API listens on 127.0.0.3, which a namespace cannot reach)."""
    with SimWorld(WorldConfig(n_proxies=0, api=config, ids=n_ids, seed=config.seed,
                              out_dir=out)) as world:  # fmt: skip
        parts = urlsplit(world.api_url)
        with Relay(SUBNET_HOST, 0, parts.hostname or "", parts.port or 80) as relay:
            yield world, f"http://{SUBNET_HOST}:{relay.port}/users/{{id}}"


def runner(lab: Lab) -> Any:
    from engine.fleet.ssh import SshRunner

    return SshRunner(config=lab.ssh_config)


def with_password(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{PASSWORD}@{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``run_cli`` in the fleet tests' call shape: the fleet's environment first."""
    return run_cli(*args, env=env, timeout=timeout)


def ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[")) else done.stdout


def wait_for(cond: Callable[[], Any], within_s: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy (returned), for at most ``within_s``."""
    deadline = time.monotonic() + within_s
    while not (got := cond()):
        assert time.monotonic() < deadline, f"{what}: not met within {within_s:.0f} s"
        time.sleep(0.2)
    return got


def fleet_env(lab: Lab, pg_url: str) -> dict[str, str]:
    """The variables of a CLI or console driving the lab: this machine's database URL and the
    hosts' (both with a password), the lab's ssh config."""
    return {
        "FETCHFLEET_DB": with_password(pg_url, "127.0.0.1"),
        "FETCHFLEET_WORKER_DB": with_password(pg_url, SUBNET_HOST),  # the hosts' view
        "FETCHFLEET_SSH_CONFIG": str(lab.ssh_config),
    }


def rows_of(pg_url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """The rows of one query on the test database (what the tests check was stored)."""
    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            return list(fetch_all(conn, sa.text(sql), params or {}))
    finally:
        db.dispose()


def live_in_db(pg_url: str, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Live workers by host as `fleet status` counts them, read from the workers table: what
    the tests poll (a CLI per poll costs 1-2 s; they check `fleet status` itself once)."""
    from storage import hosts as store

    db = open_database(pg_url, create=False)
    try:
        with db.connect() as conn:
            live = store.live_workers(conn, list(names))
    finally:
        db.dispose()
    return {name: sum(w.host == name for w in live) for name in names}


def launch_logs(pg_url: str) -> list[Path]:
    """The log files of the launches recorded now (the lab's hosts share this filesystem)."""
    return [Path(r[0]) for r in rows_of(pg_url, "SELECT log_path FROM host_launches ORDER BY pid")]


class Fleet:
    """One test's fleet on the lab: the CLI environment (the password in both database URLs,
    the API token, short leases for the workers when asked), hosts h0 and h1 added (or h0…
    of the first ``hosts`` of the lab's)."""

    def __init__(
        self, lab: Lab, pg_url: str, hosts: int | None = None, **worker_settings: str
    ) -> None:
        self.lab = lab
        self.pg_url = pg_url
        self.names = HOSTS if hosts is None else tuple(f"h{i}" for i in range(hosts))
        # FETCHFLEET_* settings for this CLI and, through `fleet start --env`, the workers
        self.settings = {f"FETCHFLEET_{k.upper()}": v for k, v in worker_settings.items()}
        self.env = {
            "FETCHFLEET_DB": with_password(pg_url, "127.0.0.1"),
            "FETCHFLEET_WORKER_DB": with_password(pg_url, SUBNET_HOST),  # the hosts' view
            "FETCHFLEET_SSH_CONFIG": str(lab.ssh_config),
            "SIM_API_TOKEN": f"Bearer {TOKEN}",
            **self.settings,
        }
        self.started = time.time()
        # added with the engine function `hosts add` calls (a CLI each cost 1-2 s; the CLI's
        # `hosts add/list/test/remove` are tests/test_fleet_ssh.py's)
        from engine.cli.common import open_database as open_with_kinds
        from engine.fleet.hosts import add_host
        from storage.hosts import HostRow

        db = open_with_kinds(pg_url)  # the CLI's: every table, as a command makes them
        try:
            for name, host in zip(self.names, lab.hosts[: len(self.names)], strict=True):
                add_host(db, HostRow(name, host.alias, sys.executable, str(ROOT)))
        finally:
            db.dispose()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return cli(self.env, *args, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """A CLI command in the background (a run the test acts on meanwhile)."""
        return start_cli(*args, env=self.env)

    def start(self, workers: int = 2, countries: dict[str, str] | None = None) -> None:
        """``workers`` on each host, with this fleet's settings and the API token (and
        ``fleet start --countries`` of the hosts named in ``countries``)."""
        passed = [a for name in [*self.settings, "SIM_API_TOKEN"] for a in ("--env", name)]
        starts = []  # one `fleet start` a host, side by side
        for name in self.names:
            serve = ["--countries", countries[name]] if countries and name in countries else []
            starts.append(self.popen("fleet", "start", name, "--workers", str(workers),
                                     *passed, *serve))  # fmt: skip
        for proc in starts:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err + out
        want = dict.fromkeys(self.names, workers)
        # polled in SQL (what `fleet status` reads): a CLI per poll cost 1-2 s each; the
        # tests that check `fleet status` itself call live_by_host
        wait_for(lambda: self.live_in_db() == want, what=f"{workers} live workers a host")

    def live_by_host(self) -> dict[str, int]:
        status = ok(self.cli("fleet", "status", "--json"))
        return {h["host"]: len(h["workers"]) for h in status}

    def live_in_db(self) -> dict[str, int]:
        return live_in_db(self.pg_url, self.names)

    def sql(self, query: str, **params: Any) -> list[Any]:
        db = open_database(self.pg_url, create=False)
        try:
            with db.connect() as conn:
                return fetch_all(conn, sa.text(query), params)
        finally:
            db.dispose()

    def workers(self, host: str) -> list[tuple[str, int]]:
        """(worker id, pid) of the host's workers that registered."""
        return [(r[0], int(r[1])) for r in self.sql(
            "SELECT id, pid FROM workers WHERE host = :h ORDER BY id", h=host)]  # fmt: skip

    def leased_by(self, where: str, **params: Any) -> list[int]:
        """Leased tasks whose worker matches ``where`` (on workers w)."""
        return [r[0] for r in self.sql(
            "SELECT t.id FROM tasks t JOIN workers w ON w.id = t.worker_id "
            f"WHERE t.status = 'leased' AND {where} ORDER BY t.id", **params)]  # fmt: skip

    def on_host(self, host: str, command: str) -> str:
        index = self.names.index(host)
        return str(runner(self.lab).run(self.lab.hosts[index].alias, command).stdout)

    def logs(self) -> list[Path]:
        """The worker logs of this fleet's launches (the hosts share this filesystem)."""
        return [
            p
            for p in (ROOT / "data" / "fleet").glob("h*-*.log")
            if p.name.split("-", 1)[0] in self.names and p.stat().st_mtime >= self.started - 1
        ]

    def close(self) -> None:
        """Stop the workers; whatever does not stop (a test failed mid-fault) is killed."""
        for host in self.lab.hosts[: len(self.names)]:  # a test that failed with a link down
            subprocess.run(["ip", "link", "set", host.veth, "up"], check=False)
        done = self.cli("fleet", "stop", "--all", "--wait", "30", timeout=120)
        if done.returncode != 0:
            for host in self.lab.hosts:
                self.lab.kill_leftovers(host)
