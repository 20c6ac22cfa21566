"""The backfill job against hostile answers and inputs (issue 12): redirects under the rate
limit, credentials kept to their origin, secrets masked in everything stored, bounded bodies,
bounded ID lines, and a killed coordinator that costs no task an attempt.

The API is the sim's (``sim/api.py``), served in the test's own event loop beside the
executor, so its counters (requests, 429s, the headers it saw) are read directly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.jobs.backfill.kind import BackfillExecutor, BackfillJob, iter_ids
from engine.ratelimit.base import MemoryLimiter
from engine.settings import Settings
from sim.api import (
    API_HOST,
    ApiConfig,
    ApiState,
    expected_outcome,
    generate_ids,
    not_found_page,
    start_api,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-9f3c1a7e5b2d4068a1c3e5f7b9d1f3a5"
API_KEY = "key-71c0ffee0ddba11c0de5eed5a1ad0000"
QUIET = {"not_found_per_mille": 0, "server_error_per_mille": 0, "flaky_per_mille": 0}


@asynccontextmanager
async def serve(
    config: ApiConfig, sock: socket.socket | None = None
) -> AsyncIterator[tuple[str, ApiState]]:
    """The sim API on a free port of 127.0.0.3 (or ``sock``), in this event loop:
    (base URL, its state)."""
    server, state = await start_api(config, sock)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}", state
    finally:
        server.close()
        await server.wait_closed()


def prepare(tmp_path: Path, template: str, **kw: Any) -> dict[str, Any]:
    ids = tmp_path / "prepare-ids.txt"
    ids.write_text("x\n")
    return BackfillJob(Settings()).prepare(
        {"ids_file": str(ids), "url_template": template, "retry_backoff_s": 0.05, **kw}
    )


async def execute_all(prepared: dict[str, Any], ids: list[str], concurrency: int = 50) -> list:
    ex = BackfillExecutor(prepared, concurrency, MemoryLimiter())
    try:
        return await asyncio.gather(*(ex.execute(i) for i in ids))
    finally:
        await ex.aclose()


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("FF_HARDEN_TOKEN", f"Bearer {TOKEN}")
    monkeypatch.setenv("FF_HARDEN_KEY", API_KEY)
    return ["Authorization=env:FF_HARDEN_TOKEN", "X-Api-Key=env:FF_HARDEN_KEY"]


def fragments(secret: str, n: int = 6) -> set[str]:
    """Every piece of ``secret`` of ``n`` characters: none may be stored."""
    return {secret[i : i + n] for i in range(len(secret) - n + 1)}


# --- case 6: every hop of a redirect takes a slot of the limit ---------------------------------


def test_redirects_take_a_slot_each_no_request_over_the_limit(
    tmp_path: Path, secrets_env: list[str]
) -> None:
    """An API that 301s every ID to a trailing slash: 2 requests per ID, both under the
    limit (the server counts every request over its sliding window)."""
    ids = list(generate_ids(24, seed=6))

    async def main() -> tuple[list, dict[str, Any], list[int]]:
        config = ApiConfig(limit=12, window_s=1.0, token=TOKEN, redirect_slash=True, **QUIET)
        async with serve(config) as (url, state):
            prepared = prepare(
                tmp_path, url + "/users/{id}", rate_limit="12/1s", headers=secrets_env
            )
            results = await execute_all(prepared, ids)
            return results, state.stats(), list(state.per_second)

    results, stats, per_second = asyncio.run(main())
    assert [r[1] for r in results] == ["ok"] * len(ids), [r for r in results if not r[0]][:3]
    assert stats["rate_limited"] == 0, stats  # no request of any hop broke the limit
    assert stats["unauthorized"] == 0  # same origin: the credentials followed the redirect
    assert stats["requests"] == stats["redirected"] * 2 == 2 * len(ids), stats
    assert [d["attempts"] for _, _, d in results] == [2] * len(ids)
    assert max(per_second) <= 12, per_second
    for item, (_, _, data) in zip(ids, results, strict=True):
        assert json.loads(data["body"])["id"] == item


def test_a_redirect_loop_ends_after_a_bounded_number_of_hops(tmp_path: Path) -> None:
    """An API redirecting to itself forever: final outcome, a bounded number of requests."""

    sock = socket.socket()
    sock.bind((API_HOST, 0))
    itself = f"http://{API_HOST}:{sock.getsockname()[1]}"

    async def main() -> tuple[list, dict[str, Any]]:
        async with serve(ApiConfig(redirect_to=itself, **QUIET), sock) as (url, state):
            prepared = prepare(tmp_path, url + "/users/{id}", rate_limit="1000/1s")
            results = await execute_all(prepared, ["a", "b"])
            return results, state.stats()

    results, stats = asyncio.run(main())
    assert [(ok, outcome) for ok, outcome, _ in results] == [(False, "too_many_redirects")] * 2
    assert stats["requests"] == 2 * 6  # the request and 5 hops, each ID once: not retried
    assert all(d["attempts"] == 6 for _, _, d in results)


# --- case 12a: our headers never follow a redirect to another origin ---------------------------


def test_configured_headers_are_dropped_when_a_redirect_changes_origin(
    tmp_path: Path, secrets_env: list[str]
) -> None:
    """A 302 to another port of the same host is another origin: it gets none of the headers
    the user configured (credentials or not), only our User-Agent and Accept."""
    ids = ["a1", "a2", "a3"]
    configured = {"authorization", "x-api-key", "x-client"}

    async def main() -> tuple[list, list, list]:
        async with serve(ApiConfig(record_headers=True, **QUIET)) as (other, other_state):
            first = ApiConfig(token=TOKEN, redirect_to=other, record_headers=True, **QUIET)
            async with serve(first) as (url, state):
                prepared = prepare(
                    tmp_path,
                    url + "/users/{id}",
                    rate_limit="1000/1s",
                    headers=[*secrets_env, "X-Client=fetchfleet-test"],
                )
                results = await execute_all(prepared, ids)
                return results, list(state.headers_seen), list(other_state.headers_seen)

    results, first_seen, other_seen = asyncio.run(main())
    assert [r[1] for r in results] == ["ok"] * 3
    assert len(first_seen) == len(other_seen) == 3
    for headers in first_seen:  # the configured origin got them all
        assert configured <= {name.lower() for name, _ in headers}
    for headers in other_seen:
        names = {name.lower() for name, _ in headers}
        assert not names & configured, headers
        assert "user-agent" in names
        assert TOKEN not in str(headers) and API_KEY not in str(headers)


# --- case 12b: secrets masked in bodies and errors, before any cut ----------------------------


def test_echoed_secrets_are_masked_in_body_and_in_a_long_error(
    tmp_path: Path, secrets_env: list[str]
) -> None:
    """An API that echoes the token in its JSON records and in 404 pages long enough that the
    token straddles character 200: no piece of it is stored."""
    config = ApiConfig(token=TOKEN, echo_auth=True, **{**QUIET, "not_found_per_mille": 500})
    ok_id = next(i for i in generate_ids(50, seed=7) if expected_outcome(i, config) == "ok")
    # An ID whose 404 page puts the token across character 200 of the page (the cut of the
    # stored error), 8+ characters of it on either side.
    auth = f"Bearer {TOKEN}"
    missing_id = ""
    for n in range(10_000):
        for length in range(100, 200):
            candidate = f"m{n}".ljust(length, "0")
            page = not_found_page(candidate, auth).decode()
            at = page.index(TOKEN)
            if at + 8 < 200 < at + len(TOKEN) - 8 and expected_outcome(candidate, config) == (
                "not_found"
            ):
                missing_id = candidate
                break
        if missing_id:
            break
    assert missing_id

    async def main() -> list:
        async with serve(config) as (url, _):
            prepared = prepare(
                tmp_path, url + "/users/{id}", rate_limit="1000/1s", headers=secrets_env
            )
            return await execute_all(prepared, [ok_id, missing_id])

    (ok, outcome, data), (ok2, outcome2, data2) = asyncio.run(main())
    assert (ok, outcome) == (True, "ok") and (ok2, outcome2) == (False, "not_found")
    record = json.loads(data["body"])  # still JSON, the echo masked
    assert record["id"] == ok_id and record["echo"]["authorization"] == "***"
    assert data2["error"].startswith("HTTP 404: ") and "***" in data2["error"]
    for stored in (data["body"], data2["error"]):
        leaked = [f for f in fragments(TOKEN) if f in stored]
        assert not leaked, (leaked, stored)


def test_network_error_text_is_masked_before_it_is_cut(tmp_path: Path) -> None:
    """An error text (a network error quoting a URL, a page) is masked, then cut: a secret
    across the cut leaves no piece behind."""
    from engine.jobs.backfill.kind import ERROR_CHARS, Masker

    secret = "s3cr3t-abcdefghijklmnop"
    mask = Masker([f"Bearer {secret}"])
    text = "x" * 190 + secret + " tail"
    assert mask.cut(text, 200) == "x" * 190 + "*** tail"
    page = ("é" * 190 + secret + "y" * 500).encode()  # multi-byte characters before it
    snippet = mask.snippet(page, ERROR_CHARS)
    assert snippet == "é" * 190 + "***" + "y" * 7
    for stored in (mask.cut(text, 195), snippet):
        assert not [f for f in fragments(secret, 4) if f in stored]


# --- case 17: a body is read up to a bound ----------------------------------------------------


def test_a_body_over_the_bound_is_too_large_final_and_the_transfer_stops(tmp_path: Path) -> None:
    """A 16 MB chunked answer (no Content-Length) against a 1 MB bound: outcome too_large,
    one request (not retried), and the client hangs up instead of reading it all."""
    config = ApiConfig(huge_per_mille=1000, huge_bytes=16 * 2**20, **QUIET)

    async def main() -> tuple[list, dict[str, Any]]:
        async with serve(config) as (url, state):
            prepared = prepare(
                tmp_path, url + "/users/{id}", rate_limit="1000/1s", max_body_bytes=2**20
            )
            results = await execute_all(prepared, ["big-1", "big-2"])
            deadline = time.monotonic() + 10
            while state.stats()["streams_cut"] + state.counts.get("streams_done", 0) < 2:
                assert time.monotonic() < deadline, state.stats()
                await asyncio.sleep(0.05)
            return results, state.stats()

    results, stats = asyncio.run(main())
    assert [(ok, outcome) for ok, outcome, _ in results] == [(False, "too_large")] * 2
    assert all(d["attempts"] == 1 and d["body"] is None for _, _, d in results)
    assert all("1,048,576" in d["error"] for _, _, d in results), results
    assert stats["requests"] == 2 and stats["streams_cut"] == 2, stats


def test_max_body_bytes_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--max-body-bytes"):
        prepare(tmp_path, "http://127.0.0.1:9/{id}", rate_limit="10/1s", max_body_bytes=0)
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    out = subprocess.run(
        [sys.executable, "-m", "engine.run", "backfill", "--db", str(tmp_path / "m.duckdb"),
         "--ids", str(ids), "--url-template", "http://127.0.0.1:9/{id}", "--rate-limit",
         "10/1s", "--max-body-bytes", "-5"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "--max-body-bytes: " in out.stderr, out.stderr
    monkeypatch.delenv("FETCHFLEET_MAX_PAGE_BYTES", raising=False)
    assert prepare(tmp_path, "http://127.0.0.1:9/{id}", rate_limit="10/1s")["max_body_bytes"] == (
        10 * 2**20
    )
    monkeypatch.setenv("FETCHFLEET_MAX_PAGE_BYTES", "5000000")  # the fleet-wide bound
    assert prepare(tmp_path, "http://127.0.0.1:9/{id}", rate_limit="10/1s")["max_body_bytes"] == (
        5_000_000
    )
    given = prepare(tmp_path, "http://127.0.0.1:9/{id}", rate_limit="10/1s", max_body_bytes=999)
    assert given["max_body_bytes"] == 999


# --- case 18: ID lines are read with a bound ---------------------------------------------------

PLAN_PEAK = """
import json, sys, tracemalloc
from engine.api import submit_run
from engine.settings import Settings
from engine.summary import run_summary
from storage.db import open_database
import engine.jobs.backfill.kind, pyarrow
db = open_database(sys.argv[1])
tracemalloc.start()
params = {'ids_file': sys.argv[2], 'url_template': 'http://127.0.0.3:9/u/{id}',
          'rate_limit': '10/1s'}
