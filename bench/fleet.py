"""Fleet benchmark (issue 13): 1 host x 2 remote workers against 3 hosts x 2, on one
PostgreSQL, through the CLI (prints a table).

    python bench/fleet.py [--proxies 32000] [--pages 20000] [--hosts 1,3] [--workers 2]
                          [--concurrency 300] [--skip validate|scrape] [--out bench/out/fleet.json]

The defaults are the issue's sizes as far as they fit (50,000 proxies do not, see below) and
finish in 4-6 minutes on 2 cores; `--proxies 2000 --pages 300` is a 1-minute check. Needs
root (network namespaces: tests/netns.py builds the hosts, each with its own sshd; workers
start through `fleet start` over ssh, the coordinator is `validate|scrape --workers 0`).

Workloads, the same for every host count:
* **validate**: N sim proxies (`mix="bench"`: 40% alive at 20-300 ms, 30% refused, 20% black
  hole, 10% flaky), checked with a --timeout per attempt; the judge and proxies bind on the
  lab's SIM_BLOCK (10.77.128.0/17), which every host routes to. That block holds 32,510
  proxies, so the issue's 50,000 do not fit: 32,000 is the largest run here.
* **scrape**: P static catalog pages (the sim shops' HTML, 20 products each, bench/scrape.py's
  ``Site``) served by nginx on the block's last address, all P as start URLs (no discovery
  chain), http only, every entity stored.

Each host count gets a fresh database (dropped after), so PostgreSQL's per-database counters
are this bench's alone: transactions per item are the `xact_commit + xact_rollback` delta of
`pg_stat_database` over the run (pg_stat_statements is not installed here; every transaction
is at least one round trip, most are one statement). Claims are the run's task attempts. CPU
comes from /proc, sampled every 0.5 s: the hosts' processes (`ip netns pids`: workers and
their ssh sessions), the PostgreSQL backends of the bench database, the coordinator (wait4),
the sim or nginx; "other" is the rest of the machine meanwhile (other people's jobs). Every
run's stored set is checked exactly (one check per proxy; every page done once, every entity
once). The namespaces share this machine's cores: extra hosts add processes, not CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scrape import Site, ff_spec  # noqa: E402
from bench.validate import Proc, _stat, code_state, run_sampled, wait_for_quiet  # noqa: E402

PG_SERVER = os.environ.get(
    "FETCHFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


# --------------------------------------------------------------------------- measuring


class CpuWatch(threading.Thread):
    """CPU seconds a changing set of processes used since start: each pid's first sample is
    its baseline (0 for a pid born after start), its last sample counts (also once gone)."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        super().__init__(daemon=True)
        self._pids = pids
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._done = threading.Event()
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        for pid in self._pids():
            st = _stat(pid)
            if st is None:
                continue
            self._base.setdefault(pid, st[2] if first else 0.0)
            self._last[pid] = st[2]

    def run(self) -> None:
        while not self._done.wait(0.5):
            self._sample()

    def stop(self) -> float:
        self._done.set()
        self.join()
        self._sample()
        return sum(self._last[p] - self._base[p] for p in self._last)


def netns_pids(namespaces: list[str], exclude: set[int]) -> list[int]:
    out = []
    for ns in namespaces:
        got = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        out += [int(p) for p in got.stdout.split() if int(p) not in exclude]
    return out


def backend_pids(dbname: str) -> list[int]:
    """PostgreSQL backends connected to ``dbname`` (their title: `postgres: [CLUSTER:] USER
    DB HOST(PORT) STATE`, Debian names the cluster)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").split()
            if title[:1] == [b"postgres:"] and dbname.encode() in title[2:4]:
                pids.append(int(name))
    return pids


def pg_xacts(url: str, dbname: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return int(conn.execute(sa.text(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                {"d": dbname}).scalar_one())  # fmt: skip
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(tag: str) -> Iterator[tuple[str, str]]:
    """(URL, name) of a new database on the bench's PostgreSQL server, dropped after."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"ffbench_fleet_{tag}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield make_url(PG_SERVER).set(database=name).render_as_string(False), name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------- one run


@dataclass
class Row:
    workload: str  # validate, scrape
    hosts: int
    workers: int  # in all
    items: int
    seconds: float = 0.0  # the CLI process, start to exit
    run_s: float = 0.0  # the run as it reports (created → finished)
    claims: int = 0
    xacts: int = 0  # PostgreSQL transactions of the bench database over the run
    cpu: dict[str, float] = field(default_factory=dict)  # seconds: hosts, pg, coordinator, …
    machine_busy_s: float = 0.0
    exact: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    @property
    def claims_per_s(self) -> float:
        return self.claims / self.seconds if self.seconds else 0.0

    def per_item_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.items if self.items else 0.0


