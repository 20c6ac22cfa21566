"""The Workers page's Hosts section: the fleet's machines and the workers started there over ssh.

The same engine calls as ``engine.run hosts`` / ``fleet`` (``engine.fleet``), with the same
worker environment (``engine.fleet.env.worker_env``: ``FETCHFLEET_WORKER_DB`` else the
console's own URL, the secret key, the variables named at Start), never shown: the URL only
with its password hidden. Only on PostgreSQL: a remote worker claims from the database
itself, and a DuckDB file has one process.

Every ssh call runs under a spinner and is bounded (``CONNECT_TIMEOUT_S`` to reach a host,
``COMMAND_TIMEOUT_S`` per command, ``STOP_WAIT_S`` for workers to sign off): an unreachable
or hung host costs the page seconds and says so, never a frozen page. The outcome of an
action survives the rerun that follows it in the session (``hosts_msg``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import streamlit as st

from console import views
from console.resources import Console
from engine.fleet import logs
from engine.fleet.env import secret_values, worker_env
from engine.fleet.hosts import (
    FleetError,
    HostCheck,
    add_host,
    host_problems,
    list_hosts,
    remove_host,
    test_host,
)
from engine.fleet.ssh import SshError, SshRunner
from engine.fleet.workers import fleet_status, start_workers, stop_all, stop_workers
from storage.db import redact_url
from storage.hosts import HostRow

CONNECT_TIMEOUT_S = 8
COMMAND_TIMEOUT_S = 30.0
STOP_WAIT_S = 30.0
MAX_START = 64
LOG_LINES = 100

NEEDS_POSTGRES = (
    "Remote workers need PostgreSQL: a worker on another machine claims its tasks from the "
    "database and stores its results there itself, and a DuckDB file is open in this server "
    "alone. Point the console at PostgreSQL (`FETCHFLEET_DB=postgresql://user:pass@host/db`, "
    "see Deployment on several machines in the README) to add hosts here."
)


def runner(c: Console) -> SshRunner:
    """The system ssh with the console's ssh config (FETCHFLEET_SSH_CONFIG) and short bounds."""
    return SshRunner(
        config=c.settings.ssh_config,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        command_timeout_s=COMMAND_TIMEOUT_S,
    )


def hosts_env(c: Console, pass_names: list[str] | None = None) -> dict[str, str]:
    """What workers started from this console get (FleetError: a named variable is unset)."""
    return worker_env(c.url, c.settings.worker_db, pass_names or [])


def hosts_db_caption(c: Console) -> str:
    where = (
        "FETCHFLEET_WORKER_DB"
        if c.settings.worker_db
        else "the console's own URL; set FETCHFLEET_WORKER_DB when the hosts reach PostgreSQL "
        "at another address"
    )
    return (
        f"Machines that run workers started over ssh, kept in the database so every console "
        f"and CLI sees them. Their workers reach the database at "
        f"`{redact_url(c.settings.worker_db or c.url)}` ({where}); the URL with its password "
        "and the secret key travel over the ssh channel, never on a command line."
    )


def check_rows(check: HostCheck) -> pd.DataFrame:
    """``hosts test`` as one row per check: ok, failed (with the problem) or not checked
    (an earlier one failed)."""
    reach = ("ok", "") if check.reachable else ("failed", check.problem or "")
    if not check.reachable:
        python = project = db = ("not checked", "")
    elif check.python is None:
        python, project, db = (
            ("failed", check.problem or ""),
            ("not checked", ""),
            ("not checked", ""),
        )
    elif not check.project:
        python = ("ok", f"Python {check.python}")
        project, db = ("failed", check.problem or ""), ("not checked", "")
    else:
        python, project = ("ok", f"Python {check.python}"), ("ok", "")
        db = ("ok", "") if check.db == "ok" else ("failed", check.problem or str(check.db))
    rows = [
        ("reachable over ssh", *reach),
        ("Python version", *python),
        ("project importable", *project),
        ("database reachable", *db),
    ]
    return pd.DataFrame(rows, columns=["check", "result", "detail"])


def hosts_frame(c: Console, hosts: list[HostRow]) -> pd.DataFrame:
    status = {s.name: s for s in fleet_status(c.db)}
    return pd.DataFrame(
        [
            (
                h.name,
                h.ssh_target,
                h.python,
                h.workdir,
                h.countries or "any",
                len(status[h.name].workers) if h.name in status else 0,
                ", ".join(map(str, status[h.name].launches)) if h.name in status else "",
            )
            for h in hosts
        ],
        columns=["host", "ssh", "python", "workdir", "countries", "live workers", "launches"],
    )


ADD_FIELDS = (  # (HostRow field, label, default, placeholder, help)
    ("name", "Name", "", "gpu1", "The fleet's name for it: its workers register under it"),
    (
        "ssh_target",
        "SSH target",
        "",
        "gpu1 or deploy@10.0.0.5:2222",
        "An alias of your ssh config, or [user@]host[:port]; keys or an agent, and the host "
        "key already known (connect once by hand)",
    ),
    ("python", "Python there", ".venv/bin/python", "", "Relative to the workdir, or absolute"),
    (
        "workdir",
        "Work directory there",
        "fetchfleet",
        "/srv/fetchfleet",
        "The project's checkout there, relative to the login directory or absolute",
    ),
    ("countries", "Countries (optional)", "", "India,Malaysia", "Comma-separated; empty: any"),
)


