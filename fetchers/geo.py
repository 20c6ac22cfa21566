"""Country of an IP address, offline.

Uses geoip2fast's IPv4+IPv6 country file (`geoip2fast-ipv6.dat.gz`, shipped inside the
wheel, MaxMind GeoLite2-derived). It is loaded lazily, once per process, on the first
lookup (~0.2 s, ~40 MB RAM); loading and lookups never touch the network — geoip2fast only
downloads when its `update_*` methods are called, which we never do (a test proves it with
an audit hook that forbids sockets). A lookup costs a few microseconds.

geoip2fast keeps its tables in module globals, so a process can only hold one data file:
keep every lookup going through this module.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from typing import Any

__all__ = ["DATA_FILE", "country_of"]

log = logging.getLogger(__name__)

DATA_FILE = "geoip2fast-ipv6.dat.gz"

_db: Any = None
_lock = threading.Lock()


def _load() -> Any:
    global _db
    with _lock:
        if _db is None:
            from geoip2fast import GeoIP2Fast

            _db = GeoIP2Fast(verbose=False, geoip2fast_data_file=DATA_FILE)
            log.debug("geoip2fast data loaded", extra={"data_file": DATA_FILE})
    return _db


@functools.lru_cache(maxsize=65536)
def country_of(ip: str) -> str | None:
    """ISO 3166 alpha-2 code of `ip`'s country, or None for private, loopback, reserved,
    unknown or invalid addresses."""
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not addr.is_global:
        return None
    db = _db if _db is not None else _load()
    code = db.lookup(str(addr)).country_code
    if not code or len(code) != 2 or not code.isalpha():
        return None  # geoip2fast's "--" (private / not found) and "" (invalid / error)
    return code.upper()
