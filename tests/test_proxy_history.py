"""Each proxy's quality over time (storage.proxy_history), on DuckDB and PostgreSQL: the
history stays at N, ratios and latencies are exact, a stored check counts once, the pool
sorts by reliability, and a scrape run through the stored pool records the cascade's uses,
exactly as many per proxy as its fetch log holds."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from statistics import mean, median

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from engine.jobs.validate.kind import ValidateJob
from engine.model import ResultBatch
from engine.settings import Settings
from storage import dashboard as dash
from storage import proxies as proxy_store
from storage import proxy_history as ph
from storage.bulk import fetch_all
from storage.db import Database
from storage.export import export
from storage.secrets import SecretBox
from tests.keys import KEY_FILE

T0 = datetime(2025, 1, 1, 12, 0, 0)


def add_proxies(db: Database, keys: list[str]) -> list[int]:
    from fetchers.proxy_parse import parse_proxy_line

    box = SecretBox.load(None, KEY_FILE)
    with db.begin() as conn:
        return proxy_store.upsert_proxies(conn, [parse_proxy_line(k) for k in keys], box, "t")


def store_checks(
    job: ValidateJob, db: Database, run_id: int, results: list[tuple[int, bool, float | None]]
) -> int:
    """One validate batch through the kind's store step, as the engine stores it."""
    batch = ResultBatch.empty(run_id, job.columns)
    for i, (pid, ok, ms) in enumerate(results):
        at = T0 + timedelta(minutes=run_id, seconds=i)
        data = {"checked_at": at, "latency_ms": ms, "error": None if ok else "timeout"}
        batch.add(1, pid, ok, "alive" if ok else "timeout", data, "w-1")
    with db.begin() as conn:
        return job.store_batch(conn, batch)


def figures(db: Database, pid: int) -> dict:
    with db.connect() as conn:
        return ph.quality(conn, [pid])[pid]


def test_check_history_stays_at_n_with_exact_ratios(db: Database) -> None:
    """N = 5; 8 runs check proxy a (alive in runs 1, 2, 4, 5, 7 with latencies 10·run ms)
    and proxy b once: a keeps runs 4-8, b its one check; storing a batch again adds
    nothing."""
    job = ValidateJob(Settings(proxy_history_n=5))
    a, b = add_proxies(db, ["http://127.0.0.1:9001", "socks5://127.0.0.1:9002"])
    alive = {1, 2, 4, 5, 7}
    for run in range(1, 9):
        ok = run in alive
        results = [(a, ok, 10.0 * run if ok else None)]
        if run == 3:
            results.append((b, True, 42.0))
        store_checks(job, db, run, results)
    store_checks(job, db, 8, [(a, False, None)])  # run 8's batch again: counted once
    store_checks(job, db, 8, [(a, True, 1.0)])  # even with another outcome
    with db.connect() as conn:
        events = ph.history(conn, a)
    assert [(e[0], e[1], e[2], e[3]) for e in events] == [
        (T0 + timedelta(minutes=r), "check", r in alive, 10.0 * r if r in alive else None)
        for r in range(4, 9)
    ]
    kept = [10.0 * r for r in range(4, 9) if r in alive]  # 40, 50, 70
    fa = figures(db, a)
    assert fa["checks_total"] == 8 and fa["checks_n"] == 5
    assert fa["check_ratio"] == pytest.approx(3 / 5)
    assert fa["check_ms_median"] == pytest.approx(median(kept))
    assert fa["check_ms_mean"] == pytest.approx(mean(kept))
    assert fa["uses_n"] == 0 and fa["use_ratio"] is None
    assert fa["reliability"] == pytest.approx(ph.wilson_lower(3, 5))
    fb = figures(db, b)
    assert (fb["checks_n"], fb["check_ratio"], fb["check_ms_median"]) == (1, 1.0, 42.0)
    assert fb["reliability"] == pytest.approx(ph.wilson_lower(1, 1))
    with db.connect() as conn:  # the check log itself is untouched: one row per run
        assert fetch_all(conn, sa.text("SELECT count(*) FROM proxy_checks"))[0][0] == 9


