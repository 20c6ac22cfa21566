"""Form checks, before anything starts: each problem is reported against its field.

Pure functions (no streamlit) so they are tested directly and reused by every page. The run
parameters are checked by the kind's ``Params`` model (``engine.jobs.<kind>.params``), the
same that ``prepare`` and the CLI use, and its widgets take their defaults and bounds from it
(``number_field``); what only a form has (a pasted list, the shared pool) is checked here. A
form that passes becomes the ``params`` dict ``prepare`` takes; a ``ParamError`` it raises
(the judge does not answer, the file has no such column) names its field too, and
``param_errors`` turns it into the same ``{field: message}`` a page shows under each field.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from engine import files
from engine.files import forget_upload
from engine.jobs.params import ParamError, Params, bounds
from engine.jobs.scrape.params import ScrapeParams
from engine.jobs.validate.params import ValidateParams
from engine.settings import Settings

PRESCAN_LINES = 5_000
GENERAL = ""  # the key of a problem of the whole run (ParamError.field None)

__all__ = [
    "FormResult",
    "check_backfill",
    "check_params",
    "check_pool",
    "check_scrape",
    "check_text",
    "check_validation",
    "forget_upload",
    "number_field",
    "param_errors",
    "prescan",
    "save_list",
    "spec_countries",
]


@dataclass
class FormResult:
    params: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # field name -> what is wrong

    @property
    def ok(self) -> bool:
        return not self.errors


def param_errors(exc: ParamError) -> dict[str, str]:
    """Each field's message, by parameter name (``GENERAL`` for the run as a whole)."""
    return {field or GENERAL: message for field, message in exc.by_field().items()}


def check_params(model: type[Params], params: dict[str, Any]) -> dict[str, str]:
    """The model's verdict on a form's parameters, field by field (empty when all is right)."""
    try:
        model.build(params)
    except ParamError as exc:
        return param_errors(exc)
    return {}


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def number_field(
    model: type[Params], name: str, settings: Settings | None = None, value: Any = None
) -> dict[str, Any]:
    """``st.number_input`` keyword arguments for a parameter: its default (the setting's
    first) and a help text with its description and bounds, from the model. The bounds are
    not the widget's min/max: Streamlit would silently reset a value out of range to the
    default; the model's check says what is wrong under the field instead."""
    info = model.model_fields[name]
    b = bounds(model, name)
    limits = []
    if "ge" in b:
        limits.append(f"at least {_num(b['ge'])}")
    if "gt" in b:
        limits.append(f"more than {_num(b['gt'])}")
    if "le" in b:
        limits.append(f"at most {_num(b['le'])}")
    text = info.description or ""
    text = text[:1].upper() + text[1:]
    help_text = f"{text}: {', '.join(limits)}" if limits else text
    default = value if value is not None else model.default(name, settings)
    kwargs: dict[str, Any] = {"help": help_text}
    if default is not None:
        kwargs["value"] = default
    return kwargs


def check_pool(workers: int, concurrency: int, duckdb: bool, noun: str = "items") -> dict[str, str]:
    """The shared pool's size (not a run parameter: Settings bounds it)."""
    e: dict[str, str] = {}
    if workers < 0 or workers > 256:
        e["workers"] = "workers must be between 0 and 256"
    elif workers == 0 and duckdb:
        e["workers"] = (
            "with DuckDB at least one local worker is needed (standalone workers need PostgreSQL)"
        )
    if concurrency < 1 or concurrency > 10_000:
        e["concurrency"] = f"concurrency must be between 1 and 10,000 {noun} per worker"
    return e


