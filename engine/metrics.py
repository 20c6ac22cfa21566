"""Engine metrics in the Prometheus text format, computed in SQL at each scrape.

A custom collector (``prometheus_client``'s ``Collector``) rather than counters updated in
every process: workers live on several machines and come and go, while the database already
knows every run, worker, task and proxy; whoever serves ``/metrics`` (``engine.run metrics``
or the console's server with ``FETCHFLEET_METRICS_PORT``) reads it. States are gauges; rates
are gauges over a short window (``WINDOW_S``), since the logs, not this process, hold the
totals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from storage import metrics as m
from storage.clock import utcnow
from storage.db import Database

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # items/s, limiter use
RECENT_S = 300.0  # errors and blocked attempts "recently"


class FleetCollector(Collector):
    """``now`` is injectable for tests; the database's rows are naive UTC."""

    def __init__(self, db: Database, now: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.now = now

    def collect(self) -> Iterator[Metric]:
        from engine.jobs import item_logs
        from engine.ratelimit.base import Rate

        now = self.now()
        with self.db.connect() as conn:
            runs = m.runs_by_kind_status(conn)
            items = m.items_in_window(conn, item_logs(), now - timedelta(seconds=WINDOW_S))
            errs = m.errors_by_type(conn, now - timedelta(seconds=RECENT_S))
            blocked = m.blocked_by_reason(conn, now - timedelta(seconds=RECENT_S))
            workers = m.workers_by_host_status(conn)
            ages = m.heartbeat_ages(conn, now)
            depth = m.queue_depth(conn)
            pool = m.proxies_by_status(conn)
            limiter = m.merge_keys(m.limiter_requests(conn, now, WINDOW_S))

        yield _gauge("fetchfleet_runs", "Runs by kind and status.", ["kind", "status"], runs)
        yield _gauge(
            "fetchfleet_items_per_second",
            f"Items stored per second over the last {WINDOW_S:.0f} s, by kind.",
            ["kind"],
            {(k,): n / WINDOW_S for k, n in items.items()},
        )
        yield _gauge(
            "fetchfleet_errors_recent",
            f"Errors logged in the last {RECENT_S:.0f} s, by type.",
            ["type"],
            {(k,): v for k, v in errs.items()},
        )
        yield _gauge(
            "fetchfleet_blocked_recent",
            f"Fetch attempts that met a block page in the last {RECENT_S:.0f} s.",
            ["reason", "method"],
            blocked,
        )
        yield _gauge(
            "fetchfleet_workers", "Live workers by host and status.", ["host", "status"], workers
        )
        yield _gauge(
            "fetchfleet_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat.",
            ["host", "worker"],
            {(h, w): age for h, w, age in ages},
        )
        yield _gauge(
            "fetchfleet_queue_tasks",
            "Tasks of unfinished runs, by kind and task status (queued = the queue's depth).",
            ["kind", "status"],
            depth,
        )
        yield _gauge(
            "fetchfleet_proxies",
            "Stored proxies by status.",
            ["status"],
            {(k,): v for k, v in pool.items()},
        )
        use = {}
        for key, (rate_json, sent) in limiter.items():
            try:
                allowed = Rate.from_json(rate_json).per_second * WINDOW_S
            except (TypeError, ValueError, KeyError):
                continue
            use[(key,)] = sent / allowed if allowed else 0.0
        yield _gauge(
            "fetchfleet_ratelimit_utilisation",
            f"Requests over the last {WINDOW_S:.0f} s as a fraction of what the key's limit "
            "allows (running backfill runs).",
            ["key"],
            use,
        )


def _gauge(name: str, doc: str, labels: list[str], values: dict[Any, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items(), key=lambda kv: tuple(map(str, kv[0]))):
        g.add_metric([str(k) for k in key], float(value))
    return g


def registry_for(db: Database, now: Callable[[], datetime] = utcnow) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(db, now))
    return registry


def serve(db: Database, port: int, host: str = "127.0.0.1") -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` in a thread; returns (server, thread, the port bound)."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry_for(db))
    return server, thread, int(server.server_address[1])
