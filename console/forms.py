"""Form checks, before anything starts: each problem is reported against its field.

Pure functions (no streamlit) so they are tested directly and reused by every page. A form
that passes becomes the same ``params`` dict the CLI builds; ``ValidateJob.prepare`` then
runs its own checks (the judge answers, the file exists) and its ``ValueError`` message is
shown too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PRESCAN_LINES = 5_000
PROTOCOLS = ("http", "https", "socks4", "socks5")
STATUSES = ("untested", "active", "inactive")


@dataclass
class FormResult:
    params: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # field name -> what is wrong

    @property
    def ok(self) -> bool:
        return not self.errors


def check_text(data: bytes, name: str) -> str | None:
    """Why an uploaded list is not a text list (empty, binary), or None when it is one.

    Looks at the first 64 KB only: the file is saved as uploaded and the planner streams it.
    """
    head = data[:65536]
    if not data or (len(data) <= 65536 and not data.strip()):
        return f"{name} is empty: upload a text file with one proxy a line"
    if b"\x00" in head[:8192]:
        return (
            f"{name} is not text (it looks binary): upload a plain text or CSV file "
            "with one proxy a line"
        )
    text = head.decode("utf-8", errors="replace")
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f\v")
    odd = text.count("\ufffd")
    if controls > len(text) // 20 or odd > len(text) // 5:
        return f"{name} is not text: upload a plain text or CSV file with one proxy a line"
    return None


def prescan(path: Path) -> tuple[int, int, str | None]:
    """(proxies, malformed lines, first problem) in the first lines of a saved list."""
    from fetchers.errors import ProxyParseError
    from fetchers.proxy_parse import iter_proxy_lines

    good = bad = 0
    first: str | None = None
    try:
        for parsed in islice(iter_proxy_lines(path), PRESCAN_LINES):
            if parsed.spec is not None:
                good += 1
            else:
                bad += 1
                first = first or f"line {parsed.line_no}: {parsed.error}"
    except ProxyParseError as exc:
        return 0, 0, str(exc)
    return good, bad, first


def save_list(data: bytes | str, uploads_dir: Path, name: str = "pasted.txt") -> Path:
    """Write a pasted or uploaded list under ``uploads_dir`` (named by time and content)."""
    if isinstance(data, str):
        data = data.encode()
    digest = hashlib.sha256(data).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[:60] or "list.txt"
    uploads_dir.mkdir(parents=True, exist_ok=True)
    path = uploads_dir / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{digest}-{safe}"
    path.write_bytes(data)
    return path


def check_judge(url: str) -> str | None:
    if not url.strip():
        return (
            "a judge URL is required (an httpbin-style /get or an azenv page); "
            "`python -m sim` starts one on loopback"
        )
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return f"{url!r} is not an http(s) URL: write it like http://127.0.0.2:8080/get"
    return None


def check_validation(
    *,
    source: str,
    has_list: bool,
    judge_url: str,
    timeout_s: float,
    batch_size: int,
    workers: int,
    concurrency: int,
    duckdb: bool,
    status: str | None = None,
    protocol: str | None = None,
    minutes_old: float | None = None,
    older_than_hours: float | None = None,
    limit: int | None = None,
) -> FormResult:
    """Check the Validation form. ``source`` is "paste", "upload" or "revalidate";
    ``has_list`` whether the pasted or uploaded list has any content. Returns the run's
    params without the file (saved only once the whole form is right)."""
    res = FormResult()
    e = res.errors
    if source in ("paste", "upload"):
        if not has_list:
            e["list"] = (
                "the proxy list is empty: paste one proxy a line "
                "(ip:port, socks5://user:pass@host:port, …)"
            )
    elif source == "revalidate":
        if minutes_old is not None and minutes_old < 0:
            e["minutes_old"] = "minutes must be 0 or more"
        if older_than_hours is not None and older_than_hours < 0:
            e["older_than_hours"] = "hours must be 0 or more"
        if limit is not None and limit < 0:
            e["limit"] = "the limit must be 0 (no limit) or more"
        if status and status not in STATUSES:
            e["status"] = f"status must be one of {', '.join(STATUSES)}"
        if protocol and protocol not in PROTOCOLS:
            e["protocol"] = f"type must be one of {', '.join(PROTOCOLS)}"
    else:
        e["source"] = f"unknown source {source!r}"
    if msg := check_judge(judge_url):
        e["judge_url"] = msg
    if not timeout_s > 0:
        e["timeout_s"] = f"the timeout must be more than 0 seconds, not {timeout_s:g}"
    if batch_size < 1 or batch_size > 100_000:
        e["batch_size"] = "the batch size must be between 1 and 100,000 items per task"
    if workers < 0 or workers > 256:
        e["workers"] = "workers must be between 0 and 256"
    elif workers == 0 and duckdb:
        e["workers"] = (
            "with DuckDB at least one local worker is needed (standalone workers need PostgreSQL)"
        )
    if concurrency < 1 or concurrency > 10_000:
        e["concurrency"] = "concurrency must be between 1 and 10,000 items per worker"
    if e:
        return res
    res.params = {
        "judge_url": judge_url.strip(),
        "timeout_s": float(timeout_s),
        "batch_size": int(batch_size),
    }
    if source == "revalidate":
        flt = {
            "minutes_old": minutes_old if minutes_old else None,
            "status": status or None,
            "protocol": protocol or None,
            "older_than_hours": older_than_hours if older_than_hours else None,
            "limit": int(limit) if limit else None,
        }
        res.params.update({k: v for k, v in flt.items() if v is not None})
        if not any(k in res.params for k in flt):
            res.params["minutes_old"] = 0.0  # every proxy checked before now
    return res


# --- the scrape form ---------------------------------------------------------------------------

EVERY_SOURCE = "every source"
STRATEGIES = ("adaptive", "round_robin", "least_connections", "weighted")


def spec_countries(text: str) -> list[str]:
    """The countries of a spec's sources, or [] while it does not parse (the form says why
    on Start)."""
    from engine.jobs.scrape.spec import SpecError, parse_spec

    if not text.strip():
        return []
    try:
        spec = parse_spec(text)
    except SpecError:
        return []
    return sorted({s.country for s in spec.all_sources()})


def check_scrape(
    *,
    spec_text: str,
    spec_name: str,
    base_dir: Path,
    country: str | None,
    methods: list[str],
    max_pages: int,
    batch_size: int,
    workers: int,
    concurrency: int,
    duckdb: bool,
    proxies: str | None = None,
    strategy: str | None = None,
    stored_proxies: int | None = None,
) -> FormResult:
    """Check the Scraping form: the spec parses (``parse_spec``: TOML line and column, or the
        field path), the country is one of its sources, the method order is known, numbers are in
        range, and there are stored proxies to route through (``stored_proxies``: how many have the
    chosen status). Returns the params ``ScrapeJob.prepare`` takes (it then reads start-URL
    files)."""
    from engine.jobs.scrape.spec import SpecError, parse_spec
    from fetchers.cascade import PolicyError, parse_methods

    res = FormResult()
    e = res.errors
    spec = None
    if not spec_text.strip():
        e["spec"] = "the spec is empty: choose one under specs/, upload one or write TOML here"
    else:
        try:
            spec = parse_spec(spec_text, spec_name)
        except SpecError as exc:
            e["spec"] = str(exc)
    country = (country or "").strip() or None
    if country == EVERY_SOURCE:
        country = None
    if country and spec is not None:
        known = sorted({s.country for s in spec.all_sources()})
        if country.lower() not in {k.lower() for k in known}:
            e["country"] = (
                f"{country!r} is not a country of this spec: its sources are for {', '.join(known)}"
            )
    if methods:
        try:
            methods = parse_methods(methods)
        except PolicyError as exc:
            e["methods"] = str(exc)
    if max_pages < 0:
        e["max_pages"] = "max pages must be 0 (the spec's cap, or none) or more"
    if not 1 <= batch_size <= 100_000:
        e["batch_size"] = "the batch size must be between 1 and 100,000 pages per task"
    if workers < 0 or workers > 256:
        e["workers"] = "workers must be between 0 and 256"
    elif workers == 0 and duckdb:
        e["workers"] = (
            "with DuckDB at least one local worker is needed (standalone workers need PostgreSQL)"
        )
    if not 1 <= concurrency <= 10_000:
        e["concurrency"] = "concurrency must be between 1 and 10,000 pages per worker"
    if proxies and stored_proxies == 0:
        e["proxies"] = (
            f"no stored proxy is {proxies}: validate a list first (the Validation page) "
            "or fetch directly"
        )
    if strategy and strategy not in STRATEGIES:
        e["strategy"] = f"strategy must be one of {', '.join(STRATEGIES)}"
    if e:
        return res
    res.params = {
        "spec_text": spec_text,
        "spec_name": spec_name,
        "base_dir": str(base_dir),
        "country": country,
        "methods": methods or None,
        "max_pages": int(max_pages) or None,
        "batch_size": int(batch_size),
    }
    if proxies:
        res.params["proxies"] = proxies
        res.params["strategy"] = strategy or "adaptive"
    return res
