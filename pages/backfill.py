"""Backfill: fetch a long ID list through a JSON API under a hard rate limit, watch the rate
against the limit, resume a stopped run, read the evaluation report.

Start: upload or paste the IDs (saved under data/uploads/ and passed as ``ids_file``), the URL
template with ``{id}``, the rate limit (``N/period``) and headers — secrets only by
environment-variable *name* (``Authorization=env:API_TOKEN``): the value is read by each
worker from its own environment and never typed into, stored by or shown on this page.
Every field is checked with the job's own parsers before anything starts; then the run goes
through ``engine.api.submit_run`` like ``python -m engine.run backfill``.

Until the engine registers the ``backfill`` job kind the page says so instead.
"""

from __future__ import annotations

import re
from typing import Any

import streamlit as st

from console import forms, reads, views
from console.resources import Console, console_or_stop
from engine.api import submit_run
from engine.model import TERMINAL
from storage.runs import TRANSITIONS

SOURCES = {"Upload an ID file": "upload", "Paste IDs": "paste"}
FLAG_FIELDS = {  # the job's messages name CLI flags: show each next to its field
    "--ids": "ids",
    "--id-column": "id_column",
    "--id-pattern": "ids",
    "--url-template": "url_template",
    "--rate-limit": "rate_limit",
    "--burst": "rate_limit",
    "rate limit": "rate_limit",
    "--header": "headers",
    "--timeout": "timeout_s",
    "--item-attempts": "item_attempts",
}


def field_of(message: str) -> str | None:
    for flag, name in FLAG_FIELDS.items():
        if message.startswith(flag):
            return name
    return None


def check_form(values: dict[str, Any], duckdb: bool) -> dict[str, str]:
    """Each field with the job's own parsers (so the page and the CLI agree)."""
    from engine.jobs.backfill.kind import check_url_template, parse_header
    from engine.ratelimit.base import Rate

    errors: dict[str, str] = {}
    try:
        check_url_template(values["url_template"].strip())
    except ValueError as exc:
        errors["url_template"] = str(exc)
    try:
        Rate.parse(values["rate_limit"].strip(), burst=int(values["burst"] or 1))
    except ValueError as exc:
        errors["rate_limit"] = str(exc)
    for line in values["headers"].splitlines():
        if line.strip():
            try:
                parse_header(line.strip())
            except ValueError as exc:
                errors.setdefault("headers", str(exc))
    if not values["timeout_s"] > 0:
        errors["timeout_s"] = (
            f"the timeout must be more than 0 seconds, not {values['timeout_s']:g}"
        )
    if not 1 <= values["item_attempts"] <= 20:
        errors["item_attempts"] = "requests per ID must be between 1 and 20"
    if not 1 <= values["batch_size"] <= 100_000:
        errors["batch_size"] = "the batch size must be between 1 and 100,000 IDs per task"
    if values["workers"] == 0 and duckdb:
        errors["workers"] = "with DuckDB at least one local worker is needed"
    elif not 0 <= values["workers"] <= 256:
        errors["workers"] = "workers must be between 0 and 256"
    if not 1 <= values["concurrency"] <= 10_000:
        errors["concurrency"] = "concurrency must be between 1 and 10,000"
    return errors


