"""Runs & errors: a run's error snapshots (the first page of each error kind), viewable and
downloadable.

The HTML came from the sites we scrape, often hostile ones (block pages): it is shown as
escaped source, and rendered only inside an iframe with an empty ``sandbox`` (no scripts,
no forms, no same-origin access to the console) under a Content-Security-Policy that
forbids every network request (a page cannot call home from the operator's browser).
"""

from __future__ import annotations

import html as html_lib

import streamlit as st

from console import reads

#: what the rendered view may load: nothing from the network, inline styles, data: images
RENDER_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:"
SOURCE_CHARS = 200_000  # shown as source (the download has the whole kept HTML)


def sandboxed_iframe(page_html: str, height: int = 480) -> str:
    """The page in an iframe that runs nothing and fetches nothing."""
    doc = f'<meta http-equiv="Content-Security-Policy" content="{RENDER_CSP}">{page_html}'
    return (
        f'<iframe sandbox="" referrerpolicy="no-referrer" srcdoc="{html_lib.escape(doc)}" '
        f'style="width:100%;height:{height}px;border:1px solid #ccc;background:#fff"></iframe>'
    )


def snapshots_section(url: str, run_id: int) -> None:
    snaps = reads.error_snapshots(url, run_id)
    st.markdown(f"**Error snapshots** · {len(snaps)}")
    if not snaps:
        st.caption(
            "none for this run: a scrape run keeps the first page of each error kind "
            "(blocked, validation, invalid entity, extraction error)"
        )
        return
    st.dataframe(
        [
            {
                "kind": s["kind"],
                "url": s["url"],
                "method": s["method"],
                "status": s["status"],
                "when": s["captured_at"],
                "message": s["message"],
                "KB": round((s["html_kept"] or 0) / 1024, 1),
                "screenshot": s["has_screenshot"],
            }
            for s in snaps
        ],
        hide_index=True,
        width="stretch",
        key="run_snapshots",
    )
    by_id = {s["id"]: s for s in snaps}
    pick = st.selectbox(
        "Snapshot",
        list(by_id),
        format_func=lambda i: f"{by_id[i]['kind']} · {by_id[i]['url']}",
        key="snapshot_pick",
    )
    snap = reads.error_snapshot(url, run_id, int(pick))
    if snap is None:
        st.caption("this snapshot is gone")
        return
    page = (snap["html"] or b"").decode("utf-8", "replace")
    cut = snap["html_bytes"] and snap["html_bytes"] > len(snap["html"] or b"")
    st.caption(
        f"{snap['method'] or '-'} · status {snap['status'] or '-'} · {snap['captured_at']} UTC"
        + (f" · HTML cut at {len(snap['html']):,} of {snap['html_bytes']:,} bytes" if cut else "")
    )
    st.text(snap["message"] or "")
    shot, rendered, source = st.tabs(["Screenshot", "Rendered (sandboxed)", "HTML source"])
    with shot:
        if snap["screenshot"]:
            st.image(snap["screenshot"], caption=f"{snap['kind']} (screenshot)")
        else:
            st.caption("no screenshot: the page was fetched without a browser, or after it")
    with rendered:
        st.markdown(sandboxed_iframe(page), unsafe_allow_html=True)
    with source:
        st.code(page[:SOURCE_CHARS], language="html", wrap_lines=True)
    stem = f"run-{run_id}-{snap['kind'].replace(':', '-')}"
    c1, c2, c3, _ = st.columns([1, 1, 1, 2])
    c1.download_button(
        "HTML",
        data=snap["html"] or b"",
        file_name=f"{stem}.html",
        mime="text/html",
        key="snapshot_html",
        on_click="ignore",
        icon=":material/download:",
    )
    if snap["screenshot"]:
        c2.download_button(
            "Screenshot",
            data=snap["screenshot"],
            file_name=f"{stem}.png",
            mime="image/png",
            key="snapshot_png",
            on_click="ignore",
            icon=":material/download:",
        )
    c3.download_button(
        "All (zip)",
        data=lambda: reads.snapshots_zip(url, run_id),
        file_name=f"run-{run_id}-snapshots.zip",
        mime="application/zip",
        key="snapshots_zip",
        on_click="ignore",
        icon=":material/download:",
    )
