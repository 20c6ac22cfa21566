"""The console's Gateway page: Start runs the gateway inside the console's server over the
stored pool (read through the console's own DuckDB handle), real curl traffic shows in its
live table, Stop ends it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from console.gateway import gateway_holder
from console.resources import shutdown_all
from console.testing import run_page, use_fresh_database
from sim.nginx import free_port
from sim.origin import Origin
from sim.world import SimWorld, WorldConfig
from tests.gateway_support import SECRET_KEY, curl, store_members

pytestmark = [pytest.mark.timeout(180)]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, SimWorld, Origin]]:
    url = use_fresh_database(tmp_path, monkeypatch, workers=0)
    monkeypatch.setenv("FETCHFLEET_SECRET_KEY", SECRET_KEY)
    cfg = WorldConfig(n_proxies=4, mix={"elite": 1.0}, seed=3, latency_ms=(1, 2))
    with SimWorld(cfg) as world, Origin(tmp_path / "origin") as origin:
        store_members(url, world.truth)
        try:
            yield url, world, origin
        finally:
            gateway_holder(url).stop()
            shutdown_all()


def test_start_watch_and_stop_the_gateway_from_the_console(
    env: tuple[str, SimWorld, Origin],
) -> None:
    url, _world, origin = env
    at = run_page("pages/gateway.py")
    assert not at.exception
    port = free_port()
    at.number_input(key="gw_port").set_value(port)
    at.number_input(key="gw_metrics").set_value(0)
    at.button(key="gw_start").click().run()
    assert not at.exception, at.exception
    holder = gateway_holder(url)
    assert holder.running is not None and holder.running.members == 4
    for _ in range(8):
        r = curl("-x", f"http://127.0.0.1:{port}", origin.url("/page"))
        assert r.stdout.startswith("page for "), r.stderr
    at.run()
    assert not at.exception
    assert any(m.label == "Members" and m.value == "4" for m in at.metric)
    table = at.dataframe[0].value
    assert sorted(table["requests"]) == [2, 2, 2, 2]
    assert set(table["breaker"]) == {"closed"}
    at.button(key="gw_stop").click().run()
    assert holder.running is None
    assert curl("-x", f"http://127.0.0.1:{port}", origin.url("/page")).returncode != 0
