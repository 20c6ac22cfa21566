"""A process that opens the database while the server is away waits it out (bounded), and a
refusal that waiting cannot fix (no such database) fails at once."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import storage.db as db_module
from storage.db import open_database
from storage.errors import DatabaseUnreachable, StorageError, is_unreachable_message
from tests.netns import Relay

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_messages_of_a_server_away_and_of_a_refusal_for_good() -> None:
    assert is_unreachable_message("port 5432 failed: Connection refused\n\tIs the server running")
    assert is_unreachable_message("FATAL:  the database system is shutting down")
    assert is_unreachable_message("FATAL:  the database system is starting up")
    assert not is_unreachable_message('FATAL:  database "nope" does not exist')
    assert not is_unreachable_message('FATAL:  password authentication failed for user "x"')


def test_open_waits_for_a_server_that_comes_back(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at first; the server "comes back" (a relay to the real PostgreSQL
    starts on that port) once the first failure has been logged."""
    monkeypatch.setattr(db_module, "outage_delay", lambda failures: 0.2)
    port = _free_port()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    relay = Relay("127.0.0.1", port, "127.0.0.1", 5432)
    back = threading.Event()

    class ComeBack(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not back.is_set() and "Connection refused" in record.getMessage():
                back.set()
                relay.__enter__()

    handler = ComeBack()
    logging.getLogger("storage.db").addHandler(handler)
    try:
        db = open_database(url, create=False, outage_s=60)
        with db.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        db.dispose()
    finally:
        logging.getLogger("storage.db").removeHandler(handler)
        if back.is_set():
            relay.__exit__(None, None, None)
    assert back.is_set(), "the first try failed and was logged before the server came back"


def test_open_gives_up_after_the_outage_window(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[int] = []
    monkeypatch.setattr(db_module, "outage_delay", lambda failures: tries.append(failures) or 0.01)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/test"
    with pytest.raises(DatabaseUnreachable, match="Connection refused"):
        open_database(url, create=False, outage_s=0.3)
    assert len(tries) >= 2
    with pytest.raises(DatabaseUnreachable):  # no window: at once, as before
        open_database(url, create=False)


def test_a_missing_database_is_not_waited_for(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[int] = []
    monkeypatch.setattr(db_module, "outage_delay", lambda failures: tries.append(failures) or 0.01)
    url = pg_url.rsplit("/", 1)[0] + "/ff_no_such_database"
    with pytest.raises(StorageError, match="does not exist") as err:
        open_database(url, create=False, outage_s=60)
    assert not isinstance(err.value, DatabaseUnreachable)
    assert tries == []


def test_pool_workers_wait_out_an_outage_a_worker_started_by_hand_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool worker's boot (its coordinator has the database open: an unreachable server is
    a restart) waits; ``engine.run worker`` with a wrong address says so at once
    (``test_validate_e2e::test_worker_processes_exit_1_when_one_of_them_failed``)."""
    import engine.queue.sql as sql
    from engine.settings import Settings

    seen: list[float] = []

    def fake_open(url: str, **kw: object) -> object:
        seen.append(float(kw["outage_s"]))  # type: ignore[arg-type]
        raise DatabaseUnreachable("cannot open: Connection refused")

    monkeypatch.setattr(sql, "open_database", fake_open)
    boot = sql.SqlBoot.factory("postgresql+psycopg://postgres@127.0.0.1:9/x")(
        "w1", Settings(), "WARNING"
    )
    with pytest.raises(DatabaseUnreachable):
        _ = boot.db
    assert seen == [sql.BOOT_OUTAGE_S] and sql.BOOT_OUTAGE_S >= 60
