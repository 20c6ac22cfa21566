"""Opening the database: URL resolution, DuckDB's single-process lock, schema setup.

DuckDB allows one read-write process per file. SQLAlchemy's default pool would keep the file
lock after ``close()``, and a second process gets an ``IOException`` that names the PID holding
the lock: we turn that into :class:`DatabaseLockedError`, which says who holds it and what to
do, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from storage.errors import (
    DatabaseLockedError,
    DatabaseUnreachable,
    StorageError,
    is_unreachable_message,
    outage_delay,
)
from storage.migrations import Component, migrate

log = logging.getLogger(__name__)

DEFAULT_DUCKDB_PATH = Path("data") / "fetchfleet.duckdb"


def resolve_db_url(cli_url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``--db``, then FETCHFLEET_DB, then POSTGRES_* variables, then the DuckDB default."""
    env = os.environ if env is None else env
    if cli_url:
        return normalize_url(cli_url)
    if env.get("FETCHFLEET_DB"):
        return normalize_url(env["FETCHFLEET_DB"])
    if env.get("POSTGRES_HOST") or env.get("POSTGRES_DB"):
        user = quote_plus(env.get("POSTGRES_USER", "postgres"))
        password = env.get("POSTGRES_PASSWORD")
        auth = f"{user}:{quote_plus(password)}" if password else user
        host = env.get("POSTGRES_HOST", "127.0.0.1")
        port = env.get("POSTGRES_PORT", "5432")
        name = env.get("POSTGRES_DB", "postgres")
        return f"postgresql+psycopg://{auth}@{host}:{port}/{name}"
    return f"duckdb:///{DEFAULT_DUCKDB_PATH}"


def normalize_url(url: str) -> str:
    """Accept what people type: a bare path means DuckDB, ``postgres://`` means psycopg 3."""
    if "://" not in url:
        return f"duckdb:///{url}"
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        return f"postgresql+psycopg://{rest}"
    return url


def redact_url(url: str) -> str:
    """The URL as it may be shown or logged: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//[^@/]*@", "//***@", url)


_LOCK_RE = re.compile(
    r'lock on file "(?P<path>[^"]+)".*?held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)', re.S
)


def _describe_pid(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    except OSError:
        return ""


def translate_lock_error(exc: BaseException, url: str) -> DatabaseLockedError | None:
    match = _LOCK_RE.search(str(exc))
    if not match:
        return None
    pid = int(match["pid"])
    return DatabaseLockedError(path=match["path"], pid=pid, command=_describe_pid(pid), url=url)


@dataclass
class Database:
    """One database: its engine, its dialect name and a redacted URL for display.

    On DuckDB, write transactions of this process's threads are serialised by a lock: the
    coordinator, the planner and the console all write through one process, and DuckDB
    aborts concurrent transactions that touch the same rows instead of waiting.
    """

    engine: Engine
    url: str
    write_lock: threading.RLock = field(default_factory=threading.RLock)
    # the schema components (plugin kinds' tables) opened with it: exports list their tables
    components: tuple[Component, ...] = ()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name  # 'duckdb' or 'postgresql'

    @property
    def is_duckdb(self) -> bool:
        return self.dialect == "duckdb"

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        if not self.is_duckdb:
            with self.engine.begin() as conn:
                yield conn
            return
        with self.write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def dispose(self) -> None:
        """Release connections (and, for DuckDB, the file lock)."""
        self.engine.dispose()


def open_database(
    url: str,
    *,
    create: bool = True,
    wait_s: float = 5.0,
    components: Sequence[Component] = (),
    idle_in_transaction_s: float | None = None,
    outage_s: float = 0.0,
) -> Database:
    """Open (and by default create/migrate) the database at ``url``.

    ``components`` are the schema components of the plugin kinds this process works with
    (``engine.jobs.components()``): migrated with the core schema when ``create``.
    A DuckDB file locked by another process is retried for ``wait_s``: the holder is often a
    short-lived command (``status``) that lets go within a moment. ``idle_in_transaction_s``
    (PostgreSQL): the server ends a session of this process that sits that long inside a
    transaction (its client cut off mid-way), which releases its row locks.
    ``outage_s``: a server that does not answer (restarting, down for now) is waited for
    that long, with the backoff every process uses, before the error is raised: a worker
    that starts during an outage waits it out as a running one does.
    """
    deadline = time.monotonic() + wait_s
    outage_deadline = time.monotonic() + outage_s
    failures = 0
    while True:
        try:
            return _open(url, create, tuple(components), idle_in_transaction_s)
        except DatabaseLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
        except DatabaseUnreachable as exc:
            failures += 1
            delay = outage_delay(failures)
            if time.monotonic() + delay > outage_deadline:
                raise
            if failures == 1 or failures % 10 == 0:
                log.warning("%s; try %d, again in %.1f s", exc, failures + 1, delay)
            time.sleep(delay)


def duckdb_path(url: str) -> Path | None:
    """The file behind a DuckDB URL (None for PostgreSQL or in-memory)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "duckdb" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def _quiet_duckdb(dbapi_conn: object, _record: object) -> None:
    dbapi_conn.execute("SET enable_progress_bar = false")  # type: ignore[attr-defined]


def _open(
    url: str, create: bool, components: tuple[Component, ...], idle_s: float | None = None
) -> Database:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "duckdb":
        path = duckdb_path(url)
        if path is not None:
            if not create and not path.exists():
                raise StorageError(f"no database at {path} yet: nothing has run against it")
            path.parent.mkdir(parents=True, exist_ok=True)
        # Connections of one process share the same DuckDB instance (its instance cache),
        # so a small pool lets the coordinator write while pages read.
        engine = sa.create_engine(url, pool_size=4, max_overflow=4)
        # DuckDB draws a progress bar on stdout for queries over 2 s (planning a big ID list
        # on a busy machine): stdout belongs to the CLI (`--json` prints one object there).
        sa.event.listen(engine, "connect", _quiet_duckdb)
    elif parsed.get_backend_name() == "postgresql":
        options = (
            {}
            if idle_s is None
            else {"options": f"-c idle_in_transaction_session_timeout={max(1, int(idle_s * 1000))}"}
        )
        engine = sa.create_engine(
            url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=options
        )
    else:
        raise StorageError(
            f"unsupported database URL {redact_url(url)!r}: use a DuckDB path "
            "(duckdb:///data/x.duckdb) or postgresql://user@host:5432/db"
        )
    db = Database(engine=engine, url=url, components=components)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).fetchall()
    except sa.exc.OperationalError as exc:
        engine.dispose()
        locked = translate_lock_error(exc, url)
        if locked:
            raise locked from None
        error = DatabaseUnreachable if is_unreachable_message(str(exc.orig)) else StorageError
        raise error(f"cannot open {redact_url(url)}: {exc.orig}") from None
    if create:
        migrate(db, components)
    return db
