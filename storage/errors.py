"""Storage errors, translated from driver exceptions at this boundary, and which of them pass."""

from __future__ import annotations


class StorageError(Exception):
    """A database problem the user can act on; the message says what to do."""


class DatabaseLockedError(StorageError):
    """Another process holds the DuckDB file (DuckDB allows one read-write process)."""

    def __init__(self, path: str, pid: int, command: str, url: str) -> None:
        self.path, self.pid, self.command, self.url = path, pid, command, url
        who = f"PID {pid}" + (f" ({command})" if command else "")
        super().__init__(
            f"the database {path} is in use by {who}. DuckDB lets one process open a file "
            "at a time. Either wait for that run to finish, talk to it with "
            "`python -m engine.run status` / `stop RUN_ID` (they reach the running coordinator), "
            f"stop it (kill -INT {pid}), or use PostgreSQL (--db postgresql://…) so several "
            "processes can share the work."
        )


class DatabaseUnreachable(StorageError):
    """The database server did not answer (down, restarting, refusing connections for now):
    unlike a wrong password or a missing database, waiting can help."""


# What a driver says when the server is away for now, not when it refuses us for good (wrong
# role, password or database name: those fail the same way on every try). psycopg reports
# connection failures without an SQLSTATE, so the text is all there is.
_UNREACHABLE = (
    "connection refused",
    "the database system is",  # starting up, shutting down, in recovery mode
    "timeout expired",
    "timed out",
    "server closed the connection",
    "no route to host",
    "network is unreachable",
    "too many clients",
    "connection reset",
)


def is_unreachable_message(message: str) -> bool:
    """Whether a failed connection's message says the server is away for now."""
    text = message.lower()
    return any(sign in text for sign in _UNREACHABLE)


def is_transient(exc: BaseException) -> bool:
    """Whether a database call failed for a reason that passes (the server restarting, a
    dropped connection, a deadlock or serialization failure, a lock timeout): retry it
    later, unchanged. Anything else (bad data, a constraint, a bug) fails again the same
    way, so retrying the same statement cannot help."""
    import sqlalchemy as sa

    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError
        | ConnectionError
        | TimeoutError,
    )


def is_database_outage(exc: BaseException) -> bool:
    """A transient failure that came from the database driver itself (not a timeout or a
    refused connection of some other service): the work that hit it did nothing wrong."""
    import sqlalchemy as sa

    return is_transient(exc) and isinstance(exc, sa.exc.SQLAlchemyError)


def outage_delay(failures: int) -> float:
    """The wait before the next try after ``failures`` transient failures in a row: 0.5 s,
    doubling, at most 10 s (every process waiting out our database uses the same)."""
    return min(10.0, 0.5 * 2 ** min(max(failures, 1) - 1, 5))
