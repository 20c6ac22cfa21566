"""File descriptors: each client connection holds at most one upstream connection, so the
gateway needs about two per connection, plus the idle kept-alive member connections
(`upstream_idle_total`) and the ones opened ahead (`standby_total`). Raise the soft limit to
the hard one and, if even that is short, shrink the idle pool and the standby pool, then
`max_connections`, so an accept never fails for want of a descriptor."""

from __future__ import annotations

import dataclasses
import logging
import resource

from engine.gateway.config import GatewayConfig

log = logging.getLogger(__name__)
RESERVED_FDS = 64  # the database, the metrics port, logs


def raise_fd_limit(config: GatewayConfig) -> GatewayConfig:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = config.upstream_idle_total + config.standby_total
    want = 2 * config.max_connections + spare + RESERVED_FDS
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft >= want:
        return config
    room = max(0, soft - RESERVED_FDS - 2 * config.max_connections)
    standby = min(config.standby_total, room // 4)  # the kept-alive pool saves more
    idle = min(config.upstream_idle_total, room - standby)
    log.warning(
        "gateway: %d file descriptors allow %d idle and %d standby member connections",
        soft, idle, standby,
    )  # fmt: skip
    config = dataclasses.replace(config, upstream_idle_total=idle, standby_total=standby)
    fits = max(1, (soft - RESERVED_FDS) // 2)
    if fits < config.max_connections:
        log.warning("gateway: %d file descriptors allow %d connections", soft, fits)
        return dataclasses.replace(config, max_connections=fits)
    return config
