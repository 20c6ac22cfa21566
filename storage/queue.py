"""Task queue operations in SQL: claim with a lease, heartbeat, complete, release, retry.

The same statements run on both databases. On PostgreSQL many processes claim at once, so the
claim locks candidate rows with ``FOR UPDATE SKIP LOCKED`` (each worker takes different
tasks, nobody waits); on DuckDB only the coordinator process writes, so no lock clause is
needed. Every time comes from the database clock (``storage.clock``).

**Fencing.** Every claim stamps each of its tasks with a new ``lease_token`` (a random
prefix per claim, then the task id: no two tasks or claims share one). A caller that
passes ``tokens`` (task id → the token of its claim) to ``heartbeat``, ``complete``,
``release`` or ``fail`` acts only on the tasks still leased under that token; ``held`` says
which those are, so results of a lease that expired (a worker partitioned, stopped, or
slower than its lease) are not stored and a re-claimed task is never completed by its old
holder. A token is per claim, not per worker: a worker that re-claims a task it lost holds
it under the new token only, and what it still sends under the old one is fenced off.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from storage.bulk import fetch_all, staged_columns
from storage.clock import NOW_SQL, db_now, seconds_from_now, utcnow
from storage.schema import commands, errors, runs, tasks, workers

ACTIVE_RUN = "running"


@dataclass(slots=True)
class ClaimedTask:
    id: int
    run_id: int
    seq: int
    kind: str
    params: dict[str, Any]
    refs: list[Any]
    attempts: int
    max_attempts: int
    lease_token: str


def add_tasks(
    conn: sa.Connection,
    run_id: int,
    batches: Sequence[Sequence[Any]],
    start_seq: int,
    max_attempts: int,
    countries: Sequence[str | None] | None = None,
) -> int:
    """Insert one task per batch of item references; returns how many items were queued.

    ``countries`` has one entry per batch (normal forms, ``engine.countries``): only a worker
    serving that country claims the task; None (or no list): any worker."""
    if not batches:
        return 0
    n = len(batches)
    if countries is not None and len(countries) != n:
        raise ValueError(f"{len(countries)} countries for {n} batches")
    sizes = [len(b) for b in batches]
    values = [
        [run_id] * n,
        [start_seq + i for i in range(n)],
        ["queued"] * n,
        [json.dumps(list(b)) for b in batches],
        sizes,
        [max_attempts] * n,
        [utcnow()] * n,
        list(countries) if countries is not None else [None] * n,
    ]
    cols = {
        "run_id": "bigint",
        "seq": "int",
        "status": "text",
        "items": "text",
        "n_items": "int",
        "max_attempts": "int",
        "created_at": "timestamp",
        "country": "text",
    }
    with staged_columns(conn, cols, values, once=True) as s:
        conn.execute(
            sa.text(f"INSERT INTO tasks ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {s}")
        )
    return sum(sizes)


def claim(
    conn: sa.Connection,
    worker_id: str,
    max_tasks: int,
    lease_seconds: float,
    run_id: int | None = None,
    run_meta: dict[int, tuple[str, dict[str, Any]]] | None = None,
    countries: Sequence[str] = (),
    version: str | None = None,
) -> list[ClaimedTask]:
    """Lease up to ``max_tasks`` queued tasks of running runs to ``worker_id``.

    ``run_meta`` caches (kind, params) by run id across calls: they never change.
    ``countries`` (normal forms): only tasks of no country or of one of these; empty: any.
    ``version``: only runs created by that code version, or by none (``engine.version``).
    """
    token = secrets.token_hex(8) + "."
    lock = " FOR UPDATE OF t SKIP LOCKED" if conn.dialect.name == "postgresql" else ""
    run_filter = " AND t.run_id = :run_id" if run_id is not None else ""
    if countries:
        run_filter += " AND (t.country IS NULL OR t.country IN :countries)"
    if version is not None:
        run_filter += " AND (r.code_version IS NULL OR r.code_version = :version)"
    stmt = sa.text(
        f"""
            UPDATE tasks SET status = 'leased', worker_id = :w,
                   lease_token = :tok || CAST(id AS VARCHAR),
                   attempts = attempts + 1,
                   lease_until = {seconds_from_now(lease_seconds)},
                   updated_at = {NOW_SQL}
            WHERE id IN (
                SELECT t.id FROM tasks t JOIN runs r ON r.id = t.run_id
                WHERE r.status = 'running' AND t.status = 'queued'
                  AND (t.available_at IS NULL OR t.available_at <= {NOW_SQL}){run_filter}
                ORDER BY t.run_id, t.seq
                LIMIT :n{lock}
            )
            RETURNING id, run_id, seq, items, attempts, max_attempts, lease_token
            """
    )
    args: dict[str, Any] = {
        "w": worker_id,
        "tok": token,
        "n": max_tasks,
        "run_id": run_id,
        "version": version,
    }
    if countries:
        stmt = stmt.bindparams(sa.bindparam("countries", expanding=True))
        args["countries"] = sorted(set(countries))
    rows = fetch_all(conn, stmt, args)
    if not rows:
        return []
    meta = {} if run_meta is None else run_meta
    missing = sorted({r[1] for r in rows} - set(meta))
    if missing:
        for r in fetch_all(
            conn, sa.select(runs.c.id, runs.c.kind, runs.c.params).where(runs.c.id.in_(missing))
        ):
            meta[r[0]] = (r[1], json.loads(r[2]))
    return [
        ClaimedTask(
            id=r[0],
            run_id=r[1],
            seq=r[2],
            kind=meta[r[1]][0],
            params=meta[r[1]][1],
            refs=json.loads(r[3]),
            attempts=r[4],
            max_attempts=r[5],
            lease_token=r[6],
        )
        for r in sorted(rows, key=lambda r: (r[1], r[2]))
    ]


def refused_runs(
    conn: sa.Connection, version: str, run_id: int | None = None
) -> list[tuple[int, str]]:
    """(run id, its code version) of running runs with queued tasks that a worker of
    ``version`` does not take: they were created by another version."""
    q = (
        sa.select(runs.c.id, runs.c.code_version)
        .where(
            runs.c.status == ACTIVE_RUN,
            runs.c.code_version.is_not(None),
            runs.c.code_version != version,
            sa.exists().where(tasks.c.run_id == runs.c.id, tasks.c.status == "queued"),
        )
        .order_by(runs.c.id)
    )
    if run_id is not None:
        q = q.where(runs.c.id == run_id)
    return [(int(r[0]), str(r[1])) for r in fetch_all(conn, q)]


def current_leases(conn: sa.Connection, task_ids: Iterable[int]) -> dict[int, str]:
    """Task id → the lease token it is leased under now, for those of ``task_ids`` leased."""
    ids = list(task_ids)
    if not ids:
        return {}
    rows = fetch_all(
        conn,
        sa.select(tasks.c.id, tasks.c.lease_token).where(
            tasks.c.id.in_(ids), tasks.c.status == "leased", tasks.c.lease_token.is_not(None)
        ),
    )
    return {r[0]: r[1] for r in rows}


def held(conn: sa.Connection, tokens: Mapping[int, str]) -> set[int]:
    """Of the tasks in ``tokens`` (task id → lease token), those still leased under it."""
    now = current_leases(conn, tokens)
    return {t for t, tok in tokens.items() if now.get(t) == tok}


def _leased(worker_id: str | None, ids: list[int], tokens: Mapping[int, str] | None) -> list[Any]:
    """WHERE clauses: the tasks ``ids`` leased by ``worker_id`` (under their tokens, when
    given: a task whose token is not given is not matched)."""
    where = [tasks.c.id.in_(ids), tasks.c.status == "leased"]
    if worker_id is not None:
        where.append(tasks.c.worker_id == worker_id)
    if tokens is not None:
        where.append(tasks.c.lease_token.in_(sorted({tokens[i] for i in ids if i in tokens})))
    return where


def heartbeat(
    conn: sa.Connection,
    worker_id: str,
    task_ids: Iterable[int],
    lease_seconds: float,
    tokens: Mapping[int, str] | None = None,
) -> dict[int, str]:
    """Extend the leases ``worker_id`` holds (under ``tokens``, when given); returns task id
    → its run's status (``lost`` for a task this worker no longer holds)."""
    asked = list(task_ids)
    if not asked:
        return {}
    ids = (
        asked
        if tokens is None
        else sorted(held(conn, {i: tokens[i] for i in asked if i in tokens}))
    )
    extended = fetch_all(
        conn,
        sa.update(tasks)
        .where(*_leased(worker_id, ids, tokens))
        .values(lease_until=seconds_from_now(lease_seconds))
        .returning(tasks.c.id, tasks.c.run_id),
    ) if ids else []  # fmt: skip
    statuses = dict(
        fetch_all(
            conn,
            sa.select(runs.c.id, runs.c.status).where(
                runs.c.id.in_({r[1] for r in extended} or {-1})
            ),
        )
    )
    out = {tid: "lost" for tid in asked}
    out.update({r[0]: statuses.get(r[1], "lost") for r in extended})
    return out


