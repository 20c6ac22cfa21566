"""The gateway under trouble: a member killed mid-run, bad clients, the cache's rules, the
metrics matching what was sent, our own fetchers through it, and the CLI's exposure rules
and drain."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.origin import Origin
from sim.world import SimWorld, WorldConfig
from tests.gateway_support import SECRET_KEY, curl, start_gateway, store_members

pytestmark = [pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world() -> Iterator[SimWorld]:
    # one shard process per member: killing a shard kills exactly one member
    cfg = WorldConfig(n_proxies=4, mix={"elite": 1.0}, seed=7, processes=4, latency_ms=(1, 3))
    with SimWorld(cfg) as w:
        yield w


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    with Origin(tmp_path_factory.mktemp("origin")) as o:
        yield o


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory, world: SimWorld) -> str:
    url = f"duckdb:///{tmp_path_factory.mktemp('db') / 'ff.duckdb'}"
    store_members(url, world.truth)
    return url


start = start_gateway


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def raw(port: int, data: bytes, *, read: bool = True, timeout: float = 10) -> bytes:
    """Send bytes to the gateway, read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_cache_serves_repeats_without_the_origin_and_keeps_its_rules(
    db_url: str, origin: Origin
) -> None:
    with start(db_url, cache="ttl", ttl_s=60) as gw:
        bodies = [curl("-i", "-x", gw.url, origin.url("/page?c=1")).stdout for _ in range(3)]
        for path in ("/nostore?c=1", "/private?c=1", "/cookie?c=1"):
            for _ in range(2):
                assert curl("-x", gw.url, origin.url(path)).returncode == 0
        for _ in range(2):  # a request with a cookie is never served from (or put in) the cache
            curl("-x", gw.url, "-H", "Cookie: a=1", origin.url("/page?c=2"))
        snap = gw.snapshot()
    assert (
        "X-Cache: HIT" not in bodies[0]
        and "X-Cache: HIT" in bodies[1]
        and "X-Cache: HIT" in bodies[2]
    )
    assert bodies[1].split("\n\n", 1)[1] == bodies[0].split("\n\n", 1)[1]
    wait_for(lambda: sum("c=" in uri for _, uri, _ in origin.hits()) >= 9)  # the log lags
    hits = Counter(uri for _, uri, _ in origin.hits())
    assert hits["/page?c=1"] == 1
    assert hits["/nostore?c=1"] == hits["/private?c=1"] == hits["/cookie?c=1"] == 2
    assert hits["/page?c=2"] == 2
    c = snap["cache"]
    assert (c["hits"], c["misses"], c["stores"], c["bypassed"]) == (2, 7, 1, 2)
    assert c["bytes_saved"] == 2 * len(bodies[0].split("\n\n", 1)[1].encode())


def test_metrics_equal_what_was_sent(db_url: str, world: SimWorld, origin: Origin) -> None:
    with start(db_url, strategy="round_robin") as gw:
        for _ in range(8):
            assert curl("-x", gw.url, origin.url("/page")).returncode == 0
        for _ in range(4):
            assert curl("-p", "-x", gw.url, origin.url("/page")).returncode == 0  # CONNECT
        wait_for(lambda: gw.snapshot()["connections"]["open"] == 0)
        data = gw.metrics_json()
        text = gw.metrics_text()
    by_member = {m["member"]: m for m in data["members"]}
    assert len(by_member) == 4
    assert all(m["requests"] == 3 and m["failures"] == 0 for m in by_member.values())
    assert all(
        m["latency_ms"]["p50"] is not None and m["bytes_down"] > 0 for m in by_member.values()
    )
    req = {(r["kind"], r["result"]): r["count"] for r in data["requests"]}
    assert req == {("http", "ok"): 8, ("connect", "ok"): 4}
    assert data["connections"] == {"open": 0, "total": 12, "refused": 0}
    for member in by_member:
        line = f'fetchfleet_gateway_member_requests_total{{member="{member}"}} 3.0'
        assert line in text, line
        assert f'fetchfleet_gateway_member_breaker{{member="{member}",state="closed"}} 1.0' in text
    assert 'fetchfleet_gateway_requests_total{kind="http",result="ok"} 8.0' in text
    assert "fetchfleet_gateway_connections_open 0.0" in text


