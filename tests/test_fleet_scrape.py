"""A 3-country scrape of the sim shops on 2 hosts x 2 remote workers (issue 13), through the
CLI: `scrape --spec … --workers 0`, the fleet's workers doing every fetch.

The shops listen on the last addresses of SIM_BLOCK (``WorldConfig(bind=…, shops=…)``), which
the namespace hosts route to. Each source starts at page 1 and at a middle page, so two
workers race to register the pages between (the URL registry keeps one). Exact stored set:
every product of every shop once under its country, every page stored once and fetched with
success once. With host countries (`fleet start h0 --countries …`), each page was fetched by a
worker of a host that serves its country.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.shops import ShopsConfig, ShopSpec, shop_products
from sim.world import SimWorld, WorldConfig
from tests.fleet_lab import Fleet, ok
from tests.netns import SIM_BLOCK, Lab
from tests.test_scrape import CATALOG_EXTRACT, FIELDS, stored

pytestmark = pytest.mark.postgres

SHOPS = ShopsConfig(
    (
        ShopSpec("my-pharmacy", "Malaysia", "none", 200, seed=13),
        ShopSpec("in-market", "India", "none", 120, seed=13),
        ShopSpec("br-flaky", "Brazil", "flaky", 160, seed=13, error_rate=0.2),
    )
)
COUNTRY = {s.name: s.country for s in SHOPS.shops}


@pytest.fixture(scope="module")
def world(lab: Lab) -> Iterator[SimWorld]:
    with SimWorld(WorldConfig(n_proxies=0, shops=SHOPS, bind=SIM_BLOCK)) as w:
        yield w


def spec_file(world: SimWorld, tmp_path: Path) -> str:
    """Each shop's page 1 and its middle page as start URLs, `a.next` followed."""
    assert world.shops is not None
    parts = ['name = "fleet"', 'entity_type = "product"']
    for name, info in world.shops.shops.items():
        assert info.base_url.startswith("http://10.77."), info.base_url  # the hosts reach it
        starts = [info.catalog_url(1), info.catalog_url(info.spec.pages // 2 + 1)]
        parts += [
            "[[sources]]",
            f'country = "{COUNTRY[name]}"',
            f"start_urls = {json.dumps(starts)}",
        ]
    parts += ["[follow]", 'css = ["a.next"]', "max_depth = 100", CATALOG_EXTRACT]
    path = tmp_path / "spec.toml"
    path.write_text("\n".join(parts))
    return str(path)


def scrape(fleet: Fleet, spec: str) -> dict[str, Any]:
    summary = ok(fleet.cli("scrape", "--spec", spec, "--workers", "0", "--batch-size", "1",
                           "--json", timeout=600))  # fmt: skip
    assert summary["status"] == "completed", summary
    return summary


def assert_exact_set(fleet: Fleet, world: SimWorld, run_id: int) -> None:
    """Every product once under its country, every page stored once, fetched once with
    success (the flaky shop's 5xx answers are retries of the same fetch)."""
    assert world.shops is not None
    pages = sum(info.spec.pages for info in world.shops.shops.values())
    for info in world.shops.shops.values():
        want = {p["id"]: p for p in shop_products(info.spec)}
        got = stored(fleet.pg_url, info.spec.country)
        assert set(got) == set(want), info.spec.country
        for pid, product in want.items():
            assert {f: got[pid][f] for f in FIELDS} == {f: product[f] for f in FIELDS}
    ((entities, distinct),) = fleet.sql(
        "SELECT count(*), count(DISTINCT (country, external_id)) FROM entities"
    )
    assert entities == distinct == sum(s.n_products for s in SHOPS.shops)
    ((done, urls, distinct_urls),) = fleet.sql(
        "SELECT count(*) FILTER (WHERE status = 'done'), count(*), count(DISTINCT url) "
        "FROM urls WHERE run_id = :r",
        r=run_id,
    )
    assert done == urls == distinct_urls == pages
    fetched = fleet.sql(
        "SELECT url, count(*) FROM fetch_logs WHERE run_id = :r AND status = 200 GROUP BY url",
        r=run_id,
    )
    assert len(fetched) == pages and {n for _, n in fetched} == {1}, fetched


def hosts_of_fetches(fleet: Fleet, run_id: int) -> dict[str, set[str]]:
    """Country -> the hosts whose workers held the tasks its pages were fetched in."""
    rows = fleet.sql(
        "SELECT f.country, w.host FROM fetch_logs f JOIN tasks t ON t.id = f.task_id "
        "JOIN workers w ON w.id = t.worker_id WHERE f.run_id = :r",
        r=run_id,
    )
    by: dict[str, set[str]] = {}
    for country, host in rows:
        by.setdefault(country, set()).add(host)
    return by


def test_two_hosts_scrape_three_countries_exactly_once(
    lab: Lab, pg_url: str, world: SimWorld, tmp_path: Path
) -> None:
    fleet = Fleet(lab, pg_url, concurrency="1")
    try:
        fleet.start(workers=2)
        summary = scrape(fleet, spec_file(world, tmp_path))
        assert_exact_set(fleet, world, summary["run_id"])
        (untracked,) = fleet.sql(
            "SELECT count(*) FROM fetch_logs f LEFT JOIN tasks t ON t.id = f.task_id "
            "WHERE f.run_id = :r AND t.worker_id IS NULL",
            r=summary["run_id"],
        )[0]
        assert untracked == 0, "a fetch no remote worker made"
        fetched_on = set().union(*hosts_of_fetches(fleet, summary["run_id"]).values())
        assert fetched_on == {"h0", "h1"}, fetched_on
    finally:
        fleet.close()


def test_host_countries_fetch_only_their_countries(
    lab: Lab, pg_url: str, world: SimWorld, tmp_path: Path
) -> None:
    serves = {"h0": "Malaysia,India", "h1": "Brazil"}
    fleet = Fleet(lab, pg_url, concurrency="1")
    try:
        fleet.start(workers=2, countries=serves)
        summary = scrape(fleet, spec_file(world, tmp_path))
        assert_exact_set(fleet, world, summary["run_id"])
        by_country = hosts_of_fetches(fleet, summary["run_id"])
        assert by_country == {"Malaysia": {"h0"}, "India": {"h0"}, "Brazil": {"h1"}}, by_country
    finally:
        fleet.close()