if len(sys.argv) > 3:
    params['id_column'] = sys.argv[3]
run = submit_run(db, Settings(batch_size=50), 'backfill', params, 'test')
peak = tracemalloc.get_traced_memory()[1] / 2**20
with db.connect() as conn:
    from storage.bulk import fetch_all
    import sqlalchemy as sa
    errors = [tuple(r) for r in fetch_all(conn, sa.text(
        "SELECT item_key, message FROM errors WHERE run_id = :r"), {"r": run})]
print(json.dumps({"peak_mb": peak, "total": run_summary(db, run)["counts"]["total"],
                  "errors": [(k, m[:300]) for k, m in errors]}))
"""


def plan_in_subprocess(db: Path, ids: Path, id_column: str | None = None) -> dict[str, Any]:
    args = [sys.executable, "-c", PLAN_PEAK, f"duckdb:///{db}", str(ids)]
    out = subprocess.run(
        [*args, *([id_column] if id_column else [])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


LONG = 50 * 2**20  # one 50 MB line


def test_a_50_mb_line_is_one_malformed_line_and_is_never_held(tmp_path: Path) -> None:
    good = list(generate_ids(2000, seed=18))
    src = tmp_path / "long-line.txt"
    with src.open("w") as fh:
        fh.write("\n".join(good[:1000]) + "\n")
        chunk = "z" * 2**20
        for _ in range(LONG // len(chunk)):  # line 1001
            fh.write(chunk)
        fh.write("\n" + "\n".join(good[1000:]) + "\n")
    result = plan_in_subprocess(tmp_path / "l.duckdb", src)
    assert result["total"] == 2000
    assert [k for k, _ in result["errors"]] == ["line 1001"], result["errors"]
    assert "longer than" in result["errors"][0][1]
    assert result["peak_mb"] < 20, result  # the line is 50 MB: it was skipped, not read


def test_a_50_mb_csv_cell_is_one_malformed_row(tmp_path: Path) -> None:
    good = list(generate_ids(300, seed=19))
    src = tmp_path / "long-cell.csv"
    with src.open("w") as fh:
        fh.write("name,did\n")
        fh.write("".join(f"n{i},{d}\n" for i, d in enumerate(good[:100])))
        fh.write("huge,")  # line 102
        chunk = "z" * 2**20
        for _ in range(LONG // len(chunk)):
            fh.write(chunk)
        fh.write("\n")
        fh.write('quoted,"unterminated\n')  # line 103: swallows what follows, up to a bound
        fh.write("".join(f"n{i},{d}\n" for i, d in enumerate(good[100:])))
    result = plan_in_subprocess(tmp_path / "c.duckdb", src, "did")
    keys = [k for k, _ in result["errors"]]
    assert keys[0] == "line 102" and "longer than" in result["errors"][0][1], result["errors"]
    # The unterminated quote takes the rest of the file into its field (CSV says so): one row.
    assert keys == ["line 102", "line 103"], result["errors"]
    assert result["total"] == 100 and result["peak_mb"] < 20, result


def test_over_long_lines_in_a_small_file(tmp_path: Path) -> None:
    from engine.jobs.backfill.kind import MAX_LINE_CHARS

    src = tmp_path / "ids.txt"
    src.write_text(f"a\n{'y' * (MAX_LINE_CHARS * 3)}\nb\r\nc")
    lines = list(iter_ids(src))
    assert [(ln.line_no, ln.item_id) for ln in lines] == [(1, "a"), (2, None), (3, "b"), (4, "c")]
    assert "longer than" in (lines[1].error or "") and len(lines[1].text) <= 200


# --- case 5: a killed coordinator costs no task an attempt -------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sim.world import SimWorld, WorldConfig

    api = ApiConfig(limit=300, window_s=1.0, seed=5, **QUIET)
    out = tmp_path_factory.mktemp("api")
    with SimWorld(WorldConfig(n_proxies=0, api=api, ids=200, seed=5, out_dir=out)) as w:
        yield w


def test_four_takeovers_of_a_killed_coordinators_leases_cost_no_attempt(
    world: Any, tmp_path: Path
) -> None:
    from engine.api import submit_run, wait_run
    from engine.runtime.coordinator import Coordinator
    from storage import queue as q
    from storage.bulk import fetch_all
    from storage.db import open_database

    ids = world.ids_file.read_text().split()[:120]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    url = f"duckdb:///{tmp_path / 'orphans.duckdb'}"
    s = Settings(workers=1, concurrency=20, batch_size=20, heartbeat_s=0.5, lease_s=10.0)
    db = open_database(url)

    def attempts() -> dict[int, tuple[str, int]]:
        with db.connect() as conn:
            rows = fetch_all(conn, sa.text("SELECT id, status, attempts FROM tasks"))
        return {r[0]: (r[1], r[2]) for r in rows}

    try:
        run_id = submit_run(
            db,
            s,
            "backfill",
            {"ids_file": str(ids_file), "url_template": world.api_template, "rate_limit": "300/1s"},
            "killed",
        )
        before = attempts()
        assert len(before) == 6 and {a for _, a in before.values()} == {0}
        for crash in range(4):
            # A coordinator that claimed every task for its worker, then was killed -9.
            dead = f"killed-{crash}"
            with db.begin() as conn:
                q.register_worker(conn, dead, "host", 999_999, "local")
                assert len(q.claim(conn, dead, 100, lease_seconds=600)) == 6
            assert {st for st, _ in attempts().values()} == {"leased"}
            Coordinator(db, s, workers=0).start().shutdown()  # takes the orphans over
            assert attempts() == before, f"takeover {crash + 1} changed the tasks"
        coord = Coordinator(db, s).start()
        try:
            summary = wait_run(db, run_id, timeout_s=60)
        finally:
            coord.shutdown()
        assert summary["status"] == "completed", summary
        with db.connect() as conn:
            stored = [
                r[0]
                for r in fetch_all(
                    conn,
                    sa.text("SELECT item_id FROM backfill_items WHERE run_id = :r"),
                    {"r": run_id},
                )
            ]
        assert sorted(stored) == sorted(ids)
    finally:
        db.dispose()


def test_requeue_keeps_attempts(db_url: str) -> None:
    """The storage function itself, on both databases: a requeued claim is not an attempt."""
    from storage import queue as q
    from storage import runs
    from storage.db import open_database

    db = open_database(db_url)
    try:
        with db.begin() as conn:
            run_id = runs.create_run(conn, "backfill", {}, "test")
            q.add_tasks(conn, run_id, [["a"], ["b"]], 0, max_attempts=1)
            runs.start_run(conn, run_id)
            q.register_worker(conn, "w", "host", 1, "local")
        for _ in range(3):
            with db.begin() as conn:
                claimed = q.claim(conn, "w", 10, lease_seconds=60, run_id=run_id)
                assert [t.attempts for t in claimed] == [1, 1]
                q.requeue(conn, [t.id for t in claimed], "coordinator restarted")
                counts = q.task_counts(conn, run_id)
            assert counts == {"queued": 2}
    finally:
        db.dispose()
