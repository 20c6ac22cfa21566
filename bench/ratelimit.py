"""Rate-limit utilisation: how close a backfill runs to its limit, and what the server refused.

    python bench/ratelimit.py [--skip nginx,sim10s,sim5m] [--nginx-ids 1000] [--sim-ids 20000]
                              [--sim5m-ids 2000] [--repeat 1] [--quiet-wait-s 60]
                              [--out bench/out/ratelimit.json]

Each run is a backfill as a user runs it — `python -m engine.run backfill --json` in a
subprocess (coordinator + a local pool of 2 processes + DuckDB in a temp dir, every body
stored) — against a server that enforces the same limit itself and says what it refused:

* **nginx 20/1s**: Debian's nginx, `limit_req` rate 20 r/s, burst 20, `limit_req_status 429`
  (a leaky bucket), serving one small JSON record (`sim.nginx.LimitedOrigin`); its access log
  gives every request's status and time;
* **sim 1500/10s** and **sim 3000/5m**: the sim's JSON API (`sim.api`, a sliding log: at most
  N in any half-open window, 429 beyond, counted), with no failing IDs here, so that retries
  do not stretch the end of the run: this measures the limiter.

Reported per run: the rate the server admitted from its first request to its last, as a
fraction of N/W (**utilisation**; target ≥ 0.97), the requests it refused (**429s**; target
0), the busiest window it counted (sim: exact), and the key's margin at the end (read from
the pool's rate-limit file). Before each run the bench waits (--quiet-wait-s) for the machine
to be idle: other people's jobs on 2 cores delay the workers' wake-ups, which the margin then
follows (that is the design: it costs throughput, never the limit). Every run has a hard
timeout; its process group is killed when exceeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backfill import loadavg, run_cli  # noqa: E402
from bench.validate import code_state, wait_for_quiet  # noqa: E402


@dataclass
class Row:
    server: str
    limit: str
    ids: int
    wall_s: float
    requests: int  # as the server counted them
    refused: int  # 429s
    admitted_per_s: float  # the server's admitted requests, first to last
    utilisation: float  # admitted_per_s / (N / W)
    busiest_window: int | None  # of N (sim: exact sliding window)
    client_per_s: float  # the run's report: requests over the span of their send times
    margin_end_ms: float  # the key's margin J at the end of the run
    waited_s: float
    load_before: float
    load_after: float


def backfill(template: str, ids: Path, limit: str, tmp: Path, timeout: float) -> dict[str, Any]:
    """Run the CLI; returns its summary, its report and the key's margin at the end."""
    from engine.ratelimit.shared import SharedLimiter

    db = tmp / f"run-{time.monotonic_ns()}.duckdb"
    out = run_cli(
        ["backfill", "--db", str(db), "--ids", str(ids), "--url-template", template,
         "--rate-limit", limit, "--workers", "2", "--concurrency", "20", "--batch-size", "50",
         "--json"],
        timeout,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"backfill exited {out.returncode}: {out.stderr[-2000:]}")
    summary = json.loads(out.stdout)
    report = json.loads(
        run_cli(["report", "--db", str(db), str(summary["run_id"]), "--json"], 60).stdout
    )
    limiter = SharedLimiter(db.with_name(db.name + ".ratelimit"))
    try:
        margin = limiter.margin_of(report["rate_key"])
    finally:
        limiter.close()
    return {"summary": summary, "report": report, "margin_s": margin}


def run_nginx(args: argparse.Namespace, tmp: Path) -> Row:
    from engine.ratelimit.base import Rate
    from sim.api import write_ids
    from sim.nginx import LimitedOrigin

    limit = "20/1s"
    rate = Rate.parse(limit)
    ids = write_ids(tmp / "nginx-ids.txt", args.nginx_ids)
    with LimitedOrigin(tmp / f"nginx-{time.monotonic_ns()}", rate_per_s=20, burst=20) as origin:
        waited = wait_for_quiet(args.quiet_wait_s)
        load_before, began = loadavg(), time.monotonic()
        done = backfill(origin.url_template, ids, limit, tmp, args.nginx_ids / 15 + 120)
        wall = time.monotonic() - began
        served = origin.requests()
    times = sorted(t for t, _ in served)
    per_s = (len(times) - 1) / (times[-1] - times[0])
    return Row(
        server="nginx limit_req (burst 20)",
        limit=limit,
        ids=args.nginx_ids,
        wall_s=round(wall, 1),
        requests=len(served),
        refused=sum(1 for _, status in served if status == 429),
        admitted_per_s=round(per_s, 3),
        utilisation=round(per_s / rate.per_second, 4),
        busiest_window=None,  # its log times are after its own pacing, not arrivals
        client_per_s=done["report"]["throughput"]["requests_per_s"],
        margin_end_ms=round(done["margin_s"] * 1000, 1),
        waited_s=round(waited, 1),
        load_before=load_before,
        load_after=loadavg(),
    )


