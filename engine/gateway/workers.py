"""`serve-proxy --processes N`: N gateway processes on one port (SO_REUSEPORT, the kernel
spreads new connections over them) under a supervisor that owns the metrics port, prints
the banner, forwards Ctrl-C / SIGTERM (each worker drains) and replaces a worker that dies.

What is per process, and what that changes:

- the pool state (breakers, EWMAs, per-site quality, in-flight counts): `least_connections`
  balances each process's own connections, so a member's load from the other processes is
  not seen (with the kernel spreading connections evenly the totals stay even); a dead
  member is found by each process on its own (failover hides it from clients);
- sticky sessions: a session's first member is chosen by rendezvous hashing of the session
  name over the candidates (`Gateway._acquire`), so every process picks the same member
  without sharing anything, and after a failure they all move to the same next one;
- metrics: each worker sends its snapshot every `SNAPSHOT_S`; the supervisor serves their
  sum (latency percentiles: the request-weighted mean of the workers' percentiles).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
import sys
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from engine.gateway.config import GatewayConfig
from engine.gateway.service import ServeOptions

log = logging.getLogger(__name__)
SNAPSHOT_S = 1.0
BREAKER_ORDER = {"open": 2, "half_open": 1, "closed": 0}
UPSTREAM_COUNTS = ("idle", "opened", "reused", "stale_retries")
STANDBY_COUNTS = ("idle", "opening", "opened", "used", "misses", "failed", "stale_retries")


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: fixes the port (0: the kernel picks one) for the
    workers, which each bind and listen on it; a bound socket that does not listen takes no
    connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def worker_main(config: GatewayConfig, options: ServeOptions, conn: Connection) -> None:
    """One worker process: a gateway on the shared port, snapshots to the supervisor."""
    try:
        import uvloop

        uvloop.run(_worker(config, options, conn))
    except ImportError:
        asyncio.run(_worker(config, options, conn))


async def _worker(config: GatewayConfig, options: ServeOptions, conn: Connection) -> None:
    from engine.gateway.service import GatewayService, tune_gc

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    service = GatewayService(config, options)
    try:
        n = await service.start()
    except OSError as e:
        conn.send({"error": str(e)})
        return
    tune_gc()
    conn.send({"ready": n, "port": service.gateway.port})
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SNAPSHOT_S)
        with contextlib.suppress(OSError):
            conn.send({"snapshot": service.snapshot()})
    await service.stop()
    with contextlib.suppress(OSError):
        conn.send({"snapshot": service.snapshot(), "stopped": True})


class Supervisor:
    def __init__(self, config: GatewayConfig, options: ServeOptions, processes: int) -> None:
        self.config = dataclasses.replace(config, reuse_port=True)
        self.options = dataclasses.replace(options, metrics_port=None)
        self.metrics_port = options.metrics_port
        self.metrics_host = options.metrics_host
        self.n = processes
        self.ctx = multiprocessing.get_context("spawn")  # no event loop state in the children
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Connection] = {}
        self.snaps: dict[int, dict[str, Any]] = {}
        self.ready: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.stopping = False

    def _spawn(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        parent, child = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(
            target=worker_main, args=(self.config, self.options, child), name=f"gateway-{i}"
        )
        p.start()
        child.close()
        self.procs[i], self.conns[i] = p, parent
        self.ready[i] = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_message, i)

    def _on_message(self, i: int) -> None:
        conn = self.conns[i]
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self._ended(i)
            return
        fut = self.ready[i]
        if ("error" in msg or "ready" in msg) and not fut.done():
            fut.set_result(msg)
        if "snapshot" in msg:
            self.snaps[i] = msg["snapshot"]

    def _ended(self, i: int) -> None:
        p = self.procs[i]
        p.join(5)
        fut = self.ready[i]
        if not fut.done():
            fut.set_result({"error": f"worker {i} exited with {p.exitcode}"})
            return
        if not self.stopping:
            log.warning("gateway worker %d exited (%s): starting another", i, p.exitcode)
            print(f"gateway worker {i} exited ({p.exitcode}); starting another", file=sys.stderr)
            self._spawn(i)

    def snapshot(self) -> dict[str, Any]:
        snap = merge_snapshots(list(self.snaps.values()))
        snap["processes"] = self.n
        return snap

    async def start(self) -> int:
        """Start the workers; the number of members (as the first worker read them)."""
        for i in range(self.n):
            self._spawn(i)
        msgs = [await self.ready[i] for i in range(self.n)]
        bad = [m["error"] for m in msgs if "error" in m]
        if bad:
            await self.stop()
            raise OSError(bad[0])
        return int(msgs[0]["ready"])

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM to every worker (each drains), then wait; the worst exit code."""
        self.stopping = True
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        loop = asyncio.get_running_loop()
        for i, p in self.procs.items():
            await loop.run_in_executor(None, p.join, timeout)
            if p.is_alive():
                p.kill()
                p.join(5)
            with contextlib.suppress(Exception):
                loop.remove_reader(self.conns[i].fileno())
        return max((p.exitcode or 0) for p in self.procs.values())


