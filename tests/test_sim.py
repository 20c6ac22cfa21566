"""The simulated world against real traffic on loopback: judge, proxies, list/truth, CLI, scale."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from sim import ProxyTruth, SimWorld, WorldConfig, load_truth
from sim.fleet import HEADER_BEHAVIOURS, TAMPERING, Behaviour, ProxyProtocol, plan_fleet

REPO = Path(__file__).resolve().parent.parent
IO_TIMEOUT = 5.0
JUDGE_PATH = "/get"

Response = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def world() -> Iterator[SimWorld]:
    with SimWorld(WorldConfig(n_proxies=60, mix="demo", seed=3)) as running:
        yield running


def run(coro, timeout: float = 20.0):
    """Each async test body runs in a fresh loop, bounded in time."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def pick(world: SimWorld, protocol: str, behaviour: str, auth: bool = False) -> ProxyTruth:
    for truth in world.truth:
        if (
            truth.protocol == protocol
            and truth.behaviour == behaviour
            and (truth.username is not None) == auth
        ):
            return truth
    raise LookupError(f"no {protocol}/{behaviour} auth={auth} proxy in this world")


def proxy_url(truth: ProxyTruth, password: str | None = None) -> str:
    """python-socks URL: its `http` type is a CONNECT tunnel, which is what `https` proxies are."""
    scheme = "http" if truth.protocol == "https" else truth.protocol
    creds = ""
    if truth.username is not None:
        creds = f"{truth.username}:{password or truth.password}@"
    return f"{scheme}://{creds}{truth.host}:{truth.port}"


def get_request(target: str, host: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sim-test\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes):
    try:
        writer.write(req)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), IO_TIMEOUT)
    finally:
        writer.close()
    return parse_response(raw)


async def http_get(host: str, port: int, req: bytes) -> Response:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), IO_TIMEOUT)
    return await exchange(reader, writer, req)


async def judge_through(world: SimWorld, truth: ProxyTruth, token: str, **kw) -> Response:
    """GET the judge through any proxy: absolute-form for http, a tunnel for the others."""
    authority = f"{world.judge_host}:{world.judge_port}"
    path = f"{JUDGE_PATH}?token={token}"
    if truth.protocol == "http" and not kw.get("tunnel"):
        extra = ""
        if truth.username is not None:
            creds = base64.b64encode(f"{truth.username}:{truth.password}".encode()).decode()
            extra = f"Proxy-Authorization: Basic {creds}\r\n"
        req = get_request(
            f"http://{authority}{path}", authority, extra + "Proxy-Connection: close\r\n"
        )
        return await http_get(truth.host, truth.port, req)
    proxy = Proxy.from_url(proxy_url(truth))
    sock = await proxy.connect(world.judge_host, world.judge_port, timeout=IO_TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock)
    return await exchange(reader, writer, get_request(path, authority))


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


# -- judge ---------------------------------------------------------------------------------


