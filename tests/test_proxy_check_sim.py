"""ProxyChecker against the simulated world: every proxy of a demo world vs its truth.

Zero false positives, zero false negatives on non-flaky proxies, the right anonymity and the
right detected protocol — with both judge formats.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
import uvloop

from fetchers.proxy_check import CheckResult, ProxyChecker
from fetchers.proxy_parse import ProxySpec, iter_proxy_lines
from sim.world import SimWorld, WorldConfig

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TIMEOUT = 4.0  # the demo's slow proxies answer within 2 s


@pytest.fixture(scope="module")
def world() -> Iterator[object]:
    with SimWorld(WorldConfig(n_proxies=60, mix="demo", seed=1)) as w:
        yield w


def check_world(judge_url: str, proxies_file: object) -> list[tuple[int, ProxySpec, CheckResult]]:
    parsed = list(iter_proxy_lines(proxies_file))  # type: ignore[arg-type]
    assert all(p.spec is not None for p in parsed), [p.error for p in parsed if p.error]

    async def main() -> list[tuple[int, ProxySpec, CheckResult]]:
        async with ProxyChecker(judge_url, timeout=TIMEOUT) as checker:
            results = await asyncio.gather(*(checker.check(p.spec) for p in parsed))  # type: ignore[arg-type]
        return [(p.line_no, p.spec, r) for p, r in zip(parsed, results, strict=True)]  # type: ignore[misc]

    return uvloop.run(main())


@pytest.mark.parametrize("judge", ["judge_url", "judge_azenv_url"])
def test_every_demo_proxy_matches_its_truth(world, judge: str) -> None:  # type: ignore[no-untyped-def]
    truth = {t.line_no: t for t in world.truth}
    results = check_world(getattr(world, judge), world.proxies_file)
    assert len(results) == len(truth)
    problems = []
    judged = Counter()
    for line_no, spec, r in results:
        t = truth[line_no]
        label = f"line {line_no} {spec.redacted()} ({t.protocol}/{t.behaviour})"
        if t.password:
            assert t.password not in repr(r), label
        if t.alive_expected is None:  # flaky by design
            continue
        judged[t.behaviour] += 1
        if r.alive != t.alive_expected:
            kind = "false positive" if r.alive else "false negative"
            problems.append(f"{label}: {kind}: {r.outcome} {r.error}")
            continue
        if not r.alive:
            continue
        if r.protocol != t.protocol:
            problems.append(f"{label}: protocol {r.protocol}, expected {t.protocol}")
        if r.anonymity != t.anonymity_expected:
            problems.append(f"{label}: anonymity {r.anonymity}, expected {t.anonymity_expected}")
        if r.exit_ip != t.exit_ip:
            problems.append(f"{label}: exit ip {r.exit_ip}, expected {t.exit_ip}")
        if r.latency_ms is None or r.latency_ms <= 0:
            problems.append(f"{label}: no latency")
    assert not problems, "\n".join(problems)
    # the demo world really exercised every behaviour that has a verdict
    assert {"elite", "anonymous", "transparent", "slow", "refused", "blackhole", "fake"} <= set(
        judged
    ), judged


def test_dead_proxies_get_the_right_outcome(world) -> None:  # type: ignore[no-untyped-def]
    truth = {t.line_no: t for t in world.truth}
    expected = {"refused": {"refused"}, "blackhole": {"timeout"}, "fake": {"bad_response"}}
    wrong = []
    for line_no, spec, r in check_world(world.judge_url, world.proxies_file):
        t = truth[line_no]
        if t.behaviour in expected and r.outcome not in expected[t.behaviour]:
            wrong.append(f"line {line_no} {spec.redacted()} {t.behaviour}: {r.outcome} {r.error}")
    assert not wrong, "\n".join(wrong)
