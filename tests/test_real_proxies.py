"""ProxyChecker against real proxy servers and real judges (tests/real_proxies.py).

Every server variant × every judge form a user may give × the list forms people paste,
with right, wrong and missing credentials. The expected verdicts are what these servers
really do (seen on the wire, see the table in tests/real_proxies.py):

* squid default sends ``Via`` and ``X-Forwarded-For: <client>`` → transparent;
  ``forwarded_for off`` sends ``X-Forwarded-For: unknown`` + Via → anonymous;
  ``forwarded_for delete`` + ``via off`` → elite. Basic auth: 407 on wrong credentials.
* tinyproxy sends ``Via`` → anonymous; ``DisableViaHeader`` → elite; ``XTinyproxy`` sends
  ``X-Tinyproxy: <client>`` → transparent. BasicAuth: 407 without credentials, but **401**
  (with WWW-Authenticate) on wrong ones.
* dante and microsocks tunnel (SOCKS adds no header) → elite.
* privoxy 3.0.34 cannot choose its outgoing address: it exits from the checker's own
  127.0.0.1, which the judge sees → transparent, and no exit IP (never our own).

The exit IP is the server's outgoing address where the judge can show it. httpbin reports
``origin`` = the X-Forwarded-For header when there is one, so behind a proxy that sends it
(squid default / ``forwarded_for off``) plain httpbin shows only the proxy's claim
(``127.0.0.1`` or ``unknown``) and the exit IP is empty; behind nginx the address nginx
appended is the exit. All checks run concurrently in one event loop, once per module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvloop

from fetchers.proxy_check import CheckResult, ProxyChecker
from fetchers.proxy_parse import ProxySpec, parse_proxy_line
from tests.real_proxies import (
    CHECKER_IP,
    DANTE_USER,
    PASSWORD,
    USER,
    RealBed,
    missing_binaries,
    missing_python,
)

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 3.0

#: judge form -> whether it shows request headers to the checker (after its switches)
JUDGES = ("httpbin", "httpbin_show_env", "httpbin_nginx", "azenv", "httpbin_ip")


@dataclass(frozen=True)
class Variant:
    protocol: str  # what a line without a scheme is detected as
    anonymity: str  # the verdict with a judge that shows headers
    schemes: tuple[str, ...]  # explicit schemes the server answers
    auth: bool = False
    sends_xff: bool = False  # an X-Forwarded-For of its own: httpbin's origin is that claim
    reveals_in: str = ""  # the header that carries the verdict ("" = origin / none)


VARIANTS = {
    "squid": Variant("http", "transparent", ("http", "https"), sends_xff=True),
    "squid_ff_off": Variant("http", "anonymous", ("http", "https"), sends_xff=True),
    "squid_delete_novia": Variant("http", "elite", ("http", "https")),
    "squid_auth": Variant("http", "transparent", ("http", "https"), auth=True, sends_xff=True),
    "tinyproxy": Variant("http", "anonymous", ("http", "https"), reveals_in="via"),
    "tinyproxy_novia": Variant("http", "elite", ("http", "https")),
    "tinyproxy_xtinyproxy": Variant(
        "http", "transparent", ("http", "https"), reveals_in="x-tinyproxy"
    ),
    "tinyproxy_auth": Variant("http", "anonymous", ("http",), auth=True, reveals_in="via"),
    "dante": Variant("socks5", "elite", ("socks5", "socks4")),
    "dante_auth": Variant("socks5", "elite", ("socks5",), auth=True),
    "microsocks": Variant("socks5", "elite", ("socks5",), auth=True),
    "privoxy": Variant("http", "transparent", ("http",)),
}

OPEN_FORMS = ("{addr}", "{scheme}://{addr}", "{scheme}://{user}:{pw}@{addr}")
RIGHT_FORMS = ("{scheme}://{user}:{pw}@{addr}", "{addr}:{user}:{pw}", "{user}:{pw}@{addr}")
WRONG_FORMS = ("{scheme}://{user}:wrong-{pw}@{addr}", "{addr}:{user}:wrong-{pw}")


@dataclass(frozen=True)
class Case:
    server: str
    form: str
    scheme: str  # the scheme written into the form ("" when none)
    creds: str  # "none" | "right" | "wrong"

    @property
    def id(self) -> str:
        return f"{self.server}-{self.form}-{self.scheme or 'auto'}-{self.creds}"


def cases() -> Iterator[Case]:
    for name, v in VARIANTS.items():
        for scheme in v.schemes:
            if v.auth:
                for form in RIGHT_FORMS:
                    yield Case(name, form, scheme if "{scheme}" in form else "", "right")
                for form in WRONG_FORMS:
                    yield Case(name, form, scheme if "{scheme}" in form else "", "wrong")
                yield Case(name, "{addr}", "", "none")
            else:
                for form in OPEN_FORMS:
                    creds = "right" if "{user}" in form else "none"
                    yield Case(name, form, scheme if "{scheme}" in form else "", creds)


def unique_cases() -> list[Case]:
    """The auto-detected lines come once per scheme above: keep one of each."""
    seen: dict[str, Case] = {}
    for c in cases():
        seen.setdefault(c.id, c)
    return list(seen.values())


CASES = unique_cases()


def expected(c: Case, judge: str, exit_ip: str) -> dict[str, object]:
    """The verdict this server really produces for this line with this judge."""
    v = VARIANTS[c.server]
    if v.auth and c.creds != "right":
        return {"outcome": "auth_failed", "alive": False}
    protocol = c.scheme or v.protocol
    tunnel = protocol != "http"
    anonymity = v.anonymity
    if judge == "httpbin_ip" and protocol in ("http", "https"):
        # a bare-IP judge shows no headers: only an address in `origin` decides
        anonymity = "transparent" if v.sends_xff and v.anonymity == "transparent" else "unknown"
        if c.server == "privoxy":
            anonymity = "transparent"
    exit_: str | None = exit_ip
    if exit_ip == CHECKER_IP:
        exit_ = None  # privoxy: its exit is our own address, never reported
    elif v.sends_xff and not tunnel and judge in ("httpbin", "httpbin_show_env", "httpbin_ip"):
        exit_ = None  # origin is the proxy's X-Forwarded-For claim, not its address
    return {
        "outcome": "alive",
        "alive": True,
        "protocol": protocol,
        "anonymity": anonymity,
        "exit_ip": exit_,
    }


def _line(c: Case, bed: RealBed) -> str:
    s = bed.servers[c.server]
    user, pw = (DANTE_USER, bed.dante_password) if c.server == "dante_auth" else (USER, PASSWORD)
    return c.form.format(addr=s.addr, scheme=c.scheme, user=user, pw=pw)


@pytest.fixture(scope="module")
def bed() -> Iterator[RealBed]:
    missing = missing_binaries() + missing_python()
    if missing:
        msg = f"real proxy suite needs: {', '.join(missing)} (Debian / PyPI packages)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    b = RealBed()
    try:
        b.start()
        yield b
    finally:
        b.close()


async def _run_all(bed: RealBed) -> dict[tuple[str, str], CheckResult]:
    """Every case through every judge, concurrently — in two phases: squid shares one
    pending basic-auth lookup among concurrent requests of the same user whatever their
    passwords (seen with squid 5.7: a wrong password passes, a right one gets 407, while
    the other is in flight), so right and wrong credentials never overlap."""
    out: dict[tuple[str, str], CheckResult] = {}
    for phase in ("right", "other"):
        runnable = [
            c
            for c in CASES
            if c.server in bed.servers and (c.creds == "right") == (phase == "right")
        ]
        await asyncio.gather(*(_run_judge(bed, j, runnable, out) for j in JUDGES))
    return out


async def _run_judge(
    bed: RealBed, judge: str, runnable: list[Case], out: dict[tuple[str, str], CheckResult]
) -> None:
    url = bed.judges[judge]
    async with ProxyChecker(url, timeout=TIMEOUT, verify_echo=judge != "httpbin_ip") as ck:
        # keyed by identity: `user:pw@addr` and `addr:user:pw` are equal specs
        specs = [(parse_proxy_line(_line(c, bed)), c) for c in runnable]
        case_of = {id(spec): c for spec, c in specs}
        async for spec, result in ck.check_many([s for s, _ in specs], concurrency=64):
            out[(judge, case_of[id(spec)].id)] = result


@pytest.fixture(scope="module")
def verdicts(bed: RealBed) -> dict[tuple[str, str], CheckResult]:
    return uvloop.run(_run_all(bed))


@pytest.mark.parametrize("judge", JUDGES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_verdict(
    case: Case, judge: str, bed: RealBed, verdicts: dict[tuple[str, str], CheckResult]
) -> None:
    if case.server not in bed.servers:
        pytest.skip(f"{case.server} needs root (dante's username method checks system users)")
    r = verdicts[(judge, case.id)]
    want = expected(case, judge, bed.servers[case.server].exit_ip)
    got = {k: getattr(r, k) for k in want}
    assert got == want, f"{_line(case, bed).replace(PASSWORD, '***')} via {judge}: {r}"


def test_exit_ip_is_an_address_never_ours(verdicts: dict[tuple[str, str], CheckResult]) -> None:
    """Every exit IP the suite saw is an address (never `unknown`) and never the checker's."""
    for key, r in verdicts.items():
        if r.exit_ip is not None:
            ip = ipaddress.ip_address(r.exit_ip)  # raises on a word
            assert str(ip) != CHECKER_IP, (key, r)
        if r.error:
            assert PASSWORD not in r.error, key


