"""Validation: start a proxy check run, watch it live, browse and export the pool.

Start: paste or upload a list (saved under data/uploads/ and passed as ``proxies_file``), or
revalidate stored proxies by filter; the form is checked field by field before anything
starts, then the run goes through ``engine.api.submit_run`` exactly as the CLI's does.
"""

from __future__ import annotations

import math

import streamlit as st

from console import forms, reads, schedules, views
from console.resources import Console, console_or_stop
from engine.api import submit_run
from engine.jobs.params import ParamError
from engine.jobs.validate.params import PROTOCOLS, REVALIDATE_MINUTES, STATUSES, ValidateParams
from engine.model import TERMINAL
from storage import dashboard as dash

SOURCES = {
    "Paste a list": "paste",
    "Upload a file": "upload",
    "Revalidate stored proxies": "revalidate",
}
ANY = "any"
TAMPERING_HELP = (
    "Alive, but they changed the canary's content (injected, stripped or rewrote it): never "
    "used by scrape runs or the gateway. The detail is in the table's last error."
)
PAGE_SIZES = (25, 50, 100, 200)
TAIL_MS = dash.LATENCY_WIDTH_MS * (dash.LATENCY_BUCKETS - 1)
LIST_HELP = (
    "One proxy a line: ip:port, scheme://ip:port, scheme://user:pass@host:port, "
    "ip:port:user:pass; # comments and blank lines are skipped; CSV with a proxy column works"
)


def _opt(value: str) -> str | None:
    return None if value == ANY else value


def start_form(c: Console) -> None:
    """The Start form; on submit: check every field, save the list, submit the run."""
    label = st.radio("What to validate", list(SOURCES), horizontal=True, key="val_source")
    source = SOURCES[label]
    s, pool = c.settings, c.coordinator.pool
    upload = None
    text: str | None = None
    minutes = hours = 0.0
    limit = 0
    status = proto = ANY
    slots: dict[str, object] = {}
    with st.form("val_form", border=True):
        if source == "paste":
            text = st.text_area(
                "Proxy list", key="val_paste", height=160, help=LIST_HELP,
                placeholder="socks5://user:pass@203.0.113.7:1080\n198.51.100.4:8080",
            )  # fmt: skip
            slots["proxies_file"] = st.empty()
        elif source == "upload":
            upload = st.file_uploader("Proxy list file (text or CSV)", key="val_upload")
            slots["proxies_file"] = st.empty()
        else:
            cols = st.columns(5)
            minutes = cols[0].number_input(
                "Checked more than N minutes ago", step=5.0, key="val_minutes",
                **forms.number_field(ValidateParams, "minutes_old", value=REVALIDATE_MINUTES),
            )  # fmt: skip
            status = cols[1].selectbox("Status", [ANY, *STATUSES], key="val_status")
            proto = cols[2].selectbox("Type", [ANY, *PROTOCOLS], key="val_type")
            hours = cols[3].number_input(
                "Never checked or older than (hours, 0 = off)", key="val_hours",
                **forms.number_field(ValidateParams, "older_than_hours", value=0.0),
            )  # fmt: skip
            limit = cols[4].number_input(
                "Limit (0 = all)", step=100, key="val_limit",
                **forms.number_field(ValidateParams, "limit", value=0),
            )  # fmt: skip
            for col, name in zip(
                st.columns(5), ("minutes_old", "status", "protocol", "older_than_hours", "limit"),
                strict=True,
            ):  # fmt: skip
                slots[name] = col.empty()
        judge = st.text_input(
            "Judge URL", value=s.judge_url or "", key="val_judge",
            placeholder="http://127.0.0.2:8080/get",
            help="An httpbin-style /get or an azenv page; it must answer a direct request",
        )  # fmt: skip
        slots["judge_url"] = st.empty()
        canary = st.text_input(
            "Canary URL (tampering check)", key="val_canary",
            placeholder="empty: the judge's /canary/ when it serves one; off: no check",
            help="A plain http:// base URL serving page.html, data.json and pixel.png: each "
            "alive proxy fetches them, and one that changes a byte is stored as tampering",
        )  # fmt: skip
        slots["canary_url"] = st.empty()
        cols = st.columns(4)
        timeout = cols[0].number_input(
            "Timeout per check (s)", step=0.5, key="val_timeout",
            **forms.number_field(ValidateParams, "timeout_s", s),
        )  # fmt: skip
        batch = cols[1].number_input(
            "Batch size (proxies per task)", step=10, key="val_batch",
            **forms.number_field(ValidateParams, "batch_size", s),
        )  # fmt: skip
        workers = cols[2].number_input(
            "Workers (pool, shared by all runs)", value=int(pool.target), step=1, key="val_workers"
        )
        concurrency = cols[3].number_input(
            "Concurrency per worker (pool)", value=int(s.concurrency), step=50, key="val_conc"
        )
        for col, name in zip(
            st.columns(4), ("timeout_s", "batch_size", "workers", "concurrency"), strict=True
        ):
            slots[name] = col.empty()
        submitted, schedule = views.start_buttons("val")
    general = st.empty()
    if not (submitted or schedule):
        return

    errors: dict[str, str] = {}
    data: bytes | str | None = text
    if source == "upload":
        if upload is None:
            errors["proxies_file"] = "choose a file to upload (text or CSV, one proxy a line)"
        else:
            data = upload.getvalue()
            if err := forms.check_text(data, f"the upload {upload.name!r}"):
                errors["proxies_file"] = err
    result = forms.check_validation(
        source=source,
        # an upload's emptiness is judged by check_text (above), a paste's here
        has_list=bool(text and text.strip()) if source == "paste" else source == "upload",
        judge_url=judge or "",
        canary_url=canary or "",
        timeout_s=float(timeout or 0),
        batch_size=int(batch or 0),
        workers=int(workers or 0),
        concurrency=int(concurrency or 0),
        duckdb=c.db.is_duckdb,
        status=_opt(status),
        protocol=_opt(proto),
        minutes_old=minutes,
        older_than_hours=hours,
        limit=int(limit or 0),
    )
    errors = {**result.errors, **errors}
    params = result.params
    if not errors and data is not None:
        name = upload.name if upload is not None else "pasted.txt"
        path = forms.save_list(data, c.uploads_dir, name)
        good, _bad, first = forms.prescan(path)
        if good == 0:
            path.unlink(missing_ok=True)
            errors["proxies_file"] = (
                f"no proxy found in the list: {first or 'it has no content lines'}"
            )
        params["proxies_file"] = str(path)
    if errors:
        views.show_errors(
            slots, errors, general, "Nothing was started: fix the fields marked above."
        )
        return
    if schedule:
        schedules.schedule_this(c, "validate", params, ("proxies_file",))
        return
    run_id = _start(c, params, int(workers), int(concurrency), slots, general)
    if run_id is not None:
        st.session_state["val_run"] = run_id


