"""Remote workers over SSH on real separate hosts: network namespaces, each with its own sshd.

Everything goes through the CLI (`hosts`, `fleet`, `backfill`), real ssh, real PostgreSQL.
The job is a backfill against the sim's API, not a proxy validation: the sim's proxies and
judge live on 127.x addresses of this machine's loopback, which a namespace cannot reach,
while the API is one address that a relay on the bridge (10.77.0.1) exposes to every host.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim.api import ApiConfig, expected_outcome
from sim.world import SimWorld
from storage.bulk import fetch_all
from storage.db import open_database
from tests.fleet_lab import (
    PASSWORD,
    ROOT,
    TOKEN,
    api_world,
    cli,
    ok,
    runner,
    wait_for,
    with_password,
)
from tests.netns import SUBNET_HOST, Lab

API = ApiConfig(limit=400, window_s=1.0, token=TOKEN, seed=4)
N_IDS = 600


@pytest.fixture(scope="module")
def api(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimWorld, str]]:
    with api_world(API, N_IDS, tmp_path_factory.mktemp("api")) as world:
        yield world


def live_by_host(env: dict[str, str]) -> dict[str, int]:
    status = ok(cli(env, "fleet", "status", "--json"))
    return {h["host"]: len(h["workers"]) for h in status}


def test_two_hosts_over_ssh_backfill_exactly_once_then_stop(
    lab: Lab, api: tuple[SimWorld, str], pg_url: str, tmp_path: Path
) -> None:
    world, template = api
    env = {
        "FETCHFLEET_DB": with_password(pg_url, "127.0.0.1"),
        "FETCHFLEET_WORKER_DB": with_password(pg_url, SUBNET_HOST),  # the hosts' view
        "FETCHFLEET_SSH_CONFIG": str(lab.ssh_config),
        "SIM_API_TOKEN": f"Bearer {TOKEN}",
    }
    names = ["h0", "h1"]
    for name, host in zip(names, lab.hosts, strict=True):
        ok(cli(env, "hosts", "add", name, "--ssh", host.alias, "--python", sys.executable,
               "--workdir", str(ROOT)))  # fmt: skip
    assert [h["name"] for h in ok(cli(env, "hosts", "list", "--json"))] == names

    checks = ok(cli(env, "hosts", "test", "--all", "--json"))
    assert [c["ok"] for c in checks] == [True, True], checks
    assert checks[0]["python"] == ".".join(map(str, sys.version_info[:3]))

    for name in names:
        ok(cli(env, "fleet", "start", name, "--workers", "2", "--env", "SIM_API_TOKEN"))
    wait_for(lambda: live_by_host(env) == {"h0": 2, "h1": 2})

    # secrets: neither the password nor the token on any command line, here or there
    ps_here = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    ps_there = runner(lab).run(lab.hosts[0].alias, "ps -eo args").stdout
    for text in (ps_here, ps_there):
        assert "engine.run worker" in text
        assert PASSWORD not in text and TOKEN not in text

    ids = world.ids_file.read_text().split()
    world.api_reset()
    run = cli(env, "backfill", "--ids", str(world.ids_file), "--url-template", template,
              "--rate-limit", "300/1s", "--header", "Authorization=env:SIM_API_TOKEN",
              "--workers", "0", "--batch-size", "20", "--json", timeout=180)  # fmt: skip
    summary = ok(run)
    assert summary["status"] == "completed", summary

    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            rows = fetch_all(conn, sa.text(
                "SELECT item_id, outcome FROM backfill_items WHERE run_id = :r"),
                {"r": summary["run_id"]})  # fmt: skip
            done_by_host = dict(fetch_all(conn, sa.text(
                "SELECT host, sum(items_done) FROM workers GROUP BY host")))  # fmt: skip
    finally:
        db.dispose()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) == len(ids), "an ID stored twice or missing"
    assert set(keys) == set(ids)
    want = Counter(expected_outcome(i, API) for i in ids)
    want["ok"] += want.pop("flaky", 0)
    assert Counter(r[1] for r in rows) == want
    assert set(done_by_host) == {"h0", "h1"} and all(v > 0 for v in done_by_host.values())

    stopped = ok(cli(env, "fleet", "stop", "--all", "--json"))
    assert stopped == {"h0": 2, "h1": 2}
    assert live_by_host(env) == {"h0": 0, "h1": 0}
    db = open_database(pg_url)
    try:
        with db.connect() as conn:
            rows = fetch_all(conn, sa.text("SELECT host, status, pid FROM workers"))
    finally:
        db.dispose()
    assert Counter(r[:2] for r in rows) == Counter({("h0", "exited"): 2, ("h1", "exited"): 2})
    probe = "; ".join(f"kill -0 {r[2]} 2>/dev/null && echo {r[2]}" for r in rows) + "; true"
    assert runner(lab).run(lab.hosts[0].alias, probe).stdout.strip() == ""  # processes gone
    for name in names:
        ok(cli(env, "hosts", "remove", name))
    assert ok(cli(env, "hosts", "list", "--json")) == []