def complete(
    conn: sa.Connection, task_ids: Iterable[int], tokens: Mapping[int, str] | None = None
) -> None:
    """All items of these tasks are stored: done. With ``tokens``, only the tasks still
    leased under them (a holder that lost its lease completes nothing); without, whoever
    holds the lease now (the claim, completing what an earlier attempt stored)."""
    ids = list(task_ids)
    if tokens is not None:
        complete_leases(conn, [(i, tokens[i]) for i in ids if i in tokens])
    elif ids:
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_(ids), tasks.c.status.in_(("leased", "queued")))
            .values(status="done", lease_token=None, lease_until=None, updated_at=db_now())
        )


def complete_leases(conn: sa.Connection, leases: Iterable[tuple[int, str]]) -> None:
    """``complete`` of (task id, token) pairs, possibly several per task (an old execution's
    and a new one's, both handed over in one flush): a task is done when one of its pairs is
    its current lease (tokens are per task, so a pair never matches another task)."""
    pairs = list(leases)
    if not pairs:
        return
    conn.execute(
        sa.update(tasks)
        .where(
            tasks.c.id.in_(sorted({t for t, _ in pairs})),
            tasks.c.status == "leased",
            tasks.c.lease_token.in_(sorted({tok for _, tok in pairs})),
        )
        .values(status="done", lease_token=None, lease_until=None, updated_at=db_now())
    )


