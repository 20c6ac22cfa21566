"""Settings: the database in use (never its password), the settings values and where they
come from, the paths, and the doctor: what each fetch method needs and whether it is here.
"""

from __future__ import annotations

import os

import streamlit as st
from pydantic_settings import BaseSettings

from console import reads
from console.resources import console_or_stop
from engine.jobs import kinds
from engine.runtime.control import control_path
from storage.db import duckdb_path

SECRET_FIELDS = {"secret_key"}


def settings_rows(settings: BaseSettings) -> list[dict[str, str]]:
    """Every field of a settings object: value (secrets only as set / not set), source."""
    rows = []
    for name, info in type(settings).model_fields.items():
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
    st.subheader("Fetchers")
    st.caption("Browser paths, tor ports, cascade and cache defaults (fetchers/config.py).")
    st.dataframe(
        settings_rows(reads.fetch_settings()), hide_index=True, width="stretch", key="fetch_table"
    )
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
    checks, order = reads.doctor()
    st.subheader("Doctor")
    st.caption(
        "What each fetch method of the cascade needs on this machine and whether it is here "
        "(`python -m engine.run doctor` prints the same). Job kinds registered: "
        f"{', '.join(kinds())}."
    )
    st.dataframe(checks, hide_index=True, width="stretch", key="settings_doctor")
    st.subheader("Fetch order per country")
    st.caption(
        "The cascade's policy (fetchers/policy.toml; FETCHFLEET_POLICY_FILE replaces the rows "
        "it names). `_default` applies to every other country."
    )
    st.dataframe(
        [{"country": country, "order": " → ".join(methods)} for country, methods in order.items()],
        hide_index=True,
        key="settings_order",
    )


if __name__ == "__main__":
    main()
