"""What the fleet tests share (tests/test_fleet_ssh.py, tests/test_console_hosts.py): the
network-namespace lab's helpers. The ``lab`` fixture itself is in ``tests/conftest.py``, so
one lab (two hosts with their own sshd) serves every test of a session."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.netns import SUBNET_HOST, Lab, Relay, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "fleet-pw-Zq81x"  # trust auth ignores it; it must never show in `ps` or a log


@contextlib.contextmanager
def build_lab(directory: Path) -> Iterator[Lab]:
    """Two hosts with sshd, PostgreSQL reachable from them at 10.77.0.1:5432; skips (fails
    under CI=true) where namespaces cannot be made."""
    from tests.conftest import require_tool

    require_tool("/usr/sbin/sshd", "openssh-server")
    require_tool("ssh", "openssh-client")
    why = netns_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with Lab(2, directory) as built, Relay(SUBNET_HOST, 5432, "127.0.0.1", 5432):
        yield built
        for host in built.hosts:  # end this session's ssh master connections
            runner(built).close(host.alias)


def runner(lab: Lab) -> Any:
    from engine.fleet.ssh import SshRunner

    return SshRunner(config=lab.ssh_config)


def with_password(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{PASSWORD}@{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def wait_for(cond: Callable[[], Any], within_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {within_s:.0f} s"
        time.sleep(0.3)


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
    import sqlalchemy as sa

    from storage.bulk import fetch_all
    from storage.db import open_database

    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            return list(fetch_all(conn, sa.text(sql), params or {}))
    finally:
        db.dispose()


def launch_logs(pg_url: str) -> list[Path]:
    """The log files of the launches recorded now (the lab's hosts share this filesystem)."""
    return [Path(r[0]) for r in rows_of(pg_url, "SELECT log_path FROM host_launches ORDER BY pid")]
