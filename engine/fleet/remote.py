"""The shell lines run on a host, and the environment they get over the ssh channel.

Secrets (the database URL with its password, API tokens) never go on a command line, where
``ps`` on either machine would show them: ``env_payload`` writes ``NAME=VALUE`` lines that
the remote shell reads from its stdin and exports before it starts Python.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Read NAME=VALUE lines from stdin until EOF and export them (values taken literally).
READ_ENV = (
    'while IFS= read -r _l || [ -n "$_l" ]; do '
    'case "$_l" in [A-Za-z_]*=*) export "$_l" ;; esac; done'
)


def env_payload(env: Mapping[str, str]) -> str:
    for name, value in env.items():
        if not _NAME.match(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"environment variable {name}: a value cannot span lines")
    return "".join(f"{k}={v}\n" for k, v in env.items())


def probe_command(python: str, workdir: str) -> str:
    """Print the Python version, then the project's probe JSON (``engine.fleet.probe``)."""
    py = shlex.quote(python)
    return (
        f"{READ_ENV}; {py} -c 'import platform; print(platform.python_version())' || exit 10; "
        f"cd {shlex.quote(workdir)} || exit 11; exec {py} -m engine.fleet.probe"
    )


def start_command(
    python: str,
    workdir: str,
    host_label: str,
    processes: int,
    log_path: str,
    countries: Sequence[str] = (),
) -> str:
    """Start ``engine.run worker`` detached in a session of its own (its pid is its process
    group, which ``stop_command`` signals) and print that pid. With ``countries``, its
    workers claim only tasks of those countries (and of none)."""
    q = shlex.quote
    worker = (
        f"{q(python)} -m engine.run worker --processes {int(processes)} "
        f"--host-label {q(host_label)}"
    )
    if countries:
        worker += f" --countries {q(','.join(countries))}"
    return (
        f'{READ_ENV}; cd {q(workdir)} || exit 11; mkdir -p "$(dirname {q(log_path)})" || exit 12; '
        f"setsid nohup {worker} > {q(log_path)} 2>&1 < /dev/null & echo $!"
    )


def stop_command(pids: list[int]) -> str:
    """SIGTERM each launch's process group (workers finish in-flight items and sign off)."""
    groups = " ".join(f"-{int(p)}" for p in pids)
    return f"kill -TERM -- {groups} 2>/dev/null; true"


def alive_command(pids: list[int], groups: bool = True) -> str:
    """Print the launches' process groups that still have a process (``groups``), or the
    processes among ``pids`` still running."""
    sign = "-" if groups else ""
    return (
        "; ".join(f"kill -0 -- {sign}{int(p)} 2>/dev/null && echo {int(p)}" for p in pids)
        + "; true"
    )
