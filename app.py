"""Fetchfleet console, home page: runs and the proxy pool, read from storage.

The full console (live pages, launching runs, workers) grows in later issues; this page reads
the database and lets go of it after each render, so CLI runs on DuckDB are not blocked.
"""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa
import streamlit as st

from storage.bulk import fetch_all
from storage.db import open_database, resolve_db_url
from storage.errors import StorageError
from storage.export import exportable_columns
from storage.schema import proxies, runs

PROXY_ROWS = 500


def load(url: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    db = open_database(url, wait_s=2)
    try:
        with db.connect() as conn:
            run_rows = fetch_all(
                conn,
                sa.select(
                    runs.c.id,
                    runs.c.kind,
                    runs.c.status,
                    runs.c.total_items,
                    runs.c.created_at,
                    runs.c.started_at,
                    runs.c.finished_at,
                    runs.c.error,
                )
                .order_by(runs.c.id.desc())
                .limit(100),
            )
            proxy_rows = fetch_all(
                conn,
                sa.select(*exportable_columns(proxies))
                .order_by(proxies.c.last_checked.desc().nulls_last())
                .limit(PROXY_ROWS),
            )
            counts = dict(
                fetch_all(
                    conn, sa.select(proxies.c.status, sa.func.count()).group_by(proxies.c.status)
                )
            )
    finally:
        db.dispose()
    run_df = pd.DataFrame(
        run_rows,
        columns=["run", "kind", "status", "items", "created", "started", "finished", "error"],
    )
    proxy_df = pd.DataFrame(proxy_rows, columns=[c.name for c in exportable_columns(proxies)])
    return run_df, proxy_df, counts


def main() -> None:
    st.set_page_config(page_title="Fetchfleet", layout="wide")
    st.title("Fetchfleet")
    url = resolve_db_url()
    try:
        run_df, proxy_df, counts = load(url)
    except StorageError as exc:
        st.error(str(exc))
        return
    cols = st.columns(4)
    cols[0].metric("runs", len(run_df))
    for col, status in zip(cols[1:], ("active", "inactive", "untested"), strict=True):
        col.metric(f"proxies {status}", counts.get(status, 0))
    st.subheader("Runs")
    st.dataframe(run_df, hide_index=True, width="stretch")
    st.subheader(f"Proxy pool (latest {PROXY_ROWS} checked)")
    st.dataframe(proxy_df, hide_index=True, width="stretch")


main()
