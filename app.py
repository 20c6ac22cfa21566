"""Fetchfleet console: `streamlit run app.py` (or ./run.sh). The entrypoint routes to the
pages (``navigation``) and is itself the Home page: the fleet at a glance.

The server process hosts the engine (coordinator + local worker pool, see
``console.resources``); every page reads aggregates computed in SQL (``storage.dashboard``)
and acts through the engine API the CLI uses.
"""

from __future__ import annotations

import streamlit as st

from console import reads, views
from console.resources import console_or_stop
from engine.jobs import kinds

RUN_STATUSES = ("running", "queued", "paused", "completed", "stopped", "failed", "cancelled")


@st.fragment(run_every=2)
def live_home(url: str, heartbeat_within_s: float) -> None:
    snap = reads.home_snapshot(url, heartbeat_within_s)
    with st.container(key="home_fleet"):
        views.metrics(
            [
                ("workers alive", snap.workers_alive),
                ("items/s now", f"{snap.items_per_s_now:,.1f}"),
                ("items last hour", f"{snap.items_last_hour:,}"),
                ("errors last hour", f"{snap.errors_last_hour:,}"),
                ("fetches last hour", f"{snap.fetch.attempts:,}"),
                ("blocked last hour", f"{snap.fetch.blocked:,}"),
            ],
            {
                "workers alive": "Local and remote workers that heartbeated recently",
                "items/s now": "Items stored over the last 10 seconds, per second",
                "errors last hour": "Error log entries: failed task attempts, malformed input",
                "fetches last hour": "Fetch attempts of scrape runs (every method the cascade "
                "tried), from the fetch log",
                "blocked last hour": "Fetch attempts that met a block page (challenge, captcha…)",
            },
        )
    left, right = st.columns([3, 2])
    with left:
        fig = views.line(
            [m for m, _ in snap.per_minute],
            [v for _, v in snap.per_minute],
            "Items/s over the last hour (per minute)",
            "minute (UTC)",
            "items/s",
        )
        if snap.fetch.attempts:  # scrape runs: their fetch attempts beside the items
            fig.data[0].name = "items/s"
            fig.add_scatter(
                x=[m for m, _ in snap.fetch_per_minute],
                y=[v for _, v in snap.fetch_per_minute],
                mode="lines",
                name="fetch attempts/s",
                line={"width": 1, "dash": "dot"},
            )
            fig.update_layout(showlegend=True)
        views.chart(fig, key="home_throughput")
    with right:
        runs = snap.runs_by_status
        statuses = [s for s in RUN_STATUSES if runs.get(s)] + sorted(
            s for s in runs if s not in RUN_STATUSES
        )
        views.chart(
            views.bars(statuses, [runs[s] for s in statuses], "Runs by status", "", "runs"),
            key="home_runs",
        )
    st.subheader("Runs")
    with st.container(key="home_runs_by_status"):
        views.metrics(
            [("runs", sum(runs.values()))] + [(s, runs.get(s, 0)) for s in RUN_STATUSES[:4]]
        )
    st.subheader("Proxy pool")
    pool = snap.pool_by_status
    with st.container(key="home_pool"):
        views.metrics(
            [("proxies", sum(pool.values()))]
            + [(s, pool.get(s, 0)) for s in ("active", "inactive", "untested", "tampering")]
        )


def home() -> None:
    st.title("Fleet at a glance")
    c = console_or_stop()
    pool = c.coordinator.pool
    st.caption(
        f"Database **{c.display_url}** · coordinator `{c.coordinator.name}` · local pool "
        f"{len(pool.active())} of {pool.target} workers × {c.settings.concurrency} concurrent"
    )
    live_home(c.url, 3 * c.settings.heartbeat_s)
    st.subheader("Latest runs")
    st.dataframe(reads.runs_frame(c.url, 10), hide_index=True, width="stretch")


def navigation() -> st.navigation:  # type: ignore[valid-type]
    """Every page of the console, grouped; tests and the browser test drive it. The job
    pages are the registered kinds' (``KindInfo.page``)."""
    return st.navigation(
        {
            "Fleet": [
                st.Page(home, title="Home", icon=":material/dashboard:", default=True),
                st.Page("pages/workers.py", title="Workers", icon=":material/memory:"),
                st.Page("pages/runs.py", title="Runs & errors", icon=":material/list_alt:"),
                st.Page("pages/schedules.py", title="Schedules", icon=":material/schedule:"),
                st.Page("pages/alerts.py", title="Alerts", icon=":material/notifications:"),
                st.Page("pages/gateway.py", title="Gateway", icon=":material/router:"),
            ],
            "Jobs": [
                st.Page(info.page.path, title=info.page.title, icon=info.page.icon)
                for info in kinds().values()
                if info.page is not None
            ],
            "Data": [
                st.Page("pages/data.py", title="Data & export", icon=":material/download:"),
                st.Page("pages/settings.py", title="Settings", icon=":material/settings:"),
            ],
        }
    )


def main() -> None:
    st.set_page_config(page_title="Fetchfleet", page_icon=":material/hub:", layout="wide")
    navigation().run()


main()
