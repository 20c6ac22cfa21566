"""The rotating gateway against one member directly and against squid as a load balancer
over the same members (prints a table; results in bench/RESULTS.md).

    python bench/gateway.py [--members 8] [--concurrency 1,64,512] [--seconds 5]
                            [--members-kind sim|squid] [--pool-off]

World: `--members` elite HTTP proxies of the sim (no added latency) as the members, nginx
(sim/origin.py) as the origin, all on loopback. The sim's proxies close the connection after
every forwarded request; `--members-kind squid` uses real Debian squid processes instead
(one per member, no cache), which keep their connections alive as real members do, so a
balancer that reuses its member connections (squid does; the gateway's upstream pool) gains
from it. `--pool-off` adds the gateway with its upstream pool off (`--upstream-idle 0`) to
the same run. Three ways to the origin:

- **direct**: every request through the first member;
- **gateway xN**: `python -m engine.run serve-proxy --strategy round_robin --processes N` (a
  real subprocess, uvloop) over the members stored in a temporary DuckDB file, for each N
  of `--processes` (default 1,2);
- **squid**: Debian's squid with the members as `cache_peer … parent … round-robin`,
  `never_direct allow all`, no cache.

Workload: a small asyncio client (uvloop, its own process) with `c` workers, each doing one
request per new connection (the sim's proxies close after each forwarded request, so every
path pays the same connection set-up): `plain` = `GET http://origin/page` through the proxy;
`connect` = `CONNECT origin`, then the GET through the tunnel. Requests/s over `--seconds`,
latency p50/p99 per request, and the proxy's own CPU time per request (user + system of its
process and workers, from /proc): on shared cores req/s moves with the neighbours' load, CPU
per request much less. Beside it, the rest of the chain per request: the load generator's
own CPU, and the members' (with `--members-kind squid`) and the origin's together — when
every core is busy, what a path makes them spend is taken from the proxy too.

`--repeat N` runs every cell N times (the paths' order rotated) and reports medians with the
req/s spread; `--before REF` adds the gateway of a git ref (exported with `git archive`) to
the same run, for a before/after under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SQUID = shutil.which("squid") or "/usr/sbin/squid"


# -- load generator (runs in a child process: python bench/gateway.py --load …) ---------------


async def one(proxy: tuple[str, int], origin: tuple[str, int], mode: str) -> None:
    r, w = await asyncio.open_connection(*proxy)
    try:
        host = f"{origin[0]}:{origin[1]}"
        if mode == "connect":
            w.write(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            if b" 200" not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(head[:60])
            w.write(f"GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        else:
            w.write(
                f"GET http://{host}/page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
        head = await r.readuntil(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head[:60])
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        if length is not None:
            await r.readexactly(length)
        else:
            await r.read()
    finally:
        w.transport.abort()


async def load(
    proxy: tuple[str, int], origin: tuple[str, int], mode: str, c: int, seconds: float
) -> dict:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await asyncio.wait_for(one(proxy, origin, mode), 30)
                lat.append((time.perf_counter() - t) * 1000)
            except Exception:
                errors += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(c)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None  # noqa: E731
    return {
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "ok": len(lat),
        "errors": errors,
        # the load generator's own CPU: a path that costs the client more wakes or reads
        # per request takes the shared cores from everyone else in the chain
        "client_cpu_ms_per_req": round(cpu * 1000 / len(lat), 3) if lat else None,
    }


def run_load(
    proxy: tuple[str, int], origin: tuple[str, int], mode: str, c: int, seconds: float
) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--load", json.dumps([list(proxy), list(origin), mode, c, seconds])],
        capture_output=True, text=True, timeout=seconds * 4 + 60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


async def keep_alive(port: int, url: str, n: int) -> int:
    """n GETs over one kept-alive connection through the gateway; how many got a 200."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for _ in range(n):
            w.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await r.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        w.close()
    return ok


