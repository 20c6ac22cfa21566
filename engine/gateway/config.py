"""The gateway's knobs, with the defaults `serve-proxy` uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8899
    strategy: str = "round_robin"
    retries: int = 2  # further members tried after the first attempt fails
    connect_timeout_s: float = 5.0  # reaching a member and its handshake
    response_timeout_s: float = 30.0  # a plain-HTTP answer through a member, whole
    head_timeout_s: float = 10.0  # a client's request head (or SOCKS handshake), whole
    idle_timeout_s: float = 60.0  # a kept-alive client connection between requests
    tunnel_idle_s: float = 300.0  # a tunnel with no byte either way is closed
    max_connections: int = 1024  # client connections at once; more are closed at once
    reuse_port: bool = False  # SO_REUSEPORT: several gateway processes on one port
    max_head_bytes: int = 64 * 1024
    max_body_bytes: int = 8 << 20  # a plain-HTTP request body
    max_buffer_bytes: int = 4 << 20  # a response bigger than this is streamed, not judged
    buffer_budget_bytes: int = 256 << 20  # all responses buffered at once (per process);
    # past it, answers are streamed (no block-page failover, no cache) — engine/gateway/budget.py
    # plain HTTP through `http` members: idle connections kept for the next request
    # (engine/gateway/keepalive.py); 0 idle per member turns the pool off
    upstream_idle_per_member: int = 32
    upstream_idle_total: int = 1024  # per process
    upstream_idle_timeout_s: float = 15.0  # an idle one is closed after this long
    # every member in use: connections opened ahead for the next tunnel through it (CONNECT,
    # SOCKS5, plain HTTP through a SOCKS/https member; engine/gateway/standby.py); 0: off
    standby_per_member: int = 2
    standby_total: int = 256  # per process
    standby_timeout_s: float = 10.0  # one not used this long is closed, not replaced
    failure_threshold: int = 3  # consecutive failures that open a member's breaker
    cooldown_s: float = 30.0  # open → half-open
    site_cooldown_s: float = 300.0  # a member a site blocked is avoided for it this long
    grace_s: float = 10.0  # Ctrl-C / SIGTERM: open connections get this long to finish
