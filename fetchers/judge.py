"""Reading a proxy judge's answer and deciding how anonymous the proxy is.

A *judge* is a page that echoes what it received: the client address it saw and the request
headers. Three formats are understood:

* **httpbin** (`/get`): JSON with `headers` (a dict) and `origin` ("a" or "a, b");
* **azenv** (`azenv.php`, the classic PHP judge): text lines `KEY = value` — `REMOTE_ADDR`
  and the CGI variables `HTTP_X_FORWARDED_FOR` etc., which we map back to header names
  (`x-forwarded-for`);
* a **bare IP** text body (ipify-style); it shows no headers, so only the address counts.

Anonymity (`classify_anonymity`) is decided on parsed values, never on words:

* **transparent** — one of *our own* addresses appears anywhere the judge saw it: the remote
  address or any header value. IPv4/IPv6 tokens are extracted from every header value and
  compared as `ipaddress` objects (so `::ffff:10.0.0.5`, `for="[2001:db8::1]:4711"` and
  `10.0.0.5:51234` all match 10.0.0.5, while 10.0.0.50 does not). The `Host` header names
  the judge and is skipped: on a loopback test bed the judge's address can share a prefix
  with ours, and it is never a leak.
* **anonymous** — no address leaked, but a proxy-revealing header is present (`Via`,
  `X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `Client-IP`, ... see `PROXY_HEADERS`).
* **elite** — neither.
* **unknown** — no address leaked, but the judge hides some proxy-revealing headers (see
  `hidden` below), so anonymous and elite cannot be told apart: never a guessed level.

Real judges differ from our simulated one (checked against the `httpbin` package and an
azenv page behind Debian's squid, tinyproxy, dante, microsocks and privoxy, see
tests/test_real_proxies.py):

* httpbin's `/get` drops `Via`, `X-Forwarded-For`, `X-Real-Ip` and other "environment"
  headers from what it shows unless the query has `show_env`; the checker asks with
  `show_env=1` when it finds them hidden, else passes them as `hidden` (verdict unknown).
* httpbin's `origin` *is* the `X-Forwarded-For` header when there is one: behind a proxy
  that sends one it is the proxy's claim (`127.0.0.1`, `unknown`, a chain), not the address
  that connected. A reverse proxy in front of the judge (nginx's
  `$proxy_add_x_forwarded_for`) appends the address it saw; `xff_hops` says how many such
  entries the judge's own infrastructure appends (learned on a direct request), and
  `exit_address` takes the exit IP from there.

Why not count the words "via" and "proxy" in the page, as ProxyBroker does
(`proxybroker/checker.py`, `_get_anonymity_lvl`)? Because the headers that most often give
a proxy away contain neither word: a proxy that sends `X-Forwarded-For: <its own address>`
or `Forwarded: for=unknown` is reported "High" (elite) there, while a judge page that merely
mentions "via" in its HTML, or a user agent containing "proxy", marks every proxy anonymous.
ProxyBroker also compares the real IP with `in` over the found IP strings, which misses the
same address written as IPv4-mapped IPv6. Judges that add such headers themselves (a load
balancer in front of the judge) are handled by `baseline` — the header names seen on a
direct request without any proxy are not counted against the proxy.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from enum import StrEnum

from fetchers.errors import JudgeFormatError

__all__ = [
    "PROXY_HEADERS",
    "Anonymity",
    "JudgeView",
    "classify_anonymity",
    "exit_address",
    "extract_ips",
    "forwarded_for",
    "leaked_addresses",
    "parse_ip",
    "parse_judge_response",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Anonymity(StrEnum):
    TRANSPARENT = "transparent"
    ANONYMOUS = "anonymous"
    ELITE = "elite"
    UNKNOWN = "unknown"  # the judge hides headers a verdict needs


#: Header names (lower case) whose presence says a proxy handled the request.
PROXY_HEADERS = frozenset(
    {
        "via",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "x-proxy-id",
        "proxy-connection",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-bluecoat-via",
        "x-originating-ip",
        # the same ideas under other names seen in the wild
        "x-forwarded",
        "forwarded-for",
        "x-forwarded-server",
        "x-proxy-connection",
        "x-cluster-client-ip",
    }
)

#: Headers never searched for leaked addresses: they name the judge or are ours.
_NOT_A_LEAK = frozenset({"host", "x-fetchfleet-probe", "content-length", "content-type"})


@dataclass(frozen=True, slots=True)
class JudgeView:
    """What the judge saw: the client address, the request headers and the raw text.

    `remote_addr` is the first address of httpbin's `origin` (or azenv's REMOTE_ADDR);
    `origin` keeps every address of a multi-address origin ("a, b").
    """

    remote_addr: str | None
    headers: dict[str, str]
    raw_text: str = field(repr=False)
    origin: tuple[str, ...] = ()


_AZENV_LINE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s?(.*?)\s*$", re.MULTILINE)
_TAG = re.compile(r"<[^>]{0,200}>")
_IPV4_TOKEN = re.compile(r"(?<![0-9.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9])")
_IPV6_TOKEN = re.compile(r"(?<![0-9A-Za-z:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*[0-9A-Fa-f](?:%\w+)?")
# Non-header CGI variables an azenv page lists; everything HTTP_* is a header.
_AZENV_CLIENT_KEYS = ("REMOTE_ADDR",)


@functools.lru_cache(maxsize=16384)
def parse_ip(text: str) -> IPAddress | None:
    """`text` as an address (IPv4-mapped IPv6 unwrapped, zone dropped), or None. Cached:
    a check looks at the same few addresses several times."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def extract_ips(value: str) -> Iterator[IPAddress]:
    """Every IPv4 / IPv6 address written inside `value` (ports, brackets, quotes ignored)."""
    for m in _IPV4_TOKEN.finditer(value):
        ip = parse_ip(m.group())
        if ip is not None:
            yield ip
    if ":" in value:
        for m in _IPV6_TOKEN.finditer(value):
            tok = m.group()
            if tok.count(":") < 2:
                continue
            ip = parse_ip(tok)
            if ip is None and tok.count(":") > 2:  # maybe "2001:db8::1:4711" w/o brackets
                ip = parse_ip(tok.rpartition(":")[0])
            if ip is not None:
                yield ip