def test_judge_httpbin_azenv_and_ip(world: SimWorld) -> None:
    host, port = world.judge_host, world.judge_port
    authority = f"{host}:{port}"

    async def body():
        status, headers, raw = await http_get(
            host, port, get_request("/get?x=1&x=2&y=", authority, "x-custom-thing: 42\r\n")
        )
        assert status == 200 and headers["content-type"] == "application/json"
        doc = json.loads(raw)
        assert same_ip(doc["origin"], "127.0.0.1")
        assert doc["args"] == {"x": ["1", "2"], "y": ""}
        assert doc["headers"]["X-Custom-Thing"] == "42"
        assert doc["headers"]["Host"] == authority
        assert doc["url"] == f"http://{authority}/get?x=1&x=2&y="

        status, _, raw = await http_get(
            host, port, get_request("/azenv?x=1", authority, "Via: 1.0 test\r\n")
        )
        env = dict(line.split(" = ", 1) for line in raw.decode().splitlines())
        assert status == 200
        assert same_ip(env["REMOTE_ADDR"], "127.0.0.1")
        assert int(env["REMOTE_PORT"]) > 0
        assert env["REQUEST_METHOD"] == "GET"
        assert env["REQUEST_URI"] == "/azenv?x=1"
        assert env["QUERY_STRING"] == "x=1"
        assert env["HTTP_HOST"] == authority
        assert env["HTTP_VIA"] == "1.0 test"
        assert env["HTTP_USER_AGENT"] == "sim-test"

        status, headers, raw = await http_get(host, port, get_request("/ip", authority))
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert same_ip(raw.decode(), "127.0.0.1")

        # absolute-form, as a forward proxy might pass it on
        status, _, raw = await http_get(
            host, port, get_request(f"http://{authority}/get?abs=1", authority)
        )
        assert status == 200 and json.loads(raw)["args"] == {"abs": "1"}

        status, _, _ = await http_get(host, port, get_request("/nope", authority))
        assert status == 404

    run(body())


def test_judge_keep_alive_then_close(world: SimWorld) -> None:
    authority = f"{world.judge_host}:{world.judge_port}"

    async def body():
        reader, writer = await asyncio.open_connection(world.judge_host, world.judge_port)
        writer.write(f"GET /ip HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        length = int(parse_response(head)[1]["content-length"])
        assert same_ip((await reader.readexactly(length)).decode(), "127.0.0.1")
        status, _, raw = await exchange(reader, writer, get_request("/get?n=2", authority))
        assert status == 200 and json.loads(raw)["args"] == {"n": "2"}

    run(body())


# -- HTTP forward proxies --------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["elite", "anonymous", "transparent"])
def test_http_proxy_shows_its_own_address_and_the_right_headers(
    world: SimWorld, behaviour: str
) -> None:
    truth = pick(world, "http", behaviour)
    token = uuid.uuid4().hex
    status, _, raw = run(judge_through(world, truth, token))
    doc = json.loads(raw)
    assert status == 200 and doc["args"] == {"token": token}
    assert same_ip(doc["origin"], truth.exit_ip) and truth.exit_ip == truth.host
    headers = doc["headers"]
    assert "Proxy-Connection" not in headers and "Proxy-Authorization" not in headers
    assert truth.anonymity_expected == behaviour
    if behaviour == "elite":
        assert "Via" not in headers and "X-Forwarded-For" not in headers
    elif behaviour == "anonymous":
        assert headers["Via"] == "1.1 sim-proxy" and "X-Forwarded-For" not in headers
    else:
        assert same_ip(headers["X-Forwarded-For"], "127.0.0.1") and "Via" not in headers


def test_http_proxy_auth(world: SimWorld) -> None:
    truth = pick(world, "http", "elite", auth=True)
    authority = f"{world.judge_host}:{world.judge_port}"
    target = f"http://{authority}/get"

    async def body():
        status, headers, _ = await http_get(truth.host, truth.port, get_request(target, authority))
        assert status == 407 and headers["proxy-authenticate"].startswith("Basic")
        wrong = base64.b64encode(f"{truth.username}:nope".encode()).decode()
        status, _, _ = await http_get(
            truth.host,
            truth.port,
            get_request(target, authority, f"Proxy-Authorization: Basic {wrong}\r\n"),
        )
        assert status == 407
        status, _, raw = await judge_through(world, truth, "t")
        assert status == 200 and "Proxy-Authorization" not in json.loads(raw)["headers"]

    run(body())


def test_http_proxy_answers_other_protocols_at_once(world: SimWorld) -> None:
    """A SOCKS greeting to an HTTP proxy gets a 400 now, not a timeout (fast protocol probing)."""
    truth = pick(world, "http", "elite")

    async def body():
        reader, writer = await asyncio.open_connection(truth.host, truth.port)
        status, _, _ = await exchange(reader, writer, b"\x05\x01\x00")
        assert status == 400

    run(body())


def test_https_proxy_is_connect_only(world: SimWorld) -> None:
    truth = pick(world, "https", "elite")
    authority = f"{world.judge_host}:{world.judge_port}"
    req = get_request(f"http://{authority}/get", authority)
    status, _, _ = run(http_get(truth.host, truth.port, req))
    assert status == 405


# -- tunnels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "auth", "tunnel"),
    [
        ("socks5", True, False),
        ("socks5", False, False),
        ("socks4", False, False),
        ("https", False, False),
        ("https", True, False),
        ("http", False, True),  # CONNECT through a forward proxy
    ],
)
def test_tunnels_reach_the_judge_from_the_proxy_address(
    world: SimWorld, protocol: str, auth: bool, tunnel: bool
) -> None:
    truth = pick(world, protocol, "elite", auth=auth)
    token = uuid.uuid4().hex
    status, _, raw = run(judge_through(world, truth, token, tunnel=tunnel))
    doc = json.loads(raw)
    assert status == 200 and doc["args"] == {"token": token}
    assert same_ip(doc["origin"], truth.host)
    assert "Via" not in doc["headers"] and "X-Forwarded-For" not in doc["headers"]


