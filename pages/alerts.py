"""Alerts: webhooks told about run ends, auto-stops, missed schedules, lost workers and a low
proxy pool. The list (targets shown without secrets), add, test, remove, and the recent
events with their delivery status.

This server delivers alerts itself (``Settings.alerts``); so can any other console,
``engine.run scheduler`` or ``engine.run alerts deliver`` on the same PostgreSQL: each
delivery is sent once.
"""

from __future__ import annotations

import streamlit as st

from console.alerts import add_from_form, alerts_frame, recent_frame, send_test_line
from console.resources import Console, console_or_stop


def add_form(c: Console) -> None:
    from engine.alerts.events import DEFAULT_EVENTS, EVENTS

    with st.form("alert_add", border=True):
        a, b = st.columns([1, 2])
        name = a.text_input("Name", key="alert_name", placeholder="ops-slack")
        target = b.radio(
            "Webhook URL from",
            ["env", "url"],
            format_func=lambda t: {
                "env": "an environment variable (its name is stored)",
                "url": "a literal URL (no credentials)",
            }[t],
            horizontal=True,
            key="alert_target",
        )
        value = st.text_input(
            "Variable name or URL",
            key="alert_value",
            placeholder="OPS_SLACK_URL",
            help="A URL with a token in it (Slack's is in its path) belongs in an environment "
            "variable of this server's process: give its name.",
        )
        e, f = st.columns([3, 1])
        events = e.multiselect(
            "Events", list(EVENTS), default=list(DEFAULT_EVENTS), key="alert_events"
        )
        below = f.number_input("Pool below (0: off)", min_value=0, value=0, key="alert_pool")
        added = st.form_submit_button("Add alert", key="alert_add_btn")
    if not added:
        return
    problems, warnings = add_from_form(c.db, name, target, value, events, int(below) or None)
    for field, message in problems.items():
        st.error(f"{field}: {message}")
    if not problems:
        st.session_state["alert_msg"] = (f"added alert {name}", warnings)
        st.rerun()


def actions(c: Console, names: list[str]) -> None:
    from engine.alerts.service import remove_alert

    a, b, d = st.columns([3, 1, 1], vertical_alignment="bottom")
    pick = a.selectbox("Alert", names, key="alert_pick")
    if pick is None:
        return
    if b.button("Send test", key="alert_test", width="stretch"):
        line = send_test_line(c, pick)
        (st.error if line.startswith("error") or "(delivered)" not in line else st.success)(line)
    if d.button("Remove", key="alert_remove", width="stretch"):
        remove_alert(c.db, pick)
        st.rerun()


def main() -> None:
    st.title("Alerts")
    c = console_or_stop()
    st.caption(
        "Webhooks (JSON POST with a Slack-compatible `text`) on run ends, stop rules, missed "
        "schedules, lost workers and a low proxy pool; retried with backoff, each event once."
        + ("" if c.settings.alerts else " Delivery is off here (FETCHFLEET_ALERTS=0).")
    )
    if msg := st.session_state.pop("alert_msg", None):
        st.success(msg[0])
        for w in msg[1]:
            st.warning(w)
    frame = alerts_frame(c.db)
    if frame.empty:
        st.info("No alert yet: add one below.")
    else:
        st.dataframe(frame, hide_index=True, width="stretch", key="alert_table")
        actions(c, list(frame["name"]))
    st.subheader("Recent alerts")
    recent = recent_frame(c.db)
    if recent.empty:
        st.caption("No alert event yet.")
    else:
        st.dataframe(recent, hide_index=True, width="stretch", key="alert_recent")
    st.subheader("Add an alert")
    add_form(c)


if __name__ == "__main__":
    main()