def _addresses(origin: str) -> list[str]:
    return [a.strip() for a in origin.split(",") if a.strip()]


def _from_httpbin(obj: dict) -> JudgeView | None:
    headers = obj.get("headers")
    origin = obj.get("origin")
    if not isinstance(headers, dict) and not isinstance(origin, str):
        return None
    hdrs: dict[str, str] = {}
    if isinstance(headers, dict):
        for k, v in headers.items():
            if isinstance(v, list):
                v = ", ".join(str(x) for x in v)
            hdrs[str(k).lower()] = str(v)
    addrs = _addresses(origin) if isinstance(origin, str) else []
    return JudgeView(addrs[0] if addrs else None, hdrs, "", tuple(addrs))


def _from_azenv(text: str) -> JudgeView | None:
    if "=" not in text:
        return None
    plain = _TAG.sub("\n", text) if "<" in text else text
    remote: str | None = None
    hdrs: dict[str, str] = {}
    for key, value in _AZENV_LINE.findall(plain):
        if key.startswith("HTTP_"):
            hdrs[key[5:].lower().replace("_", "-")] = value
        elif key in _AZENV_CLIENT_KEYS:
            remote = value
    if remote is None and not hdrs:
        return None
    addrs = _addresses(remote) if remote else []
    return JudgeView(addrs[0] if addrs else None, hdrs, "", tuple(addrs))


def parse_judge_response(status: int, headers: Mapping[str, str], body: bytes) -> JudgeView:
    """Parse a judge's HTTP answer (status, response headers, body) into a `JudgeView`.

    Raises `JudgeFormatError` for a non-2xx status or a body in none of the known formats.
    """
    if not 200 <= status < 300:
        raise JudgeFormatError(f"judge answered HTTP {status}, not 2xx")
    text = body.decode("utf-8", "replace")
    stripped = text.strip()
    view: JudgeView | None = None
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            view = _from_httpbin(obj)
    if view is None:
        if stripped and "\n" not in stripped and len(stripped) <= 64:
            ip = parse_ip(stripped)
            if ip is not None:
                return JudgeView(stripped, {}, text, (stripped,))
        view = _from_azenv(stripped)
    if view is None:
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "?")
        start = stripped[:40].replace("\n", " ")
        raise JudgeFormatError(
            f"judge answer is neither httpbin JSON, azenv text nor a bare IP "
            f"({len(body):,} bytes of {ctype}, starting {start!r}); "
            "check that the judge URL points at a judge"
        )
    return JudgeView(view.remote_addr, view.headers, text, view.origin)