def test_uses_bounded_and_reliability_combines_checks_and_uses(db: Database) -> None:
    """30 uses of a proxy (every third fails) with N = 20: the newest 20 stay, in order;
    reliability counts them with its checks."""
    (a,) = add_proxies(db, ["http://127.0.0.1:9101"])
    uses = [
        (a, i % 3 != 0, 5.0 + i if i % 3 else None, T0 + timedelta(seconds=i)) for i in range(30)
    ]
    with db.begin() as conn:
        ph.record_uses(conn, uses[:7], n=20)  # two batches: the ring spans them
        ph.record_uses(conn, uses[7:], n=20)
        ph.record_checks(conn, 1, [a, a], [True, False], [30.0, None], [T0, T0], n=20)
    kept = uses[10:]
    with db.connect() as conn:
        events = [e for e in ph.history(conn, a) if e[1] == "use"]
    assert [(e[0], e[2], e[3]) for e in events] == [(at, ok, ms) for _, ok, ms, at in kept]
    f = figures(db, a)
    good = sum(1 for _, ok, _, _ in kept if ok)
    assert (f["uses_total"], f["uses_n"]) == (30, 20)
    assert f["use_ratio"] == pytest.approx(good / 20)
    assert f["use_ms_mean"] == pytest.approx(mean(ms for _, ok, ms, _ in kept if ok))
    assert (f["checks_n"], f["check_ratio"]) == (1, 1.0)  # a batch repeating a proxy: first
    assert f["reliability"] == pytest.approx(ph.wilson_lower(good + 1, 21))


def test_one_batch_of_known_and_new_proxies_with_repeats(db: Database) -> None:
    """A batch whose proxies are partly in the table already, partly new, with one proxy
    several times among others: each known proxy's lists grow in order and are cut at N,
    each new one gets its row, a proxy's repeats keep their order, counts add up; the
    same rows on both backends (one statement on PostgreSQL, two on DuckDB)."""
    a, b, c = add_proxies(db, [f"http://127.0.0.1:{9201 + i}" for i in range(3)])

    def at(m: int) -> datetime:
        return T0 + timedelta(minutes=m)

    with db.begin() as conn:
        ph.record_checks(conn, 1, [a], [True], [10.0], [at(0)], n=3)
        ph.record_uses(conn, [(a, True, 5.0, at(0)), (a, True, 6.0, at(0))], n=3)
    with db.begin() as conn:  # a known, b and c new; b twice: its first result counts
        touched = ph.record_checks(
            conn, 2, [b, a, b, c], [False, True, True, True], [None, 20.0, 99.0, 30.0],
            [at(1), at(2), at(3), at(4)], n=3,
        )  # fmt: skip
        assert touched == 3
        ph.record_checks(conn, 1, [a, c], [False, False], [None, None], [at(5), at(5)], n=3)
        uses = [(b, True, 1.0, at(6)), (a, False, None, at(7)), (b, False, None, at(8)),
                (a, True, 2.0, at(9)), (a, True, 3.0, at(10))]  # fmt: skip
        assert ph.record_uses(conn, uses, n=3) == 2
    q = ph.proxy_quality.c
    with db.connect() as conn:
        rows = fetch_all(
            conn,
            sa.select(q.proxy_id, q.check_ok, q.check_ms, q.check_at, q.check_run,
                      q.checks_total, q.use_ok, q.use_ms, q.use_at, q.uses_total)
            .order_by(q.proxy_id),
        )  # fmt: skip
    got = [tuple(list(v) if isinstance(v, (list, tuple)) else v for v in r) for r in rows]
    assert got == [
        # a: run 1 kept once (its second check ignored), run 2 added; 2 + 3 uses, newest 3
        (a, [1, 1], [10.0, 20.0], [at(0), at(2)], [1, 2], 2,
         [0, 1, 1], [None, 2.0, 3.0], [at(7), at(9), at(10)], 5),
        (b, [0], [None], [at(1)], [2], 1, [1, 0], [1.0, None], [at(6), at(8)], 2),
        # c: new in run 2; run 1 came after and counts too (another run)
        (c, [1, 0], [30.0, None], [at(4), at(5)], [2, 1], 2, None, None, None, 0),
    ]  # fmt: skip
    fa = figures(db, a)
    assert (fa["checks_n"], fa["uses_n"], fa["use_ratio"]) == (2, 3, pytest.approx(2 / 3))
    assert fa["reliability"] == pytest.approx(ph.wilson_lower(4, 5))


