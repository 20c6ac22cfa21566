"""`tor`: HTTP through Tor's SOCKS port, a new identity through stem on the control port.

- Requests go through curl_cffi (the same impersonation as `http`) with
  `socks5h://<tor_socks>`: names are resolved by Tor, never by the local resolver.
- After a block, `on_blocked()` asks Tor for a new identity (`SIGNAL NEWNYM`: new circuits,
  a new exit) if Tor allows one now — it rate-limits NEWNYM to one per ~10 s, and stem's
  `get_newnym_wait()` says how long is left; we never sleep for it inside a fetch (the
  cascade moves on instead) and never send one Tor would ignore.
- With `tor_launch`, when nothing answers on the control port we start our own tor through
  `stem.process.launch_tor_with_config` (owned by this process: it exits with us). With
  `tor_offline` it gets `DisableNetwork 1`: it never contacts the public network (tests and
  the demo); it then has no circuits, so `tor_socks` should name a stand-in SOCKS proxy.
- The control password, if any, comes from the environment variable *named* by
  `tor_password_env` (else cookie authentication), and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchers.errors import MethodUnavailable
from fetchers.methods.base import FetchMethod, FetchRequest, RawResponse, Requirement
from fetchers.methods.http import CURL_REQUIREMENT, CurlClient

if TYPE_CHECKING:
    from fetchers.config import FetchSettings

__all__ = ["TorController", "TorMethod", "parse_hostport"]

log = logging.getLogger(__name__)

_PROBE_TTL_S = 10.0


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return default_host, int(text)
    return (host.strip("[]") or default_host), int(port)


def port_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class TorController:
    """stem on Tor's control port: NEWNYM with its rate limit, and launching our own tor.

    Blocking (stem is synchronous): call it from a thread (`asyncio.to_thread`).
    """

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.host, self.port = parse_hostport(settings.tor_control)
        self._lock = threading.Lock()
        self._controller: Any = None
        self.process: Any = None  # a tor we launched
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None
        self.newnym_sent = 0

    def _password(self) -> str | None:
        name = self.settings.tor_password_env
        return os.environ.get(name) if name else None

    def controller(self) -> Any:
        """An authenticated stem Controller (launching tor first when allowed)."""
        from stem import SocketError
        from stem.control import Controller

        with self._lock:
            if self._controller is not None and self._controller.is_alive():
                return self._controller
            if not port_answers(self.host, self.port) and self.settings.tor_launch:
                self.launch()
            try:
                ctl = Controller.from_port(address=self.host, port=self.port)
            except SocketError as exc:
                raise MethodUnavailable(
                    f"tor: no control port at {self.host}:{self.port} ({exc}); start tor "
                    "(Debian package `tor`) or set FETCHFLEET_TOR_LAUNCH=true"
                ) from None
            try:
                ctl.authenticate(password=self._password())
            except Exception as exc:
                ctl.close()
                raise MethodUnavailable(
                    f"tor: control port {self.host}:{self.port} refused authentication "
                    f"({type(exc).__name__}); set FETCHFLEET_TOR_PASSWORD_ENV to the name of "
                    "a variable holding the password, or enable CookieAuthentication"
                ) from None
            self._controller = ctl
            return ctl

    def launch(self) -> None:
        """Start tor through stem on our control port (and SOCKS port when it is free)."""
        import stem.process

        cfg = self.settings
        socks_host, socks_port = parse_hostport(cfg.tor_socks)
        data_dir = cfg.tor_data_dir
        if data_dir is None:
            self._data_dir = tempfile.TemporaryDirectory(prefix="fetchfleet-tor-")
            data_dir = Path(self._data_dir.name)
        config = {
            "ControlPort": f"{self.host}:{self.port}",
            "SocksPort": "0"
            if port_answers(socks_host, socks_port)
            else f"{socks_host}:{socks_port}",
            "DataDirectory": str(data_dir),
            "CookieAuthentication": "1",
            "Log": "notice stdout",
        }
        if cfg.tor_offline:
            config["DisableNetwork"] = "1"
        log.info(
            "tor: launching %s (offline=%s) on control %s",
            cfg.tor_cmd,
            cfg.tor_offline,
            cfg.tor_control,
        )
        try:
            # completion_percent=0 and no timeout: stem's timeout uses SIGALRM, which only
            # works in the main thread; we return at the first bootstrap line and wait below
            self.process = stem.process.launch_tor_with_config(
                config=config,
                tor_cmd=cfg.tor_cmd,
                completion_percent=0,
                timeout=None,
                take_ownership=True,
            )
        except OSError as exc:
            raise MethodUnavailable(
                f"tor: could not start {cfg.tor_cmd!r} ({exc}); install the Debian package `tor`"
            ) from None
        deadline = time.monotonic() + 10
        while not port_answers(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def newnym(self) -> float:
        """Ask for a new identity if Tor allows it now: 0.0 when sent, else the seconds
        left before it will (nothing is sent then)."""
        from stem import Signal

        ctl = self.controller()
        wait = float(ctl.get_newnym_wait())
        if wait > 0:
            return wait
        ctl.signal(Signal.NEWNYM)
        self.newnym_sent += 1
        return 0.0

    def close(self) -> None:
        with self._lock:
            if self._controller is not None:
                with contextlib.suppress(Exception):
                    self._controller.close()
                self._controller = None
            if self.process is not None:
                with contextlib.suppress(Exception):
                    self.process.terminate()
                    self.process.wait(timeout=10)
                self.process = None
            if self._data_dir is not None:
                self._data_dir.cleanup()
                self._data_dir = None


class TorMethod(FetchMethod):
    name = "tor"
    uses_proxy = False  # Tor is the route

    def __init__(self, settings: FetchSettings) -> None:
        super().__init__(settings)
        self.client = CurlClient(settings, max_clients=min(32, settings.http_max_clients))
        self.control = TorController(settings)
        self._probe: tuple[float, str | None] | None = None

    def requirements(self) -> list[Requirement]:
        return [
            CURL_REQUIREMENT,
            Requirement("stem (Tor control port)", "python", "stem", "pip: stem"),
            Requirement("tor", "binary", self.settings.tor_cmd, "the Debian package `tor`"),
            Requirement("Tor SOCKS port", "service", self.settings.tor_socks, "a running tor"),
        ]

    def unavailable_reason(self) -> str | None:
        for need in self.requirements():
            if need.kind == "python" and need.found() is None:
                return f"{need.what} is missing: install {need.install}"
        now = time.monotonic()
        if self._probe and now - self._probe[0] < _PROBE_TTL_S:
            return self._probe[1]
        reason = None
        host, port = parse_hostport(self.settings.tor_socks)
        if not port_answers(host, port):
            ctl_host, ctl_port = parse_hostport(self.settings.tor_control)
            if not self.settings.tor_launch:
                reason = (
                    f"no Tor SOCKS port answers at {self.settings.tor_socks}: start tor "
                    "(Debian package `tor`) or set FETCHFLEET_TOR_LAUNCH=true"
                )
            elif self.settings.tor_offline or port_answers(ctl_host, ctl_port):
                reason = (
                    f"no SOCKS port answers at {self.settings.tor_socks} (an offline tor has "
                    "no circuits: point FETCHFLEET_TOR_SOCKS at a SOCKS proxy)"
                )
            elif Requirement("tor", "binary", self.settings.tor_cmd, "").found() is None:
                reason = (
                    f"tor is missing ({self.settings.tor_cmd}): install the Debian package `tor`"
                )
        self._probe = (now, reason)
        return reason

    async def fetch(self, request: FetchRequest) -> RawResponse:
        if self.settings.tor_launch and self.control.process is None:
            host, port = parse_hostport(self.settings.tor_socks)
            if not port_answers(host, port):
                await asyncio.to_thread(self.control.controller)  # launches tor
                self._probe = None
        self.check_available()
        socks = f"socks5h://{self.settings.tor_socks}"
        return await self.client.request(replace(request, proxy=socks))

    async def new_identity(self) -> float:
        """0.0 when Tor took a NEWNYM, else seconds until it would."""
        return await asyncio.to_thread(self.control.newnym)

    async def on_blocked(self) -> bool:
        try:
            wait = await self.new_identity()
        except MethodUnavailable as exc:
            log.info("tor: no new identity: %s", exc)
            return False
        if wait:
            log.info("tor: NEWNYM rate-limited for %.1fs more; not retrying through tor now", wait)
        return wait == 0.0

    async def aclose(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.control.close)
