"""What each fetch method needs on this machine, and whether it is there.

Looks only: Python packages by `importlib.util.find_spec` (nothing is imported), binaries on
PATH or at the configured paths, and tor's SOCKS and control ports by a TCP connect on
loopback. No browser is launched. `python -m engine.run doctor` prints it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fetchers.config import FetchSettings
from fetchers.methods.base import METHOD_NAMES, method_class
from fetchers.methods.tor import parse_hostport, port_answers

__all__ = ["Check", "doctor", "method_status"]


@dataclass(frozen=True, slots=True)
class Check:
    method: str
    needs: str
    kind: str  # python, binary, service
    ok: bool
    found_at: str
    install: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def doctor(settings: FetchSettings | None = None) -> list[Check]:
    """One row per thing a method needs."""
    settings = settings or FetchSettings()
    rows: list[Check] = []
    for name in METHOD_NAMES:
        method = method_class(name)(settings)
        for need in method.requirements():
            if need.kind == "service":
                host, port = parse_hostport(need.target)
                where = need.target if port_answers(host, port, timeout=0.5) else None
            else:
                where = need.found()
            rows.append(
                Check(name, need.what, need.kind, where is not None, where or "", need.install)
            )
        if name == "tor":
            host, port = parse_hostport(settings.tor_control)
            up = port_answers(host, port, timeout=0.5)
            rows.append(
                Check(
                    "tor",
                    "Tor control port (NEWNYM)",
                    "service",
                    up,
                    settings.tor_control if up else "",
                    "a running tor with ControlPort, or FETCHFLEET_TOR_LAUNCH=true",
                )
            )
    return rows


def method_status(settings: FetchSettings | None = None) -> dict[str, str | None]:
    """Per method: None when it can run, else why not (what the cascade would report)."""
    settings = settings or FetchSettings()
    return {name: method_class(name)(settings).unavailable_reason() for name in METHOD_NAMES}