def endurance(port: int, pid: int, url: str, total: int, step: int = 50_000) -> None:
    """`total` requests in steps, the gateway's RSS and open descriptors after each."""
    import uvloop

    def rss_kb() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    done, t0 = 0, time.perf_counter()
    print("| requests | RSS MB | open fds | req/s so far |", file=sys.stderr)
    while done < total:
        n = min(step, total - done)

        async def batch(n: int = n) -> int:
            return sum(await asyncio.gather(*(keep_alive(port, url, n // 16) for _ in range(16))))

        ok = uvloop.run(batch())
        done += n
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rate = done / (time.perf_counter() - t0)
        print(f"| {done} | {rss_kb() / 1024:.1f} | {fds} | {rate:.0f} |", file=sys.stderr,
              flush=True)  # fmt: skip
        assert ok == n - n % 16, f"{n - ok} requests failed"


# -- the three paths --------------------------------------------------------------------------


def start_gateway(
    db_url: str, env: dict[str, str], processes: int, root: Path = ROOT, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [sys.executable, "-m", "engine.run", "serve-proxy", "--db", db_url, "--port", "0",
         "--max-connections", "4096", "--retries", "2", "--processes", str(processes), *extra],
        cwd=root, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert p.stderr is not None
    line = p.stderr.readline()
    port = int(line.split("gateway on 127.0.0.1:")[1].split(" ")[0])
    return p, port


def export_tree(ref: str, into: Path) -> Path:
    """The repository at `ref` as plain files (a gateway "before" a change, run side by side
    with the working tree's in the same run)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its live descendants (the workers of
    `--processes N`): what the proxy under test spent, whatever else shares the cores."""
    if pid is None:
        return 0.0
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_squid(
    root: Path, members: list[tuple[str, int]], standby: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """squid as a round-robin balancer over `members` (with `standby` connections opened
    ahead to each: squid's `cache_peer … standby=N`), or (none) as a plain forward proxy that
    is itself a member (`--members-kind squid`)."""
    from sim.nginx import free_port

    port = free_port()
    peers = "\n".join(
        f"cache_peer {h} parent {p} 0 no-query no-digest round-robin name=m{i}"
        + (f" standby={standby}" if standby else "")
        for i, (h, p) in enumerate(members)
    )
    if members:
        peers += "\nnever_direct allow all"
    (root / "squid.conf").write_text(f"""
http_port 127.0.0.1:{port}
{peers}
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_log {root}/cache.log
pid_filename {root}/squid.pid
coredump_dir {root}
max_filedescriptors 65536
forwarded_for delete
via off
shutdown_lifetime 1 seconds
""")
    p = subprocess.Popen(
        [SQUID, "-N", "-f", str(root / "squid.conf")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError(f"squid did not start: {(root / 'cache.log').read_text()[-500:]}")


def stop(p: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--concurrency", default="1,64,512")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--processes", default="1,2", help="gateway process counts to compare")
    ap.add_argument("--endurance", type=int, metavar="N",
                    help="instead: N requests through one gateway process, RSS as it goes")  # fmt: skip
    ap.add_argument("--before", metavar="REF",
                    help="also run the gateway of this git ref (one process), same run")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every cell (paths interleaved); medians and spread")  # fmt: skip
    ap.add_argument("--members-kind", choices=["sim", "squid"], default="sim",
                    help="sim proxies (close after each request) or squid processes (keep-alive)")  # fmt: skip
    ap.add_argument("--pool-off", action="store_true",
                    help="also the gateway with its upstream pool off (--upstream-idle 0)")  # fmt: skip
    ap.add_argument("--standby-off", action="store_true",
                    help="also the gateway with no connections opened ahead (--standby 0)")  # fmt: skip
    ap.add_argument("--modes", default="plain,connect", help="plain, connect or both")
    ap.add_argument("--squid-standby", type=int, default=0, metavar="N",
                    help="also squid with N standby connections per member (cache_peer standby=N)")  # fmt: skip
    ap.add_argument("--load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        import uvloop

        proxy, origin, mode, c, seconds = json.loads(args.load)
        print(json.dumps(uvloop.run(load(tuple(proxy), tuple(origin), mode, c, seconds))))
        return 0

    from sim.origin import Origin
    from sim.world import SimWorld, WorldConfig
    from tests.gateway_support import SECRET_KEY, store_members

    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d, Origin(Path(d) / "origin") as origin:
        # only HTTP members (squid's cache_peer speaks HTTP to its parents): the first
        # --members plain HTTP proxies of a world of every protocol
        cfg = WorldConfig(n_proxies=8 * args.members, mix={"elite": 1.0}, seed=1, latency_ms=(0, 0))
        with SimWorld(cfg) as world, contextlib.ExitStack() as member_procs:
            http = [t for t in world.truth if t.protocol == "http" and not t.username]
            http = http[: args.members]
            chain: list[int] = []  # pids of the members (squid) and the origin, for their CPU
            if args.members_kind == "squid":
                http = []
                for i in range(args.members):
                    (Path(d) / f"member{i}").mkdir()
                    mp, mport = start_squid(Path(d) / f"member{i}", [])
                    member_procs.callback(stop, mp)
                    chain.append(mp.pid)
                    http.append(SimpleNamespace(protocol="http", host="127.0.0.1", port=mport,
                                                username=None, password=None,
                                                anonymity_expected="anonymous", latency_ms=1))  # fmt: skip
            members = [(t.host, t.port) for t in http]
            if origin.proc is not None:
                chain.append(origin.proc.pid)
            db_url = f"duckdb:///{d}/bench.duckdb"
            store_members(db_url, http)
            env = {**os.environ, "FETCHFLEET_SECRET_KEY": SECRET_KEY}
            if args.endurance:
                gw, port = start_gateway(db_url, env, 1)
                try:
                    endurance(port, gw.pid, origin.url("/page"), args.endurance)
                finally:
                    stop(gw)
                return 0
            gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

            def add(name: str, started: tuple[subprocess.Popen[bytes], int]) -> None:
                gateways[name] = started  # stopped however the bench ends from here
                member_procs.callback(stop, started[0])

            for n in (int(x) for x in args.processes.split(",")):
                add(f"gateway x{n}", start_gateway(db_url, env, n))
            if args.pool_off:
                add(
                    "gateway x1 pool off",
                    start_gateway(db_url, env, 1, extra=("--upstream-idle", "0")),
                )
            if args.standby_off:
                add(
                    "gateway x1 standby off",
                    start_gateway(db_url, env, 1, extra=("--standby", "0")),
                )
            if args.before:
                tree = export_tree(args.before, Path(d) / "before")
                add(f"before x1 ({args.before})", start_gateway(db_url, env, 1, tree))
            (Path(d) / "squid").mkdir()
            sq, sq_port = start_squid(Path(d) / "squid", members)
            member_procs.callback(stop, sq)
            origin_addr = ("127.0.0.1", origin.ports["main"])
            paths: list[tuple[str, tuple[str, int], int | None]] = [("direct", members[0], None)]
            paths += [(name, ("127.0.0.1", port), gw.pid) for name, (gw, port) in gateways.items()]
            paths.append(("squid", ("127.0.0.1", sq_port), sq.pid))
            if args.squid_standby:
                (Path(d) / "squid-standby").mkdir()
                sqs, sqs_port = start_squid(Path(d) / "squid-standby", members, args.squid_standby)
                member_procs.callback(stop, sqs)
                paths.append(
                    (f"squid standby={args.squid_standby}", ("127.0.0.1", sqs_port), sqs.pid)
                )
            for mode in args.modes.split(","):
                for c in levels:
                    for rep in range(args.repeat):
                        # rotate the order so no path always runs first (or last) in a cell
                        k = rep % len(paths)
                        for name, proxy, pid in paths[k:] + paths[:k]:
                            cpu0, chain0 = cpu_s(pid), sum(map(cpu_s, chain))
                            r = run_load(proxy, origin_addr, mode, c, args.seconds)
                            cpu = cpu_s(pid) - cpu0
                            rest = sum(map(cpu_s, chain)) - chain0
                            r["cpu_ms_per_req"] = (
                                round(cpu * 1000 / r["ok"], 3) if pid and r["ok"] else None
                            )
                            # the members' and the origin's CPU per request
                            r["rest_cpu_ms_per_req"] = (
                                round(rest * 1000 / r["ok"], 3) if chain and r["ok"] else None
                            )
                            rows.append({"mode": mode, "c": c, "path": name, "rep": rep, **r})
                            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report(rows, levels, [name for name, _, _ in paths], args)
    return 0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report(rows: list[dict], levels: list[int], names: list[str], args: argparse.Namespace) -> None:
    """Per cell and path: the median of the runs (req/s min–max in brackets), then the
    gateway/squid ratios, each run's ratio taken within the run before the median."""
    kind = "elite HTTP sim proxies" if args.members_kind == "sim" else "squid processes"
    print(f"members: {args.members} {kind}; origin: nginx; "
          f"{args.seconds:g} s per cell; {args.repeat} run(s) per cell, medians\n")  # fmt: skip
    print("| mode | clients | path | req/s (min–max) | p50 ms | p99 ms | CPU ms/req | "
          "client CPU ms/req | members+origin CPU ms/req | errors |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    cells: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["mode"], r["c"], r["path"]), []).append(r)
    modes = args.modes.split(",")
    for mode in modes:
        for c in levels:
            for name in names:
                rs = cells[(mode, c, name)]
                rps = [r["rps"] for r in rs]
                med = lambda k, rs=rs: (  # noqa: E731
                    None if any(r[k] is None for r in rs) else round(_median([r[k] for r in rs]), 3)
                )
                spread = f" ({min(rps):g}–{max(rps):g})" if len(rs) > 1 else ""
                print(f"| {mode} | {c} | {name} | {_median(rps):g}{spread} | {med('p50_ms')} | "
                      f"{med('p99_ms')} | {med('cpu_ms_per_req')} | {med('client_cpu_ms_per_req')} | "
                      f"{med('rest_cpu_ms_per_req')} | {sum(r['errors'] for r in rs)} |")  # fmt: skip
    print()
    squids = [n for n in names if n.startswith("squid")]
    for mode in modes:
        for c in levels:
            direct = cells[(mode, c, "direct")]
            for name, sq in itertools.product(names, squids):
                if name == "direct" or name.startswith("squid"):
                    continue
                g, squid = cells[(mode, c, name)], cells[(mode, c, sq)]
                ratios = [a["rps"] / b["rps"] for a, b in zip(g, squid, strict=True) if b["rps"]]
                cpu = [
                    b["cpu_ms_per_req"] / a["cpu_ms_per_req"]
                    for a, b in zip(g, squid, strict=True)
                    if a["cpu_ms_per_req"] and b["cpu_ms_per_req"]
                ]
                added = [
                    a["p50_ms"] - b["p50_ms"]
                    for a, b in zip(g, direct, strict=True)
                    if a["p50_ms"] is not None and b["p50_ms"] is not None
                ]
                fmt = lambda xs: (  # noqa: E731
                    f"{_median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if xs else "n/a"
                )
                print(f"- {mode}, {c} clients, {name}: req/s vs {sq} {fmt(ratios)}; "
                      f"CPU per request {sq}/gateway {fmt(cpu)}; "
                      f"added p50 over direct {fmt(added)} ms")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