def release(
    conn: sa.Connection,
    worker_id: str,
    task_ids: Iterable[int],
    tokens: Mapping[int, str] | None = None,
) -> None:
    """Hand tasks back untouched (graceful stop): the claim does not count as an attempt."""
    ids = list(task_ids)
    if ids:
        conn.execute(
            sa.update(tasks)
            .where(*_leased(worker_id, ids, tokens))
            .values(
                status="queued",
                attempts=tasks.c.attempts - 1,
                worker_id=None,
                lease_token=None,
                lease_until=None,
                updated_at=db_now(),
            )
        )


def fail(
    conn: sa.Connection,
    task_ids: Iterable[int],
    error: str,
    backoff_seconds: float,
    worker_id: str | None = None,
    tokens: Mapping[int, str] | None = None,
) -> None:
    """A failed attempt: back to the queue after a backoff, or ``failed`` when out of tries."""
    ids = list(task_ids)
    if not ids:
        return
    owner = " AND worker_id = :w" if worker_id else ""
    fence = " AND lease_token IN :toks" if tokens is not None else ""
    toks = sorted({tokens[i] for i in ids if i in tokens}) if tokens is not None else []
    stmt = sa.text(
        f"""
        UPDATE tasks SET
            status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
            available_at = {NOW_SQL}
                + (:backoff * power(2, greatest(attempts - 1, 0)) * INTERVAL '1 second'),
            worker_id = NULL, lease_token = NULL, lease_until = NULL,
            last_error = :err, updated_at = {NOW_SQL}
        WHERE status = 'leased' AND id IN :ids{owner}{fence}
        """
    ).bindparams(sa.bindparam("ids", expanding=True))
    if tokens is not None:
        if not toks:
            return
        stmt = stmt.bindparams(sa.bindparam("toks", expanding=True))
    conn.execute(
        stmt,
        {"ids": ids, "err": error[:2000], "backoff": float(backoff_seconds), "w": worker_id,
         "toks": toks},
    )  # fmt: skip