def test_socks_domain_address_types(world: SimWorld) -> None:
    """SOCKS4a and SOCKS5 ATYP=3 carry a host name; the proxy resolves it."""
    s4 = pick(world, "socks4", "elite")
    s5 = pick(world, "socks5", "elite")
    name = world.judge_host.encode()  # a numeric name still goes through the resolver
    port = world.judge_port.to_bytes(2, "big")
    authority = f"{world.judge_host}:{world.judge_port}"

    async def body():
        reader, writer = await asyncio.open_connection(s4.host, s4.port)
        writer.write(b"\x04\x01" + port + b"\x00\x00\x00\x01" + b"me\x00" + name + b"\x00")
        assert (await asyncio.wait_for(reader.readexactly(8), IO_TIMEOUT))[1] == 0x5A
        status, _, raw = await exchange(reader, writer, get_request("/ip", authority))
        assert status == 200 and same_ip(raw.decode(), s4.host)

        reader, writer = await asyncio.open_connection(s5.host, s5.port)
        writer.write(b"\x05\x01\x00")
        assert await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port)
        reply = await asyncio.wait_for(reader.readexactly(10), IO_TIMEOUT)
        assert reply[:2] == b"\x05\x00"
        assert same_ip(socket.inet_ntoa(reply[4:8]), s5.host)
        status, _, raw = await exchange(reader, writer, get_request("/ip", authority))
        assert status == 200 and same_ip(raw.decode(), s5.host)

    run(body())


def test_socks5_wrong_password_is_rejected(world: SimWorld) -> None:
    truth = pick(world, "socks5", "elite", auth=True)

    async def body():
        proxy = Proxy.from_url(proxy_url(truth, password="wrong"))
        with pytest.raises(ProxyError):
            await proxy.connect(world.judge_host, world.judge_port, timeout=IO_TIMEOUT)
        no_creds = Proxy.from_url(f"socks5://{truth.host}:{truth.port}")
        with pytest.raises(ProxyError):
            await no_creds.connect(world.judge_host, world.judge_port, timeout=IO_TIMEOUT)

    run(body())


# -- dead and deceptive proxies -----------------------------------------------------------------


def test_refused_gets_econnrefused(world: SimWorld) -> None:
    refused = [t for t in world.truth if t.behaviour == "refused"]
    assert refused

    async def body():
        for truth in refused:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(truth.host, truth.port)

    run(body())