def measured_run(
    row: Row,
    fleet: Any,
    cmd: list[str],
    lab: Any,
    hosts: int,
    dbname: str,
    side_cpu: Callable[[], float],
) -> dict[str, Any]:
    """Run one CLI command against the fleet; fill timing, transactions and CPU."""
    namespaces = [h.netns for h in lab.hosts[:hosts]]
    sshd = {h.sshd.pid for h in lab.hosts if h.sshd is not None}
    on_hosts = CpuWatch(lambda: netns_pids(namespaces, sshd))
    backends = CpuWatch(lambda: backend_pids(dbname))
    xacts0, side0 = pg_xacts(fleet.pg_url, dbname), side_cpu()
    on_hosts.start()
    backends.start()
    proc = Proc()
    try:
        run_sampled([sys.executable, "-m", "engine.run", *cmd], {**os.environ, **fleet.env},
                    3600, proc)  # fmt: skip
    finally:
        host_cpu, pg_cpu = on_hosts.stop(), backends.stop()
    time.sleep(1.5)  # backends report their transactions' counts at most once a second
    row.xacts = pg_xacts(fleet.pg_url, dbname) - xacts0
    row.seconds = proc.wall_s
    row.machine_busy_s = proc.machine_busy_s
    row.cpu = {"hosts": host_cpu, "pg": pg_cpu, "coordinator": proc.cpu_s,
               "sim": side_cpu() - side0}  # fmt: skip
    row.cpu["other"] = max(0.0, proc.machine_busy_s - sum(row.cpu.values()))
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row.note = f"exit {proc.code}: {proc.stderr.strip()[-300:]}"
        return {}
    row.run_s = float(summary.get("duration_s") or 0.0)
    if summary.get("status") != "completed":
        row.note = f"run {summary.get('status')}: {summary.get('error')}"
    (row.claims,) = fleet.sql(
        "SELECT coalesce(sum(attempts), 0) FROM tasks WHERE run_id = :r", r=summary["run_id"]
    )[0]
    row.claims = int(row.claims)
    return summary


def run_validate(
    fleet: Any, lab: Any, hosts: int, dbname: str, world: Any, args: argparse.Namespace
) -> Row:
    n = len(world.truth)
    row = Row("validate", hosts, hosts * args.workers, n)
    cmd = ["validate", "--proxies", str(world.proxies_file), "--judge", world.judge_url,
           "--timeout", str(args.timeout), "--batch-size", str(args.batch_size),
           "--workers", "0", "--json"]  # fmt: skip
    summary = measured_run(row, fleet, cmd, lab, hosts, dbname, world.cpu_seconds)
    if summary:
        ((total, distinct),) = fleet.sql(
            "SELECT count(*), count(DISTINCT proxy_id) FROM proxy_checks WHERE run_id = :r",
            r=summary["run_id"],
        )
        row.exact = total == distinct == n
        row.extra["alive"] = fleet.sql(
            "SELECT count(*) FROM proxy_checks WHERE run_id = :r AND alive", r=summary["run_id"]
        )[0][0]
    return row


def run_scrape(
    fleet: Any, lab: Any, hosts: int, dbname: str, site: Site, args: argparse.Namespace
) -> Row:
    row = Row("scrape", hosts, hosts * args.workers, args.pages)
    spec = ff_spec(site, args.pages, site.root)
    cmd = ["scrape", "--spec", str(spec), "--batch-size", str(args.batch_size),
           "--workers", "0", "--json"]  # fmt: skip
    summary = measured_run(row, fleet, cmd, lab, hosts, dbname, site.cpu_s)
    if summary:
        ((done, urls, distinct),) = fleet.sql(
            "SELECT count(*) FILTER (WHERE status = 'done'), count(*), count(DISTINCT url) "
            "FROM urls WHERE run_id = :r",
            r=summary["run_id"],
        )
        ((entities, ext),) = fleet.sql("SELECT count(*), count(DISTINCT external_id) FROM entities")
        want = args.pages * 20
        row.exact = done == urls == distinct == args.pages and entities == ext == want
        row.extra["stored"] = {"pages": done, "entities": entities}
    return row