DEFAULT_MAX_LOST_LEASES = 5  # engine.settings.Settings.max_lost_leases


def lost_too_often(times: int) -> str:
    """A task's error once its holders were lost ``times`` times."""
    return (
        f"its worker died or went silent while holding it {times} times (the cap, "
        "max_lost_leases): a task that crashes or wedges every worker that takes it; see "
        "the worker logs, then `resume RUN_ID` queues it again"
    )


def requeue(
    conn: sa.Connection,
    task_ids: Iterable[int],
    reason: str,
    *,
    lost: bool = False,
    max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
) -> None:
    """Leased tasks back to the queue at once, their claim not counted as an attempt: for
    leases whose holder died through no fault of the task's data (its coordinator was
    killed), so that crashes of ours never use up a task's ``max_attempts``. ``lost``: the
    holder was a worker that is gone (killed, crashed): that counts as a lost lease, and a
    task lost ``max_lost_leases`` times fails instead (it may be what kills them)."""
    ids = list(task_ids)
    if not ids:
        return
    base = dict(
        attempts=sa.func.greatest(tasks.c.attempts - 1, 0),
        available_at=None,
        worker_id=None,
        lease_token=None,
        lease_until=None,
        updated_at=db_now(),
    )
    leased = sa.update(tasks).where(tasks.c.id.in_(ids), tasks.c.status == "leased")
    if not lost:
        conn.execute(leased.values(status="queued", last_error=reason[:2000], **base))
        return
    losses = sa.func.coalesce(tasks.c.lost_leases, 0) + 1
    capped = losses >= max_lost_leases
    conn.execute(
        leased.values(
            status=sa.case((capped, "failed"), else_="queued"),
            lost_leases=losses,
            last_error=sa.case(
                (capped, sa.literal(lost_too_often(max_lost_leases))), else_=reason[:2000]
            ),
            **base,
        )
    )


WATCHDOG_LOCK = 0x46_46_57_44  # "FFWD": the advisory lock of the fleet's one watchdog