def test_checker_reads_httpbin_with_show_env(bed: RealBed) -> None:
    """Plain httpbin `/get` hides Via and X-Forwarded-For; the checker asks with
    `show_env=1` (httpbin's own switch) so it sees every header a proxy adds."""

    async def main() -> tuple[str, frozenset[str], int]:
        async with ProxyChecker(bed.judges["httpbin"], timeout=TIMEOUT) as ck:
            return ck.effective_judge_url, ck.hidden_headers, ck.xff_hops

    url, hidden, hops = uvloop.run(main())
    assert url == bed.judges["httpbin"] + "?show_env=1"
    assert hidden == frozenset()
    assert hops == 0

    async def nginx() -> tuple[frozenset[str], frozenset[str], int]:
        async with ProxyChecker(bed.judges["httpbin_nginx"], timeout=TIMEOUT) as ck:
            return ck.hidden_headers, ck.baseline_headers, ck.xff_hops

    hidden, baseline, hops = uvloop.run(nginx())
    assert hidden == frozenset()
    assert baseline == {"x-forwarded-for", "x-real-ip"}
    assert hops == 1  # nginx appends one address: the one that connected to it


# --------------------------------------------------------------------------- the canary


@pytest.fixture(scope="module")
def canary_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The canary as the sim's judge serves it (a keep-alive HTTP/1.1 server)."""
    from sim.world import SimWorld, WorldConfig

    out = tmp_path_factory.mktemp("canary")
    with SimWorld(WorldConfig(n_proxies=0, out_dir=out)) as world:
        yield f"http://{world.judge_host}:{world.judge_port}/canary/"


