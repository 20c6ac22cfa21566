"""Data & export: pick a table (optionally one run's rows), preview it, download it as CSV or
Parquet. The same selection as ``python -m engine.run export``: ``storage.export`` streams
the file and never writes the encrypted proxy password column.
"""

from __future__ import annotations

import streamlit as st

from console import reads, views
from console.resources import console_or_stop

ALL_RUNS = "all rows"
PREVIEW_ROWS = 50
DEFAULT_TABLE = "proxies"


def main() -> None:
    st.title("Data & export")
    c = console_or_stop()
    a, b = st.columns(2)
    exportable = reads.table_names()  # the core schema's and the kinds' own tables
    table = a.selectbox(
        "Table", exportable, index=exportable.index(DEFAULT_TABLE), key="data_table"
    )
    run_ids = list(reads.runs_frame(c.url, 200)["run"])
    run = b.selectbox(
        "Run", [ALL_RUNS, *run_ids], key="data_run", help="Only the rows of one run, if the table has runs"
    )  # fmt: skip
    run_id = None if run == ALL_RUNS else int(run)
    try:
        total, frame = reads.table_preview(c.url, table, run_id, PREVIEW_ROWS)
    except ValueError as exc:  # e.g. a table that has no run to filter by
        st.warning(str(exc))
        return
    scope = f"run {run_id}" if run_id is not None else "all runs"
    st.caption(f"{total:,} rows in {table} ({scope}); the first {min(total, PREVIEW_ROWS)} below")
    with st.container(key="data_preview"):
        st.dataframe(frame, hide_index=True, width="stretch", key="data_frame")
    stem = table if run_id is None else f"{table}-run{run_id}"
    views.download_buttons(c.url, table, c.exports_dir, key="data_dl", run_id=run_id, stem=stem)


if __name__ == "__main__":
    main()
