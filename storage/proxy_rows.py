"""What a pool worker receives for a proxy check: kept apart from ``storage.proxies`` so that
unpickling a claimed task in a worker process does not import SQLAlchemy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ProxyRow:
    """What a check needs to reach a proxy (password decrypted, never logged)."""

    id: int
    key: str
    scheme: str | None
    host: str
    port: int
    username: str | None
    password: str | None
