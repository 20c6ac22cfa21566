"""Tampering proxies: the canary comparison, the sim's tamperers, the stored `tampering`
status, and that nothing routes through such a proxy (scrape pool, gateway).

Real traffic against sim/ on loopback (one small world for the module), real DuckDB and
PostgreSQL for the storage part.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import uvloop
from cryptography.fernet import Fernet

from fetchers.integrity import (
    CanaryError,
    IntegrityCheck,
    canary_for_judge,
    describe_change,
    resolve_canary,
)
from fetchers.proxy_check import CheckResult, Outcome, ProxyChecker
from fetchers.proxy_parse import ProxySpec, iter_proxy_lines
from sim import canary, tamper
from sim.fleet import TAMPERING
from sim.world import SimWorld, WorldConfig
from storage import proxies as proxy_store
from storage.clock import utcnow
from storage.db import Database, open_database
from storage.secrets import SecretBox
from tests.relays import verify_counting

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 3.0
MIX = {
    "elite": 0.3,
    "anonymous": 0.1,
    "flaky": 0.1,
    "refused": 0.1,
    "injects_script": 0.1,
    "rewrites_json": 0.1,
    "strips_scripts": 0.1,
    "recompresses_image": 0.1,
}
# What each sim tamperer must be caught doing (a part of the stored detail).
CAUGHT = {
    "injects_script": "html injected 52 bytes (a <script>)",
    "rewrites_json": "json rewritten at $.price (100 → 101)",
    "strips_scripts": "html stripped 74 bytes (a <script>)",
    "recompresses_image": "image rewritten from byte",
}


# --------------------------------------------------------------------------- comparison


def test_identical_bytes_are_no_change() -> None:
    assert describe_change(canary.HTML, bytes(canary.HTML)) is None


def test_an_injected_script_is_named_with_its_size_and_place() -> None:
    at = canary.HTML.rfind(b"</body>")
    got = canary.HTML[:at] + b"<script>x()</script>" + canary.HTML[at:]
    assert describe_change(canary.HTML, got) == f"injected 20 bytes (a <script>) at byte {at}"


def test_stripped_and_rewritten_content() -> None:
    assert describe_change(b"abcdef", b"abef") == "stripped 2 bytes at byte 2"
    assert describe_change(b"abcdef", b"abXYef") == "rewritten from byte 2 (6 → 6 bytes)"
    assert describe_change(b'{"a": [1, {"b": 2}]}', b'{"a": [1, {"b": 3}]}') == (
        "rewritten at $.a[1].b (2 → 3)"
    )
    assert describe_change(b"abc", b"") == "stripped 3 bytes at byte 0"


@pytest.mark.parametrize("behaviour", sorted(tamper.TAMPERS))
def test_each_sim_tamperer_changes_its_kind_of_content(behaviour: str) -> None:
    ctype, change = tamper.TAMPERS[behaviour]
    name = next(n for n, (_, t) in canary.RESOURCES.items() if t.startswith(ctype))
    body = canary.RESOURCES[name][0]
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
        ctype.encode(),
        len(body),
    )
    out = tamper.tamper(behaviour, raw + body)
    head, _, new_body = out.partition(b"\r\n\r\n")
    assert new_body == change(body) != body
    assert f"Content-Length: {len(new_body)}".encode() in head
    # the judge's JSON (no numbers) and other types pass untouched
    judge = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    assert tamper.tamper(behaviour, judge) == judge


def test_canary_urls() -> None:
    assert canary_for_judge("http://127.0.0.2:8080/get") == "http://127.0.0.2:8080/canary/"
    assert canary_for_judge("https://judge.example/get") is None  # TLS: give --canary
    with pytest.raises(CanaryError, match="plain http"):
        IntegrityCheck("https://judge.example/canary/")


# --------------------------------------------------------------------------- the sim world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    out = tmp_path_factory.mktemp("tamper-world")
    with SimWorld(WorldConfig(n_proxies=20, mix=MIX, seed=4, out_dir=out)) as w:
        yield w


def _check_all(world: SimWorld, canary_url: str | None) -> dict[int, CheckResult]:
    parsed = list(iter_proxy_lines(world.proxies_file))

    async def main() -> dict[int, CheckResult]:
        integrity = IntegrityCheck(canary_url, TIMEOUT) if canary_url else None
        async with ProxyChecker(world.judge_url, TIMEOUT, integrity=integrity) as checker:
            results = await asyncio.gather(*(checker.check(p.spec) for p in parsed))  # type: ignore[arg-type]
        return {p.line_no: r for p, r in zip(parsed, results, strict=True)}

    return uvloop.run(main())


@pytest.mark.timeout(60)
def test_canary_resolution(world: SimWorld) -> None:
    own = f"http://{world.judge_host}:{world.judge_port}/canary/"
    dead = "http://127.0.0.2:9/get"  # nothing listens on the discard port

    async def main() -> None:
        assert await resolve_canary(None, world.judge_url, TIMEOUT) == own  # beside the judge
        assert await resolve_canary("off", world.judge_url, TIMEOUT) is None
        assert await resolve_canary(None, dead, TIMEOUT) is None  # no canary: not checked
        with pytest.raises(CanaryError, match="HTTP 404"):  # asked for: must work
            await resolve_canary(world.judge_url.replace("/get", "/nope/"), dead, TIMEOUT)

    uvloop.run(main())


@pytest.mark.timeout(60)
def test_checker_catches_exactly_the_tampering_proxies(world: SimWorld) -> None:
    results = _check_all(world, f"http://{world.judge_host}:{world.judge_port}/canary/")
    truth = {t.line_no: t for t in world.truth}
    seen = set()
    for line_no, r in results.items():
        t = truth[line_no]
        label = f"line {line_no} {t.protocol}/{t.behaviour}: {r.outcome} {r.error}"
        if t.behaviour in TAMPERING:
            seen.add(t.behaviour)
            assert (r.outcome, r.alive, r.integrity) == (Outcome.TAMPERING, False, "tampering")
            assert r.error and CAUGHT[t.behaviour] in r.error, label
            assert r.protocol == "http" and r.exit_ip == t.host, label  # still informative
        elif t.alive_expected:
            assert (r.outcome, r.integrity, r.error) == (Outcome.ALIVE, "intact", None), label
        elif t.alive_expected is None:  # flaky: a dropped canary fetch is unknown, no verdict
            assert r.outcome != Outcome.TAMPERING, label
            assert r.integrity in (None, "intact", "unknown"), label
        else:
            assert not r.alive, label
        if t.password:
            assert t.password not in repr(r)
    assert seen == set(TAMPERING)
    assert {truth[n].protocol for n, r in results.items() if r.integrity == "intact"} == {
        "http",
        "https",
        "socks4",
        "socks5",
    }  # the canary went through every kind of tunnel too


@pytest.mark.timeout(60)
def test_the_canary_takes_one_connection_where_it_is_kept_open(world: SimWorld) -> None:
    """Through a tunnel (CONNECT, SOCKS) the canary's server keeps the connection alive: the
    three files come down one connection. The sim's forward proxies close after each
    answer (as tinyproxy does): the two files left then take a connection each, and the
    verdict is the same, a tamperer's included."""
    truth = {t.line_no: t for t in world.truth}
    cases: dict[str, tuple[ProxySpec, str]] = {}
    for p in iter_proxy_lines(world.proxies_file):
        t = truth[p.line_no]
        kind = {"elite": "", "anonymous": "", "injects_script": " injects_script"}.get(t.behaviour)
        if kind is not None and p.spec is not None:
            cases.setdefault(f"{t.protocol}{kind}", (p.spec, str(t.protocol)))
    got = uvloop.run(
        verify_counting(f"http://{world.judge_host}:{world.judge_port}/canary/", cases)
    )
    assert got == {
        "http": ("intact", 3),
        "http injects_script": ("tampering", 3),
        "https": ("intact", 1),
        "socks4": ("intact", 1),
        "socks5": ("intact", 1),
    }


