"""Automatic stop rules: a run stops itself when it is burning work on a site that says no.

A rule is ``METRIC>THRESHOLD[/WINDOW]``; WINDOW is ``N`` (the last N items) or a duration
(``10m``, ``90s``, ``1h``: the last ten minutes). Everything counts from the run's start or
its last resume, so a resumed run gets a fresh window and budget. Metrics:

- ``error_ratio``: the share of items that failed (a window is required);
- ``blocked_ratio``: the share of pages blocked after the whole cascade (scrape; window required);
- ``http_429``: 429 answers (scrape: fetch attempts; backfill: IDs that ended on one);
- ``browser_s``: browser-seconds (scrape); ``proxy_mb``: megabytes through proxies (scrape);
- ``no_progress>15m``: no item stored for that long (a bare number is minutes; no window).

A ratio over a time window needs ``MIN_SAMPLE`` items before it can fire; one over the last
N items, N of them. Each kind has defaults (``Params.default_stop_rules``) and the metrics it
measures (``Params.stop_metrics``); a run's ``stop_when`` overrides them metric by metric
(``resolve_rules``): ``none`` drops them all, ``METRIC=off`` one. The resolved list is stored
with the run (led by ``none`` when a default was dropped, so that it resolves to itself).

``check_runs`` runs in the coordinator's watchdog round under ``storage.queue.watchdog_turn``
(one coordinator at a time on PostgreSQL); a rule that fires stops the run like the ``stop``
command (resumable), writes the rule and its numbers to the run's ``error`` and ``run_logs``,
and calls ``engine.lifecycle.on_auto_stopped``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from engine.jobs.params import ParamError

if TYPE_CHECKING:
    import sqlalchemy as sa

    from engine.jobs.base import RunKind
    from engine.settings import Settings
    from storage.db import Database

log = logging.getLogger(__name__)

RATIOS = ("error_ratio", "blocked_ratio")
COUNTS = ("http_429", "browser_s", "proxy_mb")
METRICS = (*RATIOS, *COUNTS, "no_progress")
MIN_SAMPLE = 20  # items a ratio over a time window needs before it may fire
MAX_ITEMS_WINDOW = 100_000
NONE = "none"

_RULE = re.compile(
    r"(?P<metric>[a-z_0-9]+)\s*>\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[smh]?)"
    r"(?:\s*/\s*(?P<window>\d+(?:\.\d+)?)\s*(?P<wunit>[smh]?))?"
)
_SECONDS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True, slots=True)
class StopRule:
    metric: str
    threshold: float  # a ratio, a count, seconds (browser_s, no_progress) or megabytes
    items: int | None = None  # the window: the last N items
    seconds: float | None = None  # the window: the last S seconds

    def text(self) -> str:
        """The canonical form, as stored and shown (``blocked_ratio>0.8/50``)."""
        if self.metric == "no_progress":
            return f"no_progress>{_duration(self.threshold)}"
        window = ""
        if self.items is not None:
            window = f"/{self.items}"
        elif self.seconds is not None:
            window = f"/{_duration(self.seconds)}"
        return f"{self.metric}>{self.threshold:g}{window}"

    def window_text(self) -> str:
        if self.items is not None:
            return f"the last {self.items:,} items"
        if self.seconds is not None:
            return f"the last {_duration(self.seconds)}"
        return "the run (since its start or last resume)"


def _duration(seconds: float) -> str:
    for unit, scale in (("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def parse_rule(text: str) -> StopRule:
    """One rule; ValueError says what is wrong and shows the form."""
    m = _RULE.fullmatch((text or "").strip().lower())
    if m is None:
        raise ValueError(
            "write METRIC>THRESHOLD[/WINDOW], e.g. error_ratio>0.5/200 (the last 200 items), "
            "blocked_ratio>0.8/10m, http_429>50/5m, browser_s>3600, proxy_mb>500, "
            "no_progress>15m; or none, or METRIC=off"
        )
    metric, value, unit = m["metric"], float(m["value"]), m["unit"]
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    items = seconds = None
    if m["window"] is not None:
        if metric == "no_progress":
            raise ValueError("no_progress takes a duration and no window: no_progress>15m")
        if m["wunit"]:
            seconds = float(m["window"]) * _SECONDS[m["wunit"]]
            if seconds <= 0:
                raise ValueError("the window must be longer than zero")
        else:
            if not m["window"].isdigit() or not 1 <= int(m["window"]) <= MAX_ITEMS_WINDOW:
                raise ValueError(f"a window of items is a whole number, 1 to {MAX_ITEMS_WINDOW:,}")
            items = int(m["window"])
    if metric == "no_progress":
        value *= _SECONDS[unit or "m"]
        if value <= 0:
            raise ValueError("no_progress needs a duration longer than zero")
        return StopRule(metric, value)
    if unit:
        raise ValueError(f"{metric}'s threshold is a number (a unit goes on the window: /10m)")
    if metric in RATIOS:
        if items is None and seconds is None:
            raise ValueError(f"{metric} needs a window: {metric}>{value:g}/200 or /10m")
        if not 0 <= value < 1:
            raise ValueError(f"{metric} is a share: its threshold is from 0 to below 1")
    return StopRule(metric, value, items, seconds)


def resolve_rules(
    given: str | Iterable[str] | None, defaults: Sequence[str], allowed: Sequence[str]
) -> tuple[str, ...]:
    """A run's rules: the kind's ``defaults``, then each given entry in order — a rule
    replaces the default of its metric, ``METRIC=off`` drops it, ``none`` drops them all.
    Returns canonical texts (``("none",)`` when no rule is left). Raises ParamError (field
    ``stop_when``) naming the entry."""
    if isinstance(given, str):
        given = [given]
    entries = [e.strip() for g in given or () for e in re.split(r"[,;\n]", str(g)) if e.strip()]
    rules: dict[str, StopRule] = {}
    for text in defaults:
        rule = parse_rule(text)
        rules[rule.metric] = rule
    for text in entries:
        low = text.lower()
        if low == NONE:
            rules.clear()
            continue
        try:
            if low.endswith("=off"):
                metric = low[: -len("=off")].strip()
                if metric not in METRICS:
                    raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
                rules.pop(metric, None)
                continue
            rule = parse_rule(text)
            if rule.metric not in allowed:
                raise ValueError(
                    f"this kind of run does not measure {rule.metric}: use {', '.join(allowed)}"
                )
        except ValueError as exc:
            raise ParamError(str(exc), "stop_when", value=repr(text)) from None
        rules[rule.metric] = rule
    kept = tuple(r.text() for r in rules.values())
    dropped = {parse_rule(t).metric for t in defaults} - set(rules)
    # "none" first when a default was dropped: resolving the result again gives itself
    return (NONE, *kept) if dropped or not kept else kept


def rules_of(params: dict[str, Any]) -> list[StopRule]:
    """The rules stored with a run (none for a run from before stop rules)."""
    return [parse_rule(t) for t in params.get("stop_when") or () if t != NONE]


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule that fired, with the numbers that made it."""

    rule: StopRule
    numbers: dict[str, Any]
    message: str