def _start(
    c: Console,
    params: dict[str, object],
    workers: int,
    concurrency: int,
    slots: dict[str, object],
    general: object,
) -> int | None:
    coord = c.coordinator
    try:
        with st.spinner("Asking the judge and planning the run…"):
            run_id = submit_run(c.db, coord.settings, "validate", params, coord.name)
    except ParamError as exc:  # prepare's own checks (the judge answers): under the field
        views.show_errors(slots, forms.param_errors(exc), general)
        return None
    except ValueError as exc:
        general.error(str(exc), icon=":material/error:")  # type: ignore[attr-defined]
        return None
    # The pool is shared: it changes only once the run is accepted (nothing on bad input).
    if concurrency != coord.settings.concurrency:
        coord.set_concurrency(concurrency)
    if workers != coord.pool.target:
        coord.resize(workers)
    with c.db.connect() as conn:
        groups = {g.name: g for g in dash.error_groups(conn, run_id)}
    note = ""
    if bad := groups.get("bad_input"):
        first = bad.examples[0] if bad.examples else (None, None)
        note = f" {bad.count:,} malformed line(s) skipped (first: {first[0]}: {first[1]})."
    general.success(f"Run {run_id} started.{note}", icon=":material/play_arrow:")  # type: ignore[attr-defined]
    return run_id


def current_run(url: str) -> int | None:
    """This session's last start, else the newest validation run."""
    run_id = st.session_state.get("val_run") or reads.latest_run_id(url, "validate")
    return None if run_id is None else int(run_id)


def live_run(url: str) -> None:
    """Progress, counts, throughput and outcomes of the current run (a fragment)."""
    run_id = current_run(url)
    if run_id is None:
        st.info("No validation run yet: start one above.", icon=":material/info:")
        return
    s = reads.summary(url, run_id)
    counts, status = s["counts"], s["status"]
    total, done = counts["total"], counts["done"]
    with st.container(key="val_run", border=True):
        st.markdown(
            f"**Run {s['run_id']}** · status **{status}** · "
            f"{views.fmt_duration(s['duration_s'])} · created {s['created_at']} UTC"
        )
        frac = min(done / total, 1.0) if total else (1.0 if status in TERMINAL else 0.0)
        st.progress(frac, text=f"{done:,} of {total:,} proxies checked")
        views.metrics(
            [
                ("checked", f"{done:,} / {total:,}"),
                ("alive", f"{counts['ok']:,}"),
                ("not alive", f"{counts['failed']:,}"),
                ("tampering", f"{counts['outcomes'].get('tampering', 0):,}"),
                ("items/s", f"{s['items_per_s']:,.1f}"),
                ("status", status),
            ]
        )
        if s.get("error"):
            st.error(s["error"])
        left, right = st.columns([3, 2])
        with left:
            tp = reads.run_throughput(url, run_id)
            views.chart(
                views.line(
                    tp["time"], tp["items/s"], "Throughput (last 90 s)", "time (UTC)", "items/s"
                ),
                key="val_throughput",
            )
        with right:
            outcomes = counts["outcomes"]
            names = sorted(outcomes, key=lambda k: -outcomes[k])
            views.chart(
                views.bars(names, [outcomes[n] for n in names], "Outcomes", "", "proxies"),
                key="val_outcomes",
            )


