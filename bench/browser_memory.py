"""Browser memory over many pages, and browser pages/s on the JS-challenge site.

Fetches N catalog pages of a sim shop guarded by the JS challenge through one browser
method (Playwright or Selenium, the system Chromium), the way the cascade does (a fresh
context per page; cookie hand-off off, so *every* page solves the challenge: the worst
case), and samples the memory of the browser process tree every K pages:

- PSS (proportional set size: pages shared between Chromium's processes split among them —
  what the tree really costs the machine) and the sum of RSS (an upper bound), from /proc;
- the number of processes in the tree.

    .venv/bin/python bench/browser_memory.py --method playwright --pages 500
    .venv/bin/python bench/browser_memory.py --method selenium --pages 500
    .venv/bin/python bench/browser_memory.py --method playwright --pages 500 --relaunch-every 0

`--relaunch-every 0` never relaunches (to see what the relaunch buys). `--http-pages N`
then lets one browser page earn the clearance cookie and fetches N pages with the http
method carrying it (hand-off on, 64 at once), for the pages/s a browser is compared with.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fetchers import Fetcher, FetchSettings
from fetchers.methods._browser import browser_tree_memory
from sim.shops import ShopInfo, ShopsConfig, ShopSpec, ShopWorld

MIB = 2**20


async def measure(args: argparse.Namespace, world: ShopWorld) -> dict:
    shop = world["challenge"]
    relaunch = args.relaunch_every or 10**9
    settings = FetchSettings(
        browser_relaunch_every=relaunch,
        browser_pages=args.concurrency,
        handoff_cookies=False,
        explore_rate=0.0,
        retries=1,
        fetch_timeout_s=30,
    )
    samples: list[dict] = []
    failures = 0
    began = time.monotonic()
    async with Fetcher(settings) as fetcher:
        done = 0
        while done < args.pages:
            batch = min(args.sample_every, args.pages - done)
            urls = [shop.catalog_url(1 + (done + i) % shop.spec.pages) for i in range(batch)]
            results = await asyncio.gather(
                *(
                    fetcher.fetch(u, method=args.method, selectors=["li.product"], use_cache=False)
                    for u in urls
                )
            )
            failures += sum(not r.success for r in results)
            done += batch
            mem = browser_tree_memory()
            samples.append({"pages": done, "t": round(time.monotonic() - began, 1), **mem})
            if args.verbose:
                print(
                    f"{done:5d} pages  {mem['pss'] / MIB:7.0f} MiB PSS  {mem['rss'] / MIB:7.0f} "
                    f"MiB RSS  {mem['processes']:3d} procs  {done / (time.monotonic() - began):.2f}"
                    " pages/s",
                    file=sys.stderr,
                )
        launches = fetcher.method(args.method).launches
    elapsed = time.monotonic() - began
    http_rate = await measure_http(args, shop) if args.http_pages else None
    pss = [s["pss"] for s in samples]
    tail = pss[len(pss) // 2 :]
    return {
        "method": args.method,
        "pages": args.pages,
        "relaunch_every": args.relaunch_every or None,
        "concurrency": args.concurrency,
        "failures": failures,
        "launches": launches,
        "seconds": round(elapsed, 1),
        "pages_per_s": round(args.pages / elapsed, 2),
        "pss_mib_first": round(pss[0] / MIB),
        "pss_mib_median": round(statistics.median(pss) / MIB),
        "pss_mib_max": round(max(pss) / MIB),
        "pss_mib_last": round(pss[-1] / MIB),
        "pss_mib_second_half_median": round(statistics.median(tail) / MIB),
        "rss_mib_max": round(max(s["rss"] for s in samples) / MIB),
        "processes_max": max(s["processes"] for s in samples),
        "challenges_served": world.stats("challenge").get("challenges", 0),
        "http_pages_after_handoff": args.http_pages or None,
        "http_pages_per_s_after_handoff": http_rate,
        "samples": samples,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg()[0],
    }


async def measure_http(args: argparse.Namespace, shop: ShopInfo) -> float:
    """pages/s of the http method on the same site once a browser handed it the cookie."""
    settings = FetchSettings(domain_concurrency=64, explore_rate=0.0)
    async with Fetcher(settings) as fetcher:
        first = await fetcher.fetch(shop.catalog_url(1), selectors=["li.product"])
        assert first.success and first.method_used != "http", first.to_dict()
        gate = asyncio.Semaphore(64)

        async def one(i: int) -> bool:
            async with gate:
                r = await fetcher.fetch(
                    shop.catalog_url(1 + i % shop.spec.pages),
                    method="http",
                    selectors=["li.product"],
                    use_cache=False,
                )
                return r.success

        began = time.monotonic()
        ok = await asyncio.gather(*(one(i) for i in range(args.http_pages)))
        assert all(ok)
        return round(args.http_pages / (time.monotonic() - began), 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("playwright", "selenium"), default="playwright")
    p.add_argument("--pages", type=int, default=500)
    p.add_argument("--relaunch-every", type=int, default=100, help="0: never")
    p.add_argument("--concurrency", type=int, default=2, help="pages at once (playwright)")
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--http-pages", type=int, default=0, help="then N http pages (hand-off)")
    p.add_argument("--out", type=Path, help="append the JSON line here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    config = ShopsConfig((ShopSpec("challenge", "Malaysia", "js_challenge", n_products=200),))
    with ShopWorld(config) as world:
        result = asyncio.run(measure(args, world))
    line = json.dumps(result)
    print(line)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(line + "\n")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
