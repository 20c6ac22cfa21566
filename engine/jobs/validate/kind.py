"""The ``validate`` job kind: check proxies through a judge and keep the pool's state.

Items are proxy ids. Planning imports a list (streamed, deduplicated, malformed lines
recorded in ``errors`` with their line numbers) or selects stored proxies by filter. Workers
receive the proxies with their passwords decrypted at claim time; the task rows and run
parameters hold only ids and file paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.jobs.base import Executor, JobKind, WorkerEnv
from engine.jobs.validate.params import ValidateParams
from engine.model import ItemResult, ResultBatch

if TYPE_CHECKING:
    import sqlalchemy as sa

    from storage.db import Database
    from storage.item_logs import ItemLog
    from storage.proxy_rows import ProxyRow
    from storage.secrets import SecretBox

log = logging.getLogger(__name__)

# Storage modules (SQLAlchemy, DuckDB) are imported inside the methods that write: pool
# worker processes import this module for its executor only.

IMPORT_CHUNK = 10_000
MAX_PARSE_ERRORS_STORED = 1_000
FILTER_KEYS = ("status", "protocol", "older_than_hours", "minutes_old", "limit")


class ValidateJob(JobKind):
    name = "validate"
    params_model = ValidateParams
    # Workers hand results over column by column (see store_batch).
    columns = (
        "checked_at", "protocol", "latency_ms", "anonymity", "exit_ip", "country", "error",
    )  # fmt: skip

    def _box(self) -> SecretBox:
        from storage.secrets import SecretBox

        return SecretBox.load(self.settings.secret_key, self.settings.secret_key_file)

    def prepare(self, params: dict[str, Any]) -> dict[str, Any]:
        p = ValidateParams.build(params, self.settings)
        source = p.proxies_file
        if source:
            path = Path(source)
            if not path.is_file():
                raise ValidateParams.error("proxies_file", "no such file", source)
            if path.stat().st_size == 0:
                raise ValidateParams.error(
                    "proxies_file", "the file is empty; one proxy a line", source
                )
            p = p.model_copy(update={"proxies_file": str(path.resolve())})
        elif not p.filters():
            raise ValidateParams.error(
                None,
                "nothing to validate: give --proxies FILE, or select stored proxies with "
                "--revalidate / --status / --type / --older-than-hours / --limit",
            )
        _check_judge(p.judge_url, p.timeout_s)
        canary = _resolve_canary(p.canary_url, p.judge_url, p.timeout_s)
        return p.model_copy(update={"canary_url": canary or "off"}).stored()

    def plan(self, db: Database, run_id: int, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
        batch = int(params["batch_size"])
        if params.get("proxies_file"):
            ids = self._import(db, run_id, Path(params["proxies_file"]))
        else:
            from storage import proxies as store

            flt = store.ProxyFilter(**{k: params.get(k) for k in FILTER_KEYS})
            with db.connect() as conn:
                ids = iter(store.select_ids(conn, flt))
        while chunk := list(islice(ids, batch)):
            yield chunk

    def _import(self, db: Database, run_id: int, path: Path) -> Iterator[int]:
        from fetchers.proxy_parse import iter_proxy_lines, redact_line
        from storage import proxies as store
        from storage.clock import utcnow
        from storage.error_log import BAD_INPUT, add_errors

        box = self._box()
        seen: set[str] = set()
        bad = 0
        lines = iter_proxy_lines(path)
        while chunk := list(islice(lines, IMPORT_CHUNK)):
            specs, bad_rows = [], []
            for parsed in chunk:
                if parsed.spec is None:
                    bad += 1
                    if bad <= MAX_PARSE_ERRORS_STORED:
                        bad_rows.append(
                            {
                                "run_id": run_id,
                                "item_key": f"line {parsed.line_no}",
                                "error_type": BAD_INPUT,
                                "message": f"{parsed.error} — {redact_line(parsed.text)!r}",
                                "created_at": utcnow(),
                            }
                        )
                elif (key := parsed.spec.key) not in seen:
                    seen.add(key)
                    specs.append(parsed.spec)
            if not specs and not bad_rows:
                continue  # a chunk of duplicates: later lines may still hold new proxies
            with db.begin() as conn:
                ids = store.upsert_proxies(conn, specs, box, source=path.name)
                add_errors(conn, bad_rows)
            yield from ids
        if bad > MAX_PARSE_ERRORS_STORED:
            with db.begin() as conn:
                more = f"{bad - MAX_PARSE_ERRORS_STORED:,} more malformed lines not listed "
                add_errors(
                    conn,
                    [
                        {
                            "run_id": run_id,
                            "item_key": "more",
                            "error_type": BAD_INPUT,
                            "created_at": utcnow(),
                            "message": f"{more}({bad:,} in all)",
                        }
                    ],
                )

    def load_items(self, conn: sa.Connection, run_id: int, refs: list[Any]) -> list[Any]:
        from storage import proxies as store

        return store.load_for_check(conn, run_id, refs, self._box())

    def store(self, conn: sa.Connection, results: list[ItemResult]) -> int:
        batches: dict[int, ResultBatch] = {}
        for r in results:
            batch = batches.get(r.run_id)
            if batch is None:
                batch = batches[r.run_id] = ResultBatch.empty(r.run_id, self.columns)
            batch.add(r.task_id, r.ref, r.ok, r.outcome, r.data, r.worker_id, r.lease)
        return sum(self.store_batch(conn, b) for b in batches.values())

    def store_batch(self, conn: sa.Connection, batch: ResultBatch) -> int:
        from storage import proxies as store
        from storage.clock import utcnow

        n = len(batch)
        if not n:
            return 0
        from storage.proxy_history import record_checks

        c = batch.columns
        now = utcnow()
        ids = [int(r) for r in batch.refs]
        at = [t or now for t in c["checked_at"]]
        new = store.store_check_columns(
            conn,
            [
                [batch.run_id] * n,
                ids,
                batch.task_ids,
                batch.worker_ids,
                at,
                batch.outcomes,
                batch.oks,
                c["protocol"],
                c["latency_ms"],
                c["anonymity"],
                c["exit_ip"],
                c["country"],
                c["error"],
            ],
        )
        if new:  # the proxies' recent history (a run's check of a proxy counts once there too)
            n_kept = self.settings.proxy_history_n
            record_checks(conn, batch.run_id, ids, batch.oks, c["latency_ms"], at, n_kept)
        return new

    def item_log(self) -> ItemLog:
        from storage.item_logs import ItemLog
        from storage.schema import proxy_checks

        return ItemLog("validate", proxy_checks, time="checked_at", ok_column="alive")

    def ok_outcomes(self) -> set[str]:
        return {"alive"}

    def summary_extra(self, conn: sa.Connection, run_id: int) -> dict[str, Any] | None:
        """The integrity check: the canary used (None: not checked) and the tampering count."""
        from storage.item_logs import outcome_counts
        from storage.runs import get_run

        run = get_run(conn, run_id)
        if run is None:
            return None
        canary = run.params.get("canary_url")
        tampering = outcome_counts(conn, self.item_log(), run_id).get("tampering", 0)
        return {"integrity": {"canary": None if canary in (None, "off") else canary,
                              "tampering": tampering}}  # fmt: skip

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        integrity = (summary.get(self.name) or {}).get("integrity")
        if not integrity:
            return []
        if integrity["canary"] is None:
            return ["  integrity: not checked (no canary: give --canary URL to catch tampering)"]
        return [
            f"  integrity: {integrity['tampering']:,} tampering (they modify content: never "
            f"used), canary {integrity['canary']}"
        ]

    async def open_executor(self, params: dict[str, Any], env: WorkerEnv) -> Executor:
        from fetchers.proxy_check import ProxyChecker

        timeout = float(params["timeout_s"])
        integrity = await _open_integrity(params.get("canary_url"), timeout)
        checker = ProxyChecker(params["judge_url"], timeout=timeout, integrity=integrity)
        await checker.start()
        return ValidateExecutor(checker)


class ValidateExecutor(Executor):
    def __init__(self, checker: Any) -> None:
        self.checker = checker

    async def execute(self, item: ProxyRow) -> tuple[bool, str, dict[str, Any]]:
        from fetchers.proxy_parse import ProxySpec

        spec = ProxySpec(
            scheme=item.scheme,
            host=item.host,
            port=item.port,
            username=item.username,
            password=item.password,
        )
        res = await self.checker.check(spec)
        return (
            res.alive,
            res.outcome,
            {
                "checked_at": res.checked_at.replace(tzinfo=None) if res.checked_at else None,
                "protocol": res.protocol,
                "latency_ms": res.latency_ms,
                "anonymity": res.anonymity,
                "exit_ip": res.exit_ip,
                "country": res.country,
                "error": res.error,
            },
        )

    async def aclose(self) -> None:
        await self.checker.aclose()


def _resolve_canary(option: str | None, judge: str, timeout: float) -> str | None:
    """The canary the run's workers use (None: integrity not checked); an explicit one that
    does not serve a usable canary stops the run before it starts."""
    from fetchers.integrity import CanaryError, resolve_canary

    try:
        return asyncio.run(resolve_canary(option, judge, timeout))
    except CanaryError as exc:
        raise ValidateParams.error(
            "canary_url", f"{exc}; or give --canary off to skip the tampering check", option
        ) from None


async def _open_integrity(canary: str | None, timeout: float) -> Any:
    """The worker's IntegrityCheck (None: off). A canary that stopped answering since the
    run was planned leaves integrity unknown: no proxy gets a wrong verdict."""
    if not canary or canary == "off":
        return None
    from fetchers.integrity import CanaryError, IntegrityCheck

    integrity = IntegrityCheck(canary, timeout)
    try:
        await integrity.start()
    except CanaryError as exc:
        log.warning("integrity not checked: %s", exc)
        return None
    return integrity


def _check_judge(judge: str, timeout: float) -> None:
    """Fail before planning when the judge does not answer: every check would fail."""
    from fetchers.proxy_check import ProxyChecker

    async def probe() -> None:
        checker = ProxyChecker(judge, timeout=timeout)
        try:
            await checker.start()
        finally:
            await checker.aclose()

    try:
        asyncio.run(probe())
    except Exception as exc:
        raise ValidateParams.error(
            "judge_url",
            f"the judge {judge} did not answer a direct request ({type(exc).__name__}: {exc}); "
            "check the URL, or start the local world with `python -m sim`",
        ) from None
