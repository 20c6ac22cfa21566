"""What a pipeline step works with: its context (fetch, store, log, state, stop checks), the
run log writer, the run's fetcher thread, and the control that stop requests reach.

Split from engine.pipelines.runner (definitions and the runner) to keep both small; import the
public names from ``engine.pipelines.runner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from engine import lifecycle
from engine.settings import Settings
from storage import pipelines as store
from storage import runs as run_store
from storage.clock import utcnow
from storage.db import Database, redact_url
from storage.scrape import Entity, store_entities

if TYPE_CHECKING:
    from engine.pipelines.runner import _Runner

log = logging.getLogger(__name__)

KIND = "pipeline"
STOP_STATUSES = ("stopping", "stopped", "paused", "cancelled")


class StopRequested(Exception):
    """Raised by ``ctx.check_stop()`` when the run was asked to stop, pause or cancel. Let it
    propagate: the step is recorded ``stopped`` and a resume runs it again from its saved
    state."""


class PipelineControl:
    """Where stop requests meet the running pipeline. It is also the target of the DuckDB
    control socket (``engine.runtime.control.dispatch`` needs ``.db`` and ``.command``), so
    ``engine.run stop RUN_ID`` in another terminal reaches this process; with PostgreSQL that
    command writes the run's status and ``stop_requested`` reads it (every ``poll_s``)."""

    def __init__(self, db: Database, poll_s: float = 0.5, settings: Settings | None = None) -> None:
        self.db = db
        self.poll_s = poll_s
        self.settings = settings or Settings()
        self.run_id: int | None = None
        self._event = threading.Event()
        self._signalled: str | None = None
        self._polled = 0.0

    def command(self, run_id: int, action: str, source: str = "cli") -> str:
        with self.db.connect() as conn:
            run = run_store.get_run(conn, run_id)
        if run is not None and run.kind == KIND and action == "resume":
            raise ValueError(
                f"run {run_id} is a pipeline: resume it with "
                f"`python -m engine.run pipeline --resume {run_id}`"
            )
        status = lifecycle.command(self.db, self.settings, run_id, action, source)
        if run_id == self.run_id and action in ("stop", "pause", "cancel"):
            self._event.set()
        return status

    def request_stop(self, source: str) -> None:
        """Ctrl-C or SIGTERM of the process running the pipeline. Safe in a signal handler:
        it only sets a flag; the stop is recorded in the run (``stopping``) the next time the
        runner looks, outside any transaction of its own."""
        self._signalled = source
        self._event.set()

    def stop_requested(self) -> bool:
        if self._event.is_set():
            source, self._signalled = self._signalled, None
            if source and self.run_id is not None:
                with contextlib.suppress(ValueError):  # already stopping, paused, cancelled
                    self.command(self.run_id, "stop", source)
            return True
        now = time.monotonic()
        if self.run_id is not None and now - self._polled >= self.poll_s:
            self._polled = now
            with self.db.connect() as conn:
                if store.run_status(conn, self.run_id) in STOP_STATUSES:
                    self._event.set()
        return self._event.is_set()

    def attach(self, run_id: int) -> None:
        self.run_id = run_id
        self._polled = 0.0


class RunLog:
    """Lines for ``run_logs``, written in batches (every ``flush_s`` or ``max_lines``), so a
    chatty script costs one insert per batch and memory stays bounded."""

    def __init__(
        self,
        db: Database,
        run_id: int,
        on_line: Callable[[str | None, str, str], None] | None = None,
        flush_s: float = 0.25,
        max_lines: int = 500,
    ) -> None:
        self.db, self.run_id, self.on_line = db, run_id, on_line
        self.flush_s, self.max_lines = flush_s, max_lines
        self._buf: list[tuple[str | None, str, str, Any]] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def write(self, step: str | None, stream: str, line: str) -> None:
        with self._lock:
            self._buf.append((step, stream, line, utcnow()))
        if self.on_line is not None:
            self.on_line(step, stream, line)
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if len(self._buf) >= self.max_lines or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._buf = self._buf, []
            self._last = time.monotonic()
        if lines:
            with self.db.begin() as conn:
                store.add_logs(conn, self.run_id, lines)


