"""Micro-benchmark of ProxyChecker: checks/s and checker CPU per check (not a timed test).

    .venv/bin/python -m tests.test_proxy_check_bench                    # 2,000 http, fakes
    .venv/bin/python -m tests.test_proxy_check_bench --target sim       # 2,000 alive, sim mix
    .venv/bin/python -m tests.test_proxy_check_bench --protocol socks5 --n 2000 -c 500
    .venv/bin/python -m tests.test_proxy_check_bench --target sim --canary  # + tampering check

The servers run in another process (the loopback fakes of tests/test_proxy_fakes.py, or a
sim world), so `time.process_time()` of this process is the checker's own CPU. The one test
below runs a tiny version so the script cannot rot; it asserts correctness, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from fetchers.proxy_check import ProxyChecker
from fetchers.proxy_parse import ProxySpec, iter_unique_proxies

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- servers


async def _serve_fakes(n: int, protocol: str) -> None:
    from tests.test_proxy_fakes import LoopbackBed

    bed = LoopbackBed()
    await bed.start_judge()
    lines = []
    for _ in range(n):
        if protocol == "socks5":
            lines.append(f"socks5://{await bed.socks5()}")
        elif protocol == "https":
            lines.append(f"https://{await bed.http_proxy(forward=False)}")
        elif protocol == "auto":
            lines.append(await bed.http_proxy())
        else:
            lines.append(f"http://{await bed.http_proxy()}")
    print(json.dumps({"judge_url": bed.judge_url, "proxies": lines}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent goes away
    await bed.close()


class FakeServers:
    """The loopback fakes in a child process; `cpu_seconds()` reads its /proc stat."""

    def __init__(self, n: int, protocol: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_proxy_check_bench", "--serve", str(n), protocol],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.judge_url: str = info["judge_url"]
        self.specs = list(iter_unique_proxies(info["proxies"]))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SimServers:
    def __init__(self, n: int, latency_ms: tuple[int, int]) -> None:
        from sim.world import SimWorld, WorldConfig

        self.world = SimWorld(WorldConfig(n_proxies=n, mix={"elite": 1.0}, latency_ms=latency_ms))
        self.world.start()
        self.judge_url = self.world.judge_url
        self.specs = list(iter_unique_proxies(self.world.proxies_file))

    def cpu_seconds(self) -> float:
        return float(self.world.cpu_seconds())

    def close(self) -> None:
        self.world.stop()


# --------------------------------------------------------------------------- the run


async def run_checks(
    judge_url: str,
    specs: list[ProxySpec],
    concurrency: int,
    timeout: float,
    canary: bool = False,
) -> tuple[Counter[str], Counter[str], float, float, list[float]]:
    integrity = None
    if canary:  # the sim's judge serves the canary (fetchers/integrity.py)
        from fetchers.integrity import IntegrityCheck, canary_for_judge

        integrity = IntegrityCheck(canary_for_judge(judge_url) or "", timeout)
    async with ProxyChecker(judge_url, timeout=timeout, integrity=integrity) as checker:
        await checker.check(specs[0])  # warm up (geo data, code paths)
        cpu0, t0 = time.process_time(), time.perf_counter()
        outcomes: Counter[str] = Counter()
        protocols: Counter[str] = Counter()
        latencies = []
        async for _, r in checker.check_many(specs, concurrency=concurrency):
            outcomes[str(r.outcome)] += 1
            protocols[str(r.protocol)] += 1
            if r.latency_ms is not None:
                latencies.append(r.latency_ms)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return outcomes, protocols, wall, cpu, latencies


def bench(
    n: int = 2000,
    concurrency: int = 500,
    target: str = "fakes",
    protocol: str = "http",
    timeout: float = 5.0,
    latency_ms: tuple[int, int] = (20, 300),
    canary: bool = False,
) -> dict[str, Any]:
    if canary and target != "sim":
        raise ValueError("--canary needs --target sim (the fakes' judge serves no canary)")
    servers: FakeServers | SimServers
    servers = SimServers(n, latency_ms) if target == "sim" else FakeServers(n, protocol)
    try:
        server_cpu0 = servers.cpu_seconds()
        outcomes, protocols, wall, cpu, lat = uvloop.run(
            run_checks(servers.judge_url, servers.specs, concurrency, timeout, canary)
        )
        server_cpu = servers.cpu_seconds() - server_cpu0
    finally:
        servers.close()
    lat.sort()
    checks = sum(outcomes.values())
    return {
        "target": target,
        "protocol": protocol if target == "fakes" else "sim mix",
        "canary": canary,
        "checks": checks,
        "concurrency": concurrency,
        "outcomes": dict(outcomes),
        "protocols": dict(protocols),
        "wall_s": round(wall, 3),
        "checks_per_s": round(checks / wall, 1),
        "checker_cpu_s": round(cpu, 3),
        "checker_cpu_us_per_check": round(cpu / checks * 1e6, 1),
        "servers_cpu_us_per_check": round(server_cpu / checks * 1e6, 1),
        "latency_ms_p50": lat[len(lat) // 2] if lat else None,
        "latency_ms_p95": lat[int(len(lat) * 0.95)] if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="proxies to check (all alive)")
    ap.add_argument("-c", "--concurrency", type=int, default=500)
    ap.add_argument("--target", choices=["fakes", "sim"], default="fakes")
    ap.add_argument("--protocol", choices=["http", "https", "socks5", "auto"], default="http")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--latency", default="20,300", help="sim: min,max added latency in ms")
    ap.add_argument("--canary", action="store_true", help="sim: add the tampering check")
    ap.add_argument("--serve", nargs=2, metavar=("N", "PROTOCOL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        uvloop.run(_serve_fakes(int(args.serve[0]), args.serve[1]))
        return 0
    lo, hi = (int(x) for x in args.latency.split(","))
    result = bench(
        args.n, args.concurrency, args.target, args.protocol, args.timeout, (lo, hi), args.canary
    )
    print(json.dumps(result, indent=1))
    return 0


def test_bench_smoke() -> None:
    r = bench(n=100, concurrency=50, target="fakes", protocol="auto", timeout=3.0)
    assert r["outcomes"] == {"alive": 100}
    assert r["protocols"] == {"http": 100}


if __name__ == "__main__":
    sys.exit(main())
