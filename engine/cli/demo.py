"""``engine.run demo``: validation and scraping offline, against the simulated world.

First the proxy fleet is validated (as `validate` would); then one sim shop per country is
scraped through each country's cascade (the policy's order: a JS-challenge shop that needs a
browser, a captcha shop, a SOCKS-only shop reached through the "tor" SOCKS stand-in, a
rate-limited one, a slow one, a flaky one), and the summary says which method won where and
how the stored products match the shops' ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from storage.db import open_database
from storage.proxies import pool_states


def compare_with_truth(db_url: str, truth: list[Any], timeout_s: float) -> dict[str, Any]:
    """How the stored pool matches the sim's ground truth.

    Flaky proxies are not judged, nor are live ones whose latency leaves less than half of the
    check timeout (`too_slow`): whether those make it depends on the machine's load, not on
    the checker, so counting them would turn a busy machine into false negatives.
    """
    from fetchers.proxy_parse import parse_proxy_line

    db = open_database(db_url)
    with db.connect() as conn:
        rows = pool_states(conn)
    db.dispose()
    fp = fn = anon_wrong = proto_wrong = judged = too_slow = 0
    for t in truth:
        if t.alive_expected is None:
            continue
        if t.alive_expected and (t.latency_ms or 0) > timeout_s * 1000 / 2:
            too_slow += 1
            continue
        key = parse_proxy_line(t.line).key
        status, anonymity, protocol = rows.get(key, (None, None, None))
        judged += 1
        alive = status == "active"
        fp += alive and not t.alive_expected
        fn += t.alive_expected and not alive
        if alive and t.alive_expected:
            anon_wrong += anonymity != t.anonymity_expected
            proto_wrong += protocol != t.protocol
    return {
        "judged": judged,
        "false_positives": fp,
        "false_negatives": fn,
        "anonymity_wrong": anon_wrong,
        "protocol_wrong": proto_wrong,
        "too_slow": too_slow,
    }


def run_demo(args: argparse.Namespace) -> int:
    from engine.cli.common import run_job
    from sim.world import SimWorld, WorldConfig

    if not args.db:
        args.db = str(Path("data") / "demo.duckdb")
    out = Path("data") / "demo-world"
    print(f"starting the simulated world ({args.proxies} proxies on loopback)…", file=sys.stderr)
    with SimWorld(WorldConfig(n_proxies=args.proxies, mix="demo", seed=7, out_dir=out)) as world:
        print(f"judge {world.judge_url}; proxy list {world.proxies_file}", file=sys.stderr)
        behaviours = Counter(t.behaviour for t in world.truth)
        print(
            "fleet: " + ", ".join(f"{b} {n}" for b, n in sorted(behaviours.items())),
            file=sys.stderr,
        )
        json_mode = args.json
        args.json = True  # collect the summary; print it our way below
        from contextlib import redirect_stdout
        from io import StringIO

        buf = StringIO()
        params = {
            "judge_url": world.judge_url,
            "proxies_file": str(world.proxies_file),
            "timeout_s": args.timeout,
            "batch_size": args.batch_size,
        }
        with redirect_stdout(buf):
            code = run_job(args, "validate", params)
        summary = json.loads(buf.getvalue().strip().splitlines()[-1])
        from engine.cli.common import resolve_db_url

        summary["truth"] = compare_with_truth(resolve_db_url(args.db), world.truth, args.timeout)
        summary["sim_cpu_s"] = round(world.cpu_seconds(), 2)
    if not args.skip_scrape:
        summary["scrape_run"] = scrape_shops(args)
        if summary["scrape_run"]["status"] != "completed":
            code = max(code, 1)
    args.json = json_mode
    if json_mode:
        print(json.dumps(summary, default=str))
        return code
    from engine.cli.common import format_summary

    print(format_summary(summary))
    t = summary["truth"]
    print(
        f"  vs ground truth ({t['judged']} non-flaky proxies): {t['false_positives']} false "
        f"positives, {t['false_negatives']} false negatives, {t['anonymity_wrong']} wrong "
        f"anonymity, {t['protocol_wrong']} wrong protocol"
        + (f" ({t['too_slow']} too slow for a {args.timeout:g} s timeout)" if t["too_slow"] else "")
    )
    if "scrape_run" in summary:
        from engine.jobs.scrape.cli import format_scrape

        sc = summary["scrape_run"]
        print(f"scrape run {sc['run_id']} of {len(sc['shops'])} sim shops: {sc['status']}")
        print("\n".join(format_scrape(sc)))
        print(
            f"  vs ground truth: {sc['truth']['stored']} of {sc['truth']['expected']} products "
            f"stored, {sc['truth']['missing']} missing, {sc['truth']['unexpected']} unexpected"
        )
    print(
        f"  database: {args.db}; export with `python -m engine.run export --db {args.db} "
        "--table proxies --format csv --out proxies.csv`"
    )
    return code


def demo_spec(shops: Any) -> str:
    """One source per shop (its country's cascade decides the method), catalog pages only."""
    lines = ['name = "demo"', 'entity_type = "product"']
    for info in shops.shops.values():
        lines += ["[[sources]]", f'country = "{info.spec.country}"']
        lines.append(f'start_urls = ["{info.catalog_url(1)}"]')
    lines += [
        "[follow]",
        'css = ["a.next"]',
        "max_depth = 1000",
        "[[extract]]",
        'list = "li.product"',
        "[extract.fields]",
        'id = { attr = "data-id" }',
        'name = ".name"',
        'price = { css = ".price", type = "float" }',
        'currency = { css = ".price", attr = "data-currency" }',
        'sku = ".sku"',
        'category = ".category"',
    ]
    return "\n".join(lines) + "\n"


def scrape_shops(args: argparse.Namespace) -> dict[str, Any]:
    """Scrape the default sim shops through the cascade; summary with the ground truth."""
    import os
    from contextlib import redirect_stdout
    from io import StringIO

    from engine.cli.common import resolve_db_url, run_job
    from sim.shops import ShopWorld, default_shops
    from storage.scrape import entity_rows

    print("starting the sim shops (one per country)…", file=sys.stderr)
    with ShopWorld(default_shops(seed=7, n_products=40)) as shops:
        # The SOCKS-only shop stands for a site reachable through Tor: its SOCKS proxy plays
        # Tor's SOCKS port (no tor process, nothing leaves loopback). Pool workers inherit it.
        os.environ["FETCHFLEET_TOR_SOCKS"] = shops.socks_proxy.split("://", 1)[1]
        spec_path = Path("data") / "demo-world" / "demo-spec.toml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(demo_spec(shops))
        params = {"spec": str(spec_path), "batch_size": 1}
        buf = StringIO()
        with redirect_stdout(buf):
            run_job(args, "scrape", params)
        summary = json.loads(buf.getvalue().strip().splitlines()[-1])
        expected = {(i.spec.country, p["id"]) for i in shops.shops.values() for p in i.products()}
    db = open_database(resolve_db_url(args.db))
    with db.connect() as conn:
        got = {(r["country"], r["external_id"]) for r in entity_rows(conn, "product")}
    db.dispose()
    out = {
        "run_id": summary["run_id"],
        "status": summary["status"],
        "shops": sorted(shops.shops),
        **summary["scrape"],
        "truth": {
            "expected": len(expected),
            "stored": len(got & expected),
            "missing": len(expected - got),
            "unexpected": len(got - expected),
        },
    }
    return out


def add_commands(sub: Any) -> None:
    from engine.cli.common import common_opts

    d = sub.add_parser(
        "demo",
        help="start the simulated world, validate its proxies and scrape its shops",
        description="Offline demo: starts sim/ on loopback (a judge and a "
        "proxy fleet), validates the fleet, then scrapes one sim shop per country "
        "through the fetcher cascade; prints the summaries, which method won where, "
        "and how both match the sim's ground truth.",
    )
    common_opts(d)
    d.add_argument("--proxies", type=int, default=120, help="sim proxies (120)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--concurrency", type=int, default=200)
    d.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds per check attempt (5: well above the slowest sim proxy's 2 s)",
    )
    d.add_argument("--batch-size", type=int, default=20)
    d.add_argument("--max-attempts", type=int)
    d.add_argument(
        "--skip-scrape", action="store_true", help="validate only; do not scrape the sim shops"
    )
    d.set_defaults(func=run_demo)