def _countries(text: str) -> str | None:
    return ",".join(p.strip() for p in text.split(",") if p.strip()) or None


def _names(text: str) -> list[str]:
    return [n for n in text.replace(",", " ").split() if n]


def _act(spinner: str, fn: Callable[[], str], forget: tuple[str, ...] = ()) -> None:
    """Run a slow (ssh) operation under a spinner; its message or error is shown after the
    rerun that brings the page up to date; ``forget`` drops session keys it made stale."""
    with st.spinner(spinner):
        try:
            msg = ("success", fn())
        except (FleetError, SshError, ValueError) as exc:
            msg = ("error", str(exc))
    st.session_state["hosts_msg"] = msg
    for key in forget:
        st.session_state.pop(key, None)
    st.rerun()


def add_form(c: Console, first: bool) -> None:
    with (
        st.expander("Add a host", expanded=first, icon=":material/add:"),
        st.form("hosts_add_form", border=False),
    ):
        cols = st.columns(2)
        values, slots = {}, {}
        for i, (field, label, default, placeholder, help_text) in enumerate(ADD_FIELDS):
            col = cols[i % 2]
            values[field] = col.text_input(
                label, value=default, placeholder=placeholder, help=help_text, key=f"hosts_{field}"
            )
            slots[field] = col.empty()  # the field's error goes under it
        general = st.empty()
        submitted = st.form_submit_button("Add host", key="hosts_add")
    if not submitted:
        return
    text = {k: (v or "").strip() for k, v in values.items()}
    row = HostRow(**{**text, "countries": _countries(text["countries"])})
    errors = host_problems(row)
    if not errors:
        try:
            add_host(c.db, row)
        except FleetError as exc:  # the name is taken
            errors = {"name": str(exc)}
    if errors:
        views.show_errors(slots, errors, general)
        return
    st.session_state["hosts_msg"] = (
        "success",
        f"added host {row.name} ({row.ssh_target}): Test connection checks it",
    )
    st.session_state["hosts_pick"] = row.name
    st.rerun()


def start_form(c: Console, host: HostRow) -> None:
    with st.form("hosts_start_form", border=True):
        a, b, d = st.columns([1, 2, 1], vertical_alignment="bottom")
        n = a.number_input("Workers to start", value=1, step=1, key="hosts_n")
        n_slot = a.empty()
        passed = b.text_input(
            "Pass variables (names)",
            key="hosts_pass",
            placeholder="SHOP_API_KEY",
            help="Variables of the console's environment the workers get too (an API token "
            "a backfill header names as env:VARIABLE), sent over the ssh channel",
        )
        pass_slot = b.empty()
        start = d.form_submit_button("Start workers", key="hosts_start", width="stretch")
    if not start:
        return
    count = int(n or 0)
    if not 1 <= count <= MAX_START:
        n_slot.error(f"start between 1 and {MAX_START} workers at a time", icon=":material/error:")
        return
    try:
        env = hosts_env(c, _names(passed or ""))
    except FleetError as exc:
        pass_slot.error(
            f"{exc}: start the console with it set, or leave it out", icon=":material/error:"
        )
        return

    def go() -> str:
        pid = start_workers(c.db, runner(c), host.name, count, env)
        return (
            f"started {count} worker(s) on {host.name} (launch pid {pid}); they show in the "
            "workers table once they register"
        )

    _act(f"Starting {count} worker(s) on {host.name}…", go)


def actions(c: Console, host: HostRow) -> None:
    a, b, d, e, deploy_slot = st.columns(5)
    if a.button("Test connection", key="hosts_test", width="stretch"):

        def check() -> str:
            result = test_host(runner(c), host, hosts_env(c))
            st.session_state.setdefault("hosts_checks", {})[host.name] = (result, time.time())
            if not result.ok:
                raise FleetError(f"{host.name}: {result.problem}")
            return f"{host.name}: every check passed"

        _act(f"Testing {host.name} over ssh…", check)
    if b.button("Stop its workers", key="hosts_stop", width="stretch"):

        def stop() -> str:
            n = stop_workers(c.db, runner(c), host.name, STOP_WAIT_S)
            return f"{host.name}: stopped {n} worker(s) (in-flight items finished)"

        _act(f"Stopping the workers on {host.name}…", stop, forget=("hosts_log",))
    if d.button("Stop all hosts", key="hosts_stop_all", width="stretch"):

        def stop_every() -> str:
            done = stop_all(c.db, runner(c), STOP_WAIT_S)
            return "; ".join(f"{h}: stopped {n} worker(s)" for h, n in done.items())

        _act("Stopping the workers on every host…", stop_every, forget=("hosts_log",))
    if e.button("Remove host", key="hosts_remove", width="stretch"):

        def remove() -> str:
            remove_host(c.db, host.name)
            st.session_state.get("hosts_checks", {}).pop(host.name, None)
            return f"removed host {host.name}"

        _act(f"Removing {host.name}…", remove, forget=("hosts_pick", "hosts_log"))
    if deploy_slot.button(
        "Deploy",
        key="hosts_deploy",
        width="stretch",
        help="copy this checkout's committed tree (HEAD) to the host's work directory and run "
        "`./run.sh install` there; restart its workers afterwards",
    ):
        install = st.session_state.get("hosts_deploy_install", True)
        _act(
            f"Deploying to {host.name} (copy, then install: minutes)…",
            lambda: deploy_to(c, host, install),
        )
    st.checkbox(
        "Deploy also installs (`./run.sh install`: .venv and requirements on the host)",
        value=True,
        key="hosts_deploy_install",
    )


