"""Real judges and real proxy servers on loopback, one set per test session.

Judges (each on its own loopback address):

* `httpbin`       — the `httpbin` package from PyPI under gunicorn, as httpbin.org runs it;
* `httpbin_nginx` — the same httpbin behind Debian's nginx, which appends the peer to
  X-Forwarded-For (`$proxy_add_x_forwarded_for`) and sets X-Real-IP, as a load balancer does;
* `azenv`         — `sim/azenv_wsgi.py` (azenv.php's page) under gunicorn.

Proxy servers, from Debian, each with a generated config in a private directory and its own
outgoing address on loopback (so the judge sees *that* address, not the checker's 127.0.0.1):

========================  ==============  =============================================
name                      outgoing        config
========================  ==============  =============================================
squid                     127.0.0.21      default: Via + X-Forwarded-For: <client>
squid_ff_off              127.0.0.22      ``forwarded_for off`` (X-Forwarded-For: unknown)
squid_delete_novia        127.0.0.23      ``forwarded_for delete`` + ``via off``
squid_auth                127.0.0.24      default + basic auth (basic_ncsa_auth)
tinyproxy                 127.0.0.31      default (Via)
tinyproxy_novia           127.0.0.32      ``DisableViaHeader Yes``
tinyproxy_xtinyproxy      127.0.0.33      ``XTinyproxy Yes`` (X-Tinyproxy: <client>)
tinyproxy_auth            127.0.0.34      ``BasicAuth``
dante                     127.0.0.51      SOCKS5 + SOCKS4, no auth (``external:``)
dante_auth                127.0.0.52      SOCKS5 ``socksmethod: username`` (system user)
microsocks                127.0.0.53      SOCKS5 with ``-u/-P``, ``-b`` outgoing address
privoxy                   127.0.0.1       privoxy 3.0.34 cannot choose its outgoing address
========================  ==============  =============================================

Every server runs in the foreground in its own session; readiness is a bounded connect
poll (or the process exiting, which fails with its stderr), and `RealBed.close()` stops
them (SIGTERM, then SIGKILL of the group after 5 s). dante's username method checks the
system password database, so `dante_auth` needs root (it creates the system user
`fetchfleet-socks` with a fresh password); without root it is left out and its tests skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sim.nginx import config_head, free_port, stop_process

CHECKER_IP = "127.0.0.1"
USER, PASSWORD = "ffuser", "s3cr3t-Pw"
DANTE_USER = "fetchfleet-socks"
GUNICORN = [sys.executable, "-m", "gunicorn"]

#: the command line of a server, given its private directory and port
ArgvFor = Callable[[Path, int], list[str]]
#: server name -> (binary, Debian package)
BINARIES = {
    "squid": ("/usr/sbin/squid", "squid"),
    "tinyproxy": ("/usr/bin/tinyproxy", "tinyproxy"),
    "danted": ("/usr/sbin/danted", "dante-server"),
    "microsocks": ("/usr/bin/microsocks", "microsocks"),
    "privoxy": ("/usr/sbin/privoxy", "privoxy"),
    "nginx": ("/usr/sbin/nginx", "nginx"),
}


@dataclass
class Server:
    name: str
    host: str
    port: int
    exit_ip: str  # the address the server connects onward from
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log: Path | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


def missing_binaries() -> list[str]:
    """Debian packages whose binaries are not installed."""
    return [pkg for path, pkg in BINARIES.values() if not Path(path).exists()]


def missing_python() -> list[str]:
    out = []
    for mod, pkg in (("httpbin", "httpbin"), ("gunicorn", "gunicorn")):
        try:
            __import__(mod)
        except ImportError:
            out.append(pkg)
    return out


#: Kills the servers' process groups once its stdin closes, i.e. when the test process
#: dies however it dies (PR_SET_PDEATHSIG would not do: squid, tinyproxy and dante change
#: user, which clears it).
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
for g in sys.argv[1:]:
    try:
        os.killpg(int(g), signal.SIGKILL)
    except OSError:
        pass
"""


def _spawn(name: str, argv: list[str], root: Path, **kw: object) -> subprocess.Popen[bytes]:
    log = root / f"{name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )


def _wait_ready(servers: list[Server], timeout_s: float = 20.0) -> None:
    """Until every server accepts a TCP connection; RuntimeError naming the first that
    exited (with its log's tail) or is still silent at the deadline."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    while pending:  # bounded by the deadline
        for s in list(pending):
            if s.proc is not None and s.proc.poll() is not None:
                tail = s.log.read_text(errors="replace")[-800:] if s.log else ""
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}: {tail}")
            with contextlib.suppress(OSError), socket.create_connection((s.host, s.port), 0.2):
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"not listening after {timeout_s:g} s: {names}")
        if pending:
            time.sleep(0.05)


# --------------------------------------------------------------------------- configs


def md5_crypt(password: str) -> str:
    """An Apache MD5 hash for squid's basic_ncsa_auth, from openssl (Python's `crypt`
    module is deprecated and gone in 3.13)."""
    out = subprocess.run(
        ["openssl", "passwd", "-apr1", "-stdin"],
        input=password.encode(), capture_output=True, check=True,
    )  # fmt: skip
    return out.stdout.decode().strip()


def squid_conf(d: Path, port: int, exit_ip: str, extra: str) -> str:
    return f"""
http_port 127.0.0.1:{port}
visible_hostname fetchfleet-test
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache_store_log none
coredump_dir {d}
cache deny all
cache_mem 1 MB
shutdown_lifetime 0 seconds
pinger_enable off
dns_nameservers 127.0.0.1
tcp_outgoing_address {exit_ip}
{extra}
http_access deny all
"""


def tinyproxy_conf(port: int, exit_ip: str, extra: str) -> str:
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    return (
        f"{user}Port {port}\nListen 127.0.0.1\nBind {exit_ip}\nTimeout 30\n"
        f"MaxClients 200\nAllow 127.0.0.0/8\nLogLevel Error\n{extra}\n"
    )


def dante_conf(port: int, exit_ip: str, method: str) -> str:
    user = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    return f"""
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: {exit_ip}
clientmethod: none
socksmethod: {method}
{user}
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
"""


def ensure_dante_user() -> str | None:
    """A system user for dante's username method (it checks the password database): the
    password is fresh each session. None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(DANTE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             DANTE_USER],
            check=True, capture_output=True,
        )  # fmt: skip
    pw = "d" + secrets.token_hex(8)
    subprocess.run(["chpasswd"], input=f"{DANTE_USER}:{pw}".encode(), check=True)
    return pw


# --------------------------------------------------------------------------- the bed


