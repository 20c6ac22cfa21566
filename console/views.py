"""Small view helpers the pages share: metric rows, Plotly charts, downloads, placeholders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from console import reads

CHART_HEIGHT = 260


def metrics(items: Sequence[tuple[str, Any]], help_texts: dict[str, str] | None = None) -> None:
    cols = st.columns(len(items))
    for col, (label, value) in zip(cols, items, strict=True):
        col.metric(label, value, help=(help_texts or {}).get(label))


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=title,
        height=CHART_HEIGHT,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis_title=x,
        yaxis_title=y,
        showlegend=len(fig.data) > 1,
    )
    return fig


def line(xs: Sequence[Any], ys: Sequence[Any], title: str, x: str, y: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(xs), y=list(ys), mode="lines", line={"width": 2}))
    return _layout(fig, title, x, y)


def bars(xs: Sequence[Any], ys: Sequence[Any], title: str, x: str, y: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(xs), y=list(ys)))
    return _layout(fig, title, x, y)


def stacked_bars(rows: Sequence[tuple[Any, str, int]], title: str, x: str, y: str) -> go.Figure:
    """(x, series, value) rows as one bar trace per series, stacked."""
    series: dict[str, tuple[list[Any], list[int]]] = {}
    for xv, name, value in rows:
        xs, ys = series.setdefault(str(name), ([], []))
        xs.append(xv)
        ys.append(value)
    fig = go.Figure([go.Bar(x=xs, y=ys, name=name) for name, (xs, ys) in series.items()])
    fig.update_layout(barmode="stack")
    return _layout(fig, title, x, y)


def proxy_history(events: Sequence[tuple[Any, str, bool, float | None]], title: str) -> go.Figure:
    """A proxy's kept checks and uses ((at, source, ok, latency ms)): latency over time per
    source, failures as crosses on the time axis (they have no latency)."""
    traces = []
    for source in ("check", "use"):
        good = [(at, ms) for at, src, ok, ms in events if src == source and ok]
        bad = [at for at, src, ok, _ in events if src == source and not ok]
        if good:
            traces.append(
                go.Scatter(
                    x=[a for a, _ in good],
                    y=[m for _, m in good],
                    mode="lines+markers",
                    name=f"{source}: ok",
                )
            )
        if bad:
            traces.append(
                go.Scatter(
                    x=bad,
                    y=[0] * len(bad),
                    mode="markers",
                    name=f"{source}: failed",
                    marker={"symbol": "x", "size": 10},
                )
            )
    fig = go.Figure(traces)
    return _layout(fig, title, "time (UTC)", "latency ms")


def chart(fig: go.Figure, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displayModeBar": False})


def field_error(slot: Any, errors: dict[str, str], name: str) -> None:
    """Show the error of one form field in the placeholder under it."""
    if name in errors:
        slot.error(errors[name], icon=":material/error:")


def show_errors(
    slots: dict[str, Any], errors: dict[str, str], general: Any, note: str | None = None
) -> None:
    """Each message under its field's placeholder (keyed by the parameter's name, as
    ``ParamError.field``); what has no field of its own, and ``note``, in ``general``."""
    rest = []
    for name, message in errors.items():
        if name in slots:
            slots[name].error(message, icon=":material/error:")
        else:
            rest.append(message)
    if note:
        rest.append(note)
    if rest:
        general.error(" ".join(rest), icon=":material/error:")


def download_buttons(
    url: str,
    table: str,
    exports_dir: Path,
    key: str,
    run_id: int | None = None,
    where: dict[str, str] | None = None,
    stem: str | None = None,
) -> None:
    """CSV and Parquet of a selection, built only when the user clicks (storage.export)."""
    download_pair(
        lambda fmt: reads.export_bytes(url, table, fmt, exports_dir, run_id, where),
        key,
        stem or table,
    )


def download_pair(make: Callable[[str], bytes], key: str, stem: str) -> None:
    """A CSV and a Parquet button; ``make(fmt)`` builds the file only when clicked."""

    def maker(fmt: str) -> Callable[[], bytes]:
        return lambda: make(fmt)

    c1, c2, _ = st.columns([1, 1, 4])
    c1.download_button(
        "Download CSV",
        data=maker("csv"),
        file_name=f"{stem}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
        icon=":material/download:",
    )
    c2.download_button(
        "Download Parquet",
        data=maker("parquet"),
        file_name=f"{stem}.parquet",
        mime="application/vnd.apache.parquet",
        key=f"{key}_parquet",
        on_click="ignore",
        icon=":material/download:",
    )


def fmt_duration(secs: float) -> str:
    seconds = round(secs)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def start_buttons(prefix: str) -> tuple[bool, bool]:
    """A job form's two submit buttons: Start (``{prefix}_start``) and Schedule this…
    (``{prefix}_schedule``: the same checks, then the Schedules page asks for the timing)."""
    left, right = st.columns([1, 5])
    submitted = left.form_submit_button("Start", type="primary", key=f"{prefix}_start")
    schedule = right.form_submit_button(
        "Schedule this…",
        key=f"{prefix}_schedule",
        help="keep this job and start it by a cron expression or an interval (Schedules page)",
    )
    return submitted, schedule


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def cost_section(cost: dict[str, Any] | None, key: str, domains: bool = False) -> None:
    """What a run cost (``engine.costs``): requests per method, browser-seconds, bytes by
    route, per stored entity, browser time domain learning saved; with ``domains``, per domain."""
    if not cost:
        return
    per = cost.get("per_stored") or {}
    b = cost.get("bytes", {})
    st.markdown("**Cost**")
    metrics(
        [
            ("requests", f"{sum(cost.get('requests', {}).values()):,}"),
            ("browser-s", f"{cost.get('browser_s', 0):,.1f}"),
            ("direct", _mb(b.get("direct", 0))),
            ("via proxies", _mb(b.get("proxy", 0))),
            ("stored", f"{cost.get('stored', 0):,}"),
            ("browser-s / entity", f"{per['browser_s']:.3f}" if per else "—"),
            ("KB / entity", f"{per['bytes'] / 1e3:,.1f}" if per else "—"),
            ("browser-s saved", f"{cost.get('saved_browser_s', 0):,.1f}"),
        ],
        {
            "browser-s": "Playwright and Selenium wall time, every attempt",
            "browser-s saved": f"{cost.get('saved_pages', 0):,} page(s) got without the "
            "browser their domain had needed (domain learning), times its measured seconds",
            "stored": "Entities stored or seen again (scrape), items stored ok (backfill)",
        },
    )
    requests = ", ".join(f"{m} {n:,}" for m, n in sorted(cost.get("requests", {}).items()))
    extra = f"; tor {_mb(b['tor'])}" if b.get("tor") else ""
    files = f"; files {_mb(cost['file_bytes'])}" if cost.get("file_bytes") else ""
    st.caption(f"requests by method: {requests or 'none'}{extra}{files}")
    if domains and cost.get("domains"):
        st.dataframe(
            [
                {
                    "domain": d["domain"],
                    "requests": sum(d["requests"].values()),
                    "pages": d["pages"],
                    "browser-s": d["browser_s"],
                    "MB direct": round(d["bytes"]["direct"] / 1e6, 3),
                    "MB proxies": round(d["bytes"]["proxy"] / 1e6, 3),
                    "pages without browser": d["saved_pages"],
                    "browser-s saved": d["saved_browser_s"],
                }
                for d in cost["domains"]
            ],
            hide_index=True,
            width="stretch",
            key=f"{key}_domains",
        )
