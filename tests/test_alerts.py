"""Alerts against a real HTTP receiver on loopback: every event is one delivery (a real
backfill run's run_completed, a failed run, a stop, an auto-stop, a lost worker, a missed
schedule, a low pool), a receiver that is down gets the alert when it is back within the
retry window (injected clock), two deliverers on one PostgreSQL send each delivery once, and
the webhook's secret never reaches the database or a log. The CLI and the console page too."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import lifecycle
from engine.alerts import emit
from engine.alerts.deliver import Deliverer
from engine.alerts.events import Event
from engine.alerts.service import AlertError, add_alert, send_test
from engine.cli.common import open_database
from engine.settings import Settings
from sim.world import SimWorld
from storage import alerts as store
from storage import runs
from storage.bulk import fetch_all
from storage.db import Database
from tests.test_backfill import cli, params, settings, subset
from tests.test_backfill import world as world

SECRET = "T0KEN-s3cret-9f8e7d"
ENV = "FETCHFLEET_TEST_HOOK"
T0 = datetime(2026, 12, 1, 2, 0, 0)


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


class Receiver:
    """A webhook receiver on loopback that records every POST; ``status`` is what it
    answers; ``down()`` closes its port, ``up()`` opens it again on the same port."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.status = 200
        self.delay_s = 0.0  # how long it takes to answer
        self._lock = threading.Lock()
        self.port = 0
        self.up()

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                data = json.loads(self.rfile.read(n))
                time.sleep(outer.delay_s)  # a slow receiver (deliverers overlap)
                with outer._lock:
                    outer.requests.append(data)
                    outer.paths.append(self.path)
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def down(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{SECRET}"

    def events(self) -> list[tuple[str, Any]]:
        return [(r["event"], r.get("run_id") or r.get("worker_id")) for r in self.requests]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    r = Receiver()
    monkeypatch.setenv(ENV, r.url)
    yield r
    with contextlib.suppress(OSError):
        r.down()


@pytest.fixture
def adb(db_url: str) -> Iterator[Database]:
    from engine.jobs import components

    database = open_database(db_url, components=components())
    yield database
    database.dispose()


def fast(**kw: Any) -> Settings:
    return Settings(alerts_backoff_s=5, alerts_backoff_max_s=60, alerts_retry_window_s=600, **kw)


def dump(db: Database) -> str:
    """Every row of the alert tables, as text."""
    out = []
    with db.connect() as conn:
        for t in store.COMPONENT.tables:
            out += [repr(tuple(r)) for r in fetch_all(conn, sa.select(t))]
    return "\n".join(out)


def deliveries(db: Database) -> list[tuple[str, str, str, int]]:
    e, d = store.alert_events, store.alert_deliveries
    q = sa.select(e.c.event, e.c.subject, d.c.status, d.c.attempts).select_from(
        e.join(d, d.c.event_id == e.c.id)
    )
    with db.connect() as conn:
        return sorted((str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in fetch_all(conn, q))


# --- run events ------------------------------------------------------------------------------


def test_a_completed_run_is_one_delivery_with_its_id_and_no_secret_anywhere(
    world: SimWorld,
    receiver: Receiver,
    duckdb_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from engine.api import submit_run, wait_run
    from engine.jobs import components
    from engine.runtime.coordinator import Coordinator

    caplog.set_level(logging.DEBUG)
    db = open_database(duckdb_url, components=components())
    s = settings(workers=1)
    add_alert(db, "ops", url_env=ENV)
    world.api_reset()
    coord = Coordinator(db, s).start()
    try:
        run_id = submit_run(
            db, s, "backfill", params(world, subset(world, tmp_path, 30)), coord.name
        )
        assert wait_run(db, run_id, timeout_s=60, sleep=coord.wait_settled)["status"] == "completed"
        # The hook recorded it; two deliverer rounds (each sweeping again) send it once.
        first = Deliverer(db, s).run_once()
        assert Deliverer(db, s).run_once() == []
    finally:
        coord.shutdown()
    assert [(o.event, o.status, o.http_status) for o in first] == [
        ("run_completed", "delivered", 200)
    ]
    assert receiver.events() == [("run_completed", run_id)]
    body = receiver.requests[0]
    assert body["id"] == first[0].uid and body["kind"] == "backfill"
    assert body["status"] == "completed" and body["counts"]["total"] == 30
    assert body["text"].startswith(f"Fetchfleet: run {run_id} (backfill) completed: 30 of 30")
    assert deliveries(db) == [("run_completed", str(run_id), "delivered", 1)]
    # A second record of the same end (another coordinator, the sweep) stays one row.
    assert emit(db, Event.RUN_COMPLETED, {"run_id": run_id}) is None
    assert receiver.paths == [f"/hooks/{SECRET}"]  # the secret did reach the receiver…
    assert SECRET not in dump(db)  # …and neither the database
    assert SECRET not in caplog.text and "127.0.0.1" in caplog.text  # nor a log line
    db.dispose()


def test_failed_stopped_and_auto_stopped_runs_each_one_delivery(
    adb: Database, receiver: Receiver
) -> None:
    s = fast()
    add_alert(adb, "ops", url_env=ENV)
    with adb.begin() as conn:
        failed, cancelled, auto = (runs.create_run(conn, "backfill", {}, "t") for _ in range(3))
        runs.set_status(conn, failed, "failed", "planning failed: the ID file is gone")
        runs.set_status(conn, auto, "stopping")
    # A stop rule: its event as it asks the run to stop; the run's end (stopped) adds none.
    emit(
        adb,
        Event.RUN_AUTO_STOPPED,
        {"run_id": auto, "rule": "blocked_ratio", "reason": "62% > 50%"},
    )
    lifecycle.ended(adb, s, [failed])
    assert lifecycle.command(adb, s, cancelled, "cancel", "test") == "cancelled"
    with adb.begin() as conn:
        runs.set_status(conn, auto, "stopped")
    lifecycle.ended(adb, s, [auto, failed])  # `failed` again: still one event
    out = Deliverer(adb, s).run_once()
    assert sorted(o.status for o in out) == ["delivered"] * 3, receiver.events()
    got = {e: r for r in receiver.requests for e in [r["event"]]}
    assert sorted(receiver.events()) == sorted(
        [("run_failed", failed), ("run_stopped", cancelled), ("run_auto_stopped", auto)]
    )
    assert got["run_failed"]["error"] == "planning failed: the ID file is gone"
    assert "the ID file is gone" in got["run_failed"]["text"]
    assert got["run_stopped"]["status"] == "cancelled"
    assert got["run_auto_stopped"]["rule"] == "blocked_ratio"
    assert "stop rule blocked_ratio" in got["run_auto_stopped"]["text"]


def test_only_the_events_an_alert_wants(adb: Database, receiver: Receiver) -> None:
    add_alert(adb, "failures", url_env=ENV, events="run_failed")
    with pytest.raises(AlertError, match="pool_low needs a threshold"):
        add_alert(adb, "x", url_env=ENV, events="pool_low")
    with adb.begin() as conn:
        ok = runs.create_run(conn, "backfill", {}, "t")
        runs.set_status(conn, ok, "completed")
    lifecycle.ended(adb, fast(), [ok])
    assert Deliverer(adb, fast()).run_once() == [] and receiver.requests == []


# --- what the sweep finds ----------------------------------------------------------------------


def test_lost_worker_missed_schedule_and_low_pool_each_once(
    adb: Database, receiver: Receiver
) -> None:
    from storage import queue as q
    from storage.schedules import record_fire
    from storage.schema import proxies

    s = fast()
    add_alert(adb, "ops", url_env=ENV, pool_below=2)
    with adb.begin() as conn:
        q.register_worker(conn, "host:1-w0", "host", 1, "standalone")
    with adb.begin() as conn:
        q.end_worker(conn, "host:1-w0", "dead", "stopped heartbeating")
    with adb.begin() as conn:
        record_fire(conn, "nightly", T0, "missed", note="3600 s late: skipped (missed=skip)")
    d = Deliverer(adb, s)
    d.run_once()
    d.run_once()  # nothing new: each event once
    assert sorted(r["event"] for r in receiver.requests) == [
        "pool_low",
        "schedule_missed",
        "worker_lost",
    ]
    by = {r["event"]: r for r in receiver.requests}
    assert by["worker_lost"]["reason"] == "stopped heartbeating"
    assert by["schedule_missed"]["schedule"] == "nightly"
    assert by["pool_low"]["active"] == 0 and by["pool_low"]["threshold"] == 2

    def set_active(n: int) -> None:
        with adb.begin() as conn:
            conn.execute(sa.delete(proxies))
            for i in range(n):
                conn.execute(
                    sa.insert(proxies).values(
                        key=f"127.0.0.1:{9000 + i}",
                        host="127.0.0.1",
                        port=9000 + i,
                        status="active",
                        created_at=T0,
                    )
                )

    set_active(3)  # back above: the episode closes
    d.run_once()
    set_active(1)  # below again: a second episode, one more alert
    d.run_once()
    d.run_once()
    assert [r["event"] for r in receiver.requests].count("pool_low") == 2


# --- retries ----------------------------------------------------------------------------------


def test_a_receiver_that_is_down_gets_the_alert_when_it_is_back(
    adb: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock(T0)
    s = fast()
    add_alert(adb, "ops", url_env=ENV, now=T0)
    receiver.down()
    emit(adb, Event.WORKER_LOST, {"worker_id": "w1", "host": "h"}, "w1", now=clock())
    d = Deliverer(adb, s, now=clock)
    first = d.run_once(do_sweep=False)
    assert [o.status for o in first] == ["pending"] and "ConnectionRefused" in str(first[0].error)
    clock.advance(seconds=4)
    assert d.run_once(do_sweep=False) == []  # not due before its backoff (5 s)
    clock.advance(seconds=1)
    assert [o.status for o in d.run_once(do_sweep=False)] == ["pending"]  # next: 10 s later
    receiver.up()
    receiver.status = 500  # back, but failing: still retried
    clock.advance(seconds=10)
    assert [o.http_status for o in d.run_once(do_sweep=False)] == [500]
    receiver.status = 200
    clock.advance(seconds=20)
    assert [o.status for o in d.run_once(do_sweep=False)] == ["delivered"]
    clock.advance(seconds=600)
    assert d.run_once(do_sweep=False) == []
    assert [r["event"] for r in receiver.requests] == ["worker_lost", "worker_lost"]  # 500, 200
    assert receiver.requests[0]["id"] == receiver.requests[1]["id"]  # a resend: same id
    assert deliveries(adb) == [("worker_lost", "w1", "delivered", 4)]
    assert SECRET not in caplog.text and SECRET not in dump(adb)


def test_past_the_retry_window_a_delivery_fails_with_its_last_error(
    adb: Database, receiver: Receiver
) -> None:
    clock = Clock(T0)
    add_alert(adb, "ops", url_env=ENV, now=T0)
    receiver.down()
    emit(adb, Event.WORKER_LOST, {"worker_id": "w1", "host": "h"}, "w1", now=clock())
    d = Deliverer(adb, fast(), now=clock)
    statuses = []
    for _ in range(30):
        statuses += [o.status for o in d.run_once(do_sweep=False)]
        clock.advance(seconds=60)
    assert statuses[-1] == "failed" and set(statuses[:-1]) == {"pending"}
    with adb.connect() as conn:
        rows = store.recent(conn, 5)
    assert rows[0].status == "failed" and "gave up after the retry window" in rows[0].last_error


def test_a_4xx_answer_fails_at_once_and_test_reports_it(adb: Database, receiver: Receiver) -> None:
    add_alert(adb, "ops", url_env=ENV)
    receiver.status = 404
    out = send_test(adb, fast(), "ops")
    assert (out.status, out.http_status) == ("failed", 404)
    receiver.status = 200
    assert send_test(adb, fast(), "ops").http_status == 200


# --- several deliverers, several recorders ------------------------------------------------------


def test_two_deliverers_on_one_postgresql_send_each_delivery_once(
    pg_url: str, receiver: Receiver
) -> None:
    from engine.jobs import components

    dbs = [open_database(pg_url, components=components()) for _ in range(2)]
    try:
        add_alert(dbs[0], "ops", url_env=ENV)
        add_alert(dbs[0], "second", url_env=ENV, events="worker_lost")

        # Two coordinators record the same 30 events at once: 30 events, 60 deliveries.
        def record(db: Database) -> None:
            for i in range(30):
                emit(db, Event.WORKER_LOST, {"worker_id": f"w{i}", "host": "h"}, f"w{i}")

        threads = [threading.Thread(target=record, args=(db,)) for db in dbs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        receiver.delay_s = 0.02  # each POST takes a moment: the deliverers overlap
        outs: list[list[Any]] = [[], []]
        go = threading.Barrier(2)

        def deliver(i: int) -> None:
            go.wait(10)
            outs[i] = Deliverer(dbs[i], fast()).run_once(do_sweep=False)

        threads = [threading.Thread(target=deliver, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert outs[0] and outs[1], "both deliverers took a share"
        assert len(receiver.requests) == 60
        sent = [(r["id"], p) for r, p in zip(receiver.requests, receiver.paths, strict=True)]
        assert len({r["id"] for r in receiver.requests}) == 30
        assert len(sent) == 60
        rows = deliveries(dbs[0])
        assert len(rows) == 60 and {(r[2], r[3]) for r in rows} == {("delivered", 1)}
    finally:
        for db in dbs:
            db.dispose()


# --- URLs and secrets --------------------------------------------------------------------------


def test_literal_urls_credentials_refused_query_warned(adb: Database) -> None:
    with pytest.raises(AlertError, match="--url-env") as exc:
        add_alert(adb, "a", url=f"https://user:{SECRET}@hooks.example/x")
    assert SECRET not in str(exc.value)
    added = add_alert(adb, "b", url=f"https://hooks.example/x?token={SECRET}")
    assert added.warnings and "--url-env" in added.warnings[0]
    with pytest.raises(AlertError, match="name of an environment variable"):
        add_alert(adb, "c", url_env="https://hooks.example/x")


def test_cli_add_list_test_recent_remove(
    receiver: Receiver, duckdb_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {**os.environ, ENV: receiver.url}
    bad = cli(
        "alerts", "add", "x", "--url", f"http://u:{SECRET}@127.0.0.1/", "--db", duckdb_url, env=env
    )
    assert bad.returncode == 2 and "--url-env" in bad.stderr and SECRET not in bad.stderr
    add = cli("alerts", "add", "ops", "--url-env", ENV, "--events", "run_failed,worker_lost",
              "--db", duckdb_url, env=env)  # fmt: skip
    assert add.returncode == 0, add.stderr
    listed = json.loads(cli("alerts", "list", "--json", "--db", duckdb_url, env=env).stdout)
    assert listed == [
        {
            "name": "ops",
            "target": f"${ENV}",
            "url_env": ENV,
            "events": ["run_failed", "worker_lost"],
            "pool_below": None,
            "enabled": True,
        }
    ]
    test = cli("alerts", "test", "ops", "--db", duckdb_url, env=env)
    assert test.returncode == 0 and "HTTP 200" in test.stdout, test.stderr
    assert [r["event"] for r in receiver.requests] == ["test"]
    recent = json.loads(cli("alerts", "recent", "--json", "--db", duckdb_url, env=env).stdout)
    assert [(r["event"], r["alert"], r["status"], r["http_status"]) for r in recent] == [
        ("test", "ops", "delivered", 200)
    ]
    receiver.status = 503
    failing = cli("alerts", "test", "ops", "--db", duckdb_url, env=env)
    assert failing.returncode == 1 and "HTTP 503" in failing.stdout
    everything = (
        add.stdout + add.stderr + test.stdout + test.stderr + failing.stdout + failing.stderr
    )
    assert SECRET not in everything
    removed = cli("alerts", "remove", "ops", "--db", duckdb_url, env=env)
    assert removed.returncode == 0
    assert json.loads(cli("alerts", "list", "--json", "--db", duckdb_url, env=env).stdout) == []


# --- the console's Alerts page -----------------------------------------------------------------


def test_console_alerts_page_adds_tests_and_shows_recent(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from console.resources import shutdown_all
    from console.testing import run_page, use_fresh_database

    use_fresh_database(tmp_path, monkeypatch, workers=0)
    try:
        at = run_page("pages/alerts.py")
        assert "No alert yet" in at.info[0].value
        at.text_input(key="alert_name").set_value("ops")
        at.text_input(key="alert_value").set_value("not a variable name")
        at.form_submit_button(key="alert_add_btn").click().run()
        assert "name of an environment variable" in " | ".join(e.value for e in at.error)
        at.text_input(key="alert_value").set_value(ENV)
        at.form_submit_button(key="alert_add_btn").click().run()
        assert at.success[0].value == "added alert ops"
        table = at.dataframe[0].value
        assert list(table["webhook"]) == [f"${ENV}"]
        at.button(key="alert_test").click().run()
        assert any("HTTP 200 (delivered)" in s.value for s in at.success)
        at.run()
        recent = at.dataframe[1].value
        assert list(recent["event"]) == ["test"] and list(recent["delivery"]) == ["delivered"]
        assert SECRET not in recent.to_csv()
        at.button(key="alert_remove").click().run()
        assert "No alert yet" in at.info[0].value
    finally:
        shutdown_all()


def test_a_run_by_hand_from_the_cli_sends_its_own_alert(
    world: SimWorld, receiver: Receiver, duckdb_url: str, tmp_path: Path
) -> None:
    """No console, no scheduler: the CLI that ran the job delivers its run_completed."""
    env = {ENV: receiver.url}
    assert (
        cli("alerts", "add", "ops", "--url-env", ENV, "--db", duckdb_url, env=env).returncode == 0
    )
    world.api_reset()
    ids = subset(world, tmp_path, 20)
    run = cli(
        "backfill", "--db", duckdb_url, "--ids", str(ids), "--url-template", world.api_template,
        "--rate-limit", "200/1s", "--header", "Authorization=env:SIM_API_TOKEN", "--workers", "1",
        "--json", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    run_id = json.loads(run.stdout)["run_id"]
    assert receiver.events() == [("run_completed", run_id)]
    assert SECRET not in run.stdout + run.stderr


def test_a_stop_rule_stop_is_one_run_auto_stopped_with_its_rule(
    adb: Database, receiver: Receiver
) -> None:
    """The stop and the rule's record are one transaction (as ``engine.stop_rules`` writes
    them); the run's end is then one ``run_auto_stopped`` with the rule, never also a
    ``run_stopped``, whichever of the watchdog and the settling thread comes first."""
    from storage import stop_metrics

    s = fast()
    add_alert(adb, "ops", url_env=ENV)
    with adb.begin() as conn:
        run_id = runs.create_run(conn, "backfill", {}, "t")
        runs.start_run(conn, run_id)
        runs.apply_command(conn, run_id, "stop", source="stop rule error_ratio>0.5/200")
        stop_metrics.record_auto_stop(
            conn, run_id, "error_ratio>0.5/200", "auto-stopped: 120 of 200 failed", {"ratio": 0.6}
        )
        runs.set_status(conn, run_id, "stopped")
    lifecycle.ended(adb, s, [run_id])
    lifecycle.ended(adb, s, [run_id])  # a second coordinator settling it: still one
    out = Deliverer(adb, s).run_once()
    assert [o.status for o in out] == ["delivered"]
    assert receiver.events() == [("run_auto_stopped", run_id)]
    (body,) = receiver.requests
    assert body["rule"] == "error_ratio>0.5/200" and body["numbers"] == {"ratio": 0.6}
