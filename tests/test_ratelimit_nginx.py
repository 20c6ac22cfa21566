"""The limit against a strict real server: Debian's nginx with ``limit_req`` (50 r/s, burst 20,
429 beyond), serving one JSON record. nginx's access log is the ground truth: what it refused.

A backfill of 1,000 IDs at ``--rate-limit 50/1s`` through the local pool must never be
refused and must run near the limit: with the fixed 0.1 s margin and the closed-window
formula it ran at 0.86 (``test_ratelimit_margin.py`` checks the schedule itself). The floor
asserted here (0.75) is one a loaded machine keeps (0.92 beside ``stress-ng --cpu 2``, 0.77 at a
load average of 14 on 2 cores: the margin grows with the lateness it measures); the target,
0.97 on a quiet one, is measured by ``bench/ratelimit.py`` (bench/RESULTS.md). Those
readings were at 20/1s; 50/1s keeps the same 1,000 requests in 20 s of the suite's time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim.api import write_ids
from sim.nginx import NGINX, LimitedOrigin
from storage.bulk import fetch_all
from storage.db import open_database
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
IDS = 1000
RATE = 50  # per second: 20 s of traffic, enough seconds for the rate to be a rate


@pytest.mark.slow
def test_backfill_through_nginx_limit_req_is_never_refused_and_runs_near_the_limit(
    tmp_path: Path,
) -> None:
    require_tool(NGINX, "nginx")
    ids = write_ids(tmp_path / "ids.txt", IDS)
    db = f"duckdb:///{tmp_path / 'b.duckdb'}"
    with LimitedOrigin(tmp_path / "nginx", rate_per_s=RATE, burst=20) as origin:
        out = subprocess.run(
            [sys.executable, "-m", "engine.run", "backfill", "--db", db, "--ids", str(ids),
             "--url-template", origin.url_template, "--rate-limit", f"{RATE}/1s",
             "--workers", "2", "--concurrency", "10", "--json"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        served = origin.requests()
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["status"] == "completed"

    # nginx refused nothing: every ID was asked for once, every answer was 200
    statuses = [status for _, status in served]
    assert statuses.count(429) == 0, f"{statuses.count(429)} requests refused with 429"
    assert len(statuses) == IDS and set(statuses) == {200}
    dbh = open_database(db)
    try:
        with dbh.connect() as conn:
            rows = fetch_all(
                conn, sa.text("SELECT status, http_status, attempts, count(*) FROM backfill_items "
                              "GROUP BY status, http_status, attempts"),
            )  # fmt: skip
    finally:
        dbh.dispose()
    assert [tuple(r) for r in rows] == [("ok", 200, 1, IDS)]

    # not safe by being slow, as nginx saw it (0.97 or more on a quiet machine: the bench)
    times = sorted(t for t, _ in served)
    rate = (len(times) - 1) / (times[-1] - times[0])
    print(f"\n{len(times)} requests at {rate:.2f}/s = {rate / RATE:.3f} of {RATE}/1s, no 429")
    assert rate >= 0.75 * RATE