def test_the_pool_sorts_by_reliability(db: Database, tmp_path: Path) -> None:
    """Proven beats lucky: 20 of 20 checks > 1 of 1 > 3 of 10 > none; the page's table
    shows the figures, the export order and the CLI's ranking agree."""
    keys = [f"http://127.0.0.1:{9200 + i}" for i in range(4)]
    proven, lucky, half, fresh = add_proxies(db, keys)
    with db.begin() as conn:
        for run in range(1, 21):
            pids = [proven] + ([half] if run <= 10 else []) + ([lucky] if run == 1 else [])
            oks = [True] + ([run <= 3] if run <= 10 else []) + ([True] if run == 1 else [])
            ats = [T0 + timedelta(minutes=run)] * len(pids)
            ph.record_checks(conn, run, pids, oks, [20.0] * len(pids), ats, n=20)
    with db.connect() as conn:
        cols, rows = dash.pool_page(conn, dash.PoolFilter(), "reliability", True, 0, 10)
        ranked = ph.most_reliable(conn, None, 10)
    assert [r[cols.index("id")] for r in rows] == [proven, lucky, half, fresh]
    assert set(ph.QUALITY_COLUMNS) <= set(cols)
    first = dict(zip(cols, rows[0], strict=True))
    assert first["checks_n"] == 20 and first["check_ratio"] == 1.0
    assert first["reliability"] == pytest.approx(1 / (1 + ph.Z**2 / 20))
    assert [r[0] for r in ranked] == keys
    # the export: the pool by reliability (CSV), the histories themselves (lists as JSON)
    out = tmp_path / "pool.csv"
    assert export(db, "proxies", "csv", out, order_by="-reliability") == 4
    assert [line.split(",")[1].strip('"') for line in out.read_text().splitlines()[1:]] == keys
    assert export(db, "proxy_quality", "csv", tmp_path / "q.csv") == 3
    assert export(db, "proxy_quality", "parquet", tmp_path / "q.parquet") == 3
    row = next(
        r for r in pq.read_table(tmp_path / "q.parquet").to_pylist() if r["proxy_id"] == proven
    )
    assert row["check_ok"] == [1] * 20 and row["check_run"] == list(range(1, 21))
    assert '"[1, 1, 1' in (tmp_path / "q.csv").read_text().splitlines()[1]


def test_schema_step_12_seeds_history_from_stored_checks(db: Database) -> None:
    """An upgraded pool: checks stored before the history existed become its history."""
    a, b = add_proxies(db, ["http://127.0.0.1:9301", "http://127.0.0.1:9302"])
    rows = [
        (run, a, run % 2 == 1, 100.0 + run, T0 + timedelta(minutes=run)) for run in range(1, 26)
    ] + [(1, b, False, None, T0)]
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM proxy_quality"))
        conn.execute(
            sa.text(
                "INSERT INTO proxy_checks (run_id, proxy_id, checked_at, outcome, alive, "
                "latency_ms) VALUES (:r, :p, :at, 'x', :ok, :ms)"
            ),
            [{"r": r, "p": p, "ok": ok, "ms": ms, "at": at} for r, p, ok, ms, at in rows],
        )
        ph.backfill_checks(conn, 20)
    fa, fb = figures(db, a), figures(db, b)
    kept = range(6, 26)
    assert (fa["checks_total"], fa["checks_n"]) == (25, 20)
    assert fa["check_ratio"] == pytest.approx(sum(r % 2 for r in kept) / 20)
    assert fa["check_ms_median"] == pytest.approx(median(100.0 + r for r in kept if r % 2))
    assert (fb["checks_n"], fb["check_ratio"], fb["reliability"]) == (1, 0.0, 0.0)


# --- the cascade's uses, from a scrape run through the stored pool ---------------------------


@pytest.fixture(scope="module")
def socks_shop() -> Iterator[object]:
    from sim.shops import ShopsConfig, ShopSpec, ShopWorld

    with ShopWorld(ShopsConfig((ShopSpec("socks", "Argentina", "socks_only", 45, seed=8),))) as w:
        yield w


