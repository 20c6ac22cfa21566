"""Run commands on a host through the system ``ssh`` client.

BatchMode: a background process must never wait at a password or host-key prompt, so a host
whose key is unknown or that wants a password fails at once with ssh's own message. One
ControlMaster connection per host (sockets in the private runtime directory, ``%C`` a hash of
the target) is reused for ControlPersist seconds; keepalives notice a dead link.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engine.private_dir import private_dir

_TARGET = re.compile(r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>[^@\s:]+)(?::(?P<port>\d{1,5}))?$")


class SshError(Exception):
    """ssh could not run the command (unreachable, auth, host key): the message says why."""


def target_args(target: str) -> list[str]:
    """``alias`` / ``host`` / ``user@host`` / ``user@host:port`` → ssh's destination args."""
    m = _TARGET.match(target or "")
    if not m or m["host"].startswith("-"):
        raise ValueError(f"ssh target {target!r}: write an ssh_config alias or [user@]host[:port]")
    dest = f"{m['user']}@{m['host']}" if m["user"] else m["host"]
    return (["-p", m["port"]] if m["port"] else []) + ["--", dest]


@dataclass
class SshRunner:
    """``config``: an ssh_config file used instead of ``~/.ssh/config`` (``ssh -F``)."""

    config: Path | None = None
    control_dir: Path | None = None
    connect_timeout_s: int = 10
    command_timeout_s: float = 60.0  # a command that does not answer in time raises SshError

    def base_args(self) -> list[str]:
        control = self.control_dir or private_dir() / "ssh"
        control.mkdir(mode=0o700, exist_ok=True)
        config = ["-F", str(self.config)] if self.config else []
        return [
            "ssh",
            *config,
            "-o", "BatchMode=yes",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control}/%C",
            "-o", "ControlPersist=60",
            "-o", "ServerAliveInterval=15",
            "-o", f"ConnectTimeout={self.connect_timeout_s}",
        ]  # fmt: skip

    def run(
        self, target: str, command: str, stdin: str = "", timeout_s: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` (a POSIX shell line) there, feeding ``stdin``; ssh's own failures
        (exit 255) raise SshError, the command's exit status is the caller's."""
        timeout_s = self.command_timeout_s if timeout_s is None else timeout_s
        try:
            done = subprocess.run(
                [*self.base_args(), *target_args(target), command],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise SshError(f"{target}: no answer within {timeout_s:.0f} s") from None
        if done.returncode == 255:
            raise SshError(f"{target}: {explain(done.stderr)}")
        return done

    def stream(self, target: str, command: str) -> subprocess.Popen[str]:
        """Start ``command`` there and hand back the ssh process, its stdout a pipe of lines.

        Its stdin stays open: a remote command that must end with the caller (``tail -F``)
        waits on it and ends at EOF, which closing stdin (or ssh ending) sends. Its own
        session, so a Ctrl-C at the terminal reaches the caller, who ends it in order."""
        return subprocess.Popen(
            [*self.base_args(), *target_args(target), command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

    def run_stream(
        self, target: str, command: str, stdin: IO[bytes], timeout_s: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """``run``, with the command's stdin streamed from ``stdin`` (a pipe, e.g. another
        process's stdout): large input (a tar of the project) never sits in memory."""
        try:
            done = subprocess.run(
                [*self.base_args(), *target_args(target), command],
                stdin=stdin,
                capture_output=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise SshError(f"{target}: no answer within {timeout_s:.0f} s") from None
        out = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if out.returncode == 255:
            raise SshError(f"{target}: {explain(out.stderr)}")
        return out

    def close(self, target: str) -> None:
        """End the host's master connection (``ssh -O exit``), if there is one."""
        subprocess.run(
            [*self.base_args(), "-O", "exit", *target_args(target)],
            capture_output=True,
            timeout=30,
        )


def explain(stderr: str) -> str:
    """ssh's last error line, with what to do for the usual ones."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "ssh failed"
    if "Host key verification failed" in stderr or "No ED25519 host key" in stderr:
        return f"{last} — the host key is unknown: connect once by hand (ssh HOST) to check and accept it"
    if "Permission denied" in stderr:
        return f"{last} — no usable key: load it into the agent (ssh-add) or set IdentityFile"
    return last