@pytest.mark.parametrize("protocol", ["http", "socks5"])
def test_blackhole_accepts_and_never_answers(world: SimWorld, protocol: str) -> None:
    truth = pick(world, protocol, "blackhole")

    async def body():
        reader, writer = await asyncio.open_connection(truth.host, truth.port)
        try:
            writer.write(b"\x05\x01\x00" if protocol == "socks5" else b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.0)
        finally:
            writer.close()

    run(body())
    assert truth.alive_expected is False and truth.anonymity_expected is None


@pytest.mark.parametrize("protocol", ["http", "socks5", "https"])
def test_fake_answers_without_the_token(world: SimWorld, protocol: str) -> None:
    truth = pick(world, protocol, "fake")
    token = uuid.uuid4().hex
    status, _, raw = run(judge_through(world, truth, token))
    assert status == 200
    assert token.encode() not in raw
    assert json.loads(raw)["origin"] == "203.0.113.7"
    assert truth.alive_expected is False


def test_flaky_sometimes_answers_sometimes_drops(world: SimWorld) -> None:
    truth = pick(world, "http", "flaky")
    assert truth.alive_expected is None

    async def attempt() -> bool:
        try:
            status, _, _ = await judge_through(world, truth, "t")
        except (OSError, IndexError, ValueError):
            return False
        return status == 200

    async def body():
        return [await attempt() for _ in range(16)]  # all alike: p = 3e-5

    outcomes = Counter(run(body()))
    assert outcomes[True] > 0 and outcomes[False] > 0, outcomes


def test_slow_waits_its_latency(world: SimWorld) -> None:
    truth = pick(world, "socks5", "slow")
    assert truth.latency_ms is not None and truth.latency_ms >= 1000
    started = time.monotonic()
    status, _, _ = run(judge_through(world, truth, "t"))
    assert status == 200
    assert time.monotonic() - started >= truth.latency_ms / 1000


# -- list, truth, plan ----------------------------------------------------------------------------


def test_list_file_matches_truth(world: SimWorld) -> None:
    lines = world.proxies_file.read_text().split("\n")
    assert lines[0].startswith("#") and lines[1] == ""
    for truth in world.truth:
        assert lines[truth.line_no - 1] == truth.line
    assert load_truth(world.truth_file) == world.truth
    by_format = Counter(
        ("://" in t.line, t.username is not None) for t in world.truth
    )  # scheme://, scheme://user:pass@, ip:port, ip:port:user:pass
    assert len(by_format) == 4
    for truth in world.truth:
        assert truth.scheme == (truth.line.split("://")[0] if "://" in truth.line else None)
        if truth.username and not truth.scheme:
            assert truth.line == f"{truth.host}:{truth.port}:{truth.username}:{truth.password}"
        if truth.protocol != "http":
            assert truth.behaviour not in HEADER_BEHAVIOURS
            assert truth.anonymity_expected in ("elite", None)
        assert ipaddress.ip_address(truth.host) in ipaddress.ip_network("127.0.0.0/8")
    combos = {(t.protocol, t.behaviour) for t in world.truth}
    assert {p.value for p in ProxyProtocol} == {p for p, _ in combos}
    # tampering is asked for by mix (tests/test_integrity.py), not part of the demo
    assert {b.value for b in Behaviour if b not in TAMPERING} == {b for _, b in combos}
    assert len({t.host for t in world.truth}) == len(world.truth)
    assert world.cpu_seconds() > 0


def test_bench_plan_proportions_and_determinism() -> None:
    plan = plan_fleet(10_000, "bench", seed=7, octet=9)
    assert plan == plan_fleet(10_000, "bench", seed=7, octet=9)
    assert plan != plan_fleet(10_000, "bench", seed=8, octet=9)
    counts = Counter(p.behaviour for p in plan)
    assert counts[Behaviour.REFUSED] == 3000 and counts[Behaviour.BLACKHOLE] == 2000
    assert counts[Behaviour.FLAKY] == 1000
    alive = [p for p in plan if p.behaviour in (Behaviour.ELITE, *HEADER_BEHAVIOURS)]
    assert len(alive) == 4000
    assert all(20 <= p.latency_ms <= 300 for p in alive if p.latency_ms is not None)
    assert {p.protocol for p in alive} == set(ProxyProtocol)
    schemeless = sum(not p.with_scheme for p in plan) / len(plan)
    assert 0.17 < schemeless < 0.23
    assert len({(p.host, p.port) for p in plan}) == len(plan)


