"""Cost accounting: what a run cost, per stored entity, in the words the summary uses.

A kind measures its cost (``RunKind.cost``: the scrape job from its fetch log, the backfill
from its items; ``storage.run_costs``); here it is put per stored entity and into lines.
The figures, all plain JSON under the summary's ``cost``:

- ``requests``: requests sent per fetch method (``api`` for a backfill's API calls);
- ``api_calls``; ``browser_s``: Playwright and Selenium wall time, every attempt;
- ``bytes``: ``direct``, ``proxy`` (through a proxy of the pool), ``tor``; ``file_bytes``;
- ``stored``: entities stored or seen again (scrape), items stored ok (backfill);
- ``per_stored``: browser-seconds, bytes and requests per stored entity;
- ``saved_pages`` / ``saved_browser_s``: pages the cascade got without the browser their
  domain had needed (cookies handed to http, a learned order), times that browser's
  measured seconds per attempt on the domain;
- ``domains``: the same per domain, the costliest first.
"""

from __future__ import annotations

from typing import Any


def with_per_stored(cost: dict[str, Any]) -> dict[str, Any]:
    """``cost`` with ``per_stored``: its browser-seconds, bytes and requests per stored entity
    (None when nothing was stored)."""
    n = int(cost.get("stored") or 0)
    total_bytes = sum(cost.get("bytes", {}).values()) + int(cost.get("file_bytes") or 0)
    requests = sum(cost.get("requests", {}).values())
    cost["per_stored"] = (
        {
            "browser_s": round(float(cost.get("browser_s") or 0) / n, 4),
            "bytes": round(total_bytes / n, 1),
            "requests": round(requests / n, 4),
        }
        if n
        else None
    )
    return cost


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n):,} B"


def cost_lines(cost: dict[str, Any] | None) -> list[str]:
    """The human lines of a summary's ``cost`` (``engine.cli.common.format_summary``)."""
    if not cost:
        return []
    requests = ", ".join(f"{m} {n:,}" for m, n in sorted(cost.get("requests", {}).items()))
    b = cost.get("bytes", {})
    routes = ", ".join(f"{r} {_size(n)}" for r, n in b.items() if n) or "0 B"
    lines = [
        f"  cost:  requests {requests or 'none'}; browser {cost.get('browser_s', 0):,.1f} s; "
        f"downloaded {routes}"
        + (f" + files {_size(cost['file_bytes'])}" if cost.get("file_bytes") else "")
    ]
    per = cost.get("per_stored")
    if per:
        lines.append(
            f"  per stored entity ({cost['stored']:,}): {per['browser_s']:.3f} browser-s, "
            f"{_size(per['bytes'])}, {per['requests']:.2f} requests"
        )
    if cost.get("saved_pages"):
        lines.append(
            f"  domain learning: {cost['saved_pages']:,} page(s) without a browser, "
            f"{cost['saved_browser_s']:,.1f} browser-s saved"
        )
    return lines