class RealBed:
    """Starts every judge and proxy server; `close()` stops them all."""

    def __init__(self) -> None:
        # not under pytest's 0700 basetemp: squid's and tinyproxy's unprivileged users
        # (when started as root) must reach their files
        self.root = Path(tempfile.mkdtemp(prefix="ff-real-proxies-"))
        self.root.chmod(0o755)
        self.judges: dict[str, str] = {}  # judge form -> URL
        self.servers: dict[str, Server] = {}
        self._procs: list[Server] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.dante_password: str | None = None

    def _dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o777)  # squid and tinyproxy drop to an unprivileged user when root
        return d

    def _server(self, name: str, host: str, exit_ip: str, argv_for: ArgvFor) -> Server:
        d = self._dir(name)
        port = free_port(host)
        s = Server(name, host, port, exit_ip, log=d / f"{name}.log")
        argv = argv_for(d, port)
        s.proc = _spawn(name, argv, d)
        self._procs.append(s)
        return s

    def start(self) -> None:
        self._start_judges()
        self._start_proxies()
        groups = [str(s.proc.pid) for s in self._procs if s.proc is not None]
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *groups], stdin=subprocess.PIPE
        )
        _wait_ready(self._procs)

    def _start_judges(self) -> None:
        def gunicorn(app: str, host: str) -> ArgvFor:
            return lambda d, port: [
                *GUNICORN, "--bind", f"{host}:{port}", "--worker-class", "gthread",
                "--threads", "16", "--workers", "1", "--chdir", str(Path.cwd()),
                "--log-level", "warning", "--worker-tmp-dir", str(d), app,
            ]  # fmt: skip

        hb = self._server("httpbin", "127.0.0.40", "", gunicorn("httpbin:app", "127.0.0.40"))
        az = self._server("azenv", "127.0.0.42", "", gunicorn("sim.azenv_wsgi:app", "127.0.0.42"))
        d = self._dir("nginx")
        (d / "tmp").mkdir(exist_ok=True)
        port = free_port("127.0.0.41")
        conf = f"""{config_head(d, 512)}
    access_log off;
    server {{
        listen 127.0.0.41:{port};
        location / {{
            proxy_pass http://{hb.addr};
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        ng = Server("nginx", "127.0.0.41", port, "", log=d / "nginx.log")
        ng.proc = _spawn(
            "nginx",
            ["/usr/sbin/nginx", "-p", str(d), "-e", str(d / "nginx-error.log"),
             "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
            d,
        )  # fmt: skip
        self._procs.append(ng)
        self.judges = {
            "httpbin": f"http://{hb.addr}/get",
            "httpbin_show_env": f"http://{hb.addr}/get?show_env=1",
            "httpbin_nginx": f"http://{ng.addr}/get",
            "azenv": f"http://{az.addr}/azenv.php",
            "httpbin_ip": f"http://{hb.addr}/ip",
        }

    def _start_proxies(self) -> None:
        squid = BINARIES["squid"][0]
        passwd = self.root / "squid.passwd"
        passwd.write_text(f"{USER}:{md5_crypt(PASSWORD)}\n")
        passwd.chmod(0o644)
        auth = (
            f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n"
            "auth_param basic children 2 startup=1 idle=1\n"
            "auth_param basic realm fetchfleet-test\n"
            "acl authed proxy_auth REQUIRED\nhttp_access allow localhost authed"
        )
        open_access = "http_access allow localhost"
        squids = {
            "squid": ("127.0.0.21", open_access),
            "squid_ff_off": ("127.0.0.22", f"forwarded_for off\n{open_access}"),
            "squid_delete_novia": (
                "127.0.0.23",
                f"forwarded_for delete\nvia off\n{open_access}",
            ),
            "squid_auth": ("127.0.0.24", auth),
        }
        for name, (ip, extra) in squids.items():

            def argv(d: Path, port: int, ip: str = ip, extra: str = extra) -> list[str]:
                (d / "squid.conf").write_text(squid_conf(d, port, ip, extra))
                return [squid, "-N", "-f", str(d / "squid.conf")]

            self.servers[name] = self._server(name, "127.0.0.1", ip, argv)

        tiny = {
            "tinyproxy": ("127.0.0.31", ""),
            "tinyproxy_novia": ("127.0.0.32", "DisableViaHeader Yes"),
            "tinyproxy_xtinyproxy": ("127.0.0.33", "XTinyproxy Yes"),
            "tinyproxy_auth": ("127.0.0.34", f"BasicAuth {USER} {PASSWORD}"),
        }
        for name, (ip, extra) in tiny.items():

            def argv(d: Path, port: int, ip: str = ip, extra: str = extra) -> list[str]:
                (d / "tinyproxy.conf").write_text(tinyproxy_conf(port, ip, extra))
                return [BINARIES["tinyproxy"][0], "-d", "-c", str(d / "tinyproxy.conf")]

            self.servers[name] = self._server(name, "127.0.0.1", ip, argv)

        self.dante_password = ensure_dante_user()
        dantes = {"dante": ("127.0.0.51", "none")}
        if self.dante_password is not None:
            dantes["dante_auth"] = ("127.0.0.52", "username")
        for name, (ip, method) in dantes.items():

            def argv(d: Path, port: int, ip: str = ip, method: str = method) -> list[str]:
                (d / "danted.conf").write_text(dante_conf(port, ip, method))
                return [BINARIES["danted"][0], "-f", str(d / "danted.conf"), "-N", "1"]

            self.servers[name] = self._server(name, "127.0.0.1", ip, argv)

        def microsocks(d: Path, port: int) -> list[str]:
            return [
                BINARIES["microsocks"][0], "-i", "127.0.0.1", "-p", str(port),
                "-u", USER, "-P", PASSWORD, "-b", "127.0.0.53",
            ]  # fmt: skip

        self.servers["microsocks"] = self._server(
            "microsocks", "127.0.0.1", "127.0.0.53", microsocks
        )

        def privoxy(d: Path, port: int) -> list[str]:
            (d / "config").write_text(
                f"listen-address 127.0.0.1:{port}\nconfdir {d}\nlogdir {d}\n"
                "enable-remote-toggle 0\nenable-edit-actions 0\n"
            )
            return [BINARIES["privoxy"][0], "--no-daemon", str(d / "config")]

        self.servers["privoxy"] = self._server("privoxy", "127.0.0.1", CHECKER_IP, privoxy)

    def close(self) -> None:
        for s in self._procs:  # all at once: squid takes a moment to stop
            if s.proc is not None and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGQUIT if s.name == "nginx" else signal.SIGTERM)
        for s in self._procs:
            stop_process(s.proc)
        if self._watchdog is not None:  # everything stopped: nothing left for it to do
            self._watchdog.kill()
            self._watchdog.wait()
            if self._watchdog.stdin:
                self._watchdog.stdin.close()
        shutil.rmtree(self.root, ignore_errors=True)