def run_sim(args: argparse.Namespace, tmp: Path, limit: str, n: int) -> Row:
    from engine.ratelimit.base import Rate
    from sim.api import ApiConfig
    from sim.world import SimWorld, WorldConfig

    rate = Rate.parse(limit)
    api = ApiConfig(
        limit=rate.limit,
        window_s=rate.window_s,
        not_found_per_mille=0,
        server_error_per_mille=0,
        flaky_per_mille=0,
    )
    out_dir = tmp / f"sim-{time.monotonic_ns()}"
    with SimWorld(WorldConfig(n_proxies=0, api=api, ids=n, out_dir=out_dir)) as world:
        assert world.ids_file is not None
        waited = wait_for_quiet(args.quiet_wait_s)
        world.api_reset()
        load_before, began = loadavg(), time.monotonic()
        budget = n / (rate.per_second * 0.8) + 120
        done = backfill(world.api_template, world.ids_file, limit, tmp, budget)
        wall = time.monotonic() - began
        stats = world.api_stats()
    return Row(
        server="sim API (sliding log)",
        limit=limit,
        ids=n,
        wall_s=round(wall, 1),
        requests=stats["requests"],
        refused=stats["rate_limited"],
        admitted_per_s=stats["admitted_per_s"],
        utilisation=round(stats["admitted_per_s"] / rate.per_second, 4),
        busiest_window=stats["peak_window"],
        client_per_s=done["report"]["throughput"]["requests_per_s"],
        margin_end_ms=round(done["margin_s"] * 1000, 1),
        waited_s=round(waited, 1),
        load_before=load_before,
        load_after=loadavg(),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| server | limit | IDs | seconds | admitted /s (server) | **utilisation** | **429s** "
        "| busiest window (of N) | client req/s | margin at end | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        n = int(r.limit.split("/")[0])
        busiest = f"{r.busiest_window:,} ({r.busiest_window / n:.3f})" if r.busiest_window else "–"
        lines.append(
            f"| {r.server} | {r.limit} | {r.ids:,} | {r.wall_s:.1f} | {r.admitted_per_s:.3f} "
            f"| **{r.utilisation:.3f}** | **{r.refused}** | {busiest} | {r.client_per_s:.3f} "
            f"| {r.margin_end_ms:.0f} ms | {r.load_before:.1f}→{r.load_after:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", default="", help="runs to skip: nginx,sim10s,sim5m")
    ap.add_argument("--nginx-ids", type=int, default=1000, help="IDs at 20/1s (1000)")
    ap.add_argument("--sim-ids", type=int, default=20_000, help="IDs at 1500/10s (20000)")
    ap.add_argument("--sim5m-ids", type=int, default=2000, help="IDs at 3000/5m (2000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (1)")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0, help="wait for an idle machine")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "ratelimit.json"))
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ff-bench-ratelimit-") as tmpdir:
        tmp = Path(tmpdir)
        for _ in range(args.repeat):
            if "nginx" not in skip:
                rows.append(run_nginx(args, tmp))
                print(json.dumps(asdict(rows[-1])), file=sys.stderr)
            if "sim10s" not in skip:
                rows.append(run_sim(args, tmp, "1500/10s", args.sim_ids))
                print(json.dumps(asdict(rows[-1])), file=sys.stderr)
            if "sim5m" not in skip:
                rows.append(run_sim(args, tmp, "3000/5m", args.sim5m_ids))
                print(json.dumps(asdict(rows[-1])), file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = code_state()
    out.write_text(
        json.dumps({"started": started, "code": state, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"started {started}, commit {(state['head'] or '?')[:7]}"
          + (f" + changes in {len(state['dirty'])} files" if state["dirty"] else ""))  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