def test_bad_clients_get_an_answer_or_a_close_and_the_gateway_stays_up(
    db_url: str, origin: Origin
) -> None:
    with start(db_url, head_timeout_s=0.5, max_head_bytes=16 * 1024) as gw:
        p = gw.port
        assert raw(p, b"HELLO THERE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(p, b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        huge = b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
        assert raw(p, huge).startswith(b"HTTP/1.1 431 ")
        assert raw(p, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408 ")
        assert raw(p, b"").startswith(b"")  # connect and say nothing: closed after the timeout
        with socket.socket() as s:  # a closed port behind CONNECT: 502 from every member
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        out = raw(p, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 502 "), out
        assert raw(p, b"\x05\x01\x07") == b"\x05\xff"  # SOCKS5 without an acceptable method
        assert raw(
            p, b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6)
        ) == b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)  # BIND: not supported
        # a client that hangs up in the middle of a 6 MB answer
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", p), timeout=10) as s:
                s.sendall(f"GET {origin.url('/big')} HTTP/1.1\r\n\r\n".encode())
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        wait_for(lambda: gw.snapshot()["connections"]["open"] == 0)
        r = curl("-x", gw.url, origin.url("/page"))
        assert r.returncode == 0 and r.stdout.startswith("page for ")
        big = curl("-x", gw.url, "-o", "/dev/null", "-w", "%{size_download}", origin.url("/big"))
        assert big.stdout == str(6 * 1024 * 1024)
        errors = gw.snapshot()["client_errors"]
    assert errors["400"] == 2 and errors["431"] == 1 and errors["408"] == 1


def test_post_bodies_and_keep_alive(db_url: str, origin: Origin) -> None:
    with start(db_url) as gw:
        r = curl("-x", gw.url, "-d", "a=1&b=2", "-H", "X-Test: yes", origin.url("/echo"))
        assert r.stdout.strip() == "POST /echo yes 7"
        # two URLs in one curl: one client connection, kept alive
        r = curl("-x", gw.url, origin.url("/page"), origin.url("/page"))
        assert r.stdout.count("page for ") == 2
        assert gw.snapshot()["connections"]["total"] == 2


def test_our_fetchers_through_the_gateway(db_url: str, world: SimWorld, origin: Origin) -> None:
    import fetchers

    with start(db_url) as gw:
        result = fetchers.fetch(origin.url("/page"), method="http", proxy=gw.url, use_cache=False)
        assert result.success, result.error
        assert result.text.startswith("page for ")
        assert result.text.split()[-1] in {t.host for t in world.truth}


def test_killing_a_member_mid_run_moves_its_traffic(tmp_path: Path, origin: Origin) -> None:
    cfg = WorldConfig(n_proxies=4, mix={"elite": 1.0}, seed=11, processes=4, latency_ms=(1, 3))
    with SimWorld(cfg) as w:
        url = f"duckdb:///{tmp_path / 'kill.duckdb'}"
        store_members(url, w.truth)
        victim = w.truth[0].host
        victim_pid = w.pids[0]  # shard i serves proxy i
        results: list[tuple[int, str]] = []
        lock = threading.Lock()
        with start(
            url, strategy="round_robin", retries=2, failure_threshold=2, cooldown_s=600
        ) as gw:

            def client(n: int) -> None:
                for _ in range(n):
                    r = curl("-x", gw.url, origin.url("/page"))
                    with lock:
                        results.append((r.returncode, r.stdout))

            before = [threading.Thread(target=client, args=(10,)) for _ in range(4)]
            for t in before:
                t.start()
            wait_for(lambda: len(results) >= 12)
            os.kill(victim_pid, signal.SIGKILL)  # mid-run: the other clients keep going
            for t in before:
                t.join(60)
            after_kill = len(results)
            client(12)
            snap = gw.snapshot()
    assert all(code == 0 and out.startswith("page for ") for code, out in results), results
    late = [out.split()[-1] for _, out in results[after_kill:]]
    assert victim not in late and len(set(late)) == 3
    row = next(m for m in snap["members"] if victim in m["member"])
    assert row["breaker"] == "open" and row["failures"] >= 1


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.run", "serve-proxy", *args],
        cwd=REPO,
        env={**os.environ, "FETCHFLEET_SECRET_KEY": SECRET_KEY, **(env or {})},
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_cli_exposure_auth_and_drain(db_url: str, world: SimWorld, origin: Origin) -> None:
    p = cli("--db", db_url, "--host", "0.0.0.0", "--port", "0")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--auth-env" in err
    p = cli("--db", db_url, "--host", "0.0.0.0", "--port", "0", "--auth-env", "GW")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "GW=user:password" in err

    p = cli(
        "--db", db_url, "--port", "0", "--auth-env", "GW", "--grace", "2", env={"GW": "bob:s3cret"}
    )
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        m = re.search(r"gateway on 127\.0\.0\.1:(\d+) .*: 4 members", line)
        assert m, line
        port = int(m[1])
        assert "s3cret" not in line
        r = curl("-i", "-x", f"http://127.0.0.1:{port}", origin.url("/page"))
        assert " 407 " in r.stdout.splitlines()[0]
        r = curl("-x", f"http://bob-session-s1:s3cret@127.0.0.1:{port}", origin.url("/page"))
        assert r.stdout.startswith("page for "), r.stderr
        r = curl(
            "--socks5-hostname",
            f"127.0.0.1:{port}",
            "--proxy-user",
            "bob:s3cret",
            origin.url("/page"),
        )
        assert r.stdout.startswith("page for "), r.stderr
        r = curl(
            "--socks5-hostname",
            f"127.0.0.1:{port}",
            "--proxy-user",
            "bob:nope",
            origin.url("/page"),
        )
        assert r.returncode != 0
        # a tunnel left open: SIGTERM drains it within the grace period, exit 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"CONNECT " + origin.url("").split("//")[1].encode() + b" HTTP/1.1\r\n"
                      b"Proxy-Authorization: Basic Ym9iOnMzY3JldA==\r\n\r\n")  # fmt: skip
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
