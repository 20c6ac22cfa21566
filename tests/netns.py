"""Separate "hosts" on this machine for fleet tests: network namespaces, each with its own sshd.

Why namespaces: remote workers must reach PostgreSQL and the sim over a real network link that
a test can cut, through a real sshd, without a second machine. Each namespace gets a veth pair
whose host end is on a bridge at 10.77.0.1/24 (one bridge, so every namespace reaches the same
host address); the namespace end is 10.77.0.10+i. Namespaces share the filesystem and the pid
space, so the project and its .venv are at the same paths there, and `ps` sees every process.

PostgreSQL listens on 127.0.0.1 only; rather than reconfigure the server, ``Relay`` forwards
10.77.0.1:5432 to it (connections then arrive from 127.0.0.1, which pg_hba trusts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_HOST = "10.77.0.1"  # the root namespace's end (the bridge)
SUBNET_PREFIX = 24
# Local addresses of the root namespace that every host routes to through the bridge: the
# sim's judge and proxies bind there (``WorldConfig(bind=SIM_BLOCK)``), not on 127.x.
SIM_BLOCK = "10.77.128.0/17"
SSHD = "/usr/sbin/sshd"


def namespace_address(index: int) -> str:
    return f"10.77.0.{10 + index}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, no CAP_NET_ADMIN), or None."""
    if shutil.which("ip") is None:
        return "`ip` not found: install the Debian package `iproute2`"
    probe = f"ffprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        err = getattr(exc, "stderr", "") or str(exc)
        return f"`ip netns add` is not permitted here (needs root / CAP_NET_ADMIN): {err.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", probe)
    return None


class Relay:
    """A TCP relay in a thread: listen on (host, port), copy bytes to (to_host, to_port)."""

    def __init__(self, host: str, port: int, to_host: str, to_port: int) -> None:
        self.addr = (host, port)
        self.target = (to_host, to_port)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"relay on {self.addr} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._pipe_pair, *self.addr)
            )
        finally:
            self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.close()

    async def _pipe_pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._copy(reader, up_w), self._copy(up_r, writer))

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()


class LabLock:
    """One lab on the machine at a time: every lab uses 10.77.0.0/24 and the relay's port on
    10.77.0.1, so two test sessions (two checkouts) would collide. An ``flock`` on a file in
    /run/lock serialises them; a session waits for the other's lab to go (bounded by
    FETCHFLEET_LAB_WAIT_S, 900 s), also for a lab of a checkout that takes no lock (the
    bridge address still assigned)."""

    path = (Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")) / "fetchfleet-lab"

    def __init__(self) -> None:
        self.fd: int | None = None

    def take(self) -> LabLock:
        import fcntl

        within_s = float(os.environ.get("FETCHFLEET_LAB_WAIT_S", "900"))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + within_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _address_in_use(SUBNET_HOST):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)  # an unlocked lab still stands: wait for it
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(
                    f"another test session's namespace lab ({SUBNET_HOST}) stood for "
                    f"{within_s:.0f} s: wait for it to end (FETCHFLEET_LAB_WAIT_S)"
                )
            time.sleep(1.0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def _address_in_use(address: str) -> bool:
    out = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, timeout=30).stdout
    return any(part.split("/")[0] == address for line in out.splitlines() for part in line.split())


@dataclass
class Host:
    """One namespace: its name, address, the host end of its veth (cut it with `link down`)."""

    alias: str  # the ssh_config alias
    netns: str
    address: str
    veth: str
    sshd: subprocess.Popen[bytes] | None = None


@dataclass
class Lab:
    """N hosts, their sshd, a client key, an ssh config file naming them; all removed on close."""

    n: int
    dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    _lock: LabLock | None = field(default=None, repr=False)
    _sim_route: bool = False

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    def __enter__(self) -> Lab:
        self._lock = LabLock().take()  # the addresses are the machine's: one lab at a time
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        key = self.dir / "client_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
        )
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        self.bridge = f"ffbr{self.tag}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET_HOST}/{SUBNET_PREFIX}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        _ip("route", "add", "local", SIM_BLOCK, "dev", "lo", "table", "local")
        self._sim_route = True
        known, config = [], []
        for i in range(self.n):
            host = Host(
                f"ffhost{i}", f"ff{self.tag}n{i}", namespace_address(i), f"ff{self.tag}h{i}"
            )
            self.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip(
                "link",
                "add",
                host.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            )
            _ip("link", "set", host.veth, "master", self.bridge)
            _ip("link", "set", host.veth, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{SUBNET_PREFIX}", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "route", "add", SIM_BLOCK, "via", SUBNET_HOST)
            hostkey = self._start_sshd(host)
            known.append(f"{host.address} {hostkey}")
            config.append(
                f"Host {host.alias}\n  HostName {host.address}\n  User root\n"
                f"  IdentityFile {key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n"
                "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n"
            )
        (self.dir / "known_hosts").write_text("\n".join(known) + "\n")
        self.ssh_config.write_text("\n".join(config))
        for host in self.hosts:
            self._wait_port(host.address, 22)

    def _start_sshd(self, host: Host) -> str:
        """Start the host's sshd (its own host key, our authorized key); returns the key line."""
        d = self.dir / host.alias
        d.mkdir()
        hostkey = d / "host_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
            check=True,
            timeout=30,
        )
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port 22\nListenAddress {host.address}\nHostKey {hostkey}\n"
            f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AcceptEnv FETCHFLEET_*\nMaxStartups 50\nMaxSessions 50\n"
        )
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "sshd.log", "wb"),  # noqa: SIM115 - the child keeps it
        )
        pub = (d / "host_ed25519.pub").read_text().split()
        return f"{pub[0]} {pub[1]}"

    def _wait_port(self, address: str, port: int, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        while True:
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex((address, port)) == 0:
                    return
            if time.monotonic() > deadline:
                logs = [(self.dir / h.alias / "sshd.log") for h in self.hosts]
                text = "\n".join(p.read_text() for p in logs if p.exists())
                raise RuntimeError(f"sshd on {address}:{port} did not come up:\n{text}")
            time.sleep(0.1)

    def close(self) -> None:
        for host in self.hosts:
            self.kill_leftovers(host)
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
                try:
                    host.sshd.wait(10)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait(10)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", host.veth)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.netns)
        if self.bridge:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", self.bridge)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._sim_route:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("route", "del", "local", SIM_BLOCK, "dev", "lo", "table", "local")
            self._sim_route = False

    @staticmethod
    def kill_leftovers(host: Host) -> None:
        """Whatever a test left running in the namespace (not the sshd: terminated below)."""
        out = subprocess.run(
            ["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=30
        ).stdout.split()
        own = host.sshd.pid if host.sshd else None
        for pid in out:
            with contextlib.suppress(ProcessLookupError, ValueError):
                if int(pid) != own:
                    os.kill(int(pid), 9)


@contextlib.contextmanager
def lab(n: int, directory: Path) -> Iterator[Lab]:
    with Lab(n, directory) as built:
        yield built