class FetchLoop:
    """One ``fetchers.Fetcher`` on its own event-loop thread for the run: synchronous steps
    fetch through it, and browsers and what it learned per domain are reused across steps."""

    def __init__(self, settings: Any) -> None:
        from fetchers import Fetcher

        self.loop = asyncio.new_event_loop()
        self.fetcher = Fetcher(settings)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="pipeline-fetch", daemon=True
        )
        self.thread.start()

    def fetch(self, url: str, **kwargs: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(
            self.fetcher.fetch(url, **kwargs), self.loop
        ).result()

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.fetcher.aclose(), self.loop).result(timeout=60)
        except Exception as exc:  # closing must not hide the run's outcome
            log.warning("closing the pipeline's fetcher: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


# --- the step context ------------------------------------------------------------------------


def entity_from(obj: Entity | Mapping[str, Any]) -> Entity:
    """A dict with an ``id`` key becomes an Entity: the other keys are its attributes and
    the content hash is computed the way the scrape job computes it, so the same product
    found by a spec and by a pipeline is one entity."""
    if isinstance(obj, Entity):
        return obj
    if not isinstance(obj, Mapping) or obj.get("id") in (None, ""):
        raise ValueError(f"an entity needs an 'id' key: {obj!r:.200}")
    attrs = []
    for name, value in obj.items():
        if name == "id":
            continue
        attrs.append((str(name), *_typed(value)))
    digest = hashlib.sha1(
        "\x1f".join(f"{k}={v}" for k, v, _ in sorted(attrs, key=lambda a: a[0])).encode()
    ).hexdigest()[:16]
    url = obj.get("url") or obj.get("source_url")
    return Entity(str(obj["id"]), digest, attrs, str(url) if url else None)


def _typed(value: Any) -> tuple[str | None, str]:
    if value is None:
        return None, "str"
    if isinstance(value, bool):
        return ("true" if value else "false"), "bool"
    if isinstance(value, int):
        return str(value), "int"
    if isinstance(value, float):
        return repr(value), "float"
    if isinstance(value, str):
        return value, "str"
    return json.dumps(value, sort_keys=True, default=str), "str"


class StepContext:
    """What a step gets: the run's identity, the log, the cascade, storage and stop checks."""

    def __init__(self, runner: _Runner, position: int, name: str, state: dict[str, Any]) -> None:
        self._runner = runner
        self.position = position
        self.step = name
        self.run_id = runner.run_id
        self.pipeline = runner.pipeline.name
        self.country = runner.country
        self.db_url = redact_url(runner.db.url)  # never with its password
        self.state: dict[str, Any] = dict(state)

    def log(self, line: str) -> None:
        """A line in the run log (``run_logs``, stream ``stdout``)."""
        for part in str(line).splitlines() or [""]:
            self._runner.log.write(self.step, "stdout", part)

    def fetch(self, url: str, **kwargs: Any) -> Any:
        """``Fetcher.fetch`` through the cascade (``country`` defaults to the run's); returns a
        ``fetchers.FetchResult`` and never raises for a failed fetch (check ``.success``).
        Every attempt is recorded in ``fetch_logs``."""
        kwargs.setdefault("country", self.country)
        from fetchers.cascade import domain_of

        result = self._runner.fetcher().fetch(url, **kwargs)
        with self._runner.db.begin() as conn:
            store.add_fetch_logs(
                conn, self.run_id, url, kwargs["country"], result.attempts, domain_of(url)
            )
        return result

    def store(
        self,
        entity_type: str,
        entities: Iterable[Entity | Mapping[str, Any]],
        *,
        country: str | None = None,
    ) -> dict[str, int]:
        """Upsert entities (``storage.scrape.Entity`` or dicts with an ``id``) and save
        ``ctx.state`` in one transaction: after a crash either both are stored or neither,
        so a resumed step continues exactly after the last stored batch. Returns external
        id → entity id."""
        items = [entity_from(e) for e in entities]
        state = json.loads(json.dumps(self.state))  # fail here if it is not JSON
        with self._runner.db.begin() as conn:
            ids = store_entities(conn, self.run_id, entity_type, country or self.country, items)
            store.save_state(conn, self.run_id, self.position, state)
        self._runner.saved_state = state
        return ids

    def stored(
        self, entity_type: str, *, after: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Entities of this run and country (as ``{"id": …, attribute: value}``, by id after
        ``after``): how a later step reads what an earlier step stored, a page at a time."""
        with self._runner.db.connect() as conn:
            return store.run_entities(conn, self.run_id, entity_type, self.country, after, limit)

    def checkpoint(self) -> None:
        """Save ``ctx.state`` without storing anything."""
        state = json.loads(json.dumps(self.state))
        with self._runner.db.begin() as conn:
            store.save_state(conn, self.run_id, self.position, state)
        self._runner.saved_state = state

    @property
    def stopping(self) -> bool:
        return self._runner.control.stop_requested()

    def check_stop(self) -> None:
        """Raise StopRequested if the run was asked to stop, pause or cancel."""
        if self._runner.control.stop_requested():
            raise StopRequested(f"run {self.run_id} was asked to stop")