def watchdog_turn(conn: sa.Connection) -> bool:
    """Whether this transaction is the watchdog's (PostgreSQL: several consoles and CLIs on
    one database take turns, one at a time, through a transaction-scoped advisory lock, and
    the others skip the round; DuckDB has one process)."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(
        conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": WATCHDOG_LOCK}).scalar()
    )


def requeue_expired(
    conn: sa.Connection, backoff_seconds: float, max_lost_leases: int = DEFAULT_MAX_LOST_LEASES
) -> list[tuple[int, str]]:
    """The watchdog's lease check: every lease past its time goes back to the queue. The
    re-queueing statement checks the lease again, so one renewed since it was read is left
    alone. A lost lease is not a failed attempt: its worker went silent (partitioned,
    stopped, killed), which says nothing of the task, and the token fences the old holder
    off. But a task that has lost ``max_lost_leases`` holders fails (with why): it may be
    what wedges or kills them, and it must not come back for ever. Returns the (task id,
    worker id) pairs it took back (re-queued, or failed at the cap)."""
    found = dict(expired_leases(conn))
    if not found:
        return []
    rows = fetch_all(
        conn,
        sa.text(
            f"""
            UPDATE tasks SET
                status = CASE WHEN coalesce(lost_leases, 0) + 1 >= :cap THEN 'failed'
                    ELSE 'queued' END,
                lost_leases = coalesce(lost_leases, 0) + 1,
                attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                available_at = {NOW_SQL} + (:backoff * INTERVAL '1 second'),
                last_error = CASE WHEN coalesce(lost_leases, 0) + 1 >= :cap THEN :capped
                    ELSE 'lease expired (worker ' || coalesce(worker_id, '?') || ' went silent)'
                    END,
                worker_id = NULL, lease_token = NULL, lease_until = NULL,
                updated_at = {NOW_SQL}
            WHERE id IN :ids AND status = 'leased' AND lease_until < {NOW_SQL}
            RETURNING id, status
            """
        ).bindparams(sa.bindparam("ids", expanding=True)),
        {
            "ids": sorted(found),
            "backoff": float(backoff_seconds),
            "cap": int(max_lost_leases),
            "capped": lost_too_often(max_lost_leases),
        },
    )
    for task_id, status in rows:
        if status == "failed":  # shown with the run's errors, as a last failed attempt is
            record_task_errors(
                conn, [task_id], found[task_id], "task_failed", lost_too_often(max_lost_leases)
            )
    return sorted((r[0], found[r[0]]) for r in rows)


def lock_tasks(conn: sa.Connection, task_ids: Sequence[int]) -> None:
    """Lock task rows until the transaction ends (PostgreSQL; DuckDB has one writer).

    Two executions of one task (a lease that expired under a slow worker) that store their
    results serialise here, so each item counts as new exactly once."""
    if conn.dialect.name != "postgresql" or not task_ids:
        return
    fetch_all(
        conn,
        sa.text("SELECT id FROM tasks WHERE id IN :ids ORDER BY id FOR UPDATE").bindparams(
            sa.bindparam("ids", expanding=True)
        ),
        {"ids": sorted(task_ids)},
    )


def run_kind_params(conn: sa.Connection, run_id: int) -> tuple[str, dict[str, Any]]:
    """A run's kind and parameters (they never change, callers cache them)."""
    rows = fetch_all(conn, sa.select(runs.c.kind, runs.c.params).where(runs.c.id == run_id))
    return rows[0][0], json.loads(rows[0][1])


def record_task_errors(
    conn: sa.Connection,
    task_ids: Sequence[int],
    worker_id: str | None,
    error_type: str,
    message: str,
) -> None:
    """One ``errors`` row per task (with its run), e.g. why an attempt failed."""
    if not task_ids:
        return
    rows = fetch_all(
        conn,
        sa.text("SELECT id, run_id FROM tasks WHERE id IN :ids").bindparams(
            sa.bindparam("ids", expanding=True)
        ),
        {"ids": list(task_ids)},
    )
    values: list[dict[str, Any]] = [
        {
            "run_id": r[1],
            "task_id": r[0],
            "worker_id": worker_id,
            "error_type": error_type,
            "message": message[:2000],
            "created_at": utcnow(),
        }
        for r in rows
    ]
    if values:
        conn.execute(sa.insert(errors), values)


def expired_leases(conn: sa.Connection, include_live: bool = False) -> list[tuple[int, str]]:
    """(task id, worker id) of leases whose holder stopped heartbeating (or all leases)."""
    conds = [tasks.c.status == "leased"]
    if not include_live:
        conds.append(tasks.c.lease_until < db_now())
    return [
        (r[0], r[1])
        for r in fetch_all(conn, sa.select(tasks.c.id, tasks.c.worker_id).where(*conds))
    ]


def tasks_of_worker(conn: sa.Connection, worker_id: str) -> list[int]:
    return [
        r[0]
        for r in fetch_all(
            conn,
            sa.select(tasks.c.id).where(tasks.c.worker_id == worker_id, tasks.c.status == "leased"),
        )
    ]