def merge_snapshots(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' snapshots as one: counters summed per key, breakers at their worst."""
    if not snaps:
        return {"members": [], "decisions": [], "requests": [], "client_errors": {},
                "cache": None, "connections": {"open": 0, "total": 0, "refused": 0},
                "uptime_s": 0.0, "strategy": None, "members_total": 0, "sessions": 0}  # fmt: skip
    members: dict[str, dict[str, Any]] = {}
    weights: dict[str, list[tuple[int, dict[str, float | None]]]] = {}
    for s in snaps:
        for row in s["members"]:
            key = row["member"]
            m = members.get(key)
            weights.setdefault(key, []).append((row["requests"], row["latency_ms"]))
            if m is None:
                members[key] = dict(row)
                continue
            for f in ("requests", "failures", "blocked", "bytes_up", "bytes_down"):
                m[f] += row[f]
            m["in_flight"] = (m["in_flight"] or 0) + (row["in_flight"] or 0)
            if BREAKER_ORDER.get(row["breaker"] or "", 0) > BREAKER_ORDER.get(
                m["breaker"] or "", 0
            ):
                m["breaker"] = row["breaker"]
            m["healthy"] = m["breaker"] == "closed"
    for key, m in members.items():
        m["latency_ms"] = _weighted(weights[key])

    def counted(field: str, a: str, b: str) -> list[dict[str, Any]]:
        total: Counter[tuple[str, str]] = Counter()
        for s in snaps:
            for row in s[field]:
                total[(row[a], row[b])] += row["count"]
        return [{a: x, b: y, "count": n} for (x, y), n in sorted(total.items())]

    errors: Counter[str] = Counter()
    conns: Counter[str] = Counter()
    cache: Counter[str] | None = None
    budget: Counter[str] = Counter()  # per-process budgets summed (peak: the sum of peaks)
    for s in snaps:
        budget.update(s.get("buffer_budget") or {})
        errors.update(s["client_errors"])
        conns.update(s["connections"])
        if s.get("cache") is not None:
            cache = (cache or Counter()) + Counter(s["cache"])
    first = snaps[0]
    return {
        "uptime_s": max(s["uptime_s"] for s in snaps),
        "members": [members[k] for k in sorted(members)],
        "decisions": counted("decisions", "strategy", "outcome"),
        "requests": counted("requests", "kind", "result"),
        "client_errors": dict(sorted(errors.items())),
        "cache": None if cache is None else dict(cache),
        "connections": {k: conns[k] for k in ("open", "total", "refused")},
        "buffer_budget": {k: budget[k] for k in ("capacity", "used", "peak", "fallbacks")},
        "upstream_pool": _pool_sum(snaps, "upstream_pool", UPSTREAM_COUNTS),
        "standby": _pool_sum(snaps, "standby", STANDBY_COUNTS),
        "strategy": first.get("strategy"),
        "members_total": max(s.get("members_total", 0) for s in snaps),
        "sessions": sum(s.get("sessions", 0) for s in snaps),
        "members_source_error": next(
            (s["members_source_error"] for s in snaps if s.get("members_source_error")), None
        ),
    }


def _pool_sum(snaps: list[dict[str, Any]], field: str, counts: tuple[str, ...]) -> dict[str, Any]:
    """A connection pool's counters summed over the processes (their limits are each's)."""
    total: Counter[str] = Counter()
    discarded: Counter[str] = Counter()
    for s in snaps:
        pool = s.get(field) or {}
        total.update({k: pool.get(k, 0) for k in counts})
        discarded.update(pool.get("discarded") or {})
    return {
        **{k: total[k] for k in counts},
        "discarded": dict(sorted(discarded.items())),
        "limits": (snaps[0].get(field) or {}).get("limits"),
    }


def _weighted(rows: list[tuple[int, dict[str, float | None]]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in ("p50", "p90", "p99"):
        pairs = [(n, lat[q]) for n, lat in rows if lat.get(q) is not None]
        total = sum(n for n, _ in pairs)
        out[q] = round(sum(n * v for n, v in pairs) / total, 3) if total else None  # type: ignore[operator]
    return out
