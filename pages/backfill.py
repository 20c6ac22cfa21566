"""Backfill: fetch a long ID list through a JSON API under a hard rate limit, watch the rate
against the limit, resume a stopped run, read the evaluation report.

Start: upload or paste the IDs (saved under data/uploads/ and passed as ``ids_file``), the URL
template with ``{id}``, the rate limit (``N/period``) and headers — secrets only by
environment-variable *name* (``Authorization=env:API_TOKEN``): the value is read by each
worker from its own environment and never typed into, stored by or shown on this page.
Every field is checked by the job's ``BackfillParams`` (``console.forms.check_backfill``)
before anything starts; then the run goes through ``engine.api.submit_run`` like
``python -m engine.run backfill``, and a ``ParamError`` of ``prepare`` (the ID column is not in
the file) shows under the field it names.

Until the engine registers the ``backfill`` job kind the page says so instead.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from console import forms, reads, schedules, views
from console.resources import Console, console_or_stop
from engine.api import submit_run
from engine.jobs.backfill.params import BackfillParams
from engine.jobs.params import ParamError
from engine.model import TERMINAL
from storage.runs import TRANSITIONS

SOURCES = {"Upload an ID file": "upload", "Paste IDs": "paste"}


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
        slots["ids_file"] = st.empty()
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
        burst = b.number_input(
            "Burst", step=1, key="bf_burst", **forms.number_field(BackfillParams, "burst")
        )
        a, b = st.columns([3, 1])
        slots["rate_limit"], slots["burst"] = a.empty(), b.empty()
        headers = st.text_area(
            "Headers, one a line: Name=value or Name=env:VARIABLE", key="bf_headers", height=80,
            placeholder="Authorization=env:API_TOKEN\nAccept-Language=en",
            help="Secrets only by environment variable name: each worker reads the value from "
            "its own environment; a literal value for a credential-like header is refused.",
        )  # fmt: skip
        slots["headers"] = st.empty()
        cols = st.columns(5)
        batch = cols[0].number_input(
            "Batch (IDs per task)", key="bf_batch",
            **forms.number_field(BackfillParams, "batch_size", s),
        )  # fmt: skip
        timeout = cols[1].number_input(
            "Timeout (s)", step=1.0, key="bf_timeout",
            **forms.number_field(BackfillParams, "timeout_s"),
        )  # fmt: skip
        attempts = cols[2].number_input(
            "Requests per ID", step=1, key="bf_attempts",
            **forms.number_field(BackfillParams, "item_attempts"),
        )  # fmt: skip
        workers = cols[3].number_input("Workers (pool)", value=int(pool.target), key="bf_workers")
        conc = cols[4].number_input("Concurrency (pool)", value=int(s.concurrency), key="bf_conc")
        names = ("batch_size", "timeout_s", "item_attempts", "workers", "concurrency")
        for col, name in zip(st.columns(5), names, strict=True):
            slots[name] = col.empty()
        submitted, schedule = views.start_buttons("bf")
    general = st.empty()
    if not (submitted or schedule):
        return

    result = forms.check_backfill(
        url_template=template or "",
        rate_limit=rate or "",
        burst=int(burst or 0),
        headers=headers or "",
        timeout_s=float(timeout or 0),
        item_attempts=int(attempts or 0),
        batch_size=int(batch or 0),
        workers=int(workers or 0),
        concurrency=int(conc or 0),
        duckdb=c.db.is_duckdb,
        id_column=id_column,
    )
    errors = dict(result.errors)
    data: bytes | None = None
    name = "ids.txt"
    if source == "upload":
        if upload is None:
            errors["ids_file"] = (
                "choose a file to upload (one ID a line, or a CSV with an ID column)"
            )
        else:
            data, name = upload.getvalue(), upload.name
            if err := forms.check_text(data, f"the upload {upload.name!r}"):
                errors["ids_file"] = err
    elif not (pasted or "").strip():
        errors["ids_file"] = "the ID list is empty: paste one ID a line"
    else:
        data = (pasted or "").encode()
    if not errors and name.lower().endswith(".csv") and not (id_column or "").strip():
        errors["id_column"] = "this is a CSV file: name the column that holds the IDs"
    if errors:
        views.show_errors(
            slots, errors, general, "Nothing was started: fix the fields marked above."
        )
        return
    assert data is not None
    path = forms.save_list(data, c.uploads_dir, name)
    params = {**result.params, "ids_file": str(path)}
    if schedule:
        schedules.schedule_this(c, "backfill", params, ("ids_file",))
        return
    coord = c.coordinator
    try:
        with st.spinner("Reading the IDs and planning the run…"):
            run_id = submit_run(c.db, coord.settings, "backfill", params, coord.name)
    except ParamError as exc:  # prepare's own checks (the ID column): under the field
        views.show_errors(slots, forms.param_errors(exc), general)
        return
    except ValueError as exc:
        general.error(str(exc), icon=":material/error:")
        return
    workers, conc = int(workers), int(conc)
    if conc != coord.settings.concurrency:
        coord.set_concurrency(conc)
    if workers != coord.pool.target:
        coord.resize(workers)
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