def start_form(c: Console) -> None:
    label = st.radio("IDs", list(SOURCES), horizontal=True, key="bf_source")
    source = SOURCES[label]
    s, pool = c.settings, c.coordinator.pool
    upload = None
    pasted: str | None = None
    slots: dict[str, Any] = {}
    with st.form("bf_form", border=True):
        if source == "upload":
            upload = st.file_uploader("ID list (one ID a line, or a CSV)", key="bf_upload")
        else:
            pasted = st.text_area("IDs, one a line", key="bf_paste", height=140)
        slots["ids"] = st.empty()
        id_column = st.text_input(
            "ID column (CSV files only)", key="bf_id_column", placeholder="id"
        )
        slots["id_column"] = st.empty()
        template = st.text_input(
            "URL template", key="bf_template",
            placeholder="https://api.example.com/users/{id}",
            help="{id} is replaced by each ID (URL-encoded)",
        )  # fmt: skip
        slots["url_template"] = st.empty()
        a, b = st.columns([3, 1])
        rate = a.text_input(
            "Rate limit (N/period, across all workers)", key="bf_rate", placeholder="3000/5m",
            help="At most N requests in any window of the period: 3000/5m, 10/1s, 500/2h",
        )  # fmt: skip
        burst = b.number_input("Burst", value=1, step=1, key="bf_burst")
        slots["rate_limit"] = st.empty()
        headers = st.text_area(
            "Headers, one a line: Name=value or Name=env:VARIABLE", key="bf_headers", height=80,
            placeholder="Authorization=env:API_TOKEN\nAccept-Language=en",
            help="Secrets only by environment variable name: each worker reads the value from "
            "its own environment; a literal value for a credential-like header is refused.",
        )  # fmt: skip
        slots["headers"] = st.empty()
        cols = st.columns(5)
        batch = cols[0].number_input(
            "Batch (IDs per task)", value=int(s.batch_size), key="bf_batch"
        )
        timeout = cols[1].number_input("Timeout (s)", value=10.0, step=1.0, key="bf_timeout")
        attempts = cols[2].number_input("Requests per ID", value=3, step=1, key="bf_attempts")
        workers = cols[3].number_input("Workers (pool)", value=int(pool.target), key="bf_workers")
        conc = cols[4].number_input("Concurrency (pool)", value=int(s.concurrency), key="bf_conc")
        names = ("batch_size", "timeout_s", "item_attempts", "workers", "concurrency")
        for col, name in zip(st.columns(5), names, strict=True):
            slots[name] = col.empty()
        submitted = st.form_submit_button("Start", type="primary", key="bf_start")
    general = st.empty()
    if not submitted:
        return

    values = {
        "url_template": template or "",
        "rate_limit": rate or "",
        "burst": int(burst or 1),
        "headers": headers or "",
        "timeout_s": float(timeout or 0),
        "item_attempts": int(attempts or 0),
        "batch_size": int(batch or 0),
        "workers": int(workers or 0),
        "concurrency": int(conc or 0),
    }
    errors = check_form(values, c.db.is_duckdb)
    data: bytes | None = None
    name = "ids.txt"
    if source == "upload":
        if upload is None:
            errors["ids"] = "choose a file to upload (one ID a line, or a CSV with an ID column)"
        else:
            data, name = upload.getvalue(), upload.name
            if err := forms.check_text(data, f"the upload {upload.name!r}"):
                errors["ids"] = err
    elif not (pasted or "").strip():
        errors["ids"] = "the ID list is empty: paste one ID a line"
    else:
        data = (pasted or "").encode()
    if not errors and name.lower().endswith(".csv") and not (id_column or "").strip():
        errors["id_column"] = "this is a CSV file: name the column that holds the IDs"
    if errors:
        for key, slot in slots.items():
            views.field_error(slot, errors, key)
        general.error("Nothing was started: fix the fields marked above.")
        return
    assert data is not None
    path = forms.save_list(data, c.uploads_dir, name)
    params = {
        "ids_file": str(path),
        "id_column": (id_column or "").strip() or None,
        "url_template": values["url_template"].strip(),
        "rate_limit": values["rate_limit"].strip(),
        "burst": values["burst"],
        "headers": [h.strip() for h in values["headers"].splitlines() if h.strip()],
        "timeout_s": values["timeout_s"],
        "item_attempts": values["item_attempts"],
        "batch_size": values["batch_size"],
    }
    coord = c.coordinator
    try:
        with st.spinner("Reading the IDs and planning the run…"):
            run_id = submit_run(c.db, coord.settings, "backfill", params, coord.name)
    except ValueError as exc:
        msg = str(exc)
        target = slots.get(field_of(msg) or "", general)
        target.error(re.sub(r"^--[a-z-]+ ", "", msg), icon=":material/error:")
        return
    if values["concurrency"] != coord.settings.concurrency:
        coord.set_concurrency(values["concurrency"])
    if values["workers"] != coord.pool.target:
        coord.resize(values["workers"])
    st.session_state["bf_run"] = run_id
    general.success(f"Run {run_id} started.", icon=":material/play_arrow:")