def test_a_scrape_run_records_each_proxys_uses(
    socks_shop: object, db: Database, tmp_path: Path
) -> None:
    """Two proxies in the run's pool, round robin: the shop's SOCKS proxy and one that
    refuses. Every page is stored; each proxy's recorded uses equal its attempts in the
    fetch log (good ones: those without error), and storing pages again adds none."""
    from engine.api import submit_run, wait_run
    from engine.runtime.coordinator import Coordinator
    from fetchers.proxy_parse import parse_proxy_line

    shop = socks_shop["socks"]  # type: ignore[index]
    good_url = socks_shop.socks_proxy  # type: ignore[attr-defined]
    good = parse_proxy_line(good_url)
    dead = parse_proxy_line(f"socks5://{good.host}:1")
    key_file = tmp_path / "secret.key"
    box = SecretBox.load(None, key_file)
    with db.begin() as conn:
        ids = proxy_store.upsert_proxies(conn, [good, dead], box, "t")
        conn.execute(sa.text("UPDATE proxies SET status = 'active', protocol = 'socks5'"))
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'name = "u"\nentity_type = "product"\n[[sources]]\ncountry = "Argentina"\n'
        f'start_urls = ["{shop.catalog_url(1)}"]\n[follow]\ncss = ["a.next"]\nmax_depth = 100\n'
        '[[extract]]\nlist = "li.product"\n[extract.fields]\nid = { attr = "data-id" }\n'
    )
    s = Settings(
        workers=1, concurrency=2, batch_size=1, heartbeat_s=0.5, lease_s=10.0,
        retry_backoff_s=0.2, secret_key_file=key_file, proxy_history_n=50,
    )  # fmt: skip
    coord = Coordinator(db, s).start()
    try:
        params = {
            "spec": str(spec), "methods": ["http"], "proxies": "active",
            "strategy": "round_robin", "files_dir": str(tmp_path / "files"),
        }  # fmt: skip
        run_id = submit_run(db, s, "scrape", params, coord.name)
        summary = wait_run(db, run_id, timeout_s=120)
    finally:
        coord.shutdown()
    assert summary["counts"]["outcomes"] == {"done": shop.spec.pages}, summary
    with db.connect() as conn:
        logged = fetch_all(
            conn,
            sa.text(
                "SELECT proxy, count(*), count(*) FILTER (WHERE error_type IS NULL) "
                "FROM fetch_logs WHERE run_id = :r GROUP BY proxy"
            ),
            {"r": run_id},
        )
        got = ph.quality(conn, ids)
    by_proxy = {p: (int(n), int(k)) for p, n, k in logged}
    want_good = by_proxy[f"socks5://{good.host}:{good.port}"]
    want_dead = by_proxy.get(f"socks5://{dead.host}:{dead.port}", (0, 0))
    assert want_good[1] == shop.spec.pages and want_dead[0] >= 1 and want_dead[1] == 0
    assert (got[ids[0]]["uses_total"], got[ids[0]]["uses_n"]) == want_good[:1] * 2
    assert got[ids[0]]["use_ratio"] == pytest.approx(want_good[1] / want_good[0])
    assert (got[ids[1]]["uses_total"], got[ids[1]]["use_ratio"]) == (want_dead[0], 0.0)


def test_pools_take_the_most_reliable_proxies_first_then_the_fastest(db: Database) -> None:
    """A run's pool, the pool snapshot and the gateway's members are chosen by quality over
    time: a proxy that answered 5 checks of 5 comes before a faster one that answered 1 of
    5, and a proxy with no history comes last; among equals the faster goes first. With a
    limit, the most reliable are the ones taken."""
    fast_flaky, slow_sure, no_history, fast_sure = add_proxies(
        db, [f"http://127.0.0.1:{9301 + i}" for i in range(4)]
    )
    latency = {fast_flaky: 10.0, slow_sure: 200.0, no_history: 5.0, fast_sure: 50.0}
    with db.begin() as conn:
        for pid, ms in latency.items():
            conn.execute(
                sa.text("UPDATE proxies SET status = 'active', latency_ms = :ms WHERE id = :id"),
                {"ms": ms, "id": pid},
            )
        for run in range(5):
            ph.record_checks(
                conn, run + 1, [fast_flaky, slow_sure, fast_sure], [run == 0, True, True],
                [10.0, 200.0, 50.0], [T0 + timedelta(minutes=run)] * 3, n=5,
            )  # fmt: skip
    port = {pid: 9301 + i for i, pid in enumerate((fast_flaky, slow_sure, no_history, fast_sure))}
    want = [port[p] for p in (fast_sure, slow_sure, fast_flaky, no_history)]
    with db.begin() as conn:
        assert [r[3] for r in proxy_store.pool_snapshot(conn, "active", 10)] == want
        assert [r[3] for r in proxy_store.pool_snapshot(conn, "active", 2)] == want[:2]
        assert [r[4] for r in proxy_store.gateway_members(conn, "active", 10)] == want
        assert proxy_store.snapshot_run_pool(conn, 77, "active", 3) == 3
        assert [r[3] for r in proxy_store.read_run_pool(conn, 77)] == want[:3]
