"""Validation of sim proxies on 2 hosts x 2 remote workers (issue 13), through the CLI.

The sim's judge and proxies bind on SIM_BLOCK (10.77.128.0/17, local addresses of this
machine that every namespace host routes to through the bridge: ``WorldConfig.bind``)
instead of 127.x, which a namespace cannot reach. Exact stored set: one check per proxy,
each proxy once, graded against the sim's truth.

The suite checks 2,000 proxies (the suite's budget on 2 cores); the issue's 20,000 is the
same test with FETCHFLEET_FLEET_PROXIES=20000 (a bench run, not part of the suite).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from engine.cli.demo import compare_with_truth
from sim.world import SimWorld, WorldConfig
from tests.fleet_lab import Fleet, ok
from tests.netns import SIM_BLOCK, Lab
from tests.test_validate_e2e import TRUTH_TIMEOUT_S

N_PROXIES = int(os.environ.get("FETCHFLEET_FLEET_PROXIES", "2000"))

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("proxies")
    cfg = WorldConfig(n_proxies=N_PROXIES, mix="bench", seed=13, out_dir=out, bind=SIM_BLOCK)
    with SimWorld(cfg) as w:
        yield w


def test_two_hosts_validate_sim_proxies_exactly_once(
    lab: Lab, pg_url: str, world: SimWorld
) -> None:
    fleet = Fleet(lab, pg_url, concurrency="200")
    try:
        fleet.start(workers=2)
        summary = ok(fleet.cli(
            "validate", "--proxies", str(world.proxies_file), "--judge", world.judge_url,
            "--timeout", str(TRUTH_TIMEOUT_S), "--batch-size", "50", "--workers", "0",
            "--json", timeout=900))  # fmt: skip
        assert summary["status"] == "completed", summary
        assert summary["counts"]["total"] == summary["counts"]["done"] == len(world.truth)
        total, distinct = fleet.sql(
            "SELECT count(*), count(DISTINCT proxy_id) FROM proxy_checks WHERE run_id = :r",
            r=summary["run_id"])[0]  # fmt: skip
        assert total == distinct == len(world.truth), "a proxy checked twice or missing"
        by_host = dict(fleet.sql("SELECT host, sum(items_done) FROM workers GROUP BY host"))
        assert set(by_host) == {"h0", "h1"} and all(v > 0 for v in by_host.values()), by_host
        truth = compare_with_truth(pg_url, world.truth, TRUTH_TIMEOUT_S)
        assert truth["false_positives"] == truth["false_negatives"] == 0, truth
        assert truth["anonymity_wrong"] == truth["protocol_wrong"] == 0, truth
        assert truth["judged"] > 0, truth
    finally:
        fleet.close()
