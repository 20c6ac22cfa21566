"""The ``backfill`` job kind: fetch a long list of IDs from a JSON API under a hard rate limit.

Items are the IDs themselves (strings). Planning streams the ID file (text, one a line, or a
CSV column) into ``backfill_inputs`` in chunks, flags duplicates in SQL and pages the unique
IDs into tasks, so no process holds the list. Malformed lines go to ``errors`` (``bad_input``,
``line N``); lines are read with a bound (``MAX_LINE_CHARS``), so an over-long line is one
malformed line, never a whole-file read. Each worker process opens one aiohttp session per run
(pooled keep-alive connections) and, for every request, first takes a slot from the run's
shared limiter (``engine.ratelimit.base``): the local pool shares an mmap'd file, PostgreSQL
workers share a row. Redirects are followed here, not by aiohttp, so that every hop takes a
slot too (at most ``MAX_REDIRECTS``) and the headers the user configured never leave their
origin. A body is read up to ``max_body_bytes`` (``too_large`` beyond, final). An item is
retried inside the worker with exponential backoff (5xx, network errors, timeouts, non-JSON
answers); 404/410 and other 4xx are permanent; a 429 honours ``Retry-After`` and pushes the
shared schedule back so every worker slows down. The final outcome of each ID is stored once
per (run, ID) with its HTTP status, its JSON body, the error, the number of requests it took,
the worker and the time.

Secrets: ``--header 'Authorization=env:API_TOKEN'`` stores the variable's *name* in the run;
each worker reads the value from its own environment when it opens the run, and it is never
logged or stored: an API that echoes it back finds it masked (``***``) in the stored body and
error. A literal value for a header that looks like a credential is refused.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from engine.jobs.backfill.params import (  # noqa: F401 — parse_header, HeaderSpec: re-exported
    DEFAULT_MAX_BODY_BYTES,
    BackfillParams,
    HeaderSpec,
    check_url_template,
    parse_header,
)
from engine.jobs.base import Executor, JobKind, WorkerEnv
from engine.jobs.params import ParamError
from engine.model import ItemResult
from engine.ratelimit.base import Gate, Rate, RateLimiter
from fetchers.validation import parse_retry_after
from storage import backfill as store
from storage.clock import utcnow
from storage.db import Database
from storage.item_logs import ItemLog
from storage.schema import backfill_items

if TYPE_CHECKING:
    import sqlalchemy as sa

log = logging.getLogger(__name__)

IMPORT_CHUNK = 20_000  # lines read and staged per transaction while planning
PAGE = 20_000  # input lines read back per query while planning
MAX_PARSE_ERRORS_STORED = 1_000
MAX_ID_LENGTH = 512
MAX_LINE_CHARS = 64 * 1024  # a longer line of the ID file is malformed, and skipped unread
MAX_RATE_LIMITED = 5  # 429s an item may meet before it is stored as failed
MAX_RETRY_AFTER_S = 600.0
PERMANENT_NOT_FOUND = {404, 410}
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5  # hops followed per request, each taking a slot of the limit
ERROR_CHARS = 200  # of an error page kept in the stored error (after masking)
USER_AGENT = "fetchfleet-backfill/0.1"
SAFE_IN_PATH = ":@!$&'()*+,;="  # RFC 3986 pchar sub-delims stay readable (did:plc:…)

_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


# --- parameters ------------------------------------------------------------------------------


def _check_ids_file(source: str, id_column: str | None) -> Path:
    def error(message: str, name: str = "ids_file", value: str | None = source) -> ParamError:
        return BackfillParams.error(name, message, value)

    path = Path(source)
    if not path.is_file():
        raise error("no such file")
    if path.stat().st_size == 0:
        raise error("the file is empty; one ID a line")
    with path.open("rb") as fh:
        head = fh.read(8192)
    if b"\0" in head:
        raise error("this is a binary file, not a list of IDs")
    if path.suffix.lower() == ".csv" and not id_column:
        raise error("a CSV file; name the ID column with --id-column")
    if id_column:
        first = head.decode("utf-8-sig", "replace").splitlines()[0] if head else ""
        header = next(csv.reader([first]), [])
        if id_column not in [h.strip() for h in header]:
            raise error(
                f"not in the header of {source} "
                f"({', '.join(h.strip() for h in header) or 'empty'})",
                "id_column",
                id_column,
            )
    return path.resolve()


# --- reading the ID list --------------------------------------------------------------------


@dataclass(slots=True)
class IdLine:
    line_no: int
    item_id: str | None  # None: blank/comment (error None) or malformed (error set)
    error: str | None = None
    text: str = ""


def check_id(raw: str, pattern: re.Pattern[str] | None) -> tuple[str | None, str | None]:
    """(id, None) for a valid ID, (None, None) for a blank, (None, reason) when malformed."""
    value = raw.strip()
    if not value:
        return None, None
    if _BAD_CHARS.search(value):
        return None, "contains whitespace or control characters"
    if not value.isascii():
        try:
            value.encode("utf-8")  # undecodable input bytes arrive as lone surrogates
        except UnicodeEncodeError:
            return None, "not valid UTF-8"
    if len(value) > MAX_ID_LENGTH:
        return None, f"longer than {MAX_ID_LENGTH} characters"
    if pattern is not None and not pattern.fullmatch(value):
        return None, f"does not match --id-pattern {pattern.pattern!r}"
    return value, None


def _bounded_lines(fh: Any, limit: int = MAX_LINE_CHARS) -> Iterator[tuple[str, bool]]:
    """(line, too long) of a text file, each read with a bound: of a line over ``limit``
    characters only its start is returned (the rest is skipped in bounded reads, never held),
    so one 100 MB line costs what a short one does."""
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(("\n", "\r")):
            yield line, False
            continue
        while (rest := fh.readline(65536)) and not rest.endswith(("\n", "\r")):
            pass
        yield line[:200], True


def _too_long(n: int, text: str = "") -> IdLine:
    return IdLine(n, None, f"line longer than {MAX_LINE_CHARS:,} characters: not an ID", text)


def iter_ids(
    path: Path, id_column: str | None = None, id_pattern: str | None = None
) -> Iterator[IdLine]:
    """Stream a text file (one ID a line, ``#`` comments) or a CSV column, numbered from 1.

    Lines are read with a bound (``MAX_LINE_CHARS``): an over-long line is one malformed line.
    A CSV row is numbered by its first line; a row the csv module refuses (a quoted field
    over its 128 KiB field limit) is one malformed row, and reading goes on after it."""
    pattern = re.compile(id_pattern) if id_pattern else None
    # utf-8-sig: a byte-order mark (Excel, Notepad) is not part of the first ID
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        if id_column is None:
            for n, (line, too_long) in enumerate(_bounded_lines(fh), 1):
                if too_long:
                    yield _too_long(n, line)
                    continue
                if line.lstrip().startswith("#"):
                    yield IdLine(n, None)
                    continue
                item, err = check_id(line, pattern)
                yield IdLine(n, item, err, line.strip())
            return
        long_lines: list[int] = []  # over-long physical lines not reported yet

        def physical() -> Iterator[str]:
            for n, (line, too_long) in enumerate(_bounded_lines(fh), 1):
                if too_long:
                    long_lines.append(n)
                    yield "\n"  # keeps the csv module's line count; reported below
                else:
                    yield line

        reader = csv.reader(physical())
        header = [h.strip() for h in next(reader, [])]
        col = header.index(id_column)
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                long_lines.clear()
                yield IdLine(first, None, f"not a CSV row: {exc}")
                continue
            if long_lines:
                yield _too_long(long_lines[0])
                long_lines.clear()
                continue
            if not row or all(not c.strip() for c in row):
                yield IdLine(first, None)
                continue
            if col >= len(row):
                text = ",".join(row)[:200]
                yield IdLine(first, None, f"no {id_column!r} column on this row", text)
                continue
            item, err = check_id(row[col], pattern)
            if item is None and err is None:
                err = f"empty {id_column!r}"
            yield IdLine(first, item, err, row[col][:200])


# --- the job kind -----------------------------------------------------------------------------


class BackfillJob(JobKind):
    name = "backfill"
    params_model = BackfillParams

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        from fetchers.config import FetchSettings

        p = BackfillParams.build(params, self.settings)
        path = _check_ids_file(p.ids_file, p.id_column)
        rate = p.rate()
        return {
            **p.stored(),
            "ids_file": str(path),
            "rate_limit": rate.describe(),
            "rate": rate.to_json(),
            "rate_key": p.rate_key or p.origin(),
            # One bound for every page the fleet fetches unless the run sets its own.
            "max_body_bytes": p.max_body_bytes or FetchSettings().max_page_bytes,
        }

    def plan(self, db: Database, run_id: int, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
        unique = self._import(db, run_id, params)
        if not unique:
            raise ValueError(
                f"--ids {params['ids_file']}: no valid ID in the file (blank or malformed lines only)"
            )
        batch = int(params["batch_size"])
        with db.connect() as conn:
            last = store.last_line(conn, run_id)
        pending: list[str] = []
        for after in range(0, last, PAGE):
            with db.connect() as conn:
                pending.extend(store.ids_between(conn, run_id, after, after + PAGE))
            while len(pending) >= batch:
                yield pending[:batch]
                del pending[:batch]
        if pending:
            yield pending

    def _import(self, db: Database, run_id: int, params: dict[str, Any]) -> int:
        """Stream the file into backfill_inputs; flag duplicates; returns unique IDs."""
        lines = iter_ids(
            Path(params["ids_file"]), params.get("id_column"), params.get("id_pattern")
        )
        stats = {"lines": 0, "blank": 0, "malformed": 0, "valid": 0}
        while chunk := list(islice(lines, IMPORT_CHUNK)):
            good: list[tuple[int, str]] = []
            bad: list[dict[str, Any]] = []
            for line in chunk:
                if line.item_id is not None:
                    good.append((line.line_no, line.item_id))
                elif line.error is None:
                    stats["blank"] += 1
                else:
                    stats["malformed"] += 1
                    if stats["malformed"] <= MAX_PARSE_ERRORS_STORED:
                        bad.append(
                            {
                                "run_id": run_id,
                                "item_key": f"line {line.line_no}",
                                "error_type": "bad_input",
                                "message": f"{line.error} — {line.text[:200]!r}",
                                "created_at": utcnow(),
                            }
                        )
            stats["lines"] += len(chunk)
            stats["valid"] += len(good)
            with db.begin() as conn:
                store.add_inputs(conn, run_id, good)
                store.record_bad_lines(conn, bad)
        with db.begin() as conn:
            dups = store.mark_duplicates(conn, run_id)
            unique = stats["valid"] - dups
            store.save_input_stats(
                conn,
                run_id,
                {
                    "lines": stats["lines"],
                    "blank": stats["blank"],
                    "duplicates": dups,
                    "malformed": stats["malformed"],
                    "unique_ids": unique,
                },
            )
        log.info("run %s: %s", run_id, {**stats, "duplicates": dups, "unique": unique})
        return unique

    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        return store.ids_not_stored(conn, run_id, [str(r) for r in refs])

    def store(self, conn: sa.Connection, results: list[ItemResult]) -> int:
        rows = []
        for r in results:
            d = r.data
            rows.append(
                (
                    r.run_id,
                    str(r.ref),
                    "ok" if r.ok else "failed",
                    r.outcome,
                    d.get("http_status"),
                    d.get("body"),
                    d.get("error"),
                    int(d.get("attempts") or 1),
                    r.worker_id or None,
                    r.task_id,
                    d.get("fetched_at") or utcnow(),
                    d.get("elapsed_ms"),
                )
            )
        return store.store_items(conn, rows)

    def item_log(self) -> ItemLog:
        # one row per run and ID
        return ItemLog(
            "backfill",
            backfill_items,
            time="fetched_at",
            ok_column="status",
            ok_value="ok",
            key="item_id",
        )

    def ok_outcomes(self) -> set[str]:
        return {"ok"}

    def cost(self, conn: sa.Connection, run_id: int) -> dict[str, Any]:
        """API calls (every request, retries included) and the bytes of the stored bodies,
        per item stored ok."""
        from engine.costs import with_per_stored
        from storage.run_costs import backfill_costs

        return with_per_stored(backfill_costs(conn, run_id))

    def stop_window(self, conn: sa.Connection, run_id: int, since: Any) -> dict[str, float]:
        from storage.run_costs import backfill_window

        return backfill_window(conn, run_id, since)

    async def open_executor(self, params: dict[str, Any], env: WorkerEnv) -> Executor:
        return BackfillExecutor(params, self.settings.concurrency, env.limiter)


# --- execution ------------------------------------------------------------------------------


def resolve_headers(specs: list[dict[str, str]]) -> dict[str, str]:
    """Header values for this process; env values are read here and never logged."""
    out = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    for spec in specs:
        if spec.get("env"):
            var = spec["env"]
            value = os.environ.get(var)
            if value is None:
                raise RuntimeError(
                    f"header {spec['name']}: the environment variable {var} is not set on this "
                    "worker; export it where the worker runs"
                )
            if "\r" in value or "\n" in value:
                raise RuntimeError(f"header {spec['name']}: ${var} contains a line break")
            out[spec["name"]] = value
        else:
            out[spec["name"]] = spec.get("value", "")
    return out


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """``Retry-After`` as seconds, ``default`` when absent or junk, at most MAX_RETRY_AFTER_S."""
    seconds = parse_retry_after(value)
    return default if seconds is None else min(seconds, MAX_RETRY_AFTER_S)


class Masker:
    """Replaces every secret value with ``***``: the whole value, each word of it of 8+
    characters (the token of ``Bearer <token>``), and their JSON-escaped forms (an API that
    echoes a value does so inside JSON). Mask first, cut after: a cut through a secret would
    keep the part before it."""

    def __init__(self, secrets: Sequence[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            for value in (secret, *(p for p in secret.split() if len(p) >= 8)):
                forms.update((value, json.dumps(value)[1:-1]))
        self.forms = sorted(forms, key=len, reverse=True)  # the whole value before its words
        # Bytes of a page to decode so that a secret starting inside its first n characters
        # is wholly in the text that is masked (a UTF-8 character is at most 4 bytes).
        self.extra_bytes = max((len(f.encode()) for f in self.forms), default=0)

    def __call__(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, "***")
        return text

    def cut(self, text: str, n: int) -> str:
        return self(text)[:n]

    def snippet(self, raw: bytes, n: int) -> str:
        """The first ``n`` characters of a page, masked, for an error message."""
        text = raw[: 4 * n + self.extra_bytes].decode("utf-8", "replace")
        return self(text).strip()[:n]


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL; None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


@dataclass(slots=True)
class Answer:
    """One HTTP exchange: a final answer (outcome…) or a redirect (``location``)."""

    outcome: str = ""
    error: str | None = None
    retry: bool = False
    body: str | None = None
    status: int | None = None
    retry_after: str | None = None
    location: str | None = None
    head_s: float | None = None  # seconds from the send to the answer's head


class BackfillExecutor(Executor):
    """One per worker process and run: one aiohttp session (keep-alive pool) and the gate."""

    def __init__(self, params: dict[str, Any], concurrency: int, limiter: RateLimiter) -> None:
        import aiohttp

        self.template = params["url_template"]
        self.rate = Rate.from_json(params["rate"])
        self.key = params["rate_key"]
        self.attempts = int(params["item_attempts"])
        self.backoff = float(params["retry_backoff_s"])
        self.max_body = int(params.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES)
        self.limiter = limiter
        self.gate = Gate(limiter)
        self._aiohttp = aiohttp
        specs = params.get("headers") or []
        # Sent per request, not as session defaults: on another origin (a redirect) none of
        # the headers the user configured goes along, credential-looking or not.
        self.headers = resolve_headers(specs)
        self.foreign_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        # Values from the environment never reach storage, even when an API echoes them back
        # in a record or an error page: they are masked in every stored body and error.
        self._secrets = [
            self.headers[h["name"]] for h in specs if h.get("env") and self.headers[h["name"]]
        ]
        self.mask = Masker(self._secrets)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=float(params["timeout_s"])),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def redact(self, text: str) -> str:
        return self.mask(text)

    def url_for(self, item_id: str) -> str:
        return self.template.replace("{id}", quote(item_id, safe=SAFE_IN_PATH))

    async def execute(self, item: str) -> tuple[bool, str, dict[str, Any]]:
        start = self.url_for(item)
        home = origin_of(start)
        url, hops = start, 0
        requests = failures = limited = 0
        while True:
            await self.gate.wait(self.key, self.rate)  # every hop of a redirect, too
            requests += 1
            sent = datetime.now(UTC).replace(tzinfo=None)
            began = time.perf_counter()
            answer = await self._request(url, same_origin=origin_of(url) == home)
            elapsed = (time.perf_counter() - began) * 1000
            if answer.head_s is not None:  # it reached the server: how late, at most
                self.gate.answered(self.key, answer.head_s)
            if answer.location is not None:
                if hops < MAX_REDIRECTS:
                    url, hops = answer.location, hops + 1
                    continue
                answer = Answer(
                    "too_many_redirects",
                    self.mask.cut(
                        f"HTTP {answer.status}: more than {MAX_REDIRECTS} redirects "
                        f"(the last to {answer.location})",
                        500,
                    ),
                    status=answer.status,
                )
            url, hops = start, 0  # a retry starts again from the ID's own URL
            outcome = answer.outcome
            data = {
                "http_status": answer.status,
                "body": answer.body,
                "error": answer.error,
                "attempts": requests,
                "fetched_at": sent,
                "elapsed_ms": round(elapsed, 2),
            }
            if outcome == "ok":
                return True, outcome, data
            if outcome == "rate_limited":
                limited += 1
                wait = retry_after_seconds(answer.retry_after)
                self.gate.refused(self.key)  # the margin was too small: ask for more
                await self.limiter.penalize(self.key, self.rate, wait)
                if limited < MAX_RATE_LIMITED:
                    continue  # the gate's next slot is after Retry-After
                return False, outcome, data
            failures += 1
            if not answer.retry or failures >= self.attempts:
                return False, outcome, data
            delay = self.backoff * 2 ** (failures - 1)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _request(self, url: str, same_origin: bool) -> Answer:
        """One GET, redirects not followed; the body read up to ``max_body``."""
        headers = self.headers if same_origin else self.foreign_headers
        began = time.monotonic()
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False) as resp:
                head_s = time.monotonic() - began
                status = resp.status
                location = resp.headers.get("Location")
                if status in REDIRECTS and location:
                    target = urljoin(str(resp.url), location)
                    await self._read(resp, 64 * 1024)  # small: the connection is reused
                    if origin_of(target) is None:
                        error = f"HTTP {status}: a redirect to {location!r}, not an http(s) URL"
                        error = self.mask.cut(error, 500)
                        return Answer("bad_redirect", error, status=status, head_s=head_s)
                    return Answer(status=status, location=target, head_s=head_s)
                raw = await self._read(resp, self.max_body)
                if raw is None:
                    resp.close()  # stop the transfer
                    length = resp.content_length
                    what = (
                        f"Content-Length {length:,} is over"
                        if length is not None and length > self.max_body
                        else "the body grew over"
                    )
                    error = f"HTTP {status}: {what} --max-body-bytes {self.max_body:,}; not kept"
                    return Answer("too_large", error, status=status, head_s=head_s)
                retry_after = resp.headers.get("Retry-After")
            outcome, error, retry, body = classify(status, raw, self.mask)
            return Answer(outcome, error, retry, body, status, retry_after, head_s=head_s)
        except TimeoutError:
            return Answer("timeout", "no answer within the timeout", True)
        except (self._aiohttp.ClientError, OSError) as exc:
            return Answer("network", self.mask.cut(f"{type(exc).__name__}: {exc}", 500), True)

    @staticmethod
    async def _read(resp: Any, limit: int) -> bytes | None:
        """The body, or None as soon as it is known to be over ``limit`` bytes."""
        length = resp.content_length
        if length is not None and length > limit:
            return None
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    async def aclose(self) -> None:
        await self.session.close()


def classify(
    status: int, raw: bytes, mask: Masker | None = None
) -> tuple[str, str | None, bool, str | None]:
    """(outcome, error, retryable, JSON body) of one HTTP answer; secrets masked in the body
    and in the error before any cut."""
    mask = mask or Masker(())
    if status == 429:
        return "rate_limited", "HTTP 429 Too Many Requests", True, None
    if 200 <= status < 300:
        try:
            text = raw.decode("utf-8")
            json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            snippet = mask.snippet(raw, 80)
            return "bad_json", f"not JSON ({exc.__class__.__name__}): {snippet!r}", True, None
        return "ok", None, False, mask(text)
    snippet = mask.snippet(raw, ERROR_CHARS)
    error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    if status in PERMANENT_NOT_FOUND:
        return "not_found", error, False, None
    if status == 408:
        return "timeout", error, True, None
    if 400 <= status < 500:
        return "client_error", error, False, None
    if status >= 500:
        return "server_error", error, True, None
    return "unexpected_status", error, True, None


# --- the report -------------------------------------------------------------------------------


def run_report(db: Database, run_id: int) -> dict[str, Any]:
    """What `engine.run report` prints (and a console page can show): input, progress,
    throughput, limit utilisation, errors and each worker's share."""
    from engine.summary import run_summary

    summary = run_summary(db, run_id)
    if summary["kind"] != "backfill":
        raise ValueError(
            f"run {run_id} is a {summary['kind']} run; `report` covers backfill runs "
            f"(`python -m engine.run status {run_id}` shows any run)"
        )
    with db.connect() as conn:
        from storage import runs as runs_store

        run = runs_store.get_run(conn, run_id)
        assert run is not None
        params = run.params
        rate = Rate.from_json(params["rate"])
        inputs = store.input_stats(conn, run_id)
        t = store.timing(conn, run_id)
        peak = store.peak_window(conn, run_id, rate.window_s)
        workers = store.per_worker(conn, run_id)
        failed = store.failures(conn, run_id)
        missing = store.missing_count(conn, run_id)
    span = t["span_s"]
    items_per_s = (t["items"] - 1) / span if span > 0 else 0.0
    requests_per_s = (t["requests"] - 1) / span if span > 0 else 0.0
    done = summary["counts"]["done"]
    total = summary["counts"]["total"]
    eta = None
    if summary["status"] == "running" and items_per_s > 0:
        eta = round((total - done) / items_per_s, 1)
    for w in workers:
        w["share"] = round(w["items"] / t["items"], 4) if t["items"] else 0.0
    return {
        "run_id": run_id,
        "kind": "backfill",
        "status": summary["status"],
        "url_template": params["url_template"],
        "rate_limit": params["rate_limit"],
        "rate_key": params["rate_key"],
        "input": inputs,
        "counts": summary["counts"],
        "missing": missing,
        "duration_s": summary["duration_s"],
        "eta_s": eta,
        "throughput": {
            "items": t["items"],
            "requests": t["requests"],
            "span_s": round(span, 3),
            "items_per_s": round(items_per_s, 3),
            "items_per_min": round(items_per_s * 60, 1),
            "requests_per_s": round(requests_per_s, 3),
            "avg_latency_ms": round(t["avg_latency_ms"], 1) if t["avg_latency_ms"] else None,
        },
        "limit": {
            "limit": rate.limit,
            "window_s": rate.window_s,
            "per_s": round(rate.per_second, 4),
            "utilisation": round(requests_per_s / rate.per_second, 4),
            "schedule_max": round(rate.utilisation, 4),
            "peak_window_items": peak,
            "peak_window_fraction": round(peak / rate.limit, 4),
        },
        "errors": failed,
        "workers": workers,
        "error": summary["error"],
    }


def format_report(r: dict[str, Any]) -> str:
    c, tp, lim = r["counts"], r["throughput"], r["limit"]
    lines = [f"run {r['run_id']} (backfill): {r['status']} — {r['url_template']}"]
    if r["input"]:
        i = r["input"]
        lines.append(
            f"  input:      {i['lines']:,} lines: {i['unique_ids']:,} unique IDs, "
            f"{i['duplicates']:,} duplicates, {i['blank']:,} blank, {i['malformed']:,} malformed"
        )
    lines.append(
        f"  items:      {c['done']:,} of {c['total']:,} done ({c['ok']:,} ok, "
        f"{c['failed']:,} failed), {r['missing']:,} not fetched yet"
        + (f", ETA {r['eta_s']:.0f}s" if r["eta_s"] is not None else "")
    )
    lines.append(
        f"  throughput: {tp['items_per_s']:.1f} items/s ({tp['items_per_min']:,.0f}/min), "
        f"{tp['requests']:,} requests over {tp['span_s']:.1f}s"
        + (f", {tp['avg_latency_ms']:.0f} ms average answer" if tp["avg_latency_ms"] else "")
    )
    lines.append(
        f"  limit:      {r['rate_limit']} (key {r['rate_key']}): {tp['requests_per_s']:.2f} "
        f"requests/s = {lim['utilisation']:.3f} of the limit (schedule allows at most "
        f"{lim['schedule_max']:.3f}); busiest {r['rate_limit'].split('/')[1]} window "
        f"{lim['peak_window_items']:,} items ({lim['peak_window_fraction']:.3f} of {lim['limit']:,})"
    )
    if r["errors"]:
        lines.append("  failures:")
        for e in r["errors"]:
            status = f"HTTP {e['http_status']}" if e["http_status"] else "no answer"
            lines.append(
                f"    {e['outcome']} ({status}): {e['items']:,} — e.g. {', '.join(e['examples'])}"
            )
            if e["error"]:
                lines.append(f"      last error: {e['error'][:160]}")
    if r["workers"]:
        lines.append("  workers:")
        for w in r["workers"]:
            lines.append(
                f"    {w['worker_id']}: {w['items']:,} items ({w['share']:.1%}), "
                f"{w['requests']:,} requests"
            )
    if r.get("error"):
        lines.append(f"  error: {r['error']}")
    return "\n".join(lines)
