"""File descriptors: each client connection holds at most one upstream connection, so the
gateway needs about two per connection. Raise the soft limit to the hard one and, if even
that is short, lower `max_connections` so an accept never fails for want of a descriptor."""

from __future__ import annotations

import dataclasses
import logging
import resource

from engine.gateway.config import GatewayConfig

log = logging.getLogger(__name__)
RESERVED_FDS = 64  # the database, the metrics port, logs


def raise_fd_limit(config: GatewayConfig) -> GatewayConfig:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * config.max_connections + RESERVED_FDS
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    fits = max(1, (soft - RESERVED_FDS) // 2)
    if fits < config.max_connections:
        log.warning("gateway: %d file descriptors allow %d connections", soft, fits)
        return dataclasses.replace(config, max_connections=fits)
    return config
