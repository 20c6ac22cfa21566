"""Scraping: start a scrape run from a spec, watch it live, browse and export its entities.

Start: pick a spec under ``specs/`` or upload one; its text is shown and can be edited before
Start. The form is checked field by field (``console.forms.check_scrape``: the spec with
``parse_spec`` — TOML line and column, or the field path —, the country against the spec's
sources, and ``ScrapeParams`` for the method order and the numbers), then the run goes
through ``engine.api.submit_run`` like ``python -m engine.run scrape`` and
``ScrapeJob.prepare`` runs its own checks (start URLs, start-URL files); a ``ParamError``
shows under the field it names. Files are read bounded (``engine.files``) and only from
specs/ and the uploads directory (``file_roots``): a start_urls_file elsewhere is refused.
Live: pages/s, the success ratio, which method won per country, why attempts were blocked.
The entities table is paged in SQL (``storage.dashboard.entity_page``) and downloads stream
(``storage.export.export_entities``).

Until the engine registers the ``scrape`` job kind the page says so instead.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import streamlit as st

from console import forms, reads, schedules, views
from console.resources import Console, console_or_stop
from engine import files
from engine.api import submit_run
from engine.jobs.params import ParamError
from engine.jobs.scrape.params import ScrapeParams
from engine.model import TERMINAL
from storage.runs import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"
DEMO_SPEC = "sim_shops.toml"  # chosen first: the demo's shops (`python -m sim.shops`) run it
SOURCES = {"A spec under specs/": "file", "Upload a spec": "upload"}
METHODS = ("http", "playwright", "selenium", "tor", "api")
PROXIES = {"direct (no proxy)": None, "stored proxies: active": "active"}
ALL = "all countries"
PAGE_SIZES = (25, 50, 100, 200)


def spec_files() -> list[str]:
    return sorted(p.name for p in SPECS_DIR.glob("*.toml")) if SPECS_DIR.is_dir() else []


def spec_chooser(slot_errors: dict[str, str]) -> tuple[str, str, Path]:
    """The spec's source and its editable text; returns (text, name, base directory).

    Choosing another file or upload loads its text into the editor; edits stay until then.
    """
    label = st.radio("Spec", list(SOURCES), horizontal=True, key="sc_source")
    source = SOURCES[label]
    name, base_dir, loaded, text = "spec", SPECS_DIR, "none", ""
    if source == "file":
        names = spec_files()
        if not names:
            st.info(f"No spec under {SPECS_DIR}: upload one or write it below.")
        else:
            first = names.index(DEMO_SPEC) if DEMO_SPEC in names else 0
            name = st.selectbox("Spec file", names, index=first, key="sc_file")
            loaded = f"file:{name}"
            try:  # bounded, and only what lies in specs/ (a symlink out of it is refused)
                text = files.read_text_bounded(
                    SPECS_DIR / name, files.MAX_SPEC_BYTES, [SPECS_DIR], "spec file"
                )
            except files.FileRefused as exc:
                slot_errors["spec"] = str(exc)
            name = f"specs/{name}"
    else:
        upload = st.file_uploader("Spec file (TOML)", type=["toml", "txt"], key="sc_upload")
        if upload is not None:
            data = upload.getvalue()
            name, loaded = upload.name, f"upload:{upload.file_id}"
            if err := forms.check_text(data, f"the upload {upload.name!r}", files.MAX_SPEC_BYTES):
                slot_errors["spec"] = err.replace("one proxy a line", "a TOML scrape spec")
            else:
                text = data.decode("utf-8", errors="replace")
    if st.session_state.get("sc_loaded") != loaded:
        st.session_state["sc_text"] = text
        st.session_state["sc_loaded"] = loaded
    return name, source, base_dir


def start_form(c: Console) -> None:
    errors: dict[str, str] = {}
    name, _source, base_dir = spec_chooser(errors)
    text = st.text_area(
        "Spec text (TOML; edit before Start)", key="sc_text", height=300,
        help="The spec format: engine/jobs/scrape/spec.py and README.md ('Scrape specs'). "
        "It travels with the run as text; start_urls_file paths are relative to specs/.",
    )  # fmt: skip
    slots: dict[str, Any] = {"spec": st.empty()}
    countries = forms.spec_countries(text or "")
    if countries:
        st.caption(f"sources: {', '.join(countries)}")
    s, pool = c.settings, c.coordinator.pool
    with st.form("sc_form", border=True):
        cols = st.columns([2, 3, 2])
        country = cols[0].selectbox(
            "Country", [forms.EVERY_SOURCE, *countries], key="sc_country",
            accept_new_options=True, help="Only this country's sources of the spec",
        )  # fmt: skip
        methods = cols[1].multiselect(
            "Method order override (in the order picked)", list(METHODS), key="sc_methods",
            help="Empty: the source's or spec's order, else the country's row of the policy",
        )  # fmt: skip
        proxies = cols[2].selectbox("Route through", list(PROXIES), key="sc_proxies")
        for col, field in zip(
            st.columns([2, 3, 2]), ("country", "methods", "proxies"), strict=True
        ):
            slots[field] = col.empty()
        cols = st.columns(4)
        max_pages = cols[0].number_input(
            "Max pages (0 = the spec's)", step=100, key="sc_max_pages",
            **forms.number_field(ScrapeParams, "max_pages", value=0),
        )  # fmt: skip
        batch = cols[1].number_input(
            "Batch (pages per task)", key="sc_batch",
            **forms.number_field(ScrapeParams, "batch_size", s),
        )  # fmt: skip
        workers = cols[2].number_input("Workers (pool)", value=int(pool.target), key="sc_workers")
        conc = cols[3].number_input("Concurrency (pool)", value=int(s.concurrency), key="sc_conc")
        names = ("max_pages", "batch_size", "workers", "concurrency")
        for col, field in zip(st.columns(4), names, strict=True):
            slots[field] = col.empty()
        stop_when = st.text_input(
            "Stop rules (comma-separated; empty: none)",
            value=", ".join(ScrapeParams.default_stop_rules), key="sc_stop_when",
            help="The run stops itself (resumable) when one holds: METRIC>THRESHOLD[/WINDOW], "
            "e.g. blocked_ratio>0.8/50 (last 50 pages), error_ratio>0.5/10m, http_429>50/5m, "
            "browser_s>3600, proxy_mb>500, no_progress>30m. README: Automatic stop rules.",
        )  # fmt: skip
        slots["stop_when"] = st.empty()
        submitted, schedule = views.start_buttons("sc")
    general = st.empty()
    if not (submitted or schedule):
        if "spec" in errors:
            views.field_error(slots["spec"], errors, "spec")
        return
    result = forms.check_scrape(
        spec_text=text or "",
        spec_name=name,
        base_dir=base_dir,
        country=country,
        methods=list(methods or []),
        max_pages=int(max_pages or 0),
        batch_size=int(batch or 0),
        workers=int(workers or 0),
        concurrency=int(conc or 0),
        duckdb=c.db.is_duckdb,
        proxies=PROXIES[proxies],
        stored_proxies=reads.pool_status_count(c.url, PROXIES[proxies]),
        file_roots=[SPECS_DIR, c.uploads_dir],  # the only places the console reads files from
        stop_when=stop_when or "",
    )
    errors = {**result.errors, **errors}
    if errors:
        views.show_errors(
            slots, errors, general, "Nothing was started: fix the fields marked above."
        )
        return
    if schedule:
        schedules.schedule_this(c, "scrape", result.params, ())
        return
    coord = c.coordinator
    try:
        with st.spinner("Checking the spec and registering its start URLs…"):
            run_id = submit_run(c.db, coord.settings, "scrape", result.params, coord.name)
    except ParamError as exc:  # prepare's own checks (start URLs): under the field
        views.show_errors(slots, forms.param_errors(exc), general)
        return
    except ValueError as exc:
        general.error(str(exc), icon=":material/error:")
        return
    if int(conc) != coord.settings.concurrency:
        coord.set_concurrency(int(conc))
    if int(workers) != coord.pool.target:
        coord.resize(int(workers))
    st.session_state["sc_run"] = run_id
    st.session_state["sc_pick"] = run_id
    general.success(f"Run {run_id} started.", icon=":material/play_arrow:")


def pick_run(url: str) -> int | None:
    """The run shown below: picked from the scrape runs (this session's start first)."""
    ids = reads.run_ids(url, "scrape")
    if not ids:
        return None
    mine = st.session_state.get("sc_run")
    if mine is not None and int(mine) not in ids:  # just started: not in the cached list yet
        ids = [int(mine), *ids]
    if st.session_state.get("sc_pick") not in ids:
        st.session_state["sc_pick"] = int(mine) if mine is not None else ids[0]
    return int(st.selectbox("Run", ids, key="sc_pick", help="The newest scrape runs"))


def _act(c: Console, run_id: int, action: str) -> None:
    try:
        status = c.coordinator.command(run_id, action, source="console")
    except ValueError as exc:
        st.session_state["sc_msg"] = ("error", str(exc))
    else:
        st.session_state["sc_msg"] = ("ok", f"run {run_id}: {action} → {status}")


def live_run(c: Console, run_id: int) -> None:
    """Progress, rates, the method mix and blocked reasons of one run (a fragment)."""
    s = reads.summary(c.url, run_id)
    live = reads.scrape_live(c.url, run_id)
    p, status = live.progress, s["status"]
    with st.container(key="sc_live", border=True):
        st.markdown(
            f"**Run {run_id}** · status **{status}** · "
            f"{views.fmt_duration(s['duration_s'])} · created {s['created_at']} UTC"
        )
        frac = p.fetched / p.registered if p.registered else (1.0 if status in TERMINAL else 0.0)
        st.progress(
            min(frac, 1.0), text=f"{p.fetched:,} of {p.registered:,} registered pages fetched"
        )
        ratio = "—" if p.success_ratio is None else f"{p.success_ratio:.0%}"
        shown = [
            ("pages", f"{p.fetched:,} / {p.registered:,}"),
            ("done", f"{p.done:,}"),
            ("blocked", f"{p.by_status.get('blocked', 0):,}"),
            ("failed", f"{p.by_status.get('failed', 0):,}"),
            ("pages/s", f"{p.pages_per_s:,.1f}"),
            ("success", ratio),
            ("entities", f"{p.entities_seen:,} ({p.entities_new:,} new)"),
        ]
        if disallowed := p.by_status.get("disallowed", 0):
            shown.insert(4, ("robots.txt", f"{disallowed:,}"))
        views.metrics(
            shown,
            {
                "robots.txt": "Pages robots.txt disallows: recorded, not requested",
                "pages/s": f"Pages fetched over the last {p.recent_s:g} seconds, per second",
                "success": "Pages done over pages requested (after the whole cascade)",
                "entities": "Entities this run saw; new: first seen in this run",
            },
        )
        buttons = st.columns(6)
        for col, action in zip(buttons, ("stop", "resume", "cancel"), strict=False):
            col.button(
                action.capitalize(),
                key=f"sc_{action}",
                disabled=status not in TRANSITIONS[action][0],
                on_click=_act,
                args=(c, run_id, action),
                width="stretch",
            )
        if msg := st.session_state.pop("sc_msg", None):
            (st.error if msg[0] == "error" else st.success)(msg[1])
        if s.get("error"):
            st.error(s["error"])
        left, mid, right = st.columns(3)
        with left:
            tp = reads.run_throughput(c.url, run_id)
            views.chart(
                views.line(
                    tp["time"], tp["items/s"], "Pages/s (last 90 s)", "time (UTC)", "pages/s"
                ),
                key="sc_rate_chart",
            )
        with mid:
            views.chart(
                views.stacked_bars(
                    live.method_mix,
                    "Which method won, per country",
                    "",
                    "pages done",
                ),
                key="sc_mix_chart",
            )
        with right:
            views.chart(
                views.stacked_bars(
                    live.blocked,
                    "Blocked attempts by reason",
                    "",
                    "attempts",
                ),
                key="sc_blocked_chart",
            )
        if not live.blocked:
            st.caption("No attempt of this run was blocked.")
        views.cost_section(reads.run_cost(c.url, run_id, "scrape"), key="sc_cost", domains=True)


def entities_section(c: Console, run_id: int) -> None:
    """The run's entities, one page at a time, with their attributes as columns."""
    st.subheader("Entities")
    a, b = st.columns([3, 1])
    countries = reads.entity_countries(c.url, run_id)
    picked = a.selectbox("Country", [ALL, *countries], key="sc_ent_country")
    size = b.selectbox("Rows per page", PAGE_SIZES, index=1, key="sc_ent_size")
    country = None if picked == ALL else picked
    page = int(st.session_state.get("sc_ent_page", 1))
    total, frame = reads.entity_page(c.url, run_id, country, page, size)
    pages = max(1, math.ceil(total / size))
    if page > pages:
        page = 1
        st.session_state["sc_ent_page"] = 1
        total, frame = reads.entity_page(c.url, run_id, country, page, size)
    st.caption(
        f"{total:,} entities seen last by run {run_id}"
        + (f" in {country}" if country else "")
        + f" · page {page} of {pages}"
    )
    st.dataframe(frame, hide_index=True, width="stretch", key="sc_entities")
    st.pagination(pages, key="sc_ent_page", max_visible_pages=9)
    stem = f"entities-run{run_id}" + (f"-{country}" if country else "")
    views.download_pair(
        lambda fmt: reads.entities_export_bytes(c.url, fmt, c.exports_dir, run_id, country),
        key="sc_dl",
        stem=re.sub(r"[^A-Za-z0-9._-]+", "_", stem),
    )


def main() -> None:
    st.title("Scraping")
    c = console_or_stop()
    start_form(c)
    st.subheader("Runs")
    run_id = pick_run(c.url)
    if run_id is None:
        st.info("No scrape run yet: start one above.", icon=":material/info:")
        return
    active = reads.summary(c.url, run_id)["status"] not in TERMINAL
    st.fragment(live_run, run_every=1 if active else 5)(c, run_id)
    st.fragment(entities_section, run_every=5 if active else None)(c, run_id)


if __name__ == "__main__":
    main()
