"""Schedules: jobs that start themselves. The list with next due times and the last fires
(with their runs' status), enable/disable, run now, delete, and a form that adds one from
the job's command line, checked exactly as the CLI checks it (``schedule add``).

This server fires due schedules itself (``Settings.scheduler``); so can any other console
or ``engine.run scheduler`` on the same PostgreSQL: each due time fires once.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from console.resources import Console, console_or_stop
from console.schedules import PENDING, add_from_form, fires_frame, schedules_frame


def add_form(c: Console) -> None:
    pending = st.session_state.get(PENDING)
    if pending is not None:
        a, b = st.columns([5, 1], vertical_alignment="center")
        a.info(f"Scheduling the job from its page: {pending.command}")
        if b.button("Cancel", key="sched_cancel", width="stretch"):
            st.session_state.pop(PENDING, None)
            st.rerun()
    with st.form("schedule_add", border=True):
        a, b, d = st.columns([2, 2, 1])
        name = a.text_input("Name", key="sched_name", placeholder="nightly-revalidate")
        when = b.text_input(
            "When: a cron expression or an interval",
            key="sched_when",
            placeholder="0 3 * * *   or   30m",
        )
        tz = d.text_input("Time zone", value="UTC", key="sched_tz")
        command = ""
        if pending is None:
            command = st.text_input(
                "Job: the command line you would run by hand",
                key="sched_cmd",
                placeholder="validate --revalidate --minutes-old 60 --judge http://…/get",
            )
        e, f = st.columns(2)
        overlap = e.radio(
            "While the previous run still goes",
            ["skip", "queue"],
            horizontal=True,
            key="sched_overlap",
        )
        missed = f.radio(
            "Fires missed while no scheduler ran",
            ["once", "skip"],
            horizontal=True,
            key="sched_missed",
        )
        added = st.form_submit_button("Add schedule", key="sched_add")
    if not added:
        return
    problems = add_from_form(c, name, when, tz, command, overlap, missed, pending)
    if problems:
        for field, message in problems.items():
            st.error(f"{field}: {message}")
    else:
        st.session_state.pop(PENDING, None)
        st.session_state["sched_msg"] = f"added schedule {name}"
        st.rerun()  # the list above shows it


def actions(c: Console, names: list[str]) -> None:
    from engine.schedules.scheduler import Scheduler
    from engine.schedules.service import get_schedule, remove_schedule, set_enabled

    a, b, d, e = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    pick = a.selectbox("Schedule", names, key="sched_pick")
    if pick is None:
        return
    row = get_schedule(c.db, pick)
    if b.button("Run now", key="sched_run_now", width="stretch"):
        fired = Scheduler(c.db, c.settings, c.coordinator.name).fire(pick, now_anyway=True)
        if fired is not None and fired.run_id is not None:
            st.success(f"run {fired.run_id} started (Runs & errors follows it)")
        else:
            st.warning(f"no run started: {fired.note if fired else 'try again'}")
    label = "Disable" if row.enabled else "Enable"
    if d.button(label, key="sched_toggle", width="stretch"):
        set_enabled(c.db, pick, not row.enabled)
        st.rerun()
    if e.button("Delete", key="sched_delete", width="stretch"):
        remove_schedule(c.db, pick)
        st.rerun()


def main() -> None:
    st.title("Schedules")
    c = console_or_stop()
    st.caption(
        "This server fires due schedules"
        + ("" if c.settings.scheduler else " — turned off here (FETCHFLEET_SCHEDULER=0)")
        + "; with PostgreSQL, any other console or `python -m engine.run scheduler` can too, "
        "and each due time still starts one run."
    )
    if msg := st.session_state.pop("sched_msg", None):
        st.success(msg)
    frame: pd.DataFrame = schedules_frame(c.db)
    if frame.empty:
        st.info("No schedule yet: add one below.")
    else:
        st.dataframe(frame, hide_index=True, width="stretch", key="sched_table")
        actions(c, list(frame["name"]))
        st.subheader("Last fires")
        st.dataframe(fires_frame(c.db), hide_index=True, width="stretch", key="sched_fires")
    st.subheader("Add a schedule")
    add_form(c)


if __name__ == "__main__":
    main()
