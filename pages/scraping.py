"""Scraping: arrives with the scrape job and the fetcher cascade (issue 3).

Until the engine registers a ``scrape`` job kind this page says so and what it will do; the
navigation keeps its place so links and muscle memory do not change when it lands.
"""

from __future__ import annotations

import streamlit as st

from console import views

WHAT = (
    "choose or upload a scrape spec (checked before start, with line and column of any error)",
    "pick a country and override its fetch-method order",
    "Start / Stop / Resume the run",
    "watch pages/s, the success ratio, which method won per country and why pages were blocked",
    "browse the extracted entities and download them as CSV or Parquet",
)


def main() -> None:
    if not views.kind_available("scrape"):
        views.arrives_with("Scraping", "scrape", "issue 3", WHAT)
        return
    st.title("Scraping")
    st.warning("The scrape job is registered, but its console page is not built yet.")


if __name__ == "__main__":
    main()
