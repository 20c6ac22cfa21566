"""Backfill benchmark: how close the shared limiter runs to the limit, and worker scaling.

    python bench/backfill.py [--ids 20000] [--limit 1500/10s] [--workers 2] [--concurrency 50]
                             [--scale 1,2,4,8] [--scale-ids 10000] [--slow-ids 3000]
                             [--out bench/out/backfill.json]

Everything runs as a user runs it: `python -m engine.run backfill --json` in a subprocess
(coordinator + local pool + DuckDB in a temp dir, storing included), then
`python -m engine.run report RUN_ID --json`, against the sim's JSON API on loopback.

1. **Saturation.** The API enforces the same limit server-side (a sliding window that answers
   429 and counts every request over it). The workers could go several times faster, so the
   limiter is what sets the pace. Reported: the rate the server admitted over the run as a
   fraction of the limit (target ≥ 0.97), the busiest window the server saw (must never pass
   1.0 of N), and the server's 429 count (target 0).
2. **Scaling, limit not binding.** The same job with a limit far above what the machine can
   do, for 1/2/4/8 worker processes: (a) the sim answering in 5–25 ms (CPU-bound on this
   machine), (b) answering in 150–250 ms with 10 IDs in flight per worker (latency-bound, as
   a remote API is).

Every run has a hard timeout; its process group is killed when it is exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Row:
    part: str
    workers: int
    concurrency: int
    ids: int
    limit: str
    wall_s: float
    status: str
    items_per_s: float  # report: items over the span of their requests
    items_per_min: float
    requests: int
    server_requests: int
    server_429: int
    server_peak_window: int
    server_admitted_per_s: float
    limit_per_s: float
    fraction_of_limit: float  # server-admitted rate over the whole run / limit
    peak_fraction: float  # busiest server window / N (exact, sliding)
    window_median: float  # admitted in each full window of W (1 s steps) / N: median
    window_min: float
    window_max: float
    full_windows: int
    report_utilisation: float
    failed: int
    load_before: float
    load_after: float


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(args[:3])}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def backfill(
    world: Any,
    part: str,
    ids_file: Path,
    n: int,
    limit: str,
    workers: int,
    concurrency: int,
    tmp: Path,
    timeout: float,
) -> Row:
    from engine.ratelimit.base import Rate

    db = tmp / f"{part}-{workers}w-{time.monotonic_ns()}.duckdb"
    world.api_reset()
    load_before = loadavg()
    started = time.monotonic()
    out = run_cli(
        [
            "backfill",
            "--db",
            str(db),
            "--ids",
            str(ids_file),
            "--url-template",
            world.api_template,
            "--rate-limit",
            limit,
            "--workers",
            str(workers),
            "--concurrency",
            str(concurrency),
            "--batch-size",
            "50",
            "--json",
        ],
        timeout,
    )
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"backfill exited {out.returncode}: {out.stderr[-2000:]}")
    summary = json.loads(out.stdout)
    stats = world.api_stats()
    windows = full_windows(world.api_timeline(), Rate.parse(limit).window_s, world.config.api.limit)
    report = json.loads(
        run_cli(["report", "--db", str(db), str(summary["run_id"]), "--json"], 60).stdout
    )
    rate = Rate.parse(limit)
    server_limit = world.config.api.limit
    peak_of = server_limit or rate.limit
    return Row(
        part=part,
        workers=workers,
        concurrency=concurrency,
        ids=n,
        limit=limit,
        wall_s=round(wall, 2),
        status=summary["status"],
        items_per_s=report["throughput"]["items_per_s"],
        items_per_min=report["throughput"]["items_per_min"],
        requests=report["throughput"]["requests"],
        server_requests=stats["requests"],
        server_429=stats["rate_limited"],
        server_peak_window=stats["peak_window"],
        server_admitted_per_s=stats["admitted_per_s"],
        limit_per_s=round(rate.per_second, 3),
        fraction_of_limit=round(stats["admitted_per_s"] / rate.per_second, 4),
        peak_fraction=round(stats["peak_window"] / peak_of, 4),
        window_median=windows[0],
        window_min=windows[1],
        window_max=windows[2],
        full_windows=windows[3],
        report_utilisation=report["limit"]["utilisation"],
        failed=summary["counts"]["failed"],
        load_before=load_before,
        load_after=loadavg(),
    )


def full_windows(per_second: list[int], window_s: float, limit: int | None) -> tuple:
    """(median, min, max, count) of admitted requests / N over every full window of W that
    starts on a whole second after the first request (the last, partial second left out)."""
    size = round(window_s)
    if not limit or size < 1 or abs(window_s - size) > 1e-9:
        return (0.0, 0.0, 0.0, 0)
    full = per_second[:-1]
    sums = [sum(full[i : i + size]) / limit for i in range(len(full) - size + 1)]
    if not sums:
        return (0.0, 0.0, 0.0, 0)
    ordered = sorted(sums)
    return (
        round(ordered[len(ordered) // 2], 4),
        round(ordered[0], 4),
        round(ordered[-1], 4),
        len(sums),
    )


def ids_subset(world: Any, n: int, tmp: Path) -> Path:
    path = tmp / f"ids-{n}.txt"
    with world.ids_file.open() as src, path.open("w") as dst:
        for i, line in enumerate(src):
            if i >= n:
                break
            dst.write(line)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=20_000, help="IDs of the saturation run (20000)")
    ap.add_argument("--limit", default="1500/10s", help="limit, client and server (1500/10s)")
    ap.add_argument("--workers", type=int, default=2, help="saturation run: processes (2)")
    ap.add_argument("--repeat", type=int, default=1, help="saturation runs (1)")
    ap.add_argument("--concurrency", type=int, default=50, help="IDs in flight per worker (50)")
    ap.add_argument("--scale", default="1,2,4,8", help="worker counts for scaling (1,2,4,8)")
    ap.add_argument("--scale-ids", type=int, default=10_000, help="IDs per scaling run (10000)")
    ap.add_argument("--slow-ids", type=int, default=3_000, help="IDs per latency-bound run (3000)")
    ap.add_argument("--skip", default="", help="parts to skip: saturation,fast,slow")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "backfill.json"))
    args = ap.parse_args(argv)

    from engine.ratelimit.base import Rate
    from sim.api import ApiConfig
    from sim.world import SimWorld, WorldConfig

    skip = set(filter(None, args.skip.split(",")))
    rows: list[Row] = []
    rate = Rate.parse(args.limit)
    unbound = "1000000/1s"
    scale = [int(w) for w in args.scale.split(",")]
    with tempfile.TemporaryDirectory(prefix="ff-bench-backfill-") as tmpdir:
        tmp = Path(tmpdir)
        n_ids = max(args.ids, args.scale_ids, args.slow_ids)
        if "saturation" not in skip:
            api = ApiConfig(limit=rate.limit, window_s=rate.window_s)
            with SimWorld(WorldConfig(n_proxies=0, api=api, ids=n_ids, out_dir=tmp / "w1")) as w:
                ids = ids_subset(w, args.ids, tmp)
                budget = args.ids / (rate.per_second * 0.9) + 120
                for _ in range(args.repeat):
                    row = backfill(
                        w, "saturation", ids, args.ids, args.limit, args.workers,
                        args.concurrency, tmp, budget,
                    )  # fmt: skip
                    rows.append(row)
                    print(json.dumps(asdict(row)), file=sys.stderr)
        if "fast" not in skip:
            api = ApiConfig()  # no server limit, 5–25 ms
            with SimWorld(WorldConfig(n_proxies=0, api=api, ids=n_ids, out_dir=tmp / "w2")) as w:
                ids = ids_subset(w, args.scale_ids, tmp)
                for workers in scale:
                    row = backfill(
                        w, "scaling, 5-25 ms", ids, args.scale_ids, unbound, workers,
                        args.concurrency, tmp, 600,
                    )  # fmt: skip
                    rows.append(row)
                    print(json.dumps(asdict(row)), file=sys.stderr)
        if "slow" not in skip:
            api = ApiConfig(latency_ms=(150.0, 250.0))
            with SimWorld(WorldConfig(n_proxies=0, api=api, ids=n_ids, out_dir=tmp / "w3")) as w:
                ids = ids_subset(w, args.slow_ids, tmp)
                for workers in scale:
                    row = backfill(
                        w, "scaling, 150-250 ms", ids, args.slow_ids, unbound, workers, 10,
                        tmp, 900,
                    )  # fmt: skip
                    rows.append(row)
                    print(json.dumps(asdict(row)), file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print_tables(rows, rate)
    return 0


def print_tables(rows: list[Row], rate: Any) -> None:
    sat = [r for r in rows if r.part == "saturation"]
    if sat:
        print(f"### Saturation: {sat[0].ids:,} IDs at {sat[0].limit} (server enforces the same)\n")
        w = sat[0].limit.split("/")[1]
        print(
            f"| workers × conc | seconds | whole run: admitted /s (of limit) | every full {w} "
            "window: median (min–max) of N | busiest window, exact (of N) | 429s at server "
            "| requests | failed IDs | load avg |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in sat:
            print(
                f"| {r.workers} × {r.concurrency} | {r.wall_s:.1f} "
                f"| {r.server_admitted_per_s:.2f} of {r.limit_per_s:.2f} "
                f"(**{r.fraction_of_limit:.3f}**) "
                f"| **{r.window_median:.3f}** ({r.window_min:.3f}–{r.window_max:.3f}, "
                f"{r.full_windows} windows) "
                f"| {r.server_peak_window:,} ({r.peak_fraction:.3f}) | **{r.server_429}** "
                f"| {r.server_requests:,} | {r.failed} | {r.load_before:.1f}→{r.load_after:.1f} |"
            )
        print(
            f"\nschedule maximum for {rate.describe()} with the default margin: "
            f"{rate.utilisation:.3f} of the limit (T = {rate.interval_s * 1000:.2f} ms, "
            f"margin {rate.jitter:.2f} s)\n"
        )
    for part in ("scaling, 5-25 ms", "scaling, 150-250 ms"):
        sc = [r for r in rows if r.part == part]
        if not sc:
            continue
        base = sc[0].items_per_s or 1
        print(f"### Scaling, limit not binding: {sc[0].ids:,} IDs, API answers in {part[9:]}\n")
        print("| workers × conc | items/s | items/min | × 1 worker | seconds (wall) | load avg |")
        print("|---|---:|---:|---:|---:|---|")
        for r in sc:
            print(
                f"| {r.workers} × {r.concurrency} | {r.items_per_s:,.0f} | {r.items_per_min:,.0f} "
                f"| {r.items_per_s / base:.2f} | {r.wall_s:.1f} "
                f"| {r.load_before:.1f}→{r.load_after:.1f} |"
            )
        print()


if __name__ == "__main__":
    sys.exit(main())
