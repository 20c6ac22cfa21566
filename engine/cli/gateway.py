"""``serve-proxy``: the rotating proxy gateway until Ctrl-C / SIGTERM (then a drain)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from typing import Any

from engine.cli.common import EXIT_OK, UserError, resolve_db_url

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _csv(text: str | None, upper: bool = False) -> frozenset[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return frozenset(t.upper() if upper else t.lower() for t in items)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    from engine.gateway.auth import Credentials
    from engine.gateway.budget import parse_size
    from engine.gateway.config import GatewayConfig
    from engine.gateway.members import MemberFilter
    from engine.gateway.service import ServeOptions
    from engine.settings import Settings

    credentials = None
    if args.auth_env:
        try:
            credentials = Credentials.from_env(args.auth_env)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.host not in LOOPBACK and credentials is None:
        raise UserError(
            f"--host {args.host}: anyone who reaches it could use your proxies; set "
            "--auth-env NAME (NAME=user:password in the environment) to bind beyond loopback"
        )
    types = _csv(args.type)
    bad = types - {"http", "https", "socks4", "socks5"}
    if bad:
        raise UserError(f"--type {','.join(sorted(bad))}: use http, https, socks4, socks5")
    if args.retries < 0:
        raise UserError("--retries must be 0 or more")
    if args.upstream_idle < 0 or args.upstream_idle_total < 0:
        raise UserError("--upstream-idle and --upstream-idle-total must be 0 or more")
    if args.upstream_idle_timeout <= 0:
        raise UserError("--upstream-idle-timeout must be more than 0")
    if args.standby < 0 or args.standby_total < 0:
        raise UserError("--standby and --standby-total must be 0 or more")
    if args.standby_timeout <= 0:
        raise UserError("--standby-timeout must be more than 0")
    try:
        member_filter = MemberFilter(
            status=args.status,
            countries=_csv(args.country, upper=True),
            anonymity=_csv(args.anonymity),
            types=types,
        )
    except ValueError as e:  # --status tampering: never served
        raise UserError(str(e)) from None
    try:
        budget = parse_size(args.buffer_budget)
    except ValueError as e:
        raise UserError(f"--buffer-budget: {e}") from None
    settings = Settings()
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        strategy=args.strategy,
        retries=args.retries,
        connect_timeout_s=args.connect_timeout,
        response_timeout_s=args.timeout,
        max_connections=args.max_connections,
        buffer_budget_bytes=budget,
        upstream_idle_per_member=args.upstream_idle,
        upstream_idle_total=args.upstream_idle_total,
        upstream_idle_timeout_s=args.upstream_idle_timeout,
        standby_per_member=args.standby,
        standby_total=args.standby_total,
        standby_timeout_s=args.standby_timeout,
        failure_threshold=args.failure_threshold,
        cooldown_s=args.cooldown,
        grace_s=args.grace,
    )
    options = ServeOptions(
        db_url=resolve_db_url(args.db),
        filter=member_filter,
        credentials=credentials,
        cache=args.cache,
        cache_size=args.cache_size,
        ttl_s=args.ttl,
        metrics_port=args.metrics_port,
        metrics_host=args.host if args.host not in LOOPBACK else "127.0.0.1",
        refresh_s=args.refresh,
        judge_url=args.judge,
        secret_key=settings.secret_key,
        secret_key_file=str(settings.secret_key_file),
    )
    return config, options


async def serve(config: Any, options: Any, processes: int = 1) -> int:
    from engine.gateway.metrics import MetricsServer
    from engine.gateway.service import GatewayService, tune_gc
    from engine.gateway.workers import Supervisor, reserve_port

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    runner: Any
    metrics = None
    reserved = None
    try:
        try:
            if processes > 1:
                reserved = reserve_port(config.host, config.port)
                config = dataclasses.replace(config, port=reserved.getsockname()[1])
                runner = Supervisor(config, options, processes)
                n = await runner.start()
                port = config.port
                if options.metrics_port is not None:
                    metrics = MetricsServer(
                        runner.snapshot, options.metrics_host, options.metrics_port
                    )
                    await metrics.start()
            else:
                runner = GatewayService(config, options)
                n = await runner.start()
                port, metrics = runner.gateway.port, runner.metrics
                tune_gc()
        except OSError as e:
            raise UserError(f"--port {config.port}: cannot listen on {config.host}: {e}") from None
        where = f"{config.host}:{port}"
        print(
            f"gateway on {where} (HTTP, CONNECT, SOCKS5): {n} members, strategy "
            f"{config.strategy}, {processes} process{'es' if processes > 1 else ''}"
            + (f"; metrics http://{options.metrics_host}:{metrics.port}/metrics" if metrics else "")
            + " (Ctrl-C ends)",
            file=sys.stderr,
            flush=True,
        )
        if n == 0:
            print(
                f"warning: no stored proxy matches (status {options.filter.status}); requests "
                "get 503 until a validation run adds some",
                file=sys.stderr,
            )
        await stop.wait()
        print(f"draining (up to {config.grace_s:.0f}s)…", file=sys.stderr, flush=True)
        if processes > 1:
            code = await runner.stop(config.grace_s + 30)
            if metrics is not None:
                await metrics.stop()
            return EXIT_OK if code == 0 else code
        await runner.stop()
        return EXIT_OK
    finally:
        if reserved is not None:
            reserved.close()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)


def cmd_serve_proxy(args: argparse.Namespace) -> int:
    from engine.gateway.fds import raise_fd_limit

    config, options = build(args)
    config = raise_fd_limit(config)
    processes = args.processes if args.processes is not None else (os.cpu_count() or 1)
    if processes < 1:
        raise UserError("--processes must be 1 or more")
    try:
        import uvloop

        return uvloop.run(serve(config, options, processes))
    except ImportError:
        return asyncio.run(serve(config, options, processes))


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "serve-proxy",
        help="one local proxy (HTTP, CONNECT, SOCKS5) over the validated pool, until Ctrl-C",
        description="Every request goes out through a member of the stored pool chosen by "
        "--strategy, with failover to the next member on a connect error, timeout or block "
        "page. Choose a country or a sticky session per request through the proxy username: "
        "user-country-MY-session-abc.",
    )
    p.add_argument("--db", help="database URL or DuckDB path")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8899, help="port for HTTP and SOCKS5 (8899)")
    p.add_argument(
        "--strategy",
        default="round_robin",
        choices=["round_robin", "least_connections", "weighted", "adaptive"],
    )
    p.add_argument("--status", default="active", help="members' stored status (active)")
    p.add_argument("--country", help="only members in these countries, e.g. MY,IN")
    p.add_argument("--anonymity", help="only these anonymity levels, e.g. elite,anonymous")
    p.add_argument("--type", help="only these member protocols, e.g. http,socks5")
    p.add_argument("--retries", type=int, default=2, help="further members tried per request (2)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for a whole answer (30)")
    p.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to reach a member (5)"
    )
    p.add_argument(
        "--failure-threshold", type=int, default=3, help="failures that open a breaker (3)"
    )
    p.add_argument(
        "--cooldown", type=float, default=30.0, help="seconds before a half-open trial (30)"
    )
    p.add_argument("--cache", choices=["ttl", "lru"], help="cache plain-HTTP GETs")
    p.add_argument("--cache-size", type=int, default=10_000, help="cached responses (10000)")
    p.add_argument("--ttl", type=float, default=60.0, help="seconds a cached response lives (60)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics and /metrics.json here")
    p.add_argument(
        "--auth-env", metavar="NAME", help="require the credentials in $NAME (user:password)"
    )
    p.add_argument("--judge", metavar="URL", help="re-check failed members against this judge")
    p.add_argument(
        "--refresh", type=float, default=30.0, help="seconds between member reloads (30)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="client connections at once, per process (1024)",
    )
    p.add_argument(
        "--buffer-budget",
        default="256MB",
        metavar="SIZE",
        help="answers buffered at once to judge block pages, per process (256MB); past it "
        "answers are streamed without failover",
    )
    p.add_argument(
        "--upstream-idle",
        type=int,
        default=32,
        metavar="N",
        help="idle kept-alive connections per http member for plain HTTP (32); 0: one "
        "connection per request",
    )
    p.add_argument(
        "--upstream-idle-total",
        type=int,
        default=1024,
        metavar="N",
        help="idle kept-alive member connections in all, per process (1024)",
    )
    p.add_argument(
        "--upstream-idle-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds an idle member connection is kept (15)",
    )
    p.add_argument(
        "--standby",
        type=int,
        default=2,
        metavar="N",
        help="connections opened ahead to each member in use, so a tunnel through it "
        "(CONNECT, SOCKS5, plain HTTP through a SOCKS/https member) does not wait for one "
        "(2); 0: off",
    )
    p.add_argument(
        "--standby-total",
        type=int,
        default=256,
        metavar="N",
        help="connections opened ahead in all, per process (256)",
    )
    p.add_argument(
        "--standby-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds one opened ahead waits to be used before it is closed (10)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help="gateway processes on the port (SO_REUSEPORT); default: one per core",
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds to drain on Ctrl-C/SIGTERM (10)"
    )
    p.set_defaults(func=cmd_serve_proxy)