def test_the_canary_takes_one_connection_through_a_keep_alive_proxy(
    bed: RealBed, canary_url: str
) -> None:
    """squid keeps the client's connection alive (forwarding and CONNECT alike), and a SOCKS
    tunnel reaches the canary's keep-alive server: one connection for the three files.
    tinyproxy and privoxy (as configured here) close after each answer: a connection each,
    the same verdict."""
    from tests.relays import verify_counting

    def spec(name: str, scheme: str, creds: bool = False) -> tuple[ProxySpec, str]:
        auth = f"{USER}:{PASSWORD}@" if creds else ""
        line = f"{scheme}://{auth}{bed.servers[name].addr}"
        return parse_proxy_line(line), "http" if scheme == "http" else scheme

    cases = {
        "squid": spec("squid", "http"),
        "squid CONNECT": spec("squid", "https"),
        "squid_auth": spec("squid_auth", "http", creds=True),
        "tinyproxy": spec("tinyproxy", "http"),
        "privoxy": spec("privoxy", "http"),
        "dante socks5": spec("dante", "socks5"),
        "dante socks4": spec("dante", "socks4"),
        "microsocks": spec("microsocks", "socks5", creds=True),
    }
    assert uvloop.run(verify_counting(canary_url, cases)) == {
        "squid": ("intact", 1),
        "squid CONNECT": ("intact", 1),
        "squid_auth": ("intact", 1),
        "tinyproxy": ("intact", 3),
        "privoxy": ("intact", 3),
        "dante socks5": ("intact", 1),
        "dante socks4": ("intact", 1),
        "microsocks": ("intact", 1),
    }
