"""`python -m engine.run fetch` and `doctor` end to end, against the sim shops."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sim.shops import ShopsConfig, ShopSpec, ShopWorld
from tests.conftest import cli_here, run_cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    config = ShopsConfig(
        (
            ShopSpec("plain", "Malaysia", n_products=40),
            ShopSpec("guarded", "Malaysia", "js_challenge"),
        )
    )
    with ShopWorld(config) as world:
        yield world


def test_fetch_prints_the_result_and_every_attempt(shops: ShopWorld):
    url = shops["plain"].catalog_url(2)
    out = run_cli("fetch", url, "--country", "Malaysia", "--selector", "li.product", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # one JSON object, nothing else on stdout
    assert doc["success"] and doc["method_used"] == "http" and doc["status"] == 200
    assert doc["attempts"][0]["method"] == "http" and doc["attempts"][0]["error_type"] is None
    human = run_cli("fetch", url, "--method", "http", "--show")
    assert human.returncode == 0
    assert (
        "OK" in human.stdout and "attempts:" in human.stdout and 'class="product"' in human.stdout
    )


def test_fetch_failure_exits_1_and_shows_the_block(shops: ShopWorld):
    out = run_cli("fetch", shops["guarded"].catalog_url(1), "--method", "http", "--json")
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert not doc["success"] and doc["error_type"] == "blocked"
    assert "challenge" in doc["attempts"][0]["blocked_reason"]
    assert "content" not in doc


def test_fetch_bad_input_exits_2(shops: ShopWorld):
    """Refusals before any fetch: in this process (the runs above are real processes)."""
    out = cli_here("fetch", shops["plain"].catalog_url(1), "--method", "curl")
    assert out.returncode == 2 and "unknown fetch method" in out.stderr
    out = cli_here("fetch", "not-a-url")
    assert out.returncode == 2


def test_doctor_lists_what_each_method_needs():
    out = run_cli(
        "doctor",
        "--json",
        env={"FETCHFLEET_TOR_SOCKS": "127.0.0.1:9", "FETCHFLEET_TOR_CONTROL": "127.0.0.1:9"},
    )
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert set(doc["methods"]) == {"http", "playwright", "selenium", "tor", "api"}
    needs = {(c["method"], c["needs"]) for c in doc["checks"]}
    assert ("selenium", "ChromeDriver") in needs and ("tor", "Tor control port (NEWNYM)") in needs
    assert doc["methods"]["tor"]["available"] is False
    assert doc["methods"]["http"]["available"] is True
    human = cli_here("doctor")  # the same report for people: no second process needed
    assert human.returncode == 0 and "playwright" in human.stdout
