"""The fleet's hosts: machines that run standalone workers started over SSH.

Stored in the database so every console and CLI sees the same fleet. A host row holds how to
reach it (an ssh target: an ssh_config alias or ``user@host:port``), where the project sits
there and which Python runs it; never a secret (keys stay with ssh, the database password
travels to the worker's environment over the ssh channel). ``host_launches`` remembers each
worker launch (the remote session leader's pid) so ``fleet stop`` can signal it.

A ``Component`` of its own (not a core step): the fleet is an engine feature that any
deployment has, registered beside the kinds' components by ``engine.jobs.components``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from storage.bulk import fetch_all
from storage.clock import NOW_SQL, utcnow
from storage.migrations import Component
from storage.schema import workers

metadata = sa.MetaData()

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("ssh_target", sa.String, nullable=False),  # alias or [user@]host[:port]
    sa.Column("python", sa.String, nullable=False),  # the interpreter there
    sa.Column("workdir", sa.String, nullable=False),  # the project directory there
    sa.Column("countries", sa.String),  # comma-separated; NULL: any
    sa.Column("added_at", sa.DateTime, nullable=False),
)

host_launches = sa.Table(
    "host_launches",
    metadata,
    sa.Column("host", sa.String, primary_key=True),
    sa.Column("pid", sa.Integer, primary_key=True, autoincrement=False),  # session leader
    sa.Column("processes", sa.Integer, nullable=False),
    sa.Column("log_path", sa.String, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
)


def _v1(conn: sa.Connection) -> None:
    hosts.create(conn, checkfirst=True)
    host_launches.create(conn, checkfirst=True)


COMPONENT = Component(
    "fleet", [(1, "hosts, host_launches: the fleet's machines", _v1)], [hosts, host_launches]
)

LIVE = ("starting", "idle", "busy", "stopping")


@dataclass(frozen=True)
class HostRow:
    name: str
    ssh_target: str
    python: str
    workdir: str
    countries: str | None = None


@dataclass(frozen=True)
class LiveWorker:
    host: str
    worker_id: str
    pid: int
    status: str
    heartbeat_age_s: float | None
    tasks_held: str | None
    items_done: int
    countries: str | None = None  # "IN,MY": what it claims; None: any


def add_host(conn: sa.Connection, host: HostRow) -> bool:
    """Insert; False when the name is taken."""
    if get_host(conn, host.name) is not None:
        return False
    conn.execute(sa.insert(hosts).values(**host.__dict__, added_at=utcnow()))
    return True


def get_host(conn: sa.Connection, name: str) -> HostRow | None:
    rows = list_hosts(conn, name)
    return rows[0] if rows else None


def list_hosts(conn: sa.Connection, name: str | None = None) -> list[HostRow]:
    q = sa.select(
        hosts.c.name, hosts.c.ssh_target, hosts.c.python, hosts.c.workdir, hosts.c.countries
    ).order_by(hosts.c.name)
    if name is not None:
        q = q.where(hosts.c.name == name)
    return [HostRow(*r) for r in fetch_all(conn, q)]


def remove_host(conn: sa.Connection, name: str) -> bool:
    conn.execute(sa.delete(host_launches).where(host_launches.c.host == name))
    return bool(conn.execute(sa.delete(hosts).where(hosts.c.name == name)).rowcount)


def record_launch(conn: sa.Connection, host: str, pid: int, processes: int, log_path: str) -> None:
    conn.execute(
        sa.delete(host_launches).where(host_launches.c.host == host, host_launches.c.pid == pid)
    )
    conn.execute(
        sa.insert(host_launches).values(
            host=host, pid=pid, processes=processes, log_path=log_path, started_at=utcnow()
        )
    )


def launches(conn: sa.Connection, host: str) -> list[tuple[int, str]]:
    """(pid, log path) of the launches recorded on a host, oldest first."""
    q = (
        sa.select(host_launches.c.pid, host_launches.c.log_path)
        .where(host_launches.c.host == host)
        .order_by(host_launches.c.started_at)
    )
    return [(int(r[0]), str(r[1])) for r in fetch_all(conn, q)]


def forget_launches(conn: sa.Connection, host: str) -> None:
    conn.execute(sa.delete(host_launches).where(host_launches.c.host == host))


def live_workers(conn: sa.Connection, host_names: list[str]) -> list[LiveWorker]:
    """Workers registered under these host names (``worker --host-label``) still alive."""
    if not host_names:
        return []
    age = sa.literal_column(f"EXTRACT(EPOCH FROM ({NOW_SQL} - workers.heartbeat_at))")
    q = (
        sa.select(
            workers.c.host,
            workers.c.id,
            workers.c.pid,
            workers.c.status,
            age,
            workers.c.tasks_held,
            workers.c.items_done,
            workers.c.countries,
        )
        .where(workers.c.host.in_(host_names), workers.c.status.in_(LIVE))
        .order_by(workers.c.host, workers.c.started_at)
    )
    return [
        LiveWorker(
            r[0],
            r[1],
            int(r[2]),
            r[3],
            None if r[4] is None else float(r[4]),
            r[5],
            int(r[6] or 0),
            r[7],
        )
        for r in fetch_all(conn, q)
    ]
