"""SimWorld: the judge and a fleet of proxies on loopback, run in shard subprocesses.

    with SimWorld(WorldConfig(n_proxies=50, mix="demo")) as world:
        check(world.proxies_file, judge=world.judge_url)   # grade against world.truth

Why subprocesses: the benchmark checks 10,000 proxies at ~1,500/s on two cores, so the world
must not share the checker's event loop, and it shards proxies over processes to use both
cores. Why a claimed /16 of 127.0.0.0/8 per world: each proxy listens on its own address and
connects onward from it (the judge tells proxies apart by client address), and other
engineers' tests may run worlds at the same time; an flock on /tmp/fetchfleet-sim/127.N.lock
(inherited by the shards, so it is held until the last of them exits) keeps worlds apart.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from sim.api import API_HOST, ApiConfig, write_ids
from sim.fleet import (
    Behaviour,
    PlannedProxy,
    ProxyTruth,
    load_truth,
    plan_fleet,
    proxy_address,
    write_list,
    write_truth,
)
from sim.judge import JUDGE_HOST
from sim.shops import ShopsConfig, ShopWorld

__all__ = ["ApiConfig", "ProxyTruth", "SimWorld", "SimWorldError", "WorldConfig", "load_truth"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = Path(tempfile.gettempdir()) / "fetchfleet-sim"
MANY_PROXIES = 2000  # above this, two shard processes by default


class SimWorldError(RuntimeError):
    """The world could not start (a shard failed, timed out, or no address block was free)."""


@dataclass(frozen=True)
class WorldConfig:
    """What world to build. The same config (and seed) gives the same list and truth."""

    n_proxies: int
    mix: str | Mapping[str, float] = "demo"  # "demo", "bench" or behaviour -> fraction
    seed: int = 1
    processes: int | None = None  # None: 2 above 2,000 proxies, else 1
    out_dir: Path | None = None  # where proxies.txt/truth.json go; None: a temp dir, removed
    latency_ms: tuple[int, int] = (20, 300)  # alive proxies' added latency, uniform
    slow_latency_ms: tuple[int, int] = (1000, 2000)  # the `slow` behaviour's latency
    startup_timeout_s: float = 60.0
    shops: ShopsConfig | None = None  # shop sites (sim/shops.py), in a process of their own
    api: ApiConfig | None = None  # the backfill API (sim/api.py) on 127.0.0.3, in shard 0
    ids: int = 0  # write this many API IDs to <out>/ids.txt
    # A network of this machine's local addresses (e.g. 10.77.128.0/17 made local with
    # `ip route add local 10.77.128.0/17 dev lo`) to put the judge (its first address) and
    # the proxies on instead of 127.x, which other network namespaces cannot reach: the
    # fleet tests' hosts check these proxies (tests/netns.py, SIM_BLOCK). The shops (and
    # their SOCKS proxy) then listen on the block's last two addresses (``shops_config``).
    bind: str | None = None

    def shops_config(self) -> ShopsConfig | None:
        """The shops as this world starts them: on ``bind``'s last two addresses when set
        (a namespace host reaches neither 127.0.0.4 nor .5), else as configured."""
        if self.shops is None or self.bind is None:
            return self.shops
        net = ipaddress.ip_network(self.bind)
        shop_host, socks_host = net.broadcast_address - 1, net.broadcast_address - 2
        if (
            self.n_proxies
            and ipaddress.ip_address(proxy_address(0, self.n_proxies, self.bind)) >= socks_host
        ):
            raise ValueError(f"{self.bind} has no room for {self.n_proxies} proxies and the shops")
        return replace(self.shops, host=str(shop_host), socks_host=str(socks_host))

    def shard_count(self) -> int:
        wanted = self.processes or (2 if self.n_proxies > MANY_PROXIES else 1)
        if wanted < 1:
            raise ValueError(f"processes must be at least 1, not {wanted}")
        return wanted


def claim_octet() -> tuple[int, int]:
    """(octet, lock fd) for the first free 127.<octet>.0.0/16; the lock dies with its holders."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for octet in range(1, 255):
        fd = os.open(LOCK_DIR / f"127.{octet}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return octet, fd
    raise SimWorldError(f"all 254 address blocks are taken (locks in {LOCK_DIR})")


def reserve_judge_port(host: str = JUDGE_HOST) -> socket.socket:
    """A bound (not listening) socket on 127.0.0.2 holding a free port for the shards.

    SO_REUSEPORT is set after the bind so the kernel picks a truly free port, and then every
    shard can bind the same port with SO_REUSEPORT: the kernel spreads judge connections.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def port_is_closed(host: str, port: int) -> bool:
    """True if nothing (not even a wildcard listener) would answer on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def cpu_seconds_of(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SimWorld:
    """Start with `with SimWorld(config) as world:` (or start()/stop()).

    After start: judge_url (httpbin /get), judge_azenv_url, judge_ip_url, judge_host,
    judge_port, proxies_file, truth_file, truth (list[ProxyTruth], list order), pids,
    startup_s (seconds from start() until every listener was ready).
    """

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.judge_host = JUDGE_HOST if config.bind is None else proxy_address(0, 0, config.bind)
        self.judge_port = 0
        self.judge_url = self.judge_azenv_url = self.judge_ip_url = ""
        self.proxies_file = Path()
        self.truth_file = Path()
        self.truth: list[ProxyTruth] = []
        self.pids: list[int] = []
        self.startup_s = 0.0
        self.octet = 0
        self.shops: ShopWorld | None = None  # with config.shops
        self.api_url = ""  # http://127.0.0.3:PORT when config.api is set
        self.api_template = ""  # api_url + /users/{id}
        self.ids_file: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock_fd: int | None = None
        self._temp_dir: Path | None = None
        self._cpu_seen: dict[int, float] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> SimWorld:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._procs:
            raise SimWorldError("this world is already running")
        began = time.monotonic()
        cfg = self.config
        shards = cfg.shard_count()
        self.octet, self._lock_fd = claim_octet()
        atexit.register(self.stop)
        try:
            plan = (  # no proxies: a world for the API alone
                plan_fleet(
                    cfg.n_proxies,
                    cfg.mix,
                    cfg.seed,
                    self.octet,
                    cfg.latency_ms,
                    cfg.slow_latency_ms,
                    cfg.bind,
                )
                if cfg.n_proxies
                else []
            )
            plan = [self._keep_refused_closed(p) for p in plan]
            judge_placeholder = reserve_judge_port(self.judge_host)
            try:
                self.judge_port = judge_placeholder.getsockname()[1]
                moved = self._start_shards(plan, shards)
            finally:
                judge_placeholder.close()
            plan = [replace(p, port=moved[p.index]) if p.index in moved else p for p in plan]
            self._write_files(plan)
            if cfg.shops is not None:
                self.shops = ShopWorld(cfg.shops_config()).start()
        except BaseException:
            self.stop()
            raise
        base = f"http://{self.judge_host}:{self.judge_port}"
        self.judge_url = f"{base}/get"
        self.judge_azenv_url = f"{base}/azenv"
        self.judge_ip_url = f"{base}/ip"
        if self.api_url:
            self.api_template = self.api_url + "/users/{id}"
        self.startup_s = time.monotonic() - began
        log.info(
            "sim world up: %d proxies on 127.%d.0.0/16, %d shard(s), judge %s, %.2fs",
            cfg.n_proxies,
            self.octet,
            shards,
            base,
            self.startup_s,
        )

    def stop(self) -> None:
        """Terminate the shards (SIGKILL after 5 s), release the address block. Idempotent."""
        for proc in self._procs:
            self._remember_cpu(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("sim shard %s ignored SIGTERM, killing it", proc.pid)
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs = []
        if self.shops is not None:
            self.shops.stop()
            self.shops = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        atexit.unregister(self.stop)

    def is_running(self) -> bool:
        """True while every shard process is alive."""
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used by the shard processes so far (also after stop)."""
        for pid in self.pids:
            self._remember_cpu(pid)
        return sum(self._cpu_seen.values())

    def api_stats(self) -> dict[str, Any]:
        """The API's counters (GET /stats): requests, rate_limited (429s), peak_window, …"""
        return self._api_call("GET", "/stats")

    def api_timeline(self) -> list[int]:
        """Admitted API requests in each second since the first (GET /stats/timeline)."""
        return self._api_call("GET", "/stats/timeline")  # type: ignore[return-value]

    def api_reset(self) -> None:
        """Zero the API's counters and its rate window."""
        self._api_call("POST", "/reset")

    @contextlib.contextmanager
    def api_holding(self, after: int = 0) -> Iterator[None]:
        """Inside the block the API sends ``after`` more answers, then holds the rest
        (``sim.hold``); leaving it sends them."""
        self._api_call("GET", f"/__sim/hold?after={int(after)}")
        try:
            yield
        finally:
            self.api_release()

    def api_release(self) -> int:
        """Send every held answer and stop holding; returns how many were held."""
        return int(self._api_call("GET", "/__sim/release")["released"])

    def _api_call(self, method: str, path: str) -> dict[str, Any]:
        import urllib.request

        if not self.api_url:
            raise SimWorldError("this world has no API: WorldConfig(api=ApiConfig(...))")
        req = urllib.request.Request(self.api_url + path, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def endpoints(self) -> dict[str, Any]:
        """What the CLI prints: where the judge is, where the list and its truth are."""
        extra: dict[str, Any] = {}
        if self.api_url:
            extra = {"api_url": self.api_url, "api_template": self.api_template}
        if self.ids_file is not None:
            extra["ids_file"] = str(self.ids_file)
        return {
            **extra,
            "judge_url": self.judge_url,
            "judge_azenv_url": self.judge_azenv_url,
            "judge_ip_url": self.judge_ip_url,
            "proxies_file": str(self.proxies_file),
            "truth_file": str(self.truth_file),
            "n_proxies": len(self.truth),
            "address_block": self.config.bind or f"127.{self.octet}.0.0/16",
            "pids": self.pids,
            "startup_s": round(self.startup_s, 3),
            **({"shops": self.shops.endpoints()} if self.shops else {}),
        }

    # -- internals -------------------------------------------------------------------------

    def _remember_cpu(self, pid: int) -> None:
        seconds = cpu_seconds_of(pid)
        if seconds is not None:
            self._cpu_seen[pid] = seconds

    @staticmethod
    def _keep_refused_closed(proxy: PlannedProxy) -> PlannedProxy:
        """A refused proxy must really refuse: skip a port some wildcard listener holds."""
        if proxy.behaviour != Behaviour.REFUSED or port_is_closed(proxy.host, proxy.port):
            return proxy
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((proxy.host, 0))
            return replace(proxy, port=sock.getsockname()[1])

    def _start_shards(self, plan: list[PlannedProxy], shards: int) -> dict[int, int]:
        """Spawn the shards, hand each its slice, wait for every ready line; {index: new port}."""
        listening = [p for p in plan if p.behaviour != Behaviour.REFUSED]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        assert self._lock_fd is not None
        for _ in range(shards):
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sim", "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                    pass_fds=(self._lock_fd,),
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, we stop them
                )
            )
        self.pids = [proc.pid for proc in self._procs]
        for shard, proc in enumerate(self._procs):
            spec = {
                "shard": shard,
                "seed": self.config.seed,
                "judge_host": self.judge_host,
                "judge_port": self.judge_port,
                "proxies": [p.to_json() for p in listening[shard::shards]],
            }
            if shard == 0 and self.config.api is not None:
                spec["api"] = self.config.api.to_json()
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(spec).encode() + b"\n")
                proc.stdin.flush()  # stdin stays open: its EOF tells the shard we are gone
            except BrokenPipeError:
                pass  # reported below with the exit code
        moved: dict[int, int] = {}
        for ready in self._read_ready_lines():
            moved.update({int(k): v for k, v in ready["moved"].items()})
            if "api_port" in ready:
                self.api_url = f"http://{API_HOST}:{ready['api_port']}"
        return moved

    def _read_ready_lines(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.config.startup_timeout_s
        buffers = {proc.stdout.fileno(): b"" for proc in self._procs if proc.stdout}
        by_fd = {proc.stdout.fileno(): proc for proc in self._procs if proc.stdout}
        ready: list[dict[str, Any]] = []
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                selector.register(fd, selectors.EVENT_READ)
            while len(ready) < len(self._procs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SimWorldError(
                        f"sim shards not ready after {self.config.startup_timeout_s:.0f}s"
                    )
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        proc = by_fd[key.fd]
                        code = proc.wait(timeout=5)
                        raise SimWorldError(
                            f"sim shard {proc.pid} exited with code {code} before it was"
                            " ready (its log is on stderr)"
                        )
                    buffers[key.fd] += chunk
                    if b"\n" in buffers[key.fd]:
                        ready.append(json.loads(buffers[key.fd].split(b"\n", 1)[0]))
                        selector.unregister(key.fd)
        return ready

    def _write_files(self, plan: list[PlannedProxy]) -> None:
        cfg = self.config
        if cfg.out_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="fetchfleet-sim-"))
            out = self._temp_dir
        else:
            out = Path(cfg.out_dir).resolve()
            out.mkdir(parents=True, exist_ok=True)
        self.proxies_file = out / "proxies.txt"
        self.truth_file = out / "truth.json"
        self.truth = write_list(plan, self.proxies_file)
        mix = cfg.mix if isinstance(cfg.mix, str) else dict(cfg.mix)
        meta = {
            "seed": cfg.seed,
            "mix": mix,
            "address_block": cfg.bind or f"127.{self.octet}.0.0/16",
        }
        write_truth(self.truth, self.truth_file, meta)
        if cfg.ids:
            self.ids_file = write_ids(out / "ids.txt", cfg.ids, cfg.seed)
