"""A strict real server for rate-limit tests: Debian's nginx with ``limit_req``.

``LimitedOrigin(root, rate_per_s=20, burst=20)`` serves one small JSON record at
``/users/<anything>`` on 127.0.0.1 (a free port) behind

    limit_req_zone "origin" zone=origin:1m rate=<N>r/s;   # one bucket for every client
    limit_req zone=origin burst=<B>; limit_req_status 429;

nginx's ``limit_req`` is a leaky bucket (GCRA): a request arriving more than ``B`` emission
intervals early is refused with 429; within that it is delayed, never refused. Every request
is logged (``$msec $status``), so ``statuses()`` counts what the server answered, 429s
included — the server's word, not the client's. Used by ``tests/test_ratelimit_nginx.py`` and
``bench/ratelimit.py``; nginx is stopped on ``stop()`` (or leaving the ``with``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Self

NGINX = "/usr/sbin/nginx"
RECORD = b'{"id": "sim", "handle": "user.sim.test", "followers": 42}\n'


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NginxServer:
    """What every private nginx of the sim shares: started on entering a ``with`` (a
    subclass's ``start``), stopped gracefully on leaving it."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_nginx(proc)


class LimitedOrigin(NginxServer):
    """nginx on 127.0.0.1 with one ``limit_req`` bucket of ``rate_per_s`` and ``burst``."""

    def __init__(self, root: Path, rate_per_s: int = 20, burst: int = 20) -> None:
        self.root = root
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/users/{{id}}"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def _config(self) -> str:
        r = self.root
        return f"""
{config_head(r, 1024)}
    log_format limit '$msec $status $request_uri';
    access_log {r}/access.log limit;
    limit_req_zone "origin" zone=origin:1m rate={self.rate_per_s}r/s;
    server {{
        listen 127.0.0.1:{self.port} backlog=1024;
        root {r}/www;
        location = /health {{ return 204; }}
        location /users/ {{
            limit_req zone=origin burst={self.burst};
            limit_req_status 429;
            default_type application/json;
            try_files /record.json =404;
        }}
    }}
}}
"""

    def start(self, timeout_s: float = 10.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "www").mkdir(exist_ok=True)
        (self.root / "www" / "record.json").write_bytes(RECORD)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.port = free_port()
        self.proc = start_nginx(
            self.root, self._config(), f"http://127.0.0.1:{self.port}/health", timeout_s
        )

    def requests(self) -> list[tuple[float, int]]:
        """(time, status) of every request to /users/ so far, in log order."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[2].startswith("/users/"):
                out.append((float(parts[0]), int(parts[1])))
        return out

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status in self.requests())


def config_head(root: Path, connections: int) -> str:
    """The start of a private nginx's config, up to inside its `http` block (pid, logs and
    temp paths under `root`)."""
    r = root
    # as root, nginx's workers would run as nobody and not reach a private temp dir
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
http {{
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    tcp_nodelay on;
    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;"""


def start_nginx(
    root: Path, config: str, health_url: str, timeout_s: float
) -> subprocess.Popen[bytes]:
    """Run nginx in the foreground with `config` (written to root/nginx.conf) until
    `health_url` answers; RuntimeError with its stderr if it exits or the deadline passes."""
    conf = root / "nginx.conf"
    conf.write_text(config)
    proc = subprocess.Popen(
        [NGINX, "-p", str(root), "-e", str(root / "nginx-error.log"),
         "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:  # bounded: until it answers, exits, or the deadline
        with contextlib.suppress(OSError), urllib.request.urlopen(health_url, timeout=2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else ""
            stop_nginx(proc)
            raise RuntimeError(f"nginx did not start: {err.strip()[-500:]}")
        time.sleep(0.05)


def stop_nginx(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop an nginx started in the foreground in its own session: gracefully (the log is
    flushed, workers finish), killed with its group after 5 s."""
    stop_process(proc, signal.SIGQUIT)
    if proc is not None and proc.stderr:
        proc.stderr.close()


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a server started in its own session; kill its group after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
