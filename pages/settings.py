"""Settings: the database in use (never its password), the settings values and where they
come from, the paths, and the doctor: what each fetch method needs and whether it is here.
"""

from __future__ import annotations

import os

import streamlit as st

from console.doctor import doctor
from console.resources import console_or_stop
from engine.control import control_path
from engine.jobs import KINDS
from engine.settings import Settings
from storage.db import duckdb_path

SECRET_FIELDS = {"secret_key"}
# Starting point of the per-country fetch order (shared/ARCHITECTURE.md); editable once the
# cascade lands.
FETCH_ORDER = [
    ("Argentina", "tor", "selenium", "playwright"),
    ("India", "api", "http", "selenium"),
    ("Russia", "selenium", "playwright", "http"),
    ("Malaysia", "http", "playwright", "selenium"),
    ("_default", "http", "playwright", "selenium"),
]


def settings_rows(settings: Settings) -> list[dict[str, str]]:
    rows = []
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        env = f"FETCHFLEET_{name.upper()}"
        if name in SECRET_FIELDS:
            shown = "set (hidden)" if value else "not set"
        elif name == "db":
            shown = "(see Database above)" if value else "—"
        else:
            shown = "—" if value is None else str(value)
        rows.append(
            {
                "setting": name,
                "value": shown,
                "from": "environment" if env in os.environ else "default / .env",
                "variable": env,
                "meaning": info.description or "",
            }
        )
    return rows


def main() -> None:
    st.title("Settings")
    c = console_or_stop()
    st.subheader("Database")
    with st.container(key="settings_db"):
        st.code(c.display_url, language=None)
    path = duckdb_path(c.url)
    if path is not None:
        size = path.stat().st_size if path.exists() else 0
        st.caption(
            f"DuckDB file {path.resolve()} ({size / 1e6:,.1f} MB), held by this server; "
            f"terminal commands reach it through {control_path(str(path))}"
        )
    else:
        st.caption("PostgreSQL: every process connects directly; standalone workers can join.")
    st.subheader("Settings")
    st.dataframe(settings_rows(c.settings), hide_index=True, width="stretch", key="settings_table")
    st.subheader("Paths")
    s = c.settings
    st.dataframe(
        [
            {"what": "data directory", "path": str(s.data_dir.resolve())},
            {"what": "secret key file", "path": str(s.secret_key_file.resolve())},
            {"what": "uploaded and pasted lists", "path": str(c.uploads_dir.resolve())},
            {"what": "export scratch files", "path": str(c.exports_dir.resolve())},
        ],
        hide_index=True,
        width="stretch",
        key="settings_paths",
    )
    st.subheader("Doctor")
    st.caption(
        "What each fetch method needs on this machine. The fetch cascade (http → playwright → "
        "selenium → tor → api, ordered per country) arrives with the scrape job (issue 3); "
        f"job kinds available now: {', '.join(sorted(KINDS))}."
    )
    st.dataframe(doctor(), hide_index=True, width="stretch", key="settings_doctor")
    st.subheader("Fetch order per country")
    st.caption("The starting policy; editable here once the cascade lands (issue 3).")
    st.dataframe(
        [{"country": r[0], "1st": r[1], "2nd": r[2], "3rd": r[3]} for r in FETCH_ORDER],
        hide_index=True,
        key="settings_order",
    )


if __name__ == "__main__":
    main()
