"""Backfill: arrives with the backfill job (rate-limited ID lists through an API).

Until the engine registers a ``backfill`` job kind this page says so and what it will do.
"""

from __future__ import annotations

import streamlit as st

from console import views

WHAT = (
    "upload an ID list, give the URL template (with `{id}`) and the rate limit",
    "name request headers by environment variable (secrets never typed into the page)",
    "watch the live rate against the limit line, progress, ETA and failures",
    "resume a stopped run and read its evaluation report",
)


def main() -> None:
    if not views.kind_available("backfill"):
        views.arrives_with("Backfill", "backfill", "the backfill issue", WHAT)
        return
    st.title("Backfill")
    st.warning("The backfill job is registered, but its console page is not built yet.")


if __name__ == "__main__":
    main()