def leased_tasks(conn: sa.Connection, run_id: int) -> list[tuple[int, str | None]]:
    """(task id, worker id) of a run's tasks under a lease."""
    return [
        (int(r[0]), r[1])
        for r in fetch_all(
            conn,
            sa.select(tasks.c.id, tasks.c.worker_id).where(
                tasks.c.run_id == run_id, tasks.c.status == "leased"
            ),
        )
    ]


def last_seq(conn: sa.Connection, run_id: int) -> int | None:
    """The highest task number of a run (None: it has no tasks)."""
    seq = fetch_all(conn, sa.select(sa.func.max(tasks.c.seq)).where(tasks.c.run_id == run_id))
    return None if seq[0][0] is None else int(seq[0][0])


def task_counts(conn: sa.Connection, run_id: int) -> dict[str, int]:
    rows = fetch_all(
        conn,
        sa.select(tasks.c.status, sa.func.count())
        .where(tasks.c.run_id == run_id)
        .group_by(tasks.c.status),
    )
    return {r[0]: int(r[1]) for r in rows}


def requeue_failed(conn: sa.Connection, run_id: int) -> int:
    """Give failed tasks of a run a fresh set of attempts (on resume)."""
    res = conn.execute(
        sa.update(tasks)
        .where(tasks.c.run_id == run_id, tasks.c.status == "failed")
        .values(status="queued", attempts=0, lost_leases=0, available_at=None, updated_at=db_now())
    )
    return res.rowcount or 0


# --- workers -----------------------------------------------------------------------------


def register_worker(
    conn: sa.Connection,
    worker_id: str,
    host: str,
    pid: int,
    kind: str,
    countries: Sequence[str] = (),
    code_version: str | None = None,
) -> None:
    conn.execute(sa.delete(workers).where(workers.c.id == worker_id))
    conn.execute(
        sa.insert(workers).values(
            id=worker_id,
            host=host,
            pid=pid,
            kind=kind,
            code_version=code_version,
            status="starting",
            started_at=db_now(),
            heartbeat_at=db_now(),
            countries=",".join(sorted(set(countries))) or None,
        )
    )


def touch_worker(
    conn: sa.Connection,
    worker_id: str,
    status: str,
    task_ids: Iterable[int],
    done: int = 0,
    failed: int = 0,
) -> None:
    conn.execute(
        sa.update(workers)
        .where(workers.c.id == worker_id)
        .values(
            status=status,
            heartbeat_at=db_now(),
            tasks_held=",".join(str(t) for t in task_ids) or None,
            items_done=workers.c.items_done + done,
            items_failed=workers.c.items_failed + failed,
        )
    )


def end_worker(conn: sa.Connection, worker_id: str, status: str, reason: str | None) -> None:
    conn.execute(
        sa.update(workers)
        .where(workers.c.id == worker_id)
        .values(status=status, tasks_held=None, exit_reason=reason, heartbeat_at=db_now())
    )


def stale_workers(conn: sa.Connection, older_than_s: float) -> list[str]:
    """Workers that claim to be alive but stopped heartbeating."""
    return [
        r[0]
        for r in fetch_all(
            conn,
            sa.select(workers.c.id).where(
                workers.c.status.in_(("starting", "idle", "busy", "stopping")),
                workers.c.heartbeat_at < seconds_from_now(-older_than_s),
            ),
        )
    ]


# --- commands ------------------------------------------------------------------------------


def pending_worker_commands(conn: sa.Connection, worker_id: str) -> list[tuple[int, str]]:
    rows = fetch_all(
        conn,
        sa.select(commands.c.id, commands.c.action).where(
            commands.c.target_kind == "worker",
            commands.c.target_id == worker_id,
            commands.c.handled_at.is_(None),
        ),
    )
    if rows:
        conn.execute(
            sa.update(commands)
            .where(commands.c.id.in_([r[0] for r in rows]))
            .values(handled_at=db_now(), result="delivered")
        )
    return [(r[0], r[1]) for r in rows]