def check_text(data: bytes, name: str, max_bytes: int = files.MAX_UPLOAD_BYTES) -> str | None:
    """Why an uploaded list is not a text list (larger than ``max_bytes``, empty, binary),
    or None when it is one.

    Looks at the first 64 KB only: the file is saved as uploaded and the planner streams it.
    """
    head = data[:65536]
    if len(data) > max_bytes:
        return f"{name} is larger than {files.size_text(max_bytes)}, the most the console takes"
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
    """Write a pasted or uploaded list under ``uploads_dir`` (named by time and content):
    at most ``MAX_UPLOAD_BYTES``, mode 0600 in a 0700 directory, created exclusively
    (``engine.files.write_private``). ``forget_upload`` removes it when its run is done."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > files.MAX_UPLOAD_BYTES:
        raise files.FileRefused(
            f"{name}: larger than {files.size_text(files.MAX_UPLOAD_BYTES)}, the most kept"
        )
    digest = hashlib.sha256(data).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[:60] or "list.txt"
    return files.write_private(
        uploads_dir, f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{digest}-{safe}", data
    )


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
    canary_url: str = "",
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
    params: dict[str, Any] = {
        "judge_url": judge_url,
        "timeout_s": timeout_s,
        "batch_size": batch_size,
    }
    if canary_url.strip():  # empty: the judge's own canary when it serves one
        params["canary_url"] = canary_url
    if source in ("paste", "upload"):
        if not has_list:
            e["proxies_file"] = (
                "the proxy list is empty: paste one proxy a line "
                "(ip:port, socks5://user:pass@host:port, …)"
            )
    elif source == "revalidate":
        flt = {  # 0 or "any": this filter is off
            "minutes_old": minutes_old or None,
            "status": status or None,
            "protocol": protocol or None,
            "older_than_hours": older_than_hours or None,
            "limit": limit or None,
        }
        params.update({k: v for k, v in flt.items() if v is not None})
        if not any(k in params for k in flt):
            params["minutes_old"] = 0.0  # every proxy checked before now
    else:
        e["source"] = f"unknown source {source!r}"
    e.update(check_params(ValidateParams, params))
    e.update(check_pool(workers, concurrency, duckdb))
    if not e:
        res.params = {k: v.strip() if isinstance(v, str) else v for k, v in params.items()}
    return res


# --- the scrape form ---------------------------------------------------------------------------

EVERY_SOURCE = "every source"


def spec_countries(text: str) -> list[str]:
    """The countries of a spec's sources, or [] while it does not parse (the form says why
    on Start)."""
    from engine.jobs.scrape.spec import SpecError, parse_spec

    if not text.strip() or len(text) > files.MAX_SPEC_BYTES:
        return []
    try:
        spec = parse_spec(text)
    except SpecError:
        return []
    return sorted({s.country for s in spec.all_sources()})


def stop_rules_field(text: str | None) -> list[str] | None:
    """A form's stop rules: the field holds the run's whole set (prefilled with the kind's
    defaults), so it is given as ``none`` then each rule — an empty field means no rule.
    None (no field on the form): the kind's defaults."""
    if text is None:
        return None
    return ["none", *[r.strip() for r in text.replace("\n", ",").split(",") if r.strip()]]


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
    file_roots: list[Path] | None = None,
    stop_when: str | None = None,
) -> FormResult:
    """Check the Scraping form: the spec parses (``parse_spec``: TOML line and column, or the
    field path), the country is one of its sources, there are stored proxies to route through
    (``stored_proxies``: how many have the chosen status), and ``ScrapeParams`` takes the rest
    (the method order, the numbers). Returns the params ``ScrapeJob.prepare`` takes (it then
    reads start-URL files, only under ``file_roots`` when given: the console's specs/ and
    uploads)."""
    from engine.jobs.scrape.spec import SpecError, parse_spec

    res = FormResult()
    e = res.errors
    spec = None
    if not spec_text.strip():
        e["spec"] = "the spec is empty: choose one under specs/, upload one or write TOML here"
    elif len(spec_text.encode()) > files.MAX_SPEC_BYTES:
        e["spec"] = f"the spec is larger than {files.size_text(files.MAX_SPEC_BYTES)}"
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
    if proxies and stored_proxies == 0:
        e["proxies"] = (
            f"no stored proxy is {proxies}: validate a list first (the Validation page) "
            "or fetch directly"
        )
    params: dict[str, Any] = {
        "spec_text": spec_text,
        "spec_name": spec_name,
        "base_dir": str(base_dir),
        "country": country,
        "methods": methods or None,
        "max_pages": max_pages or None,  # 0: the spec's cap
        "batch_size": batch_size,
        "stop_when": stop_rules_field(stop_when),
    }
    if file_roots is not None:
        params["file_roots"] = [str(Path(r).resolve()) for r in file_roots]
    if proxies:
        params["proxies"] = proxies
        params["strategy"] = strategy or "adaptive"
    for name, message in check_params(ScrapeParams, params).items():
        e.setdefault(name, message)  # the spec's own message (line, column) first
    e.update(check_pool(workers, concurrency, duckdb, "pages"))
    if e:
        return res
    res.params = params
    return res


# --- the backfill form -------------------------------------------------------------------------


def check_backfill(
    *,
    url_template: str,
    rate_limit: str,
    burst: int,
    headers: str,
    timeout_s: float,
    item_attempts: int,
    batch_size: int,
    workers: int,
    concurrency: int,
    duckdb: bool,
    id_column: str | None = None,
) -> FormResult:
    """Check the Backfill form with ``BackfillParams`` (the template, the limit, each header
    line — a variable named must be set here —, the numbers) and the pool. Returns the params
    without ``ids_file``: the page checks the list itself and saves it once the rest is right."""
    from engine.jobs.backfill.params import BackfillParams

    res = FormResult()
    params: dict[str, Any] = {
        "id_column": (id_column or "").strip() or None,
        "url_template": url_template.strip(),
        "rate_limit": rate_limit.strip(),
        "burst": burst,
        "headers": [h.strip() for h in headers.splitlines() if h.strip()],
        "timeout_s": timeout_s,
        "item_attempts": item_attempts,
        "batch_size": batch_size,
    }
    errors = check_params(BackfillParams, params)
    errors.pop("ids_file", None)  # not given yet: the page checks the list on its own
    res.errors.update(errors)
    res.errors.update(check_pool(workers, concurrency, duckdb, "IDs"))
    if not res.errors:
        res.params = params
    return res
