"""The Workers page's Hosts section under Streamlit's AppTest: form checks field by field, and
the whole path against the network-namespace lab (tests/fleet_lab.py): add two hosts, test
them, start a worker, see it in the live table under its host, read its log, stop, remove.

The console runs on a real PostgreSQL database with a password in its URL (trust auth ignores
it): nothing the page shows may contain it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console import reads
from console.hosts import NEEDS_POSTGRES
from console.resources import get_console, shutdown_all
from console.testing import run_page, use_fresh_database
from engine.fleet.hosts import list_hosts
from tests.conftest import require_tool
from tests.fleet_lab import PASSWORD, ROOT, fleet_env, launch_logs, wait_for, with_password
from tests.netns import Lab

PAGE = "pages/workers.py"


@pytest.fixture
def pg_console(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A console on PostgreSQL (password in the URL), no local pool."""
    use_fresh_database(tmp_path, monkeypatch, workers=0)
    url = with_password(pg_url, "127.0.0.1")
    monkeypatch.setenv("FETCHFLEET_DB", url)
    monkeypatch.setenv("FETCHFLEET_HEARTBEAT_S", "1")
    try:
        yield url
    finally:
        shutdown_all()


@pytest.fixture
def lab_console(lab: Lab, pg_console: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The console driving the lab: the hosts' database URL and the lab's ssh config."""
    for name, value in fleet_env(lab, pg_url).items():
        monkeypatch.setenv(name, value)
    return pg_console


def page_text(at: Any) -> str:
    return " ".join(str(getattr(e, "value", "")) for e in at.main)


def form_block(at: Any, form_id: str) -> Any:
    return next(f for f in at.form if f.proto.form.form_id == form_id)


def add_host(at: Any, name: str, ssh: str, workdir: str = str(ROOT), countries: str = "") -> Any:
    at.text_input(key="hosts_name").set_value(name)
    at.text_input(key="hosts_ssh_target").set_value(ssh)
    at.text_input(key="hosts_python").set_value(sys.executable)
    at.text_input(key="hosts_workdir").set_value(workdir)
    at.text_input(key="hosts_countries").set_value(countries)
    return at.form_submit_button(key="hosts_add").click().run()


def frame_with(at: Any, column: str) -> Any:
    """The table on the page that has ``column`` (a dataframe's key is not in AppTest's tree),
    or None."""
    found = [d.value for d in at.dataframe if column in d.value.columns]
    return found[0] if found else None


def checks(at: Any) -> dict[str, tuple[str, str]]:
    frame = frame_with(at, "check")
    return {r["check"]: (r["result"], r["detail"]) for _, r in frame.iterrows()}


def test_hosts_section_needs_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fresh_database(tmp_path, monkeypatch, workers=0)
    try:
        at = run_page(PAGE)
        assert not at.exception, at.exception
        assert "Hosts" in [h.value for h in at.header]
        assert NEEDS_POSTGRES in [i.value for i in at.info]
        assert not [t for t in at.text_input if t.key and t.key.startswith("hosts_")]
    finally:
        shutdown_all()


def test_add_host_form_says_which_field_is_wrong(pg_console: str) -> None:
    at = run_page(PAGE)
    assert not at.exception, at.exception
    assert any("No host yet" in i.value for i in at.info)
    assert "***@" in page_text(at) and PASSWORD not in page_text(at)

    add_host(at, "", "-oProxyCommand=touch /tmp/x", workdir="", countries="India,<b>")
    form = form_block(at, "hosts_add_form")
    left, right = form.columns[0], form.columns[1]
    assert [e.value for e in left.error] == [
        "a host needs a name (letters, digits, '.', '_' or '-'), e.g. gpu1",
        "countries '<b>': write names separated by commas, e.g. India,Malaysia",
    ]
    assert [e.value for e in right.error] == [
        "ssh target '-oProxyCommand=touch /tmp/x': write an ssh_config alias or [user@]host[:port]",
        "the project directory there is needed, e.g. fetchfleet or /srv/fetchfleet",
    ]

    add_host(at, "gpu 1", "deploy@10.0.0.5:2222")
    assert [e.value for e in form_block(at, "hosts_add_form").columns[0].error] == [
        "host name 'gpu 1': use only letters, digits, '.', '_' or '-' (at most 63 characters, "
        "no spaces): it labels the host's workers and names their logs"
    ]
    assert list_hosts(get_console(pg_console).db) == []  # nothing stored

    add_host(at, "gpu1", "deploy@10.0.0.5:2222", countries=" India , Malaysia ")
    assert "added host gpu1" in at.success[0].value
    add_host(at, "gpu1", "other")
    assert "exists already" in form_block(at, "hosts_add_form").columns[0].error[0].value
    [host] = list_hosts(get_console(pg_console).db)
    # stored in the normal form (ISO codes) every worker filter compares
    assert (host.ssh_target, host.countries) == ("deploy@10.0.0.5:2222", "IN,MY")

    # a host ssh cannot reach: the first check fails with ssh's reason, the others wait
    require_tool("ssh", "openssh-client")
    add_host(at, "nowhere", "nobody@ff-no-such-host.invalid")
    at.selectbox(key="hosts_pick").set_value("nowhere").run()
    at.button(key="hosts_test").click().run()
    assert "Could not resolve hostname ff-no-such-host.invalid" in at.error[0].value
    got = checks(at)
    assert (
        got["reachable over ssh"][0] == "failed"
        and "Could not resolve" in got["reachable over ssh"][1]
    )
    assert {got[k][0] for k in got if k != "reachable over ssh"} == {"not checked"}
    at.button(key="hosts_remove").click().run()
    assert "removed host nowhere" in at.success[0].value

    at.number_input(key="hosts_n").set_value(0)
    at.form_submit_button(key="hosts_start").click().run()
    assert "start between 1 and 64 workers" in form_block(at, "hosts_start_form").error[0].value
    at.number_input(key="hosts_n").set_value(1)
    at.text_input(key="hosts_pass").set_value("FF_NOT_SET_ANYWHERE")
    at.form_submit_button(key="hosts_start").click().run()
    assert "FF_NOT_SET_ANYWHERE: not set in this environment" in (
        form_block(at, "hosts_start_form").error[0].value
    )


def wait_table(at: Any, cond: Any, within_s: float = 60.0) -> Any:
    """Rerun the page until the live workers table satisfies ``cond``; returns the frame."""
    frame: Any = None

    def ready() -> bool:
        nonlocal frame
        reads.st.cache_data.clear()
        at.run()
        frame = frame_with(at, "heartbeat_age_s")
        return frame is not None and bool(cond(frame))

    wait_for(ready, within_s, "the workers table")
    return frame


def test_hosts_from_the_console_on_two_lab_hosts(lab: Lab, lab_console: str, pg_url: str) -> None:
    at = run_page(PAGE)
    assert not at.exception, at.exception
    for name, host in zip(["h0", "h1"], lab.hosts, strict=True):
        add_host(at, name, host.alias)
        assert f"added host {name} ({host.alias})" in at.success[0].value
    table = frame_with(at, "live workers")
    assert list(table["host"]) == ["h0", "h1"] and list(table["live workers"]) == [0, 0]

    # the connection test, check by check
    for name in ("h0", "h1"):
        at.selectbox(key="hosts_pick").set_value(name).run()
        at.button(key="hosts_test").click().run()
        assert f"{name}: every check passed" in at.success[0].value, page_text(at)
        python = ".".join(map(str, sys.version_info[:3]))
        assert checks(at) == {
            "reachable over ssh": ("ok", ""),
            "Python version": ("ok", f"Python {python}"),
            "project importable": ("ok", ""),
            "database reachable": ("ok", ""),
        }
    # a failing check says which and why
    add_host(at, "broken", lab.hosts[1].alias, workdir="/nonexistent-ff")
    at.selectbox(key="hosts_pick").set_value("broken").run()
    at.button(key="hosts_test").click().run()
    assert "broken: no directory /nonexistent-ff there" in at.error[0].value
    got = checks(at)
    assert got["reachable over ssh"][0] == got["Python version"][0] == "ok"
    assert got["project importable"] == ("failed", "no directory /nonexistent-ff there")
    assert got["database reachable"][0] == "not checked"
    at.button(key="hosts_remove").click().run()
    assert "removed host broken" in at.success[0].value

    # start one worker on h0: it registers under its host's name
    at.selectbox(key="hosts_pick").set_value("h0").run()
    at.number_input(key="hosts_n").set_value(1)
    at.form_submit_button(key="hosts_start").click().run()
    assert "started 1 worker(s) on h0" in at.success[0].value, page_text(at)
    frame = wait_table(
        at, lambda f: (f["host"] == "h0").any() and f["status"].isin(["idle", "busy"]).any()
    )
    row = frame[frame["host"] == "h0"].iloc[0]
    assert row["kind"] == "standalone" and row["heartbeat_age_s"] is not None
    assert frame_with(at, "live workers").set_index("host")["live workers"]["h0"] == 1

    # its log: the last lines, read over ssh
    [log] = launch_logs(pg_url)
    wait_for(lambda: " joined " in log.read_text(), 60, "the worker's joined line")
    at.button(key="hosts_log_show").click().run()
    shown = at.code[-1].value
    assert " joined " in shown and "***@" in shown, shown
    assert f"{log}" in " ".join(c.value for c in at.caption)
    with log.open("a") as f:
        f.write("a line written later\n")
    at.button(key="hosts_log_show").click().run()  # refresh
    assert at.code[-1].value.endswith("a line written later")
    assert PASSWORD not in page_text(at)

    # stop: the worker finishes and signs off; then remove both hosts
    at.button(key="hosts_stop").click().run()
    assert "h0: stopped 1 worker(s)" in at.success[0].value, page_text(at)
    frame = wait_table(at, lambda f: set(f.loc[f["host"] == "h0", "status"]) == {"exited"})
    at.button(key="hosts_stop_all").click().run()
    assert "h0: stopped 0 worker(s); h1: stopped 0 worker(s)" in at.success[0].value
    for name in ("h0", "h1"):
        at.selectbox(key="hosts_pick").set_value(name).run()
        at.button(key="hosts_remove").click().run()
        assert f"removed host {name}" in at.success[0].value
    assert any("No host yet" in i.value for i in at.info)
    assert list_hosts(get_console(lab_console).db) == []


def test_deploy_from_the_console(lab: Lab, lab_console: str, tmp_path: Path) -> None:
    """Deploy (install off: no registry round trip here) copies the committed tree; the
    message says the version the host runs now; a failing deploy says which step failed."""
    from engine.version import VERSION_FILE, git_version

    at = run_page(PAGE)
    workdir = tmp_path / "deployed"
    add_host(at, "d0", lab.hosts[0].alias, workdir=str(workdir))
    at.selectbox(key="hosts_pick").set_value("d0").run()
    at.checkbox(key="hosts_deploy_install").uncheck().run()
    at.button(key="hosts_deploy").click().run()
    commit = (workdir / VERSION_FILE).read_text().strip()
    assert commit == git_version(ROOT).split("-")[0]
    assert f"d0 runs version {commit} now" in at.success[0].value, page_text(at)
    assert "install skipped" in at.success[0].value
    assert (workdir / "engine" / "run.py").is_file() and not (workdir / ".git").exists()

    add_host(at, "d1", lab.hosts[1].alias, workdir=str(ROOT))  # a git checkout: refused
    at.selectbox(key="hosts_pick").set_value("d1").run()
    at.button(key="hosts_deploy").click().run()
    assert "copy:" in at.error[0].value and "git" in at.error[0].value, page_text(at)
