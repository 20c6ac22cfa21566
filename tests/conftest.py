"""Shared fixtures: databases (DuckDB file, real PostgreSQL), the sim world, system tools.

PostgreSQL tests use a throw-away database on the server at 127.0.0.1:5432 (user postgres).
With no server they skip, unless CI=true or FETCHFLEET_REQUIRE_PG=1, where they fail.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.db import Database, open_database
from tests.netns import Lab

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "FETCHFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def strict() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("FETCHFLEET_REQUIRE_PG") == "1"


def require_tool(path_or_name: str, package: str) -> str:
    """Skip (or fail under CI) when a system tool is missing, naming the Debian package."""
    found = shutil.which(path_or_name) or (path_or_name if Path(path_or_name).exists() else None)
    if not found:
        msg = f"{path_or_name} not found: install the Debian package `{package}`"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m engine.run ARGS`` through the CLI's own entry in this process, for quick
    commands (refusals, listings) where the process is not what is tested: a subprocess each
    costs 1-2 s of imports under load. Exit code, stdout and stderr as subprocess.run's."""
    from engine.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusals
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _python(
    argv: tuple[str, ...], env: Mapping[str, str] | None, memory_cap: int | None
) -> dict[str, Any]:
    """What every Python subprocess of the tests shares: ``python ARGV`` from the repository
    root, ``env`` added to this process's environment (pool workers inherit it), output as
    text; with ``memory_cap`` (bytes) its address space is capped, so a runaway read fails
    instead of eating the shared machine's memory."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    return {
        "args": [sys.executable, *argv],
        "cwd": ROOT,
        "env": {**os.environ, **(env or {})},
        "text": True,
        "preexec_fn": cap if memory_cap else None,
    }


def run_python(
    *argv: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    memory_cap: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` (``-m module …``, ``-c script``) in its own process, waited for,
    output captured. Still running after ``timeout`` seconds: ``subprocess.TimeoutExpired``."""
    kw = _python(argv, env, memory_cap)
    return subprocess.run(**kw, capture_output=True, timeout=timeout)


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    memory_cap: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """The CLI (``python -m engine.run ARGS``) in its own process, waited for, output
    captured: for tests where the process is what is tested (exit code, the workers it
    spawns, a run end to end). A command still running after ``timeout`` seconds raises
    ``subprocess.TimeoutExpired``."""
    return run_python("-m", "engine.run", *args, env=env, timeout=timeout, memory_cap=memory_cap)


def start_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """The CLI in its own process, left running with stdout and stderr piped: a run the test
    acts on meanwhile (kills a worker, stops it, reads its memory)."""
    pipe = subprocess.PIPE
    kw = _python(("-m", "engine.run", *args), env, None)
    return subprocess.Popen(**kw, stdout=pipe, stderr=pipe)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    # pre-ping: tests/test_pg_restart.py restarts the server under this session's feet
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        msg = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}"
        if strict():
            pytest.fail(msg)
        pytest.skip(msg)
    name = f"ff_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _reset_pg(url: str) -> None:
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    eng.dispose()


@pytest.fixture
def pg_url(pg_server_url: str) -> str:
    """An empty PostgreSQL database (schema dropped before each test)."""
    _reset_pg(pg_server_url)
    return pg_server_url


@pytest.fixture
def duckdb_url(tmp_path: Path) -> str:
    return f"duckdb:///{tmp_path / 'ff.duckdb'}"


@pytest.fixture(params=["duckdb", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage contract test runs on both backends."""
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'ff.duckdb'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The fleet tests' hosts (tests/fleet_lab.py): one lab for the whole session."""
    from tests.fleet_lab import build_lab

    with build_lab(tmp_path_factory.mktemp("lab") / "hosts") as built:
        yield built


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.dispose()
