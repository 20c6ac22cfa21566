"""A job kind is one package: a plugin outside ``engine/`` brings its table, its migration
step, its CLI subcommand, its executor and its summary section, and everything that lists
kinds picks it up (the CLI, the local pool's spawned workers, ``status``, summaries, the
Home throughput and outcome charts, exports) with no file of the project edited.

The plugin (``PLUGIN`` below) is written into a temporary directory and reached the two ways
a plugin can be: the ``FETCHFLEET_PLUGINS`` environment variable (with ``PYTHONPATH``), and a
``fetchfleet.kinds`` entry point of an installed distribution (a ``.dist-info`` on sys.path).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.jobs import components, item_logs, kinds, registry
from engine.jobs.base import RunKind
from engine.settings import Settings
from storage import dashboard as dash
from storage import schema
from storage.bulk import fetch_all
from storage.clock import utcnow
from storage.db import open_database
from storage.export import exportable_tables
from storage.migrations import LATEST, Component, migrate

ROOT = Path(__file__).resolve().parents[1]
MODULE = "fetchfleet_upper"

PLUGIN = '''
"""A minimal job kind as a plugin: upper-cases words (a word with a digit fails)."""

from __future__ import annotations

import argparse
from typing import Any

import sqlalchemy as sa

from engine.jobs.base import Executor, JobKind
from engine.jobs.registry import KindInfo
from storage.clock import utcnow
from storage.migrations import Component

metadata = sa.MetaData()  # the plugin's own, not storage.schema's
upper_items = sa.Table(
    "upper_items",
    metadata,
    sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("word", sa.String, primary_key=True),
    sa.Column("result", sa.String),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.String),
    sa.Column("worker_id", sa.String),
    sa.Column("done_at", sa.DateTime, nullable=False),
)


def _v1(conn: sa.Connection) -> None:
    upper_items.create(conn, checkfirst=True)


COMPONENT = Component("upper", [(1, "upper_items", _v1)], tables=[upper_items])

KIND = KindInfo(
    name="upper",
    title="Upper case",
    job="fetchfleet_upper:UpperJob",
    cli="fetchfleet_upper:add_commands",
    schema="fetchfleet_upper:COMPONENT",
    order=90,
)


class UpperExecutor(Executor):
    async def execute(self, item: Any) -> tuple[bool, str, dict[str, Any]]:
        if any(c.isdigit() for c in item):
            return False, "has_digit", {"error": f"{item}: digits have no upper case"}
        return True, "upper", {"result": item.upper()}


class UpperJob(JobKind):
    name = "upper"

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        words = [w for w in params.get("words") or [] if w]
        if not words:
            raise ValueError("upper needs --words a,b,c")
        return {"words": words, "batch_size": int(params.get("batch_size") or 2)}

    def plan(self, db: Any, run_id: int, params: dict[str, Any]) -> Any:
        words, n = list(dict.fromkeys(params["words"])), params["batch_size"]
        for i in range(0, len(words), n):
            yield words[i : i + n]

    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        done = {
            r[0]
            for r in conn.execute(
                sa.select(upper_items.c.word).where(
                    upper_items.c.run_id == run_id, upper_items.c.word.in_(refs)
                )
            )
        }
        return [r for r in refs if r not in done]

    def store(self, conn: sa.Connection, results: list[Any]) -> int:
        new = 0
        for r in results:  # exactly once per (run, word)
            if self.load_items(conn, r.run_id, [r.ref]):
                conn.execute(
                    sa.insert(upper_items).values(
                        run_id=r.run_id,
                        word=r.ref,
                        result=r.data.get("result"),
                        outcome=r.outcome,
                        ok=r.ok,
                        error=r.data.get("error"),
                        worker_id=r.worker_id or None,
                        done_at=utcnow(),
                    )
                )
                new += 1
        return new

    async def open_executor(self, params: dict[str, Any], env: Any) -> Executor:
        return UpperExecutor()

    def item_log(self) -> Any:
        from storage.item_logs import ItemLog

        return ItemLog("upper", upper_items, time="done_at", ok_column="ok", key="word")

    def ok_outcomes(self) -> set[str]:
        return {"upper"}

    def summary_extra(self, conn: sa.Connection, run_id: int) -> dict[str, Any]:
        letters = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(upper_items.c.result)), 0))
            .where(upper_items.c.run_id == run_id)
        ).scalar()
        return {"letters": int(letters)}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        extra = summary.get("upper")
        return [f"  letters upper-cased: {extra['letters']}"] if extra else []


def add_commands(sub: Any) -> None:
    from engine.cli.common import common_opts, pool_opts

    p = sub.add_parser("upper", help="upper-case words (a plugin kind)")
    common_opts(p)
    pool_opts(p)
    p.add_argument("--words", required=True, help="comma-separated")
    p.set_defaults(func=cmd_upper)


def cmd_upper(args: argparse.Namespace) -> int:
    from engine.cli.common import run_job

    params = {"words": args.words.split(","), "batch_size": args.batch_size}
    return run_job(args, "upper", params)
'''

WORDS = ["alpha", "beta", "gamma", "x1", "delta"]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin in a directory of its own, registered in this process and in children."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / f"{MODULE}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.setenv(registry.PLUGINS_ENV, MODULE)
    registry.reset()
    yield d
    registry.reset()
    sys.modules.pop(MODULE, None)


def cli(plugin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        registry.PLUGINS_ENV: MODULE,
        "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)]),
        "FETCHFLEET_SECRET_KEY_FILE": str(cwd / "secret.key"),
    }
    return subprocess.run(
        [sys.executable, "-m", "engine.run", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,  # data/ of the run lands in the test's directory
        env=env,
    )


@pytest.mark.parametrize("backend", ["duckdb", "postgresql"])
def test_plugin_kind_runs_end_to_end(
    backend: str, plugin_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("duckdb_url" if backend == "duckdb" else "pg_url")
    words = ",".join(WORDS)
    out = cli(
        plugin_dir, tmp_path,
        "upper", "--words", words, "--db", url, "--json", "--workers", "2", "--batch-size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    run_id = summary["run_id"]
    assert summary["kind"] == "upper" and summary["status"] == "completed"
    assert summary["counts"] == {
        "total": 5,
        "done": 5,
        "ok": 4,
        "failed": 1,
        "outcomes": {"has_digit": 1, "upper": 4},
    }
    assert summary["tasks"] == {"done": 3}
    assert summary["upper"] == {"letters": len("alphabetagammadelta")}  # summary_extra

    human = cli(plugin_dir, tmp_path, "status", str(run_id), "--db", url)
    assert human.returncode == 0, human.stderr
    assert f"run {run_id} (upper): completed" in human.stdout
    listed = cli(plugin_dir, tmp_path, "status", "--db", url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["run_id"], r["kind"], r["status"]) for r in json.loads(listed.stdout)] == [
        (run_id, "upper", "completed")
    ]
    csv = tmp_path / "upper.csv"
    exported = cli(
        plugin_dir, tmp_path,
        "export", "--table", "upper_items", "--run", str(run_id), "--out", str(csv), "--db", url,
        "--json",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["rows"] == 5
    assert csv.read_text().splitlines()[0].startswith('"run_id","word","result"')

    # in this process: the same registry, the database opened with the kind's component
    assert [c.name for c in components()] == ["fleet", "schedules", "alerts", "upper"]
    logs = item_logs()
    assert set(logs) == {"validate", "scrape", "backfill", "upper"}
    db = open_database(url, components=components())
    try:
        with db.connect() as conn:
            rows = fetch_all(
                conn,
                sa.text(
                    "SELECT run_id, word, result, outcome, ok, error FROM upper_items ORDER BY word"
                ),
            )
            assert [tuple(r) for r in rows] == [
                (run_id, "alpha", "ALPHA", "upper", True, None),
                (run_id, "beta", "BETA", "upper", True, None),
                (run_id, "delta", "DELTA", "upper", True, None),
                (run_id, "gamma", "GAMMA", "upper", True, None),
                (run_id, "x1", None, "has_digit", False, "x1: digits have no upper case"),
            ]
            versions = fetch_all(
                conn, sa.text("SELECT component, version, description FROM component_versions")
            )
            assert sorted(tuple(r) for r in versions) == [
                ("alerts", 1, "alerts, alert_events, alert_deliveries: webhooks, each event once"),
                ("fleet", 1, "hosts, host_launches: the fleet's machines"),
                ("schedules", 1, "schedules, schedule_fires: jobs that start themselves"),
                ("upper", 1, "upper_items"),
            ]
            # every item was executed by a worker of the local pool (spawned: the plugin
            # loaded there too) and is counted by the Home throughput and outcome charts
            workers = {r[0] for r in fetch_all(conn, sa.text("SELECT id FROM workers"))}
            executed_by = fetch_all(conn, sa.text("SELECT DISTINCT worker_id FROM upper_items"))
            assert {r[0] for r in executed_by} <= workers and workers
            hour_ago = utcnow() - timedelta(hours=1)
            assert sum(n for _, n in dash.throughput(conn, logs, hour_ago, "minute")) == 5
            assert dash.items_since(conn, logs, hour_ago) == 5
            assert dash.items_since(conn, logs, hour_ago, run_id=run_id) == 5
            per_outcome: dict[str, int] = {}
            for _, outcome, n in dash.outcomes_per_hour(conn, logs, hour_ago):
                per_outcome[outcome] = per_outcome.get(outcome, 0) + n
            assert per_outcome == {"upper": 4, "has_digit": 1}
            (stat,) = dash.run_stats(conn, logs, kind="upper")
            assert (stat.id, stat.total, stat.done, stat.ok, stat.failed) == (run_id, 5, 5, 4, 1)
            groups = {g.name: g for g in dash.outcome_groups(conn, logs["upper"], run_id)}
            assert {n: g.count for n, g in groups.items()} == {"upper": 4, "has_digit": 1}
            assert groups["has_digit"].examples == [("x1", "x1: digits have no upper case")]
    finally:
        db.dispose()


def test_plugin_cli_lists_its_table_and_command(plugin_dir: Path, tmp_path: Path) -> None:
    helped = cli(plugin_dir, tmp_path, "export", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "upper_items" in " ".join(helped.stdout.split())
    top = cli(plugin_dir, tmp_path, "--help")
    assert "upper-case words (a plugin kind)" in " ".join(top.stdout.split())


def test_component_steps_apply_once_in_order(plugin_dir: Path, duckdb_url: str) -> None:
    """A component's later step (a release of the plugin) is applied on the next open, the
    earlier one not again; the core schema is untouched by components."""
    upper = importlib.import_module(MODULE)
    seen: list[int] = []

    def v2(conn: sa.Connection) -> None:
        seen.append(2)
        conn.execute(sa.text("ALTER TABLE upper_items ADD COLUMN note VARCHAR"))

    db = open_database(duckdb_url, components=[upper.COMPONENT])
    try:
        released = Component("upper", [*upper.COMPONENT.steps, (2, "note column", v2)])
        assert migrate(db, [released]) == LATEST  # the core version found
        assert migrate(db, [released]) == LATEST and seen == [2]  # not applied twice
        with db.connect() as conn:
            rows = fetch_all(
                conn,
                sa.text("SELECT component, version FROM component_versions ORDER BY version"),
            )
            assert [tuple(r) for r in rows] == [("upper", 1), ("upper", 2)]
            assert fetch_all(conn, sa.text("SELECT count(note) FROM upper_items"))[0][0] == 0
    finally:
        db.dispose()
    with pytest.raises(ValueError, match="rise from 1"):
        Component("bad", [(2, "a", v2), (1, "b", v2)])
    assert "upper_items" in exportable_tables([upper.COMPONENT])
    assert "upper_items" not in exportable_tables()
    with pytest.raises(ValueError, match="exists already"):  # a plugin cannot shadow a table
        exportable_tables([Component("shadow", [], tables=[schema.runs])])


def test_entry_point_plugin_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution's ``fetchfleet.kinds`` entry point registers its kind."""
    site = tmp_path / "site"
    dist = site / "fetchfleet_demo_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fetchfleet-demo-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        "[fetchfleet.kinds]\ndemo = fetchfleet_demo_plugin:KIND\n"
    )
    (site / "fetchfleet_demo_plugin.py").write_text(
        textwrap.dedent(
            """
            from engine.jobs.registry import KindInfo

            KIND = KindInfo(name="demo", title="Demo", job="fetchfleet_demo_plugin:Nope")
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(registry.PLUGINS_ENV, raising=False)
    registry.reset()
    try:
        found = kinds()
        assert found["demo"].title == "Demo"
        assert list(found) == ["validate", "scrape", "backfill", "pipeline", "demo"]
    finally:
        registry.reset()
        sys.modules.pop("fetchfleet_demo_plugin", None)


def test_a_kind_without_an_item_log_fails_when_built() -> None:
    """``item_log`` is abstract: forgetting it is an error at once, not a kind silently
    missing from the dashboards."""

    class Forgetful(RunKind):
        name = "forgetful"

        def ok_outcomes(self) -> set[str]:
            return set()

    with pytest.raises(TypeError, match="item_log"):
        Forgetful(Settings())  # type: ignore[abstract]
