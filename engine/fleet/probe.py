"""``python -m engine.fleet.probe``, run on a host by ``hosts test``: is the project importable
here, which code version is it (``engine.version``), and is the database
(``FETCHFLEET_DB`` from the ssh channel) reachable from here? Prints one JSON object."""

from __future__ import annotations

import json
import platform
import sys


def main() -> int:
    out: dict[str, object] = {"python": platform.python_version(), "project": True}
    try:  # the project there may predate versions: then it reports none
        from engine.version import code_version

        out["version"] = code_version()
    except ImportError:
        out["version"] = None
    try:
        import sqlalchemy as sa

        from storage.db import resolve_db_url

        url = resolve_db_url(None)
        if url.startswith("duckdb"):
            out["db"] = "no FETCHFLEET_DB: a remote worker needs PostgreSQL"
        else:
            engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                out["db"] = "ok"
            finally:
                engine.dispose()
    except Exception as exc:  # the message, not the traceback: it goes back to the user
        out["db"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