def _choices(column: str, present: list[str]) -> list[str]:
    """A filter's values: those stored, and every status (tampering too) even before any."""
    if column != "status":
        return present
    return [*STATUSES, *(v for v in present if v not in STATUSES)]


@st.fragment(run_every=10)
def pool_section(url: str, c: Console) -> None:
    st.subheader("Proxy pool")
    by_status = reads.pool_by_status(url)
    with st.container(key="pool_by_status"):
        views.metrics(
            [(f"pool: {s}", f"{by_status.get(s, 0):,}") for s in STATUSES],
            {"pool: tampering": TAMPERING_HELP},
        )
    cols = st.columns(6)
    picked = {
        col: cols[i].selectbox(
            col.capitalize() if col != "protocol" else "Type",
            [ANY, *_choices(col, reads.pool_values(url, col))],
            key=f"pool_{col}",
        )
        for i, col in enumerate(dash.POOL_FILTER_COLUMNS)
    }
    sort = cols[4].selectbox("Sort by", list(dash.POOL_SORTS), key="pool_sort")
    size = cols[5].selectbox("Rows per page", PAGE_SIZES, index=1, key="pool_size")
    descending = st.toggle("Descending", key="pool_desc")
    flt = dash.PoolFilter(**{k: _opt(v) for k, v in picked.items()})
    page = int(st.session_state.get("pool_page", 1))
    total, frame = reads.pool_page(url, flt, sort, descending, page, size)
    pages = max(1, math.ceil(total / size))
    if page > pages:
        page = 1
        st.session_state["pool_page"] = 1
        total, frame = reads.pool_page(url, flt, sort, descending, page, size)
    n = c.settings.proxy_history_n
    st.caption(
        f"{total:,} proxies match · page {page} of {pages} · ratios and latency over each "
        f"proxy's last {n} checks and last {n} uses by scrape runs; reliability: the lower "
        "bound of their success ratio (Wilson, 95 %), so a proven proxy ranks above a lucky one"
    )
    st.dataframe(
        frame, hide_index=True, width="stretch", key="pool_table", column_config=QUALITY_FORMAT
    )
    st.pagination(pages, key="pool_page", max_visible_pages=9)
    history_section(url, frame)
    views.download_buttons(
        url, "proxies", c.exports_dir, key="pool_dl", where=flt.pairs(), stem="proxies"
    )
    hist, by_proto, by_country, _ = reads.pool_charts(url)
    a, b, d = st.columns(3)
    with a:
        views.chart(
            views.bars(
                [f"{lo}+" if lo >= TAIL_MS else str(lo) for lo, _ in hist],
                [n for _, n in hist],
                "Latency of alive proxies",
                "ms (bucket start)",
                "proxies",
            ),
            key="chart_latency",
        )
    with b:
        views.chart(
            views.bars(
                [p for p, _ in by_proto], [n for _, n in by_proto], "Alive by type", "", "proxies"
            ),
            key="chart_protocol",
        )
    with d:
        views.chart(
            views.bars(
                [p for p, _ in by_country],
                [n for _, n in by_country],
                "Alive by country",
                "",
                "proxies",
            ),
            key="chart_country",
        )


QUALITY_FORMAT = {
    "reliability": st.column_config.NumberColumn(format="%.3f"),
    "check_ratio": st.column_config.NumberColumn("check success", format="percent"),
    "use_ratio": st.column_config.NumberColumn("use success", format="percent"),
    "check_ms_median": st.column_config.NumberColumn("median ms (checks)", format="%.0f"),
    "check_ms_mean": st.column_config.NumberColumn("mean ms (checks)", format="%.0f"),
    "use_ms_mean": st.column_config.NumberColumn("mean ms (uses)", format="%.0f"),
}


def history_section(url: str, frame: object) -> None:
    """The kept checks and uses of one proxy of the page shown, as a chart."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame) or frame.empty:
        return
    keys = dict(zip(frame["key"], frame["id"], strict=True))
    key = st.selectbox("History of proxy", list(keys), key="pool_history_proxy")
    if key is None:
        return
    events = reads.proxy_history(url, int(keys[key]))
    if not events:
        st.caption(f"{key}: no check or use kept yet")
        return
    views.chart(views.proxy_history(events, f"{key}: last checks and uses"), key="chart_history")


def main() -> None:
    st.title("Validation")
    c = console_or_stop()
    start_form(c)
    # Every second while a run is under way, every 5 s otherwise (a start reruns the page).
    run_id = current_run(c.url)
    active = run_id is not None and reads.summary(c.url, run_id)["status"] not in TERMINAL
    st.fragment(live_run, run_every=1 if active else 5)(c.url)
    pool_section(c.url, c)


if __name__ == "__main__":
    main()