def test_mix_as_dict_and_bad_mixes() -> None:
    plan = plan_fleet(100, {"elite": 0.5, "fake": 0.5}, seed=1, octet=9)
    assert Counter(p.behaviour for p in plan) == {Behaviour.ELITE: 50, Behaviour.FAKE: 50}
    with pytest.raises(ValueError, match="unknown behaviour"):
        plan_fleet(10, {"zombie": 1.0}, seed=1, octet=9)
    with pytest.raises(ValueError, match="unknown mix"):
        plan_fleet(10, "chaos", seed=1, octet=9)


# -- CLI and process hygiene ---------------------------------------------------------------------


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not is_zombie(pid)]
        time.sleep(0.1)
    return alive


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.timeout(60)
def test_cli_prints_endpoints_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", "--proxies", "30", "--seed", "5", "--out", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        endpoints = json.loads(line)
        assert Path(endpoints["proxies_file"]) == tmp_path / "proxies.txt"
        assert len(load_truth(Path(endpoints["truth_file"]))) == 30
        status, _, raw = run(
            http_get(
                "127.0.0.2",
                int(endpoints["judge_url"].split(":")[2].split("/")[0]),
                get_request("/ip", "judge"),
            )
        )
        assert status == 200 and same_ip(raw.decode(), "127.0.0.1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == ""  # one JSON line, nothing else on stdout
        assert wait_gone(endpoints["pids"], 5) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_help_mentions_outputs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sim", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "proxies.txt" in out and "truth.json" in out and "--serve" not in out


@pytest.mark.timeout(60)
def test_shards_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import json, sys, time\n"
        "from sim import SimWorld, WorldConfig\n"
        "w = SimWorld(WorldConfig(n_proxies=20, processes=2))\n"
        "w.start()\n"
        "print(json.dumps(w.pids), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and wait_gone(pids, 0.5) == pids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        assert wait_gone(pids, 5) == []
    finally:
        if proc.poll() is None:
            proc.kill()


# -- scale ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ten_thousand_proxies_start_and_answer(capsys: pytest.CaptureFixture[str]) -> None:
    config = WorldConfig(n_proxies=10_000, mix="bench", seed=11)
    started = time.monotonic()
    with SimWorld(config) as big:
        startup = time.monotonic() - started
        assert len(big.pids) == 2 and len(big.truth) == 10_000
        alive = [t for t in big.truth if t.alive_expected]
        sample = alive[:: len(alive) // 50][:50]
        cpu_before = big.cpu_seconds()

        async def check(truth: ProxyTruth) -> bool:
            token = uuid.uuid4().hex
            status, _, raw = await judge_through(big, truth, token)
            doc = json.loads(raw)
            return (
                status == 200
                and doc["args"] == {"token": token}
                and same_ip(doc["origin"], truth.host)
            )

        async def body():
            return await asyncio.gather(*(check(t) for t in sample))

        checked = time.monotonic()
        results = run(body(), timeout=60)
        elapsed = time.monotonic() - checked
        cpu = big.cpu_seconds() - cpu_before
        with capsys.disabled():
            print(
                f"\n[sim] 10,000 proxies on 2 shards ready in {startup:.2f}s "
                f"(world's own measure {big.startup_s:.2f}s); 50 alive checked in "
                f"{elapsed:.2f}s; sim CPU ~{cpu * 1000 / 50:.2f} ms per proxied request"
                " (rough: 50 requests, 10 ms clock ticks)"
            )
        assert all(results), Counter(results)
        assert startup < 30
