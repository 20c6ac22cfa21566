"""Start, stop and watch the workers of a host.

A launch is one ``engine.run worker --processes N`` started detached (``setsid nohup``) with
``--host-label NAME``, so its workers register under the fleet's name for the host whatever
the machine calls itself; its pid (its own process group) is recorded to stop it later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.countries import parse_countries
from engine.fleet.hosts import FleetError, get_host, list_hosts
from engine.fleet.remote import alive_command, env_payload, start_command, stop_command
from engine.fleet.ssh import SshRunner
from storage import hosts as store
from storage import queue
from storage.db import Database
from storage.hosts import LiveWorker


def start_workers(
    db: Database,
    ssh: SshRunner,
    name: str,
    processes: int,
    worker_env: dict[str, str],
    countries: str | None = None,
) -> int:
    """Start ``processes`` workers on the host; returns the launch's remote pid. They serve
    ``countries`` (comma-separated names or codes; ``any``: every country) when given,
    else the host's stored countries (``hosts add --countries``), else every country."""
    if processes < 1:
        raise FleetError("--workers must be at least 1")
    if not worker_env.get("FETCHFLEET_DB", "").startswith("postgresql"):
        raise FleetError("remote workers need a PostgreSQL URL reachable from the host")
    host = get_host(db, name)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")  # one log per launch
    log_path = f"{host.workdir.rstrip('/')}/data/fleet/{name}-{stamp}.log"
    serves = parse_countries(host.countries if countries is None else countries)
    command = start_command(host.python, host.workdir, name, processes, log_path, serves)
    done = ssh.run(host.ssh_target, command, stdin=env_payload(worker_env))
    out = done.stdout.strip().splitlines()
    if done.returncode != 0 or not out or not out[-1].isdigit():
        raise FleetError(f"{name}: the worker did not start: {done.stderr.strip() or out}")
    pid = int(out[-1])
    with db.begin() as conn:
        store.record_launch(conn, name, pid, processes, log_path)
    return pid


def stop_workers(db: Database, ssh: SshRunner, name: str, wait_s: float = 60.0) -> int:
    """SIGTERM the host's launches and wait (up to ``wait_s``) until they are gone and their
    workers signed off; returns how many workers were live before."""
    stopping = _signal_launches(db, ssh, name)
    _wait_stopped(db, ssh, stopping, time.monotonic() + wait_s, wait_s)
    return stopping.before


@dataclass(frozen=True)
class _Stopping:
    """A host whose launches were sent SIGTERM: what ``_wait_stopped`` waits on."""

    name: str
    ssh_target: str
    workdir: str
    pids: list[int]
    before: int


def _signal_launches(db: Database, ssh: SshRunner, name: str) -> _Stopping:
    host = get_host(db, name)
    with db.connect() as conn:
        pids = [pid for pid, _ in store.launches(conn, name)]
        before = len(store.live_workers(conn, [name]))
    if pids:
        ssh.run(host.ssh_target, stop_command(pids))
    return _Stopping(name, host.ssh_target, host.workdir, pids, before)


def _wait_stopped(
    db: Database, ssh: SshRunner, stopping: _Stopping, deadline: float, wait_s: float
) -> None:
    name, target, pids = stopping.name, stopping.ssh_target, stopping.pids
    while pids:
        left = ssh.run(target, alive_command(pids)).stdout.split()
        with db.connect() as conn:
            live = store.live_workers(conn, [name])
        if not left and live:  # its launches are gone: those whose process is gone died unseen
            running = ssh.run(target, alive_command([w.pid for w in live], groups=False))
            gone = [w.worker_id for w in live if str(w.pid) not in running.stdout.split()]
            if gone:
                _bury(db, gone)
                continue
        if not left and not live:
            break
        if time.monotonic() > deadline:
            raise FleetError(
                f"{name}: {len(left)} launch(es) and {len(live)} worker(s) still running "
                f"after {wait_s:.0f} s; see the log under {stopping.workdir}/data/fleet/"
            )
        time.sleep(0.5)
    with db.begin() as conn:
        store.forget_launches(conn, name)


def _bury(db: Database, worker_ids: list[str]) -> None:
    """Workers whose processes are all gone (one killed with -9 signs nothing off): marked
    dead and their tasks re-queued without an attempt, as the watchdog would once their
    heartbeats are a few leases old — a watchdog that runs only beside a run."""
    from engine.settings import Settings

    reason = "its process is gone (seen by fleet stop)"
    cap = Settings().max_lost_leases
    with db.begin() as conn:
        for worker_id in worker_ids:
            held = queue.tasks_of_worker(conn, worker_id)
            queue.requeue(conn, held, reason, lost=True, max_lost_leases=cap)
            queue.end_worker(conn, worker_id, "dead", reason)


def stop_all(db: Database, ssh: SshRunner, wait_s: float = 60.0) -> dict[str, int]:
    """Every host's launches are sent SIGTERM first, then waited on: the hosts wind down
    together (stopping them one after the other cost each host's drain in turn)."""
    stopping = [_signal_launches(db, ssh, h.name) for h in list_hosts(db)]
    deadline = time.monotonic() + wait_s
    for each in stopping:
        _wait_stopped(db, ssh, each, deadline, wait_s)
    return {each.name: each.before for each in stopping}


@dataclass(frozen=True)
class HostStatus:
    name: str
    ssh_target: str
    launches: list[int]
    workers: list[LiveWorker]


def fleet_status(db: Database) -> list[HostStatus]:
    """Every host with its recorded launches and its live workers (the workers table)."""
    hosts = list_hosts(db)
    with db.connect() as conn:
        live = store.live_workers(conn, [h.name for h in hosts])
        launches = {h.name: [pid for pid, _ in store.launches(conn, h.name)] for h in hosts}
    return [
        HostStatus(h.name, h.ssh_target, launches[h.name], [w for w in live if w.host == h.name])
        for h in hosts
    ]