@pytest.mark.timeout(60)
def test_without_a_canary_tampering_proxies_stay_alive_with_integrity_unchecked(
    world: SimWorld,
) -> None:
    results = _check_all(world, None)
    tampering = [r for n, r in results.items() if n in {t.line_no for t in world.truth
                                                        if t.behaviour in TAMPERING}]  # fmt: skip
    assert tampering and all(r.alive and r.integrity is None for r in tampering)


# --------------------------------------------------------------------------- stored, never used

_BOX = SecretBox(Fernet(Fernet.generate_key()))


def _store(db: Database, outcomes: dict[str, tuple[str, bool]]) -> None:
    specs = [ProxySpec("http", f"10.0.0.{i}", 8080) for i in range(1, len(outcomes) + 1)]
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, specs, _BOX, "t")
        rows = []
        for pid, (outcome, alive) in zip(ids, outcomes.values(), strict=True):
            detail = "content modified: html injected 9 bytes at byte 1"
            rows.append(
                (1, pid, 1, "w", utcnow(), outcome, alive, "http", 5.0 * pid,
                 "elite", f"10.0.0.{pid}", None, detail if outcome == "tampering" else None)
            )  # fmt: skip
        assert proxy_store.store_checks(conn, rows) == len(rows)


def test_a_tampering_verdict_is_stored_and_never_routed(db: Database) -> None:
    _store(db, {"a": ("alive", True), "b": ("tampering", False), "c": ("refused", False)})
    with db.begin() as conn:
        states = {k: v[0] for k, v in proxy_store.pool_states(conn).items()}
        assert sorted(states.values()) == ["active", "inactive", "tampering"]
        assert proxy_store.pool_counts(conn) == {"active": 1, "inactive": 1, "tampering": 1}
        assert [r[2] for r in proxy_store.pool_snapshot(conn, "active", 10)] == ["10.0.0.1"]
        assert proxy_store.snapshot_run_pool(conn, 9, "active", 10) == 1
        assert [r[3] for r in proxy_store.gateway_members(conn, "active", 10)] == ["10.0.0.1"]
        for select in (
            lambda: proxy_store.pool_snapshot(conn, "tampering", 10),
            lambda: proxy_store.snapshot_run_pool(conn, 9, "tampering", 10),
            lambda: proxy_store.gateway_members(conn, "tampering", 10),
        ):
            with pytest.raises(ValueError, match="tampering"):
                select()
        last_error = conn.execute(
            sa.text("SELECT last_error FROM proxies WHERE status = 'tampering'")
        ).scalar_one()
    assert last_error.startswith("content modified: html injected")