def deploy_to(c: Console, host: HostRow, install: bool = True) -> str:
    """``engine.fleet.deploy`` with its steps as the message (a failure: the step, its
    message and the last lines of its output, raised as the error shown)."""
    from engine.fleet.deploy import DeployError, DeployStep, deploy

    steps: list[DeployStep] = []
    try:
        done = deploy(c.db, runner(c), host.name, install=install, progress=steps.append)
    except DeployError as exc:  # its text: the step, what failed, the output's last lines
        went = [f"{s.step}: {s.message}" for s in steps if s.status in ("ok", "warning")]
        raise FleetError("\n".join([*went, str(exc)])) from None
    said = "; ".join(f"{s.step} {s.status}" for s in steps if s.status != "start")
    return f"{host.name} runs version {done.version} now ({said}); restart its workers to use it"


def checks_view(name: str) -> None:
    found = st.session_state.get("hosts_checks", {}).get(name)
    if found is None:
        return
    check, at = found
    st.caption(f"Connection test of {name} at {time.strftime('%H:%M:%S', time.localtime(at))}")
    st.dataframe(check_rows(check), hide_index=True, width="stretch", key="hosts_checks_table")


def log_view(c: Console, host: HostRow) -> None:
    st.markdown("**Worker logs**")
    found = logs.launches(c.db, host.name)
    if not found:
        st.caption(
            f"No launch recorded on {host.name}: each Start writes a log there (a stop "
            "forgets the host's launches)."
        )
        return
    labels = {f"pid {x.pid} — {PurePosixPath(x.log_path).name}": x for x in found}
    a, b, d = st.columns([3, 1, 1], vertical_alignment="bottom")
    label = a.selectbox("Launch", list(labels), index=len(labels) - 1, key="hosts_launch")
    lines = b.number_input("Lines", value=LOG_LINES, step=50, key="hosts_log_lines")
    if d.button("Show / refresh log", key="hosts_log_show", width="stretch"):
        launch = labels[label or list(labels)[-1]]
        count = max(1, min(int(lines or LOG_LINES), logs.MAX_LINES))

        def read() -> str:
            text = logs.last_lines(runner(c), host, launch, count, secret_values(hosts_env(c)))
            st.session_state["hosts_log"] = (
                host.name,
                launch.pid,
                launch.log_path,
                text,
                time.time(),
            )
            return f"read the last {len(text)} line(s) of {host.name}'s launch {launch.pid}"

        _act(f"Reading the log on {host.name}…", read)
    shown: Any = st.session_state.get("hosts_log")
    if shown and shown[0] == host.name and shown[1] in {x.pid for x in found}:
        _, pid, path, text, at = shown
        st.caption(
            f"Last {len(text)} line(s) of {path} on {host.name} (launch {pid}), read at "
            f"{time.strftime('%H:%M:%S', time.localtime(at))}"
        )
        st.code("\n".join(text) or "(the log is empty so far)", language=None)


def flash() -> None:
    msg = st.session_state.pop("hosts_msg", None)
    if msg:
        kind, text = msg
        (st.success if kind == "success" else st.error)(text)


def section(c: Console) -> None:
    """The Hosts section (only with PostgreSQL)."""
    st.header("Hosts", divider="gray")
    if c.db.is_duckdb:
        st.info(NEEDS_POSTGRES, icon=":material/info:")
        return
    st.caption(hosts_db_caption(c))
    hosts = list_hosts(c.db)
    add_form(c, first=not hosts)
    if not hosts:
        flash()
        st.info("No host yet: add one above, then test the connection and start workers.")
        return
    st.dataframe(hosts_frame(c, hosts), hide_index=True, width="stretch", key="hosts_table")
    names = [h.name for h in hosts]
    if st.session_state.get("hosts_pick") not in names:
        st.session_state["hosts_pick"] = names[0]
    name = st.selectbox("Host", names, key="hosts_pick")
    host = next(h for h in hosts if h.name == name)
    start_form(c, host)
    actions(c, host)
    flash()
    checks_view(host.name)
    log_view(c, host)
