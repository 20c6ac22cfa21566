"""``engine.run fetch`` and ``engine.run doctor``: one fetch through the cascade, and what
each fetch method needs on this machine.

    python -m engine.run fetch URL --country India [--method http|playwright|selenium|tor|api]
        [--proxy URL] [--selector CSS ...] [--show] [--json]
    python -m engine.run doctor [--json]

``fetch`` prints the result and every attempt (method, status, error type, block reason,
time, proxy with its password hidden); ``--show`` adds the content; ``--json`` prints one
JSON object and nothing else. Exit code 0 when the fetch succeeded, 1 when it did not,
2 for bad input. Kept apart from ``engine/run.py``, which only calls ``add_commands``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_commands(sub: Any) -> None:
    f = sub.add_parser(
        "fetch",
        help="fetch one URL through the fetcher cascade and show every attempt",
        description="Fetch one URL through the cascade: the country's method order (or "
        "--method), each answer validated (status, length, selectors, block pages), "
        "blocked or invalid answers moving on to the next method, transient errors retried.",
        epilog="Exit code 0 when the fetch succeeded, 1 when every method failed, 2 for bad "
        "input. Settings: FETCHFLEET_* variables (fetchers/config.py), e.g. "
        "FETCHFLEET_CHROMIUM_PATH, FETCHFLEET_TOR_SOCKS.",
    )
    f.add_argument("url")
    f.add_argument("--country", help="picks the method order from the policy (default row)")
    f.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        help="http, playwright, selenium, tor or api; repeat (or comma-separate) for an order",
    )
    f.add_argument("--proxy", help="proxy URL: http://, socks5://[user:pass@]host:port")
    f.add_argument(
        "--selector", action="append", default=[], metavar="CSS", help="must match (repeatable)"
    )
    f.add_argument("--wait-selector", metavar="CSS", help="browsers wait for this")
    f.add_argument("--min-length", type=int, metavar="BYTES", help="shortest valid body")
    f.add_argument("--timeout", type=float, metavar="S", help="seconds per attempt (20)")
    f.add_argument("--retries", type=int, metavar="N", help="retries per method (2)")
    f.add_argument("--policy", metavar="FILE", help="TOML policy file (rows override defaults)")
    f.add_argument("--api-template", metavar="URL", help="api: endpoint with {url}/{page}")
    f.add_argument(
        "--api-auth-env", metavar="NAME", help="api: NAME of the variable holding the token"
    )
    f.add_argument("--api-pagination", choices=("none", "page", "next"), default="none", help="api")
    f.add_argument("--api-pages", type=int, default=1, metavar="N", help="api: at most N pages")
    f.add_argument("--show", action="store_true", help="print the content too")
    f.add_argument("--json", action="store_true", help="print one JSON object only")
    f.set_defaults(func=cmd_fetch)

    d = sub.add_parser(
        "doctor",
        help="what each fetch method needs and whether it is here",
        description="List what each fetch method needs (Python package, binary, tor ports) "
        "and whether this machine has it. Looks only: nothing is launched.",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object only")
    d.set_defaults(func=cmd_doctor)


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_fetch(args: argparse.Namespace) -> int:
    from fetchers import Fetcher, FetchSettings, PolicyError
    from fetchers.methods.api import ApiSpec

    overrides: dict[str, Any] = {}
    if args.policy:
        overrides["policy_file"] = args.policy
    if args.retries is not None:
        overrides["retries"] = args.retries
    if args.timeout is not None:
        overrides["fetch_timeout_s"] = args.timeout
    try:
        settings = FetchSettings(**overrides)
    except Exception as exc:  # pydantic names the field and the bound
        return _usage(f"invalid option: {exc}")
    api = None
    if args.api_template or args.api_auth_env or args.api_pagination != "none":
        try:
            api = ApiSpec(
                url_template=args.api_template,
                auth_env=args.api_auth_env,
                pagination=args.api_pagination,
                max_pages=args.api_pages,
            )
        except ValueError as exc:
            return _usage(str(exc))
    methods = ",".join(args.method) if args.method else None

    async def run() -> Any:
        async with Fetcher(settings) as fetcher:
            return await fetcher.fetch(
                args.url,
                country=args.country,
                method=methods,
                proxy=args.proxy,
                selectors=args.selector,
                wait_selector=args.wait_selector,
                min_length=args.min_length,
                api=api,
            )

    try:
        result = asyncio.run(run())
    except (PolicyError, ValueError) as exc:
        return _usage(str(exc))
    if args.json:
        print(json.dumps(result.to_dict(content=args.show)))
    else:
        print(format_result(result))
        if args.show and result.success:
            print("-" * 72)
            print(result.text)
    return EXIT_OK if result.success else EXIT_FAILED


def format_result(result: Any) -> str:
    head = "OK  " if result.success else "FAILED"
    lines = [
        f"{head} {result.url}",
        f"  method: {result.method_used or '-'}   status: {result.status or '-'}   "
        f"bytes: {len(result.content):,}   time: {result.elapsed_ms:,.0f} ms"
        + ("   (from cache)" if result.from_cache else ""),
    ]
    if result.final_url and result.final_url != result.url:
        lines.append(f"  final url: {result.final_url}")
    if not result.success:
        lines.append(f"  error: {result.error_type}: {result.error}")
    lines.append("  attempts:")
    for i, a in enumerate(result.attempts, 1):
        outcome = "ok" if a.ok else str(a.error_type)
        detail = a.blocked_reason or a.message or ""
        if a.retry_after is not None:
            detail += f" (Retry-After {a.retry_after:g}s)"
        extra = f"  via {a.proxy}" if a.proxy else ""
        flag = "  [explored]" if a.explored else ""
        lines.append(
            f"    {i}. {a.method:<10} {a.status or '-':>4}  {outcome:<12} {a.ms:>8,.0f} ms"
            f"  {detail}{extra}{flag}".rstrip()
        )
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    from fetchers.doctor import doctor, method_status

    rows = doctor()
    status = method_status()
    if args.json:
        print(
            json.dumps(
                {
                    "checks": [r.to_dict() for r in rows],
                    "methods": {
                        k: {"available": v is None, "reason": v} for k, v in status.items()
                    },
                }
            )
        )
        return EXIT_OK
    width = max(len(r.needs) for r in rows)
    current = None
    for r in rows:
        if r.method != current:
            current = r.method
            reason = status.get(r.method)
            state = "available" if reason is None else f"unavailable: {reason}"
            print(f"{r.method}  ({state})")
        mark = "ok     " if r.ok else "missing"
        where = r.found_at if r.ok else f"install: {r.install}"
        print(f"  {mark} {r.needs:<{width}}  {where}")
    return EXIT_OK
