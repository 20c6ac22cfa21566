"""Gateway: start and stop the rotating proxy gateway (`serve-proxy`) from the console and
watch it live — members with their breaker state, latency and bytes, requests/s and
failures per member, the cache. The same gateway as the CLI's, run on this server."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console.gateway import GatewayHolder, gateway_holder
from console.resources import Console, console_or_stop


def start_form(c: Console, holder: GatewayHolder) -> None:
    from engine.cli.gateway import _csv
    from engine.gateway.config import GatewayConfig
    from engine.gateway.members import MemberFilter
    from engine.gateway.service import ServeOptions

    with st.form("gateway_start", border=True):
        a, b, d, e = st.columns(4)
        port = a.number_input("Port", 1, 65535, 8899, key="gw_port")
        strategy = b.selectbox(
            "Strategy",
            ["round_robin", "least_connections", "weighted", "adaptive"],
            key="gw_strategy",
        )
        retries = d.number_input("Retries", 0, 10, 2, key="gw_retries")
        metrics_port = e.number_input("Metrics port (0: none)", 0, 65535, 8900, key="gw_metrics")
        f, g, h, i = st.columns(4)
        country = f.text_input("Countries", placeholder="MY,IN", key="gw_country")
        anonymity = g.text_input("Anonymity", placeholder="elite", key="gw_anonymity")
        types = h.text_input("Types", placeholder="http,socks5", key="gw_types")
        cache = i.selectbox("Cache", ["off", "ttl", "lru"], key="gw_cache")
        go = st.form_submit_button("Start gateway", key="gw_start", type="primary")
    if not go:
        return
    config = GatewayConfig(port=int(port), strategy=strategy, retries=int(retries))
    options = ServeOptions(
        db_url=c.url,
        filter=MemberFilter(
            countries=_csv(country, upper=True), anonymity=_csv(anonymity), types=_csv(types)
        ),
        cache=None if cache == "off" else cache,
        metrics_port=int(metrics_port) or None,
    )
    try:
        holder.start(c, config, options)
    except OSError as exc:
        st.error(f"port {port}: cannot listen on 127.0.0.1: {exc}")
        return
    st.rerun()


@st.fragment(run_every=2)
def live(holder: GatewayHolder) -> None:
    snap = holder.sample()
    if snap is None:
        return
    running = holder.running
    conns = snap["connections"]
    a, b, d, e = st.columns(4)
    a.metric("Members", snap["members_total"])
    b.metric("Connections open", conns["open"])
    d.metric("Requests", sum(r["count"] for r in snap["requests"]))
    e.metric("Strategy", snap["strategy"])
    if running is not None:
        where = f"`http://127.0.0.1:{running.port}` (HTTP, CONNECT, SOCKS5)"
        if running.metrics_port:
            where += f" · metrics `http://127.0.0.1:{running.metrics_port}/metrics`"
        st.caption(f"Listening on {where}")
    if snap.get("members_source_error"):
        st.warning(f"members not refreshed: {snap['members_source_error']}")
    rates = holder.rates()
    if not rates.empty:
        left, right = st.columns(2)
        left.caption("Requests/s per member")
        left.line_chart(rates, x="time", y="requests/s", color="member", height=220)
        right.caption("Failures/s per member")
        right.line_chart(rates, x="time", y="failures/s", color="member", height=220)
    members = pd.DataFrame(
        [
            {
                "member": m["member"],
                "breaker": m["breaker"],
                "requests": m["requests"],
                "failures": m["failures"],
                "blocked": m["blocked"],
                "p50 ms": m["latency_ms"]["p50"],
                "p99 ms": m["latency_ms"]["p99"],
                "bytes down": m["bytes_down"],
                "in flight": m["in_flight"],
            }
            for m in snap["members"]
        ]
    )
    st.dataframe(members, hide_index=True, width="stretch")
    if snap["cache"] is not None:
        st.caption("Cache: " + ", ".join(f"{k} {v}" for k, v in snap["cache"].items()))


def main() -> None:
    st.title("Gateway")
    c = console_or_stop()
    holder = gateway_holder(c.url)
    if holder.running is None:
        st.caption(
            "One local proxy over the validated pool; the same as `python -m engine.run "
            "serve-proxy`. It runs inside this console's server, on 127.0.0.1."
        )
        start_form(c, holder)
        return
    if st.button("Stop gateway", key="gw_stop"):
        holder.stop()
        st.rerun()
    live(holder)


main()
