"""Workers: every worker (this server's pool and, with PostgreSQL, standalone and remote
ones) with host, pid, status, heartbeat age, the tasks it holds, items done and items/s;
the pool size and concurrency controls; stopping one worker; with PostgreSQL the Hosts
section (``console.hosts``): machines that run workers started over ssh.

Pool size → ``Coordinator.resize`` (grow now; shrink by asking the newest workers to finish
and exit). Concurrency → ``Coordinator.set_concurrency`` (each worker is replaced gracefully).
Stop → ``Coordinator.stop_worker`` for this pool's processes; for a worker of another process
a ``stop`` command row, which that worker reads on its next claim.
"""

from __future__ import annotations

import streamlit as st

from console import hosts, reads, views
from console.resources import Console, console_or_stop
from storage import runs as run_store
from storage.dashboard import ALIVE_WORKER_STATUSES


def pool_controls(c: Console) -> None:
    coord = c.coordinator
    pool = coord.pool
    st.caption(
        f"Local pool of this server (`{coord.name}`): {len(pool.active())} running of "
        f"{pool.target} wanted, {coord.settings.concurrency} items in flight each. Changes "
        "apply to every run: batch size and timeout are per run (Validation page)."
    )
    with st.form("pool_form", border=True):
        a, b = st.columns(2)
        size = a.number_input(
            "Pool size (local workers)", value=int(pool.target), step=1, key="pool_size"
        )
        size_slot = a.empty()
        conc = b.number_input(
            "Concurrency (items in flight per worker)",
            value=int(coord.settings.concurrency),
            step=50,
            key="pool_conc",
        )
        conc_slot = b.empty()
        applied = st.form_submit_button("Apply", key="pool_apply")
    if not applied:
        return
    size, conc = int(size or 0), int(conc or 0)
    ok = True
    if not 0 <= size <= 256:
        size_slot.error("the pool size must be between 0 and 256")
        ok = False
    elif size == 0 and c.db.is_duckdb:
        size_slot.error("with DuckDB nothing runs without a local worker: keep at least 1")
        ok = False
    if not 1 <= conc <= 10_000:
        conc_slot.error("concurrency must be between 1 and 10,000")
        ok = False
    if not ok:
        return
    if conc != coord.settings.concurrency:
        coord.set_concurrency(conc)
    if size != pool.target:
        coord.resize(size)
    st.success(f"pool: {size} worker(s) × {conc} concurrent")


def _stop(c: Console) -> None:
    worker_id = st.session_state.get("workers_pick")
    if not worker_id:
        return
    local = worker_id in c.coordinator.pool.members
    c.coordinator.stop_worker(worker_id)
    if local:  # the pool shrank by one: the size control shows the new size
        st.session_state["pool_size"] = c.coordinator.pool.target
    if not local:
        with c.db.begin() as conn:
            run_store.command_worker(conn, worker_id, "stop", "console")
    st.session_state["workers_msg"] = (
        f"asked {worker_id} to finish its in-flight items and exit"
        + (
            f"; the pool is now {c.coordinator.pool.target} worker(s)"
            if local
            else " (it reads the command on its next claim)"
        )
    )


@st.fragment(run_every=2)
def live_workers(c: Console) -> None:
    frame = reads.workers_frame(c.url)
    alive = frame[frame["status"].isin(ALIVE_WORKER_STATUSES)] if not frame.empty else frame
    handled = int(frame["items_done"].sum() + frame["items_failed"].sum()) if len(frame) else 0
    with st.container(key="workers_live"):
        views.metrics(
            [
                ("workers alive", len(alive)),
                ("busy", int((frame["status"] == "busy").sum()) if not frame.empty else 0),
                ("items/s", f"{alive['items_per_s'].sum() if not alive.empty else 0:,.1f}"),
                ("items handled", f"{handled:,}"),
            ]
        )
        if gap := reads.country_warning(c.url, c.settings.lease_s):
            st.warning(gap, icon="⚠️")
        if frame.empty:
            st.info("No worker has registered yet.")
            return
        st.dataframe(
            frame,
            hide_index=True,
            width="stretch",
            key="workers_table",
            column_config={
                "heartbeat_age_s": st.column_config.NumberColumn("heartbeat age (s)"),
                "items_per_s": st.column_config.NumberColumn("items/s (30 s)"),
                "avg_items_per_s": st.column_config.NumberColumn("items/s (lifetime)"),
            },
        )
    if not alive.empty:
        a, b = st.columns([3, 1], vertical_alignment="bottom")
        a.selectbox("Worker", list(alive["worker"]), key="workers_pick")
        b.button(
            "Stop worker",
            key="workers_stop",
            on_click=_stop,  # reads the pick from the session: the value at click time
            args=(c,),
            width="stretch",
        )
    if msg := st.session_state.pop("workers_msg", None):
        st.success(msg)


def main() -> None:
    st.title("Workers")
    c = console_or_stop()
    pool_controls(c)
    live_workers(c)
    hosts.section(c)


if __name__ == "__main__":
    main()
