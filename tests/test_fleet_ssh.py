"""Remote workers over SSH on real separate hosts: network namespaces, each with its own sshd.

Everything goes through the CLI (`hosts`, `fleet`, `backfill`), real ssh, real PostgreSQL.
The job is a backfill against the sim's API, not a proxy validation: the sim's proxies and
judge live on 127.x addresses of this machine's loopback, which a namespace cannot reach,
while the API is one address that a relay on the bridge (10.77.0.1) exposes to every host.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.api import ApiConfig, expected_outcome
from sim.world import SimWorld
from tests.fleet_lab import (
    PASSWORD,
    ROOT,
    TOKEN,
    api_world,
    cli,
    fleet_env,
    launch_logs,
    live_in_db,
    ok,
    rows_of,
    runner,
    wait_for,
)
from tests.netns import Lab

API = ApiConfig(limit=400, window_s=1.0, token=TOKEN, seed=4)
N_IDS = 600


@pytest.fixture(scope="module")
def api(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimWorld, str]]:
    """The sim's API and its URL template as the hosts reach it (through a relay)."""
    with api_world(API, N_IDS, tmp_path_factory.mktemp("api")) as world:
        yield world


def live_by_host(env: dict[str, str]) -> dict[str, int]:
    status = ok(cli(env, "fleet", "status", "--json"))
    return {h["host"]: len(h["workers"]) for h in status}


def test_two_hosts_over_ssh_backfill_exactly_once_then_stop(
    lab: Lab, api: tuple[SimWorld, str], pg_url: str, tmp_path: Path
) -> None:
    world, template = api
    env = {**fleet_env(lab, pg_url), "SIM_API_TOKEN": f"Bearer {TOKEN}"}
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
    wait_for(lambda: live_in_db(pg_url, names) == {"h0": 2, "h1": 2})
    assert live_by_host(env) == {"h0": 2, "h1": 2}

    # secrets: neither the password nor the token on any command line, here or there
    ps_here = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    ps_there = runner(lab).run(lab.hosts[0].alias, "ps -eo args").stdout
    for text in (ps_here, ps_there):
        assert "engine.run worker" in text
        assert PASSWORD not in text and TOKEN not in text
    # nor in the workers' logs: each says where it joined, with the password hidden
    logs = launch_logs(pg_url)
    assert len(logs) == 2
    wait_for(lambda: all(p.read_text().count(" joined ") == 2 for p in logs), what="joined lines")
    for path in logs:
        text = path.read_text()
        assert "***@" in text and PASSWORD not in text and TOKEN not in text, text

    ids = world.ids_file.read_text().split()
    world.api_reset()
    run = cli(env, "backfill", "--ids", str(world.ids_file), "--url-template", template,
              "--rate-limit", "300/1s", "--header", "Authorization=env:SIM_API_TOKEN",
              "--workers", "0", "--batch-size", "20", "--json", timeout=180)  # fmt: skip
    summary = ok(run)
    assert summary["status"] == "completed", summary

    rows = rows_of(pg_url, "SELECT item_id, outcome FROM backfill_items WHERE run_id = :r",
                   {"r": summary["run_id"]})  # fmt: skip
    done_by_host = dict(rows_of(pg_url, "SELECT host, sum(items_done) FROM workers GROUP BY host"))
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
    rows = rows_of(pg_url, "SELECT host, status, pid FROM workers")
    assert Counter(r[:2] for r in rows) == Counter({("h0", "exited"): 2, ("h1", "exited"): 2})
    probe = "; ".join(f"kill -0 {r[2]} 2>/dev/null && echo {r[2]}" for r in rows) + "; true"
    assert runner(lab).run(lab.hosts[0].alias, probe).stdout.strip() == ""  # processes gone
    for name in names:
        ok(cli(env, "hosts", "remove", name))
    assert ok(cli(env, "hosts", "list", "--json")) == []


def test_fleet_logs_shows_and_follows_a_launch_log(lab: Lab, pg_url: str) -> None:
    """`fleet logs`: the last lines of a launch (found by its pid, a worker's pid or as the
    newest), then --follow until Ctrl-C, which ends the remote tail too."""
    env = fleet_env(lab, pg_url)
    ok(cli(env, "hosts", "add", "h0", "--ssh", lab.hosts[0].alias, "--python", sys.executable,
           "--workdir", str(ROOT)))  # fmt: skip
    none = cli(env, "fleet", "logs", "h0")
    assert none.returncode == 2 and "`fleet start h0` first" in none.stderr, none.stderr
    launch = ok(cli(env, "fleet", "start", "h0", "--workers", "2", "--json"))["pid"]
    wait_for(lambda: live_in_db(pg_url, ["h0"]) == {"h0": 2})
    wait_for(lambda: launch_logs(pg_url)[0].read_text().count(" joined ") == 2, what="joined")

    shown = ok(cli(env, "fleet", "logs", "h0", "--lines", "5", "--json"))
    assert shown["pid"] == launch and shown["log"] == str(launch_logs(pg_url)[0])
    joined = [line for line in shown["lines"] if " joined " in line]
    assert len(joined) == 2 and all("***@" in line for line in joined), shown
    assert PASSWORD not in json.dumps(shown)
    one = ok(cli(env, "fleet", "logs", "h0", "--lines", "1", "--json"))
    assert len(one["lines"]) == 1

    # a worker of the launch is a child in its process group: found by its pid
    worker_pids = [w["pid"] for w in ok(cli(env, "fleet", "status", "--json"))[0]["workers"]]
    assert launch not in worker_pids
    for pid in worker_pids:
        by_worker = ok(cli(env, "fleet", "logs", "h0", "--worker", str(pid), "--json"))
        assert by_worker["pid"] == launch
    wrong = cli(env, "fleet", "logs", "h0", "--launch", "1")
    assert wrong.returncode == 2 and "no launch with pid 1" in wrong.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.run", "fleet", "logs", "h0", "--follow", "--lines", "2"],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or []], daemon=True).start()
    try:
        seen = [lines.get(timeout=60) for _ in range(2)]  # the last two lines first
        assert all(" joined " in line for line in seen), seen
        marker = f"marker-{os.getpid()}"
        with launch_logs(pg_url)[0].open("a") as log:
            log.write(f"{marker}\n")  # written after the follow began: it shows
        assert lines.get(timeout=60).strip() == marker
        proc.send_signal(signal.SIGINT)
        # Ctrl-C closes the channel and waits for ssh (up to 10 s, then TERM and KILL):
        # a margin a loaded machine keeps; if it is exceeded, say what the CLI said
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"fleet logs --follow still running 90 s after Ctrl-C: {err[-2000:]}")
        assert code == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    tail = "tail -n 2 -F"  # the remote tail ended with the follow
    wait_for(lambda: tail not in runner(lab).run(lab.hosts[0].alias, "ps -eo args").stdout,
             within_s=30, what="remote tail gone")  # fmt: skip

    ok(cli(env, "fleet", "stop", "h0"))
    ok(cli(env, "hosts", "remove", "h0"))
