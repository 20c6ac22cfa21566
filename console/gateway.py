"""The console's gateway: at most one per server, run on a thread of the server's process
(so it reads members through the console's own database handle — with DuckDB no other
process may open the file), started and stopped from the Gateway page, with a short history
of its counters for the live chart."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st

from console.resources import Console

HISTORY = 300  # samples kept for the chart (one per page refresh, ~2 s apart)


@dataclass(eq=False)
class GatewayHolder:
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: Any = None  # engine.gateway.thread.GatewayThread
    samples: deque[tuple[float, dict[str, tuple[int, int]]]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    error: str | None = None

    def start(self, c: Console, config: Any, options: Any) -> None:
        from dataclasses import replace

        from engine.gateway.thread import GatewayThread
        from storage.proxies import gateway_members

        def read(status: str) -> list[Any]:
            with c.db.connect() as conn:
                return gateway_members(conn, status, 100_000)

        options = replace(
            options,
            reader=read,
            secret_key=c.settings.secret_key,
            secret_key_file=str(c.settings.secret_key_file),
        )
        with self.lock:
            if self.running is not None:
                return
            self.samples.clear()
            self.running = GatewayThread(config, options).start()

    def stop(self) -> None:
        with self.lock:
            running, self.running = self.running, None
        if running is not None:
            running.stop()

    def sample(self) -> dict[str, Any] | None:
        """A snapshot, also recorded for the chart; None when stopped."""
        running = self.running
        if running is None:
            return None
        snap = running.snapshot()
        counts = {m["member"]: (m["requests"], m["failures"]) for m in snap["members"]}
        self.samples.append((time.time(), counts))
        return snap

    def rates(self) -> pd.DataFrame:
        """Requests/s and failures/s per member between consecutive samples."""
        rows = []
        pts = list(self.samples)
        for (t0, a), (t1, b) in itertools.pairwise(pts):
            dt = max(t1 - t0, 1e-6)
            for member, (req, fail) in b.items():
                r0, f0 = a.get(member, (0, 0))
                rows.append(
                    {
                        "time": pd.Timestamp(t1, unit="s"),
                        "member": member,
                        "requests/s": max(req - r0, 0) / dt,
                        "failures/s": max(fail - f0, 0) / dt,
                    }
                )
        return pd.DataFrame(rows, columns=["time", "member", "requests/s", "failures/s"])


@st.cache_resource(on_release=lambda h: h.stop())
def gateway_holder(url: str) -> GatewayHolder:
    return GatewayHolder()