_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def _as_ips(ips: Iterable[object]) -> Set[IPAddress]:
    if isinstance(ips, Set) and all(
        isinstance(x, _IP_TYPES) and getattr(x, "ipv4_mapped", None) is None for x in ips
    ):
        return ips  # type: ignore[return-value]
    out: set[IPAddress] = set()
    for x in ips:
        ip = parse_ip(str(x))
        if ip is not None:
            out.add(ip)
    return out


def leaked_addresses(view: JudgeView, own_ips: Iterable[object]) -> set[IPAddress]:
    """Our own addresses found in what the judge saw (remote address or header values)."""
    own = _as_ips(own_ips)
    if not own:
        return set()
    found: set[IPAddress] = set()
    for addr in (view.remote_addr, *view.origin):
        if addr:
            ip = parse_ip(addr)
            if ip in own:
                found.add(ip)
    for name, value in view.headers.items():
        if name in _NOT_A_LEAK:
            continue
        for ip in extract_ips(value):
            if ip in own:
                found.add(ip)
    return found


def forwarded_for(view: JudgeView) -> list[str] | None:
    """The entries of the X-Forwarded-For header the judge showed, or None without one."""
    value = view.headers.get("x-forwarded-for")
    if value is None:
        return None
    return [a.strip() for a in value.split(",") if a.strip()]


def classify_anonymity(
    view: JudgeView,
    own_ips: Iterable[object],
    baseline: Iterable[str] = (),
    *,
    xff_hops: int | None = None,
    hidden: Set[str] = frozenset(),
) -> Anonymity:
    """`transparent`, `anonymous`, `elite` or `unknown` — see the module doc for the rules.

    `own_ips` are the checker's own addresses (`ipaddress` objects or strings). `baseline`
    is the set of header names the judge shows on a direct request (added by the judge's own
    infrastructure); those are not held against the proxy — except an X-Forwarded-For with
    more than the `xff_hops` entries that infrastructure appends (when known): the rest
    came from the proxy. `hidden`: proxy-revealing header names this judge never shows; with any, a
    request without a visible leak is `unknown` (a hidden header may carry one).
    """
    if leaked_addresses(view, own_ips):
        return Anonymity.TRANSPARENT
    if hidden:
        return Anonymity.UNKNOWN
    base = {b.lower() for b in baseline}
    if any(name in PROXY_HEADERS and name not in base for name in view.headers):
        return Anonymity.ANONYMOUS
    if (
        xff_hops is not None
        and "x-forwarded-for" in base
        and len(forwarded_for(view) or ()) > xff_hops
    ):
        return Anonymity.ANONYMOUS
    return Anonymity.ELITE


def exit_address(view: JudgeView, own_ips: Iterable[object], xff_hops: int = 0) -> str | None:
    """The address the proxy connected to the judge from, as far as the judge shows it:
    an IP address, or None — never a word like `unknown`, never one of `own_ips`.

    With `xff_hops` entries appended by the judge's own reverse proxy, the first of them is
    the one it saw connect (`origin[-xff_hops]`). Without, an httpbin `origin` equal to the
    X-Forwarded-For header (or a list of several, which only that header makes) is the
    proxy's claim, not its address: only a single address that is not ours is taken.
    """
    origin = view.origin or ((view.remote_addr,) if view.remote_addr else ())
    candidate: str | None
    if xff_hops and len(origin) >= xff_hops:
        candidate = origin[-xff_hops]
    elif len(origin) > 1:
        candidate = None
    else:
        candidate = origin[0] if origin else None
    ip = parse_ip(candidate) if candidate else None
    if ip is None or ip in _as_ips(own_ips):
        return None
    return candidate