def current_run(url: str) -> int | None:
    run_id = st.session_state.get("bf_run") or reads.latest_run_id(url, "backfill")
    return None if run_id is None else int(run_id)


def _act(c: Console, run_id: int, action: str) -> None:
    try:
        c.coordinator.command(run_id, action, source="console")
    except ValueError as exc:
        st.session_state["bf_msg"] = str(exc)


def live_run(c: Console) -> None:
    from engine.jobs.backfill.kind import format_report

    run_id = current_run(c.url)
    if run_id is None:
        st.info("No backfill run yet: start one above.", icon=":material/info:")
        return
    r = reads.backfill_report(c.url, run_id)
    counts, status, lim = r["counts"], r["status"], r["limit"]
    with st.container(key="bf_run", border=True):
        st.markdown(
            f"**Run {run_id}** · status **{status}** · `{r['url_template']}` · limit "
            f"**{r['rate_limit']}** ({lim['per_s']:g}/s)"
        )
        total, done = counts["total"], counts["done"]
        frac = min(done / total, 1.0) if total else (1.0 if status in TERMINAL else 0.0)
        st.progress(frac, text=f"{done:,} of {total:,} IDs fetched")
        eta = r["eta_s"]
        views.metrics(
            [
                ("fetched", f"{done:,} / {total:,}"),
                ("ok", f"{counts['ok']:,}"),
                ("failed", f"{counts['failed']:,}"),
                ("requests/s", f"{r['throughput']['requests_per_s']:,.2f}"),
                ("of the limit", f"{lim['utilisation']:.0%}"),
                ("ETA", "—" if eta is None else views.fmt_duration(eta)),
            ]
        )
        buttons = st.columns(6)
        for col, action in zip(buttons, ("stop", "resume", "cancel"), strict=False):
            col.button(
                action.capitalize(),
                key=f"bf_{action}",
                disabled=status not in TRANSITIONS[action][0],
                on_click=_act,
                args=(c, run_id, action),
                width="stretch",
            )
        if msg := st.session_state.pop("bf_msg", None):
            st.error(msg)
        if r.get("error"):
            st.error(r["error"])
        tp = reads.run_throughput(c.url, run_id)
        fig = views.line(
            tp["time"], tp["items/s"], "Rate against the limit (last 90 s)", "time (UTC)", "IDs/s"
        )
        fig.add_hline(
            y=lim["per_s"], line_dash="dash", line_color="firebrick", annotation_text="limit"
        )
        views.chart(fig, key="bf_rate_chart")
        if r["errors"]:
            st.markdown("**Failures**")
            st.dataframe(
                [
                    {
                        "outcome": e["outcome"],
                        "http": e["http_status"],
                        "IDs": e["items"],
                        "examples": ", ".join(e["examples"]),
                        "last error": (e.get("error") or "")[:200],
                    }
                    for e in r["errors"]
                ],
                hide_index=True,
                width="stretch",
                key="bf_failures",
            )
        with st.expander("Evaluation report", expanded=status in TERMINAL):
            st.code(format_report(r), language=None)


def main() -> None:
    st.title("Backfill")
    c = console_or_stop()
    start_form(c)
    run_id = current_run(c.url)
    active = run_id is not None and reads.summary(c.url, run_id)["status"] not in TERMINAL
    st.fragment(live_run, run_every=1 if active else 5)(c)
    if run_id is not None:
        st.subheader("Stored results")
        views.download_buttons(
            c.url, "backfill_items", c.exports_dir, key="bf_dl", run_id=run_id,
            stem=f"backfill-run{run_id}",
        )  # fmt: skip
        total, frame = reads.table_preview(c.url, "backfill_items", run_id, 20)
        st.caption(f"{total:,} results stored for run {run_id}; the first {len(frame)} below")
        st.dataframe(frame, hide_index=True, width="stretch", key="bf_items")


if __name__ == "__main__":
    main()
