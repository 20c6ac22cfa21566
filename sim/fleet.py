"""The fleet plan: which address, port, protocol, behaviour and credentials each proxy gets.

Pure and deterministic by seed (only the second address octet is chosen at start, see
world.py), so the same seed gives the same list, the same truth and the same mix of traps.
The truth is what a checker's answer is graded against.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path


class ProxyProtocol(StrEnum):
    """What a proxy speaks. `https` is meant as in proxy lists: a plain-TCP proxy that only
    tunnels (CONNECT), not TLS to the proxy itself (what curl's `https://` proxy means)."""

    HTTP = "http"  # forward proxy: absolute-form GET and CONNECT
    HTTPS = "https"  # CONNECT only
    SOCKS4 = "socks4"  # SOCKS4 and 4a
    SOCKS5 = "socks5"


class Behaviour(StrEnum):
    ELITE = "elite"  # forwards, adds nothing
    ANONYMOUS = "anonymous"  # adds `Via`
    TRANSPARENT = "transparent"  # adds `X-Forwarded-For: <client ip>`
    SLOW = "slow"  # elite, with a long latency
    FLAKY = "flaky"  # half the connections are closed unanswered
    REFUSED = "refused"  # nothing listens
    BLACKHOLE = "blackhole"  # accepts, never answers
    FAKE = "fake"  # answers a canned page itself, never reaches the target
    # Tampering (sim/tamper.py): elite towards the judge, but it changes what it forwards.
    INJECTS_SCRIPT = "injects_script"  # adds a <script> to HTML
    REWRITES_JSON = "rewrites_json"  # changes the numbers in JSON
    STRIPS_SCRIPTS = "strips_scripts"  # removes <script> elements from HTML
    RECOMPRESSES_IMAGE = "recompresses_image"  # re-encodes PNGs


# Only a forward HTTP proxy sees the request it could add headers to; a tunnel carries bytes.
HEADER_BEHAVIOURS = frozenset({Behaviour.ANONYMOUS, Behaviour.TRANSPARENT})
# Content a forward HTTP proxy relays, it can rewrite; the sim's tunnels never do. Their truth
# is "not alive": a proxy that tampers is stored as `tampering` and never routed through.
TAMPERING = frozenset(
    {
        Behaviour.INJECTS_SCRIPT,
        Behaviour.REWRITES_JSON,
        Behaviour.STRIPS_SCRIPTS,
        Behaviour.RECOMPRESSES_IMAGE,
    }
)
FORWARD_ONLY = HEADER_BEHAVIOURS | TAMPERING
ALIVE = frozenset({Behaviour.ELITE, Behaviour.ANONYMOUS, Behaviour.TRANSPARENT, Behaviour.SLOW})
DEAD = frozenset({Behaviour.REFUSED, Behaviour.BLACKHOLE, Behaviour.FAKE, *TAMPERING})
# Ports people's lists are full of; the rest are random high ports.
COMMON_PORTS = (1080, 3128, 4145, 8000, 8080, 8081, 8118, 8888, 9050, 9999, 10808)
MAX_PROXIES = 254 * 254  # one /16 of 127.0.0.0/8, .0 and .255 skipped


@dataclass(frozen=True)
class Mix:
    """How a world's proxies are spread: behaviour fractions, protocol weights, line formats."""

    behaviours: Mapping[Behaviour, float]
    # weights for behaviours every protocol can have (anonymous/transparent are always http)
    protocols: Mapping[ProxyProtocol, float]
    schemeless: float  # share of lines without a scheme (`ip:port`, `ip:port:user:pass`)
    auth: float  # share of http/https/socks5 proxies that want user:pass


PROTOCOL_WEIGHTS = {
    ProxyProtocol.HTTP: 0.25,
    ProxyProtocol.HTTPS: 0.2,
    ProxyProtocol.SOCKS4: 0.2,
    ProxyProtocol.SOCKS5: 0.35,
}
MIXES: dict[str, Mix] = {
    # 40% alive (elite/anonymous/transparent, 20-300 ms), 30% refused, 20% blackhole, 10% flaky
    "bench": Mix(
        behaviours={
            Behaviour.ELITE: 0.2,
            Behaviour.ANONYMOUS: 0.1,
            Behaviour.TRANSPARENT: 0.1,
            Behaviour.REFUSED: 0.3,
            Behaviour.BLACKHOLE: 0.2,
            Behaviour.FLAKY: 0.1,
        },
        protocols=PROTOCOL_WEIGHTS,
        schemeless=0.2,
        auth=0.05,
    ),
    # every behaviour; demo worlds also get one proxy of each combination first (see plan_fleet)
    "demo": Mix(
        behaviours={
            Behaviour.ELITE: 0.25,
            Behaviour.ANONYMOUS: 0.1,
            Behaviour.TRANSPARENT: 0.1,
            Behaviour.SLOW: 0.1,
            Behaviour.FLAKY: 0.1,
            Behaviour.REFUSED: 0.15,
            Behaviour.BLACKHOLE: 0.1,
            Behaviour.FAKE: 0.1,
        },
        protocols=PROTOCOL_WEIGHTS,
        schemeless=0.25,
        auth=0.2,
    ),
}


@dataclass(frozen=True)
class ProxyTruth:
    """What one line of the list really is, for grading a checker.

    alive_expected: True for elite/anonymous/transparent/slow, False for refused/blackhole/fake
    and the tampering behaviours (checked with a canary they are `tampering`, never alive),
    None for flaky (unreliable by design). anonymity_expected is what a forward request through
    the proxy shows the judge (None when it is not expected alive); SOCKS and https (CONNECT
    only) proxies are always 'elite'. exit_ip is the address the judge sees (the proxy's own
    address), None when the proxy is not expected to reach the judge.
    """

    line_no: int
    line: str
    scheme: str | None  # as declared in the line; None when the line has no scheme
    protocol: str  # what it really speaks (a ProxyProtocol value)
    host: str
    port: int
    username: str | None
    password: str | None
    behaviour: str  # a Behaviour value
    alive_expected: bool | None
    anonymity_expected: str | None
    exit_ip: str | None
    latency_ms: int | None  # delay added before relaying a response; None if it never relays


@dataclass(frozen=True)
class PlannedProxy:
    """One proxy as the shard serving it needs it, plus how its line is written."""

    index: int
    host: str
    port: int
    protocol: ProxyProtocol
    behaviour: Behaviour
    username: str | None
    password: str | None
    latency_ms: int | None
    with_scheme: bool

    def line(self) -> str:
        """The list line in one of the formats people paste."""
        address = f"{self.host}:{self.port}"
        if self.with_scheme:
            creds = f"{self.username}:{self.password}@" if self.username else ""
            return f"{self.protocol}://{creds}{address}"
        return f"{address}:{self.username}:{self.password}" if self.username else address

    def truth(self, line_no: int) -> ProxyTruth:
        if self.behaviour in ALIVE:
            alive: bool | None = True
        elif self.behaviour in DEAD:
            alive = False
        else:
            alive = None
        anonymity = None
        if alive is not False:
            anonymity = "elite"
            if self.protocol == ProxyProtocol.HTTP and self.behaviour in HEADER_BEHAVIOURS:
                anonymity = str(self.behaviour)
        return ProxyTruth(
            line_no=line_no,
            line=self.line(),
            scheme=str(self.protocol) if self.with_scheme else None,
            protocol=str(self.protocol),
            host=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            behaviour=str(self.behaviour),
            alive_expected=alive,
            anonymity_expected=anonymity,
            exit_ip=None if alive is False else self.host,
            latency_ms=self.latency_ms,
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> PlannedProxy:
        proxy = cls(**data)
        return replace(
            proxy,
            protocol=ProxyProtocol(proxy.protocol),
            behaviour=Behaviour(proxy.behaviour),
        )


def allowed_behaviours(protocol: ProxyProtocol) -> list[Behaviour]:
    """Header-adding and tampering behaviours only make sense for a forward HTTP proxy (the
    demo's one-of-each list leaves tampering out: worlds ask for it in their mix)."""
    if protocol == ProxyProtocol.HTTP:
        return [b for b in Behaviour if b not in TAMPERING]
    return [b for b in Behaviour if b not in FORWARD_ONLY]


def resolve_mix(mix: str | Mapping[str, float]) -> Mix:
    """A preset name, or a behaviour -> fraction dict (protocols and formats as in 'bench')."""
    if isinstance(mix, str):
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}: use one of {sorted(MIXES)} or a dict")
        return MIXES[mix]
    behaviours: dict[Behaviour, float] = {}
    for name, fraction in mix.items():
        try:
            behaviour = Behaviour(name)
        except ValueError:
            valid = ", ".join(b.value for b in Behaviour)
            raise ValueError(f"unknown behaviour {name!r} in mix: use {valid}") from None
        if fraction < 0:
            raise ValueError(f"negative fraction for {name!r}")
        behaviours[behaviour] = float(fraction)
    if sum(behaviours.values()) <= 0:
        raise ValueError("the mix needs at least one behaviour with a positive fraction")
    return replace(MIXES["bench"], behaviours=behaviours)


def exact_counts(weights: Mapping[Behaviour, float], n: int) -> dict[Behaviour, int]:
    """Split n by the weights, largest remainder first, so a 30% mix is exactly 30%."""
    total = sum(weights.values())
    shares = {key: n * weight / total for key, weight in weights.items()}
    counts = {key: int(share) for key, share in shares.items()}
    by_remainder = sorted(shares, key=lambda key: shares[key] - counts[key], reverse=True)
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    return counts


Combo = tuple[ProxyProtocol, Behaviour, bool, bool]  # protocol, behaviour, auth, with_scheme


def demo_combos() -> list[Combo]:
    """One proxy per protocol x behaviour, then credentials and scheme-less lines of each kind."""
    combos: list[Combo] = [
        (protocol, behaviour, False, True)
        for protocol in ProxyProtocol
        for behaviour in allowed_behaviours(protocol)
    ]
    combos += [
        (ProxyProtocol.HTTP, Behaviour.ELITE, True, True),
        (ProxyProtocol.HTTPS, Behaviour.ELITE, True, True),
        (ProxyProtocol.SOCKS5, Behaviour.ELITE, True, True),
        (ProxyProtocol.SOCKS5, Behaviour.ELITE, True, False),
        (ProxyProtocol.HTTP, Behaviour.ANONYMOUS, True, False),
        (ProxyProtocol.HTTP, Behaviour.ELITE, False, False),
        (ProxyProtocol.HTTP, Behaviour.TRANSPARENT, False, False),
        (ProxyProtocol.HTTPS, Behaviour.ELITE, False, False),
        (ProxyProtocol.SOCKS4, Behaviour.ELITE, False, False),
        (ProxyProtocol.SOCKS5, Behaviour.ELITE, False, False),
        (ProxyProtocol.HTTP, Behaviour.REFUSED, False, False),
        (ProxyProtocol.SOCKS5, Behaviour.BLACKHOLE, False, False),
    ]
    return combos


def _random_combos(mix: Mix, n: int, rng: random.Random) -> list[Combo]:
    behaviours = [b for b, count in exact_counts(mix.behaviours, n).items() for _ in range(count)]
    rng.shuffle(behaviours)
    protocols = list(mix.protocols)
    weights = list(mix.protocols.values())
    combos: list[Combo] = []
    for behaviour in behaviours:
        if behaviour in FORWARD_ONLY:
            protocol = ProxyProtocol.HTTP
        else:
            protocol = rng.choices(protocols, weights)[0]
        auth = protocol != ProxyProtocol.SOCKS4 and rng.random() < mix.auth
        combos.append((protocol, behaviour, auth, rng.random() >= mix.schemeless))
    return combos


def proxy_address(octet: int, index: int, block: str | None = None) -> str:
    """The index-th address of 127.<octet>.0.0/16, or of ``block`` (a network such as
    10.77.128.0/17, see ``WorldConfig.bind``), skipping .0 and .255."""
    if block is None:
        return f"127.{octet}.{1 + index // 254}.{1 + index % 254}"
    net = ipaddress.ip_network(block)
    offset = (index // 254) * 256 + 1 + index % 254
    if offset >= net.num_addresses - 1:
        raise ValueError(f"{block} has no room for {index + 1} addresses")
    return str(net.network_address + offset)


def plan_fleet(
    n: int,
    mix: str | Mapping[str, float],
    seed: int,
    octet: int,
    latency_ms: tuple[int, int] = (20, 300),
    slow_latency_ms: tuple[int, int] = (1000, 2000),
    block: str | None = None,
) -> list[PlannedProxy]:
    """Plan n proxies on 127.<octet>.x.y (or from the second address of ``block`` on: the
    first is the judge's); the same arguments always give the same plan."""
    if not 0 < n <= MAX_PROXIES:
        raise ValueError(f"n_proxies must be between 1 and {MAX_PROXIES}, not {n}")
    if not 1 <= octet <= 254:
        raise ValueError(f"octet must be 1..254, not {octet}")
    spec = resolve_mix(mix)
    rng = random.Random(f"fetchfleet-sim:{seed}")
    if mix == "demo":
        combos = demo_combos()
        combos = rng.sample(combos, n) if n < len(combos) else combos
        combos += _random_combos(spec, n - len(combos), rng)
        rng.shuffle(combos)
    else:
        combos = _random_combos(spec, n, rng)
    plan = []
    for index, (protocol, behaviour, auth, with_scheme) in enumerate(combos):
        common = rng.random() < 0.5
        port = rng.choice(COMMON_PORTS) if common else rng.randrange(10000, 30000)
        if behaviour in (Behaviour.REFUSED, Behaviour.BLACKHOLE):
            latency = None
        elif behaviour == Behaviour.SLOW:
            latency = rng.randint(*slow_latency_ms)
        else:
            latency = rng.randint(*latency_ms)
        plan.append(
            PlannedProxy(
                index=index,
                host=proxy_address(octet, index if block is None else index + 1, block),
                port=port,
                protocol=protocol,
                behaviour=behaviour,
                username=f"user{index}" if auth else None,
                password=f"pw{rng.getrandbits(40):010x}" if auth else None,
                latency_ms=latency,
                with_scheme=with_scheme,
            )
        )
    return plan


LIST_HEADER = "# fetchfleet sim proxy list: mixed formats, as people paste them\n\n"
HEADER_LINES = LIST_HEADER.count("\n")


def write_list(plan: list[PlannedProxy], path: Path) -> list[ProxyTruth]:
    """Write the list (a comment and a blank line first) and return its truth."""
    truth = [proxy.truth(line_no=HEADER_LINES + 1 + i) for i, proxy in enumerate(plan)]
    path.write_text(LIST_HEADER + "".join(t.line + "\n" for t in truth), encoding="utf-8")
    return truth


def write_truth(truth: list[ProxyTruth], path: Path, meta: Mapping | None = None) -> None:
    document = {**(meta or {}), "proxies": [asdict(t) for t in truth]}
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def load_truth(path: Path) -> list[ProxyTruth]:
    """Read a truth.json written by a world (for benchmarks grading a run afterwards)."""
    names = {f.name for f in fields(ProxyTruth)}
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        ProxyTruth(**{k: v for k, v in row.items() if k in names}) for row in document["proxies"]
    ]
