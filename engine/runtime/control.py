"""A control socket beside a DuckDB file, so other terminals can reach the coordinator.

DuckDB lets one process open the file; ``engine.run status`` / ``stop`` / ``resume`` from a
second terminal would get only a lock error. Instead they send one JSON line over a Unix
socket (mode 0600, so only this user) and the coordinator answers from its own connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024


def control_path(database: str) -> Path:
    path = Path(database).resolve()
    sock = path.with_name(path.name + ".ctl")
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        from engine.private_dir import private_dir  # not /tmp: a planted socket would answer

        digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
        sock = private_dir() / f"{digest}.ctl"
    return sock


class ControlServer:
    def __init__(self, path: Path, coordinator: Any) -> None:
        self.path = path
        self.coordinator = coordinator
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        coordinator = self.coordinator

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    answer = {"ok": True, "result": dispatch(coordinator, json.loads(line))}
                except Exception as exc:
                    answer = {"ok": False, "error": str(exc)}
                self.wfile.write(json.dumps(answer, default=str).encode() + b"\n")

        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        # A short poll interval: stop() waits for the loop to notice, and the CLI's exit
        # waits for stop() (the default 0.5 s was up to half a second on every run).
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="control", daemon=True
        ).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def dispatch(coordinator: Any, request: dict[str, Any]) -> Any:
    from engine.summary import run_summary, runs_overview

    op = request.get("op")
    if op == "status":
        run_id = request.get("run_id")
        if run_id is None:
            return runs_overview(coordinator.db)
        return run_summary(coordinator.db, int(run_id), extra=True)
    if op == "command":
        status = coordinator.command(
            int(request["run_id"]),
            str(request["action"]),
            source=str(request.get("source", "control")),
        )
        return {"run_id": int(request["run_id"]), "status": status}
    raise ValueError(f"unknown control operation {op!r}")


def ask(path: Path, request: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request to a running coordinator; raises ConnectionError if none listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ConnectionError(f"no coordinator listening on {path}") from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ValueError(answer.get("error", "coordinator refused the request"))
    return answer["result"]