def test_gateway_and_scrape_refuse_the_tampering_status() -> None:
    from engine.gateway.members import MemberFilter
    from engine.jobs.params import ParamError
    from engine.jobs.scrape.params import ScrapeParams
    from engine.settings import Settings

    with pytest.raises(ValueError, match="tampering"):
        MemberFilter(status="tampering")
    with pytest.raises((ParamError, ValueError), match="tampering"):
        ScrapeParams.build({"spec": "x.toml", "proxies": "tampering"}, Settings())


# --------------------------------------------------------------------------- the CLI


@pytest.mark.timeout(120)
def test_validate_run_stores_exactly_the_tampering_proxies(world: SimWorld, tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'v.duckdb'}"
    out = subprocess.run(
        [sys.executable, "-m", "engine.run", "validate", "--db", url, "--proxies",
         str(world.proxies_file), "--judge", world.judge_url, "--timeout", str(TIMEOUT),
         "--workers", "1", "--batch-size", "10", "--json"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
        env={**os.environ, "FETCHFLEET_SECRET_KEY_FILE": str(tmp_path / "secret.key")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    expected = {t.line.split("://")[-1].split("@")[-1] for t in world.truth
                if t.behaviour in TAMPERING}  # fmt: skip
    assert summary["counts"]["outcomes"]["tampering"] == len(expected) == 8
    assert summary["validate"]["integrity"]["canary"].endswith("/canary/")
    from engine.jobs import get_kind
    from engine.settings import Settings

    lines = get_kind("validate", Settings()).summary_lines(summary)
    assert lines and lines[0].startswith("  integrity: 8 tampering (they modify content")
    db = open_database(url)
    try:
        with db.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT host, port, status, last_error FROM proxies")
            ).fetchall()
            active = {r[2] for r in proxy_store.pool_snapshot(conn, "active", 100)}
            members = {r[3] for r in proxy_store.gateway_members(conn, "active", 100)}
    finally:
        db.dispose()
    tampering = {f"{h}:{p}".split(":")[0] for h, p, s, _ in rows if s == "tampering"}
    assert tampering == {e.split(":")[0] for e in expected}
    assert all(e and e.startswith("content modified: ") for *_, s, e in rows if s == "tampering")
    assert active and not (active | members) & tampering


# --------------------------------------------------------------------------- the console


def test_validation_page_counts_and_filters_tampering_proxies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from console.resources import shutdown_all
    from console.testing import run_page, use_fresh_database

    url = use_fresh_database(tmp_path, monkeypatch)
    try:
        db = open_database(url)
        try:
            _store(db, {"a": ("alive", True), "b": ("tampering", False), "c": ("alive", True)})
        finally:
            db.dispose()
        at = run_page("pages/validation.py")
        assert not at.exception, at.exception
        shown = {m.label: m.value for m in at.metric}
        assert (shown["pool: active"], shown["pool: tampering"]) == ("2", "1")
        assert "tampering" in at.selectbox(key="pool_status").options
        at.selectbox(key="pool_status").set_value("tampering").run()
        assert "1 proxies match" in at.caption[0].value
        table = at.dataframe[0].value
        assert len(table) == 1 and "content modified" in " ".join(map(str, table.iloc[0]))
    finally:
        shutdown_all()
