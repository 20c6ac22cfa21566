"""Runs & errors: every run with its counts; one run in detail (tasks, retries, errors by
type with examples, outcomes, and for a scrape run its fetch log statistics) with Stop /
Pause / Resume / Cancel; its error snapshots (the first page of each error kind: list, HTML,
screenshot, downloads); error and item-log statistics per hour.

Commands go through ``Coordinator.command`` (``storage.runs.apply_command``), the same path as
``python -m engine.run stop|pause|resume|cancel``.
"""

from __future__ import annotations

import streamlit as st

from console import reads, views
from console.resources import Console, console_or_stop
from console.snapshots import snapshots_section
from storage.runs import ACTIONS, TRANSITIONS

ACTION_LABELS = {"stop": "Stop", "pause": "Pause", "resume": "Resume", "cancel": "Cancel"}


@st.fragment(run_every=3)
def runs_table(url: str) -> None:
    frame = reads.runs_frame(url, 200)
    by_status = reads.runs_by_status(url)
    views.metrics(
        [("runs", sum(by_status.values()))]
        + [(s, by_status.get(s, 0)) for s in ("running", "completed", "stopped", "failed")]
    )
    if frame.empty:
        st.info("No runs yet: start one on the Validation page or with `python -m engine.run`.")
        return
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        key="runs_table",
        column_config={
            "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
            "error": st.column_config.TextColumn("error", width="large"),
        },
    )


def _act(c: Console, run_id: int, action: str) -> None:
    try:
        status = c.coordinator.command(run_id, action, source="console")
    except ValueError as exc:
        st.session_state["runs_msg"] = ("error", str(exc))
    else:
        st.session_state["runs_msg"] = ("ok", f"run {run_id}: {action} → {status}")


@st.fragment(run_every=2)
def run_detail(c: Console, run_id: int) -> None:
    s = reads.summary(c.url, run_id)
    counts, status = s["counts"], s["status"]
    with st.container(key="run_detail", border=True):
        st.markdown(f"**Run {run_id}** ({s['kind']}) · status **{status}**")
        views.metrics(
            [
                ("items", f"{counts['total']:,}"),
                ("done", f"{counts['done']:,}"),
                ("ok", f"{counts['ok']:,}"),
                ("failed", f"{counts['failed']:,}"),
                ("duration", views.fmt_duration(s["duration_s"])),
                ("items/s", f"{s['items_per_s']:,.1f}"),
            ]
        )
        buttons = st.columns(len(ACTIONS) + 3)
        for col, action in zip(buttons, ACTIONS, strict=False):
            col.button(
                ACTION_LABELS[action],
                key=f"run_{action}",
                disabled=status not in TRANSITIONS[action][0],
                on_click=_act,
                args=(c, run_id, action),
                width="stretch",
            )
        if msg := st.session_state.pop("runs_msg", None):
            (st.error if msg[0] == "error" else st.success)(msg[1])
        if s.get("error"):
            st.error(s["error"])
        if status == "running" and (
            gap := reads.country_warning(c.url, c.settings.lease_s, run_id)
        ):
            st.warning(gap, icon="⚠️")
        if stop := s.get("auto_stop"):
            st.caption(
                f"stop rule {stop['rule']} fired at {stop['at']} UTC: "
                + ", ".join(f"{k} {v}" for k, v in stop["numbers"].items())
            )
        views.cost_section(reads.run_cost(c.url, run_id, s["kind"]), key="run_cost")
        tasks, error_groups, outcome_groups = reads.run_detail(c.url, run_id, s["kind"])
        left, right = st.columns(2)
        with left:
            st.markdown("**Tasks**")
            st.dataframe(
                {"state": list(tasks.states), "tasks": list(tasks.states.values())},
                hide_index=True,
                key="run_tasks",
            )
            st.caption(
                f"{tasks.retried_tasks:,} task(s) retried, {tasks.retries:,} retry attempt(s); "
                f"{len(tasks.leased)} held by workers now"
            )
        with right:
            st.markdown("**Outcomes**")
            if not outcome_groups:
                st.caption("no items stored yet")
            for g in outcome_groups:
                with st.expander(f"{g.name}: {g.count:,}"):
                    if not g.examples:
                        st.caption("no error message recorded")
                    for key, message in g.examples:
                        st.text(f"{key}: {message}")
        if s["kind"] == "scrape":
            fetch_log(c.url, run_id)
        st.markdown("**Errors by type**")
        if not error_groups:
            st.caption("no errors recorded for this run")
        for g in error_groups:
            with st.expander(f"{g.name}: {g.count:,}", expanded=True):
                for key, message in g.examples:
                    st.text(f"{key or '-'}: {message}")


def fetch_log(url: str, run_id: int) -> None:
    """A scrape run's fetch log: attempts by method and outcome, time per attempt by method."""
    stats = reads.fetch_log_stats(url, run_id)
    st.markdown(f"**Fetch log statistics** · {stats.attempts:,} attempt(s)")
    if not stats.attempts:
        st.caption("no fetch attempt logged for this run yet")
        return
    left, right = st.columns([3, 2])
    with left:
        st.dataframe(
            [
                {
                    "method": m.method,
                    "attempts": m.attempts,
                    "ok": m.ok,
                    "blocked": m.blocked,
                    "other errors": m.attempts - m.ok - m.blocked,
                    "median ms": m.median_ms,
                    "p90 ms": m.p90_ms,
                    "MB": round(m.bytes / 1e6, 2),
                }
                for m in stats.by_method
            ],
            hide_index=True,
            width="stretch",
            key="run_fetch_methods",
        )
    with right:
        views.chart(
            views.stacked_bars(
                stats.by_outcome, "Attempts by method and outcome", "method", "attempts"
            ),
            key="run_fetch_outcomes",
        )


@st.fragment(run_every=30)
def hourly(url: str) -> None:
    errs, outcomes = reads.hourly(url)
    left, right = st.columns(2)
    with left:
        views.chart(
            views.stacked_bars(
                list(errs.itertuples(index=False, name=None)),
                "Errors per hour (24 h)",
                "hour (UTC)",
                "errors",
            ),
            key="runs_errors_hourly",
        )
    with right:
        views.chart(
            views.stacked_bars(
                list(outcomes.itertuples(index=False, name=None)),
                "Item log: outcomes per hour (24 h)",
                "hour (UTC)",
                "items",
            ),
            key="runs_outcomes_hourly",
        )


def main() -> None:
    st.title("Runs & errors")
    c = console_or_stop()
    runs_table(c.url)
    ids = list(reads.runs_frame(c.url, 200)["run"])
    if ids:
        st.subheader("Run detail")
        run_id = st.selectbox("Run", ids, key="runs_pick")
        run_detail(c, int(run_id))
        snapshots_section(c.url, int(run_id))  # outside the live fragment: images stay put
    st.subheader("Errors and item log")
    hourly(c.url)


if __name__ == "__main__":
    main()