# --------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    head = (
        "| workload | hosts x workers | items | items/s | claims/s | seconds | PG xacts/item "
        "| CPU ms/item: all (hosts / PG / coordinator / sim) | other CPU s | exact set |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        c = r.cpu
        mine = sum(v for k, v in c.items() if k != "other")
        parts = " / ".join(
            f"{r.per_item_ms(c.get(k, 0)):.2f}" for k in ("hosts", "pg", "coordinator", "sim")
        )
        lines.append(
            f"| {r.workload} | {r.hosts} x {r.workers // r.hosts} | {r.items:,} | {r.items_per_s:,.0f} "
            f"| {r.claims_per_s:.1f} | {r.seconds:.1f} | {r.xacts / r.items if r.items else 0:.2f} "
            f"| {r.per_item_ms(mine):.2f} ({parts}) | {c.get('other', 0):.0f} "
            f"| {'yes' if r.exact else 'NO'} |" + (f" **{r.note}**" if r.note else "")
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    """The most hosts against the fewest, per workload."""
    out = []
    for workload in ("validate", "scrape"):
        mine = sorted((r for r in rows if r.workload == workload), key=lambda r: r.hosts)
        if len(mine) < 2 or not mine[0].items_per_s:
            continue
        lo, hi = mine[0], mine[-1]

        def cpu(r: Row) -> float:
            return r.per_item_ms(sum(v for k, v in r.cpu.items() if k != "other"))

        out.append(
            f"- {workload}, {hi.hosts} hosts / {lo.hosts}: items/s x{hi.items_per_s / lo.items_per_s:.2f}, "
            f"claims/s x{hi.claims_per_s / lo.claims_per_s if lo.claims_per_s else 0:.2f}, "
            f"PG xacts/item x{(hi.xacts / hi.items) / (lo.xacts / lo.items) if lo.xacts else 0:.2f}, "
            f"CPU/item x{cpu(hi) / cpu(lo) if cpu(lo) else 0:.2f}"
        )
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--proxies",
        type=int,
        default=32_000,
        help="sim proxies to validate (32000, the most the block holds)",
    )
    ap.add_argument("--pages", type=int, default=20_000, help="catalog pages to scrape (20000)")
    ap.add_argument("--hosts", default="1,3", help="host counts to compare (1,3)")
    ap.add_argument("--workers", type=int, default=2, help="workers per host (2)")
    ap.add_argument("--concurrency", type=int, default=300, help="items in flight per worker (300)")
    ap.add_argument("--batch-size", type=int, default=50, help="items per task (50)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per proxy check (2)")
    ap.add_argument("--skip", default="", help="validate and/or scrape")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--quiet-wait-s", type=float, default=30, help="wait for an idle machine (30)")
    ap.add_argument("--out", default=str(REPO / "bench/out/fleet.json"))
    args = ap.parse_args(argv)

    from sim.world import SimWorld, WorldConfig
    from tests.fleet_lab import Fleet, build_lab
    from tests.netns import SIM_BLOCK

    counts = [int(h) for h in args.hosts.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    rows: list[Row] = []
    code_before, load = code_state(), os.getloadavg()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ff-bench-fleet-")))
        os.chmod(tmp, 0o711)  # nginx's worker runs as nobody when we are root
        lab = stack.enter_context(build_lab(tmp / "hosts", max(counts)))
        world = site = None
        if "validate" not in skip:
            world = stack.enter_context(SimWorld(WorldConfig(
                n_proxies=args.proxies, mix="bench", seed=args.seed, out_dir=tmp / "proxies",
                bind=SIM_BLOCK)))  # fmt: skip
        if "scrape" not in skip:
            www = tmp / "site"
            www.mkdir()
            last = str(ipaddress.ip_network(SIM_BLOCK).broadcast_address - 1)
            site = Site(www, args.pages, args.seed, host=last)
            site.generate()
            site.start()
            stack.callback(site.stop)
        for hosts in counts:
            with fresh_database(f"{hosts}h") as (url, dbname):
                fleet = Fleet(lab, url, hosts=hosts, concurrency=str(args.concurrency))
                try:
                    fleet.start(workers=args.workers)
                    for workload in ("validate", "scrape"):
                        if workload in skip:
                            continue
                        waited = wait_for_quiet(args.quiet_wait_s)
                        if workload == "validate":
                            row = run_validate(fleet, lab, hosts, dbname, world, args)
                        else:
                            row = run_scrape(fleet, lab, hosts, dbname, site, args)
                        row.extra["waited_for_quiet_s"] = round(waited, 1)
                        rows.append(row)
                        print(table([row]).splitlines()[-1], file=sys.stderr)
                finally:
                    fleet.close()
    code = code_state()
    print(table(rows))
    print()
    print("\n".join(ratios(rows)))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "cpus": os.cpu_count(),
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "code": {"before": code_before, "after": code},
        "table": table(rows),
        "ratios": ratios(rows),
        "runs": [
            asdict(r) | {"items_per_s": r.items_per_s, "claims_per_s": r.claims_per_s} for r in rows
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(
        f"\nwrote {out}; load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    return 1 if any(r.note or not r.exact for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