def evaluate(
    conn: sa.Connection,
    kind: RunKind,
    run_id: int,
    rules: Sequence[StopRule],
    since: datetime,
    now: datetime,
) -> Firing | None:
    """The first of ``rules`` that fires for a run, over what it did since ``since``."""
    from storage import stop_metrics

    item_log = kind.item_log()
    if item_log is None:
        return None
    for rule in rules:
        start = since
        if rule.seconds is not None:
            start = max(since, now - timedelta(seconds=rule.seconds))
        numbers: dict[str, Any] = {"threshold": rule.threshold, "window": rule.window_text()}
        if rule.metric == "no_progress":
            last = stop_metrics.last_progress(conn, item_log, run_id)
            idle = (now - max(last or since, since)).total_seconds()
            if idle > rule.threshold:
                numbers.update(idle_s=round(idle, 1), last_item_at=_iso(last))
                return Firing(
                    rule,
                    numbers,
                    f"no item stored for {_duration(round(idle))} (limit {_duration(rule.threshold)})",
                )
            continue
        window = stop_metrics.item_window(conn, item_log, run_id, start, rule.items)
        if rule.items is not None:
            if window.items < rule.items:
                continue  # the window is not full yet
            start = window.first_at or start
        if rule.metric in RATIOS:
            if rule.items is None and window.items < MIN_SAMPLE:
                continue
            bad = window.failed if rule.metric == "error_ratio" else window.blocked
            ratio = bad / window.items if window.items else 0.0
            if ratio > rule.threshold:
                what = "failed" if rule.metric == "error_ratio" else "blocked"
                numbers.update(items=window.items, **{what: bad}, ratio=round(ratio, 4))
                return Firing(
                    rule,
                    numbers,
                    f"{bad:,} of {window.items:,} items {what} in {rule.window_text()} "
                    f"({ratio:.2f} > {rule.threshold:g})",
                )
            continue
        value = kind.stop_window(conn, run_id, start).get(rule.metric)
        if value is not None and value > rule.threshold:
            numbers.update(value=round(value, 3), items=window.items)
            label = {"http_429": "429 answers", "browser_s": "browser-seconds"}.get(
                rule.metric, "MB through proxies"
            )
            return Firing(
                rule,
                numbers,
                f"{value:,.1f} {label} in {rule.window_text()} (limit {rule.threshold:g})",
            )
    return None


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


def check_runs(
    db: Database, settings: Settings, now: datetime | None = None
) -> list[tuple[int, Firing]]:
    """Evaluate the rules of every running run (one coordinator at a time: the watchdog's
    turn); stop those a rule fired for, record why, and call ``on_auto_stopped``."""
    from engine.jobs import get_kind
    from engine.lifecycle import on_auto_stopped
    from storage import queue as q
    from storage import runs, stop_metrics
    from storage.clock import utcnow

    now = now or utcnow()
    fired: list[tuple[int, Firing]] = []
    with db.begin() as conn:
        if not q.watchdog_turn(conn):
            return []
        for run in runs.list_runs(conn, limit=1000, status="running"):
            rules = rules_of(run.params)
            if not rules:
                continue
            try:
                kind = get_kind(run.kind, settings)
            except ValueError:  # a plugin kind this process does not load: its own watchdogs
                continue
            since = stop_metrics.run_since(conn, run.id) or run.started_at or now
            firing = evaluate(conn, kind, run.id, rules, since, now)
            if firing is None:
                continue
            rule = firing.rule.text()
            message = (
                f"auto-stopped by stop rule {rule}: {firing.message}; resume with "
                f"`python -m engine.run {kind.resume_command(run.id)}`"
            )
            runs.apply_command(conn, run.id, "stop", source=f"stop rule {rule}")
            stop_metrics.record_auto_stop(conn, run.id, rule, message, firing.numbers)
            fired.append((run.id, Firing(firing.rule, firing.numbers, message)))
    for run_id, firing in fired:
        log.warning("run %s: %s", run_id, firing.message)
        on_auto_stopped(db, run_id, firing.rule.text(), firing.numbers)
    return fired
