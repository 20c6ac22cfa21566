"""What a remote worker gets in its environment, built in one place for the CLI and the console.

The database URL the hosts use is ``FETCHFLEET_WORKER_DB`` when the hosts reach PostgreSQL at
another address than this machine does, else this machine's own URL. The values travel over
the ssh channel's stdin (``engine.fleet.remote.env_payload``), never on a command line; the
same values are what ``secret_values`` lists, so anything shown from a host (a log) can be
scrubbed of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from sqlalchemy.engine import make_url

from engine.fleet.hosts import FleetError

PASSED_ALWAYS = ("FETCHFLEET_SECRET_KEY",)  # passed when set here: proxy passwords decrypt there


def worker_env(
    db_url: str,
    worker_db: str | None = None,
    pass_names: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of the workers started on a host: the database URL they reach
    PostgreSQL with, the secret key if set here, and the variables named in ``pass_names``
    (an API token), taken from ``environ`` (this process's environment)."""
    environ = os.environ if environ is None else environ
    env = {"FETCHFLEET_DB": worker_db or db_url}
    for name in PASSED_ALWAYS:
        if environ.get(name):
            env[name] = environ[name]
    for name in pass_names:
        if name not in environ:
            raise FleetError(f"{name}: not set in this environment")
        env[name] = environ[name]
    return env


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The secrets in a worker environment: the database password and every other value
    (tokens, the key), longest first so a scrub never leaves part of one behind."""
    found = []
    for name, value in env.items():
        if name == "FETCHFLEET_DB":
            try:
                password = make_url(value).password
            except Exception:  # not a URL we can parse: treat all of it as secret
                password = value
            if password:
                found.append(str(password))
        elif value:
            found.append(value)
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
