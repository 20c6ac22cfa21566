"""The gateway's metrics port: `/metrics` (Prometheus text) and `/metrics.json` (the same
numbers for the console and scripts), from one snapshot of the gateway's counters.

Served from the gateway's own event loop (a few lines of HTTP, no thread): a snapshot is
taken between requests, so the numbers of one scrape are consistent with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

P = "fetchfleet_gateway_"
BREAKER_STATES = ("closed", "open", "half_open")


class GatewayCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        members = s["members"]

        def per_member(name: str, doc: str, field: str) -> CounterMetricFamily:
            m = CounterMetricFamily(P + name, doc, labels=["member"])
            for row in members:
                m.add_metric([row["member"]], row[field])
            return m

        yield per_member("member_requests", "Attempts sent through each member.", "requests")
        yield per_member("member_failures", "Attempts through each member that failed.", "failures")
        yield per_member(
            "member_blocked", "Answers through each member judged a block page.", "blocked"
        )
        b = CounterMetricFamily(
            P + "member_bytes", "Bytes relayed per member.", labels=["member", "direction"]
        )
        for row in members:
            b.add_metric([row["member"], "up"], row["bytes_up"])
            b.add_metric([row["member"], "down"], row["bytes_down"])
        yield b
        lat = GaugeMetricFamily(
            P + "member_latency_ms",
            "Latency of the recent successful attempts per member (ms), by quantile.",
            labels=["member", "quantile"],
        )
        for row in members:
            for q, v in row["latency_ms"].items():
                if v is not None:
                    lat.add_metric(
                        [row["member"], {"p50": "0.5", "p90": "0.9", "p99": "0.99"}[q]], v
                    )
        yield lat
        br = GaugeMetricFamily(
            P + "member_breaker", "1 for each member's breaker state.", labels=["member", "state"]
        )
        for row in members:
            for state in BREAKER_STATES:
                br.add_metric([row["member"], state], 1.0 if row["breaker"] == state else 0.0)
        yield br
        g = GaugeMetricFamily(P + "members", "Members in the pool.")
        g.add_metric([], s["members_total"])
        yield g
        d = CounterMetricFamily(
            P + "decisions",
            "Member selections, by strategy and outcome.",
            labels=["strategy", "outcome"],
        )
        for row in s["decisions"]:
            d.add_metric([row["strategy"], row["outcome"]], row["count"])
        yield d
        r = CounterMetricFamily(
            P + "requests", "Client requests by kind and result.", labels=["kind", "result"]
        )
        for row in s["requests"]:
            r.add_metric([row["kind"], row["result"]], row["count"])
        yield r
        e = CounterMetricFamily(
            P + "client_errors",
            "Requests refused as malformed, unauthenticated, too slow or too big.",
            labels=["status"],
        )
        for status, n in s["client_errors"].items():
            e.add_metric([status], n)
        yield e
        cache = s["cache"]
        if cache is not None:
            for key in ("hits", "misses", "stores", "origin_fetches", "bytes_saved", "bypassed"):
                c = CounterMetricFamily(
                    P + f"cache_{key}", f"Response cache: {key.replace('_', ' ')}."
                )
                c.add_metric([], cache[key])
                yield c
            size = GaugeMetricFamily(P + "cache_entries", "Responses held in the cache.")
            size.add_metric([], cache["size"])
            yield size
        conns = s["connections"]
        o = GaugeMetricFamily(P + "connections_open", "Client connections open.")
        o.add_metric([], conns["open"])
        yield o
        t = CounterMetricFamily(P + "connections", "Client connections accepted.")
        t.add_metric([], conns["total"])
        yield t
        rf = CounterMetricFamily(
            P + "connections_refused",
            "Client connections closed at once: over the limit or draining.",
        )
        rf.add_metric([], conns["refused"])
        yield rf
        budget = s.get("buffer_budget")
        if budget is not None:
            for key, text in (
                ("capacity", "Bytes of answers the gateway may buffer at once (--buffer-budget)."),
                ("used", "Bytes of answers buffered now, being judged."),
                ("peak", "Most bytes of answers buffered at once since the start."),
            ):
                g = GaugeMetricFamily(P + f"buffer_budget_{key}_bytes", text)
                g.add_metric([], budget[key])
                yield g
            fb = CounterMetricFamily(
                P + "buffer_budget_fallbacks",
                "Answers streamed unjudged because the buffer budget was spent.",
            )
            fb.add_metric([], budget["fallbacks"])
            yield fb
        yield from _pools(s)


# a member-connection pool's metrics: (snapshot field, name prefix, its counters, what a
# discarded one is, what the idle gauge counts)
POOLS = (
    (
        "upstream_pool",
        "upstream",
        (
            ("opened", "Connections opened to http members for plain-HTTP requests."),
            ("reused", "Plain-HTTP requests sent on a kept-alive member connection."),
            ("stale_retries", "Requests resent on a fresh connection: the kept one was closed."),
        ),
        "Member connections closed instead of kept, by reason.",
        "Idle member connections kept now.",
    ),
    (
        "standby",
        "standby",
        (
            ("opened", "Member connections opened ahead of the requests that use them."),
            ("used", "Attempts that started on a connection opened ahead."),
            ("misses", "Attempts that found none opened ahead and made their own."),
            ("failed", "Connections opened ahead that failed or did not connect in time."),
            ("stale_retries", "Attempts set up again on a fresh connection: the one ahead closed."),
        ),
        "Connections opened ahead and closed unused, by reason.",
        "Connections opened ahead, waiting now.",
    ),
)


def _pools(s: dict[str, Any]) -> Iterator[Metric]:
    """The kept-alive connections to `http` members (engine/gateway/keepalive.py) and the
    ones opened ahead (engine/gateway/standby.py)."""
    for field, prefix, counters, discarded, idle in POOLS:
        pool = s.get(field)
        if pool is None:
            continue
        for key, text in counters:
            c = CounterMetricFamily(P + f"{prefix}_{key}", text)
            c.add_metric([], pool[key])
            yield c
        d = CounterMetricFamily(P + f"{prefix}_discarded", discarded, labels=["reason"])
        for reason, n in pool["discarded"].items():
            d.add_metric([reason], n)
        yield d
        g = GaugeMetricFamily(P + f"{prefix}_idle", idle)
        g.add_metric([], pool["idle"])
        yield g


class MetricsServer:
    """`/metrics` and `/metrics.json` on their own port, on the gateway's loop."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        self.snapshot = snapshot
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(snapshot))
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=8192)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
            if path == b"/metrics":
                body, ctype = (
                    generate_latest(self.registry),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                status = "200 OK"
            elif path == b"/metrics.json":
                body, ctype = json.dumps(self.snapshot()).encode(), "application/json"
                status = "200 OK"
            else:
                body, ctype, status = (
                    b"try /metrics or /metrics.json\n",
                    "text/plain",
                    "404 Not Found",
                )
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), 10)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            OSError,
        ):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
