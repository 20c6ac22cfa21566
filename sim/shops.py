"""Shop sites on loopback: per-country catalogs with the hard cases a scraper meets.

Every shop serves, deterministically by seed (`shop_products(spec)` is the ground truth):

- `/` and `/catalog?page=N` — 20 products a page (`li.product` with `a.product-link`,
  `.name`, `.price`, `.sku`), `a.next` to the following page; with `hostile_links` also
  links that do not parse (`a.bad-link`) and files no fetch method speaks (`a.bad-file`);
- `/product/<id>` — one product (`.product-detail` with name, price, currency, sku,
  category, description, and `a.leaflet` linking its PDF);
- `/go/<id>` — a 302 redirect to `/product/<id>` (a page whose final URL is not its own);
- `/robots.txt` — with `robots_disallow` or `robots_crawl_delay`: one group for
  `robots_agent` with that `Disallow` and `Crawl-delay`; with `robots_status`: that status
  (a 5xx outage); else 404. Served to every client before any guard (sites answer it to
  all), never held, counted as `robots` and not in `requests`;
- `/files/<id>.pdf` — the product's leaflet (`leaflet_pdf(spec, id)`, ~2 KB, deterministic);
- `/api/products?page=N` (JSON: items, page, pages, next) and `/api/products/<id>`; with
  `api_token` set they need `Authorization: Bearer <token>` (401 otherwise);
- `/__sim/stats` — the shop's counters; `/__sim/echo` — the request's headers, cookies and
  client address as JSON (neither is guarded or counted);
- `/__sim/hold?after=N` — a test's grip on the shop's pace: the next N answers go out, every
  later one is held (counted in `held`, the answers waiting now) until `/__sim/release` sends
  them all and lets the shop answer freely again. A run against a held shop is in progress
  until the test releases it, however fast or loaded the machine (`ShopWorld.holding`);
- `/__sim/stream?bytes=N&seconds=S&length=1` — a large download made as it is sent: N bytes
  (at most 256 MB), chunked (with `length=1`: announced by Content-Length instead), spread
  over S seconds (at most 60), written only as fast as the client reads; it stops when the
  client hangs up and counts the bytes it wrote in `stream_bytes`, and the streams that ended
  early (`streams_cut`: the client hung up) or whole (`streams_done`). With `type=html` it
  is served as `text/html` (a huge page a browser renders, not a download).

and is guarded by one of (`ShopSpec.guard`):

| guard | what a client meets |
|---|---|
| `none` | nothing |
| `js_challenge` | without a valid `ff_clearance` cookie: 503, `cf-mitigated: challenge`, a "Just a moment..." page whose script computes the cookie and reloads — only a client that runs JavaScript passes. The cookie is bound to the User-Agent and client address, like Cloudflare's `cf_clearance`, so it can be handed to an HTTP client with the same User-Agent |
| `captcha` | clients without a JS-set `ff_js` cookie (or whose User-Agent is not a browser's) get a **200** page with a reCAPTCHA widget (`g-recaptcha`); a browser runs the page's script and gets through |
| `rate_limit` | more than `rate_limit` requests in `rate_window_s` from one address: 429 with `Retry-After: retry_after_s`, and every request before that time is answered 429 again and counted as `early_retries` (a client that honours Retry-After has none) |
| `slow` | every answer after `latency_ms` |
| `flaky` | a share `error_rate` of answers are 500/502/503 (seeded) |
| `socks_only` | reachable only through the shop world's SOCKS5 proxy (the stand-in for Tor's SOCKS port, on 127.0.0.5, connecting onward from that address): other clients get a 403 access-denied page (Cloudflare error 1020) |

Shops run in one child process (`ShopWorld`, or `SimWorld` with `WorldConfig.shops`):
raw asyncio Protocols with keep-alive, like the judge, so the world leaves the CPU to the
client under test. `python -m sim.shops` runs the default set in the foreground.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import hashlib
import hmac
import html
import json
import logging
import math
import os
import random
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from sim.http11 import HEAD_END, MAX_HEAD, BadRequest, RequestHead, parse_head, response

__all__ = [
    "GUARDS",
    "HOSTILE_FILES",
    "HOSTILE_LINKS",
    "SHOP_HOST",
    "SOCKS_HOST",
    "ShopInfo",
    "ShopSpec",
    "ShopWorld",
    "ShopsConfig",
    "clearance_token",
    "default_shops",
    "leaflet_pdf",
    "shop_products",
]

log = logging.getLogger(__name__)

SHOP_HOST = "127.0.0.4"
SOCKS_HOST = "127.0.0.5"  # the "tor" SOCKS proxy: listens here and connects onward from here
GUARDS = ("none", "js_challenge", "captcha", "rate_limit", "slow", "flaky", "socks_only")
KEEP_ALIVE_IDLE_S = 30.0
STREAM_PATH = "/__sim/stream"
STREAM_MAX_BYTES = 256 * 1024 * 1024
STREAM_MAX_S = 60.0
REPO_ROOT = Path(__file__).resolve().parent.parent
CURRENCY = {
    "Malaysia": "MYR",
    "India": "INR",
    "Russia": "RUB",
    "Argentina": "ARS",
    "Brazil": "BRL",
    "Indonesia": "IDR",
}
CATEGORIES = ("vitamins", "skin care", "first aid", "baby", "cold & flu", "dental", "snacks")
WORDS = (
    "Daily",
    "Herbal",
    "Active",
    "Pure",
    "Gentle",
    "Ultra",
    "Fresh",
    "Classic",
    "Organic",
    "Extra",
    "Kids",
    "Forte",
)
NOUNS = ("Vitamin C", "Zinc", "Balm", "Cream", "Syrup", "Tablets", "Lozenges", "Gel", "Drops")


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShopSpec:
    """One shop. The same spec always serves the same products."""

    name: str
    country: str
    guard: str = "none"
    n_products: int = 100
    page_size: int = 20
    seed: int = 1
    rate_limit: int = 10  # rate_limit: requests allowed per window and address
    rate_window_s: float = 1.0
    retry_after_s: int = 1
    latency_ms: int = 0  # slow: every answer waits this long
    error_rate: float = 0.0  # flaky: share of 5xx answers
    api_token: str | None = None  # /api/ needs `Authorization: Bearer <token>`
    hostile_links: bool = False  # catalog pages also carry HOSTILE_LINKS and HOSTILE_FILES
    robots_disallow: str | None = None  # /robots.txt: this Disallow path for robots_agent
    robots_crawl_delay: float | None = None  # /robots.txt: this Crawl-delay for robots_agent
    robots_agent: str = "*"  # the User-agent line of that group
    robots_status: int | None = None  # /robots.txt answers this status (a 5xx outage)
    port: int = 0

    def __post_init__(self) -> None:
        if self.guard not in GUARDS:
            raise ValueError(f"guard {self.guard!r}: use one of {', '.join(GUARDS)}")

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.n_products / self.page_size))

    @property
    def currency(self) -> str:
        return CURRENCY.get(self.country, "USD")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShopsConfig:
    shops: tuple[ShopSpec, ...]
    host: str = SHOP_HOST
    socks_host: str = SOCKS_HOST
    startup_timeout_s: float = 30.0

    def to_json(self) -> dict[str, Any]:
        return {
            "shops": [s.to_json() for s in self.shops],
            "host": self.host,
            "socks_host": self.socks_host,
        }


def default_shops(
    seed: int = 1, n_products: int = 100, api_token: str = "sim-shop-token"
) -> ShopsConfig:
    """One shop per country of the default policy, each with the case it is known for,
    plus the rate-limited, slow and flaky cases."""
    return ShopsConfig(
        (
            ShopSpec("my-pharmacy", "Malaysia", "none", n_products, seed=seed),
            ShopSpec("my-guarded", "Malaysia", "js_challenge", n_products, seed=seed),
            ShopSpec("in-market", "India", "none", n_products, seed=seed, api_token=api_token),
            ShopSpec("ru-apteka", "Russia", "captcha", n_products, seed=seed),
            ShopSpec("ar-farmacia", "Argentina", "socks_only", n_products, seed=seed),
            ShopSpec("rate-limited", "Brazil", "rate_limit", n_products, seed=seed),
            ShopSpec("slow-shop", "Indonesia", "slow", n_products, seed=seed, latency_ms=1500),
            ShopSpec("flaky-shop", "Indonesia", "flaky", n_products, seed=seed, error_rate=0.3),
        )
    )


@functools.lru_cache(maxsize=64)
def _products(spec: ShopSpec) -> tuple[dict[str, Any], ...]:
    rng = random.Random(f"{spec.seed}:{spec.name}")
    prefix = "".join(part[0] for part in spec.name.split("-")).upper()
    out = []
    for i in range(spec.n_products):
        name = f"{rng.choice(WORDS)} {rng.choice(NOUNS)} {rng.randint(5, 500)}"
        out.append(
            {
                "id": f"{prefix}-{i + 1:06d}",
                "sku": f"{prefix}{rng.randrange(10**7, 10**8)}",
                "name": name,
                "price": f"{rng.uniform(1, 500):.2f}",
                "currency": spec.currency,
                "category": rng.choice(CATEGORIES),
                "in_stock": rng.random() > 0.15,
                "shop": spec.name,
                "country": spec.country,
            }
        )
    return tuple(out)


def shop_products(spec: ShopSpec) -> list[dict[str, Any]]:
    """The ground truth: every product of the shop, in catalog order."""
    return [dict(p) for p in _products(spec)]


def clearance_token(spec: ShopSpec, user_agent: str, client_ip: str) -> str:
    """The value of `ff_clearance` a browser computes on the challenge page."""
    key = f"{spec.seed}:{spec.name}:clearance".encode()
    return hmac.new(key, f"{user_agent}|{client_ip}".encode(), hashlib.sha256).hexdigest()[:24]


def _js_token(spec: ShopSpec, user_agent: str) -> str:
    key = f"{spec.seed}:{spec.name}:js".encode()
    return hmac.new(key, user_agent.encode(), hashlib.sha256).hexdigest()[:12]


# -- pages -------------------------------------------------------------------------------------

_HEAD = (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    "<title>{title}</title><style>body{{font-family:sans-serif;margin:2em}}"
    ".product{{margin:.4em 0}}.price{{font-weight:bold}}</style></head><body>"
    '<header class="site-header"><a class="home" href="/">{shop}</a>'
    '<nav class="menu"><a href="/catalog?page=1">Catalog</a> <a href="/about">About</a></nav>'
    "</header><main>"
)
_FOOT = (
    '</main><footer class="site-footer"><p>{shop} &middot; {country} &middot; prices in '
    "{currency} &middot; simulated shop for Fetchfleet tests</p></footer></body></html>"
)


# Links a scraper must survive: each is an error of that one link, never of its page. In
# `a.bad-link`: an unclosed IPv6 host (urljoin and urlsplit raise "Invalid IPv6 URL") and a
# port out of range (`.port` raises); in `a.bad-file`: schemes no fetch method speaks.
HOSTILE_LINKS = ("http://[oops", "http://127.0.0.4:99999/catalog?page=1")
HOSTILE_FILES = (
    "ftp://127.0.0.4/leaflet.pdf",
    "data:application/pdf;base64,JVBERi0xLjQK",
    "file:///etc/passwd",
    "http://[oops/leaflet.pdf",
)


def _hostile_html() -> str:
    esc = html.escape
    links = "".join(f'<a class="bad-link" href="{esc(u)}">more</a> ' for u in HOSTILE_LINKS)
    files = "".join(f'<a class="bad-file" href="{esc(u)}">leaflet</a> ' for u in HOSTILE_FILES)
    return f'<p class="hostile">{links}{files}</p>'


def catalog_html(spec: ShopSpec, page: int) -> bytes:
    items = _products(spec)[(page - 1) * spec.page_size : page * spec.page_size]
    esc = html.escape
    parts = [
        _HEAD.format(title=f"{esc(spec.name)} — catalog page {page}", shop=esc(spec.name)),
        f'<h1 class="shop-name">{esc(spec.name)}</h1><ul class="products">',
    ]
    for p in items:
        parts.append(
            f'<li class="product" data-id="{p["id"]}">'
            f'<a class="product-link" href="/product/{p["id"]}"><span class="name">'
            f'{esc(p["name"])}</span></a> <span class="price" data-currency="{p["currency"]}">'
            f'{p["price"]}</span> <span class="sku">{p["sku"]}</span>'
            f' <span class="category">{esc(p["category"])}</span></li>'
        )
    parts.append('</ul><nav class="pagination">')
    if page > 1:
        parts.append(f'<a class="prev" rel="prev" href="/catalog?page={page - 1}">Previous</a> ')
    parts.append(
        f'<span class="page-current">{page}</span> of <span class="page-count">{spec.pages}</span>'
    )
    if page < spec.pages:
        parts.append(f' <a class="next" rel="next" href="/catalog?page={page + 1}">Next</a>')
    parts.append("</nav>")
    if spec.hostile_links:
        parts.append(_hostile_html())
    parts.append(_FOOT.format(shop=esc(spec.name), country=spec.country, currency=spec.currency))
    return "".join(parts).encode()


def product_html(spec: ShopSpec, p: dict[str, Any]) -> bytes:
    esc = html.escape
    stock = "in stock" if p["in_stock"] else "out of stock"
    body = (
        f'<div class="product-detail" data-id="{p["id"]}"><h1 class="name">{esc(p["name"])}</h1>'
        f'<p><span class="price">{p["price"]}</span> <span class="currency">{p["currency"]}'
        f'</span></p><p>SKU <span class="sku">{p["sku"]}</span> &middot; '
        f'<span class="category">{esc(p["category"])}</span> &middot; '
        f'<span class="stock">{stock}</span></p><p class="description">{esc(p["name"])} from '
        f"{esc(spec.name)}: a simulated product, its fields fixed by the shop's seed.</p>"
        f'<p><a class="leaflet" href="/files/{p["id"]}.pdf">Leaflet (PDF)</a></p></div>'
    )
    return (
        _HEAD.format(title=esc(p["name"]), shop=esc(spec.name))
        + body
        + _FOOT.format(shop=esc(spec.name), country=spec.country, currency=spec.currency)
    ).encode()


def leaflet_pdf(spec: ShopSpec, product_id: str) -> bytes:
    """A product's leaflet: a small deterministic PDF-like file (the file-download case)."""
    seed = hashlib.sha256(f"{spec.seed}:{spec.name}:{product_id}".encode()).hexdigest()
    return b"%PDF-1.4\n% " + (seed * 32).encode() + b"\n%%EOF\n"


def challenge_html(spec: ShopSpec, token: str) -> bytes:
    """A Cloudflare-like interstitial: the script assembles the clearance cookie, reloads."""
    key = random.Random(token).randint(7, 90)
    codes = ",".join(str(ord(c) ^ key) for c in token)
    return (
        '<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>'
        '<meta name="robots" content="noindex,nofollow"></head><body>'
        '<div id="challenge-running"><h1>Checking your browser before accessing '
        f"{html.escape(spec.name)}</h1><p>This takes a moment.</p></div>"
        "<noscript>Enable JavaScript and cookies to continue.</noscript>"
        "<script>window._cf_chl_opt={cType:'managed',cRay:'sim'};"
        f"(function(){{var k={key},p=[{codes}];"
        "var t=p.map(function(c){return String.fromCharCode(c^k)}).join('');"
        "setTimeout(function(){document.cookie='ff_clearance='+t+'; path=/; max-age=3600';"
        "location.reload();},150);})();</script></body></html>"
    ).encode()


def captcha_html(spec: ShopSpec, token: str | None) -> bytes:
    script = (
        f"<script>setTimeout(function(){{document.cookie='ff_js={token}; path=/';"
        "location.reload();},100);</script>"
        if token
        else ""
    )
    return (
        "<!DOCTYPE html><html><head><title>Security check</title></head><body>"
        f"<h1>{html.escape(spec.name)}: please confirm you are human</h1>"
        '<form action="/verify" method="post"><div class="g-recaptcha" '
        'data-sitekey="6LcSimSimSimSimSimSimSimSimSimSimSimSimSi"></div>'
        '<button type="submit">Continue</button></form>'
        '<script src="https://www.google.com/recaptcha/api.js" async defer></script>'
        f"{script}</body></html>"
    ).encode()


DENIED_HTML = (
    b"<!DOCTYPE html><html><head><title>Access denied</title></head><body>"
    b"<h1>Access denied</h1><p>The owner of this website has banned your access based on "
    b'your location.</p><p>Error code <span class="cf-error-code">1020</span></p>'
    b"</body></html>"
)
RATE_HTML = (
    b"<!DOCTYPE html><html><head><title>429 Too Many Requests</title></head><body>"
    b"<h1>Too Many Requests</h1><p>Rate limit exceeded. Slow down.</p></body></html>"
)


def http_response(
    status: int,
    body: bytes,
    content_type: str = "text/html; charset=utf-8",
    extra: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
    head_only: bool = False,
) -> bytes:
    """sim.http11.response with a shop's defaults: HTML, keep-alive."""
    return response(status, body, content_type, extra, keep_alive, head_only)


# -- serving -----------------------------------------------------------------------------------


@dataclass
class ShopState:
    """One shop's server-side state: its rate windows and counters."""

    spec: ShopSpec
    socks_host: str
    rng: random.Random
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    windows: dict[str, deque[float]] = field(default_factory=dict)
    penalty_until: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    hold_after: int | None = None  # answers still sent before holding (None: not holding)
    held: list[Callable[[], None]] = field(default_factory=list)  # sends waiting for release

    def bump(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def stats(self) -> dict[str, Any]:
        return {
            "shop": self.spec.name,
            "guard": self.spec.guard,
            **self.counts,
            "held": len(self.held),
        }

    def hold(self, after: int) -> None:
        """Send ``after`` more answers, then hold every later one until ``release``."""
        self.hold_after = max(0, after)

    def release(self) -> int:
        """Stop holding and send every held answer; returns how many there were."""
        self.hold_after = None
        held, self.held = self.held, []
        for send in held:
            send()
        return len(held)

    def send_or_hold(self, send: Callable[[], None]) -> None:
        """Send an answer now, or keep it until ``release`` once the hold's quota is used."""
        if self.hold_after is None:
            send()
        elif self.hold_after > 0:
            self.hold_after -= 1
            send()
        else:
            self.bump("held_total")
            self.held.append(send)

    def rate_check(self, ip: str, now: float) -> int | None:
        """None if admitted, else the Retry-After seconds of the 429."""
        spec = self.spec
        until = self.penalty_until.get(ip)
        if until is not None:
            if now < until:
                self.bump("early_retries")
                return max(1, math.ceil(until - now))
            del self.penalty_until[ip]
            self.windows.pop(ip, None)
        window = self.windows.setdefault(ip, deque())
        while window and window[0] <= now - spec.rate_window_s:
            window.popleft()
        if len(window) >= spec.rate_limit:
            self.penalty_until[ip] = now + spec.retry_after_s
            return spec.retry_after_s
        window.append(now)
        return None


def _cookies(head: RequestHead) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, value in (h for h in head.headers if h[0].lower() == "cookie"):
        for part in value.split(";"):
            name, sep, val = part.strip().partition("=")
            if sep:
                out[name] = val
    return out


def answer(state: ShopState, head: RequestHead, peer_ip: str) -> tuple[bytes, float]:
    """(response bytes, delay in seconds) for one request."""
    spec = state.spec
    keep = head.keep_alive
    head_only = head.method == "HEAD"
    split = urlsplit(head.target)
    path, query = split.path or "/", dict(parse_qsl(split.query))

    def reply(status: int, body: bytes, ctype: str = "text/html; charset=utf-8", extra=()):
        state.bump(f"status_{status}")
        return http_response(status, body, ctype, tuple(extra), keep, head_only)

    if path == "/__sim/stats":
        return http_response(
            200, json.dumps(state.stats()).encode(), "application/json", (), keep
        ), 0
    if path == "/__sim/hold":
        try:
            state.hold(int(query.get("after", "0")))
        except ValueError:
            return http_response(400, b"after is a number\n", "text/plain", (), keep), 0
        return http_response(200, b'{"holding": true}', "application/json", (), keep), 0
    if path == "/__sim/release":
        doc = {"released": state.release()}
        return http_response(200, json.dumps(doc).encode(), "application/json", (), keep), 0
    if path == "/__sim/echo":  # what reached the shop: headers in order, the client address
        doc = {"headers": head.headers, "peer": peer_ip, "cookies": _cookies(head)}
        return http_response(200, json.dumps(doc).encode(), "application/json", (), keep), 0
    if head.method not in ("GET", "HEAD"):
        return reply(405, b"GET only\n", "text/plain"), 0
    if path == "/robots.txt":
        state.bump("robots")
        return _robots(spec, reply), 0
    state.bump("requests")
    delay = spec.latency_ms / 1000 if spec.guard == "slow" else 0.0
    ua = head.get("User-Agent") or ""
    cookies = _cookies(head)

    if spec.guard == "socks_only" and peer_ip != state.socks_host:
        state.bump("denied")
        return reply(403, DENIED_HTML), delay
    if spec.guard == "rate_limit":
        retry_after = state.rate_check(peer_ip, time.monotonic())
        if retry_after is not None:
            state.bump("rate_limited")
            return reply(429, RATE_HTML, extra=(("Retry-After", str(retry_after)),)), delay
    if spec.guard == "flaky" and state.rng.random() < spec.error_rate:
        status = state.rng.choice((500, 502, 503))
        state.bump("errors_5xx")
        return reply(status, f"<html><body>error {status}</body></html>".encode()), delay
    is_api = path.startswith("/api/")
    if spec.guard == "js_challenge" and not is_api:
        if cookies.get("ff_clearance") != clearance_token(spec, ua, peer_ip):
            state.bump("challenges")
            token = clearance_token(spec, ua, peer_ip)
            extra = (("cf-mitigated", "challenge"), ("Cache-Control", "no-store"))
            return reply(503, challenge_html(spec, token), extra=extra), delay
        state.bump("cleared")
    if spec.guard == "captcha" and not is_api:
        browser_like = ua.startswith("Mozilla/")
        if not browser_like or cookies.get("ff_js") != _js_token(spec, ua):
            state.bump("captchas")
            token = _js_token(spec, ua) if browser_like else None
            return reply(200, captcha_html(spec, token)), delay

    if path in ("/", "/catalog"):
        try:
            page = int(query.get("page", "1"))
        except ValueError:
            page = 0
        if not 1 <= page <= spec.pages:
            return reply(404, b"<html><title>Not found</title>no such page</html>"), delay
        state.bump("catalog_pages")
        return reply(200, catalog_html(spec, page)), delay
    if path.startswith("/product/"):
        product = state.by_id.get(unquote(path[len("/product/") :]))
        if product is None:
            return reply(404, b"<html><title>Not found</title>no such product</html>"), delay
        state.bump("product_pages")
        return reply(200, product_html(spec, product)), delay
    if path.startswith("/go/"):
        state.bump("redirects")
        target = "/product/" + path[len("/go/") :]
        return reply(302, b"", extra=(("Location", target),)), delay
    if path.startswith("/files/") and path.endswith(".pdf"):
        product_id = unquote(path[len("/files/") : -len(".pdf")])
        if product_id not in state.by_id:
            return reply(404, b"<html><title>Not found</title>no such file</html>"), delay
        state.bump("files")
        return reply(200, leaflet_pdf(spec, product_id), "application/pdf"), delay
    if is_api:
        if spec.api_token and head.get("Authorization") != f"Bearer {spec.api_token}":
            state.bump("unauthorized")
            body = json.dumps({"error": "missing or wrong bearer token"}).encode()
            return reply(401, body, "application/json"), delay
        return _api(state, path, query, reply), delay
    return reply(404, b"<html><title>Not found</title>not found</html>"), delay


def robots_txt(spec: ShopSpec) -> bytes | None:
    """The shop's robots.txt, or None when it has none (404)."""
    if spec.robots_disallow is None and spec.robots_crawl_delay is None:
        return None
    lines = [f"User-agent: {spec.robots_agent}"]
    if spec.robots_disallow is not None:
        lines.append(f"Disallow: {spec.robots_disallow}")
    if spec.robots_crawl_delay is not None:
        lines.append(f"Crawl-delay: {spec.robots_crawl_delay:g}")
    return ("\n".join(lines) + "\n").encode()


def _robots(spec: ShopSpec, reply: Any) -> bytes:
    if spec.robots_status is not None:
        body = f"<html><body>error {spec.robots_status}</body></html>".encode()
        return reply(spec.robots_status, body)
    text = robots_txt(spec)
    if text is None:
        return reply(404, b"<html><title>Not found</title>not found</html>")
    return reply(200, text, "text/plain; charset=utf-8")


def _api(state: ShopState, path: str, query: dict[str, str], reply: Any) -> bytes:
    spec = state.spec
    if path == "/api/products":
        try:
            page = int(query.get("page", "1"))
        except ValueError:
            page = 0
        if page < 1:
            return reply(400, b'{"error": "page must be a positive integer"}', "application/json")
        items = list(_products(spec)[(page - 1) * spec.page_size : page * spec.page_size])
        nxt = f"/api/products?page={page + 1}" if page < spec.pages else None
        doc = {"items": items, "page": page, "pages": spec.pages, "next": nxt}
        state.bump("api_pages")
        return reply(200, json.dumps(doc).encode(), "application/json")
    if path.startswith("/api/products/"):
        product = state.by_id.get(unquote(path[len("/api/products/") :]))
        if product is None:
            return reply(404, b'{"error": "no such product"}', "application/json")
        return reply(200, json.dumps(product).encode(), "application/json")
    return reply(404, b'{"error": "no such route"}', "application/json")


class ShopConnection(asyncio.Protocol):
    """One client connection; requests answered in order, one at a time."""

    __slots__ = ("buf", "busy", "paused", "peer_ip", "state", "streaming", "timer", "transport")

    def __init__(self, state: ShopState) -> None:
        self.state = state
        self.buf = bytearray()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.paused: asyncio.Future[None] | None = None  # the transport's buffer is full
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer_ip = transport.get_extra_info("peername")[0]
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(KEEP_ALIVE_IDLE_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport.is_closing():
            return
        end = self.buf.find(HEAD_END)
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._send(http_response(431, b"", keep_alive=False), True)
            return
        try:
            head = parse_head(bytes(self.buf[:end]))
            length = head.content_length
        except BadRequest:
            self._send(http_response(400, b"bad request\n", keep_alive=False), True)
            return
        start = end + len(HEAD_END)
        if len(self.buf) < start + length:
            return
        del self.buf[: start + length]
        self.busy = True
        if head.target.startswith(STREAM_PATH):  # the connection ends with the stream
            self.streaming = asyncio.get_running_loop().create_task(self._stream(head))
            return
        try:
            reply, delay = answer(self.state, head, self.peer_ip)
        except Exception:
            log.exception("shop %s: answering %s", self.state.spec.name, head.target)
            reply, delay = http_response(500, b"internal error\n", keep_alive=False), 0.0
        close = not head.keep_alive
        if head.target.startswith("/__sim/") or head.target == "/robots.txt":  # never held
            send = functools.partial(self._send, reply, close)
        else:
            send = functools.partial(
                self.state.send_or_hold, functools.partial(self._send, reply, close)
            )
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, send)
        else:
            send()

    def _send(self, reply: bytes, close: bool) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(reply)
        self.busy = False
        if close:
            self.transport.close()
            return
        self._arm_idle()
        if self.buf:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.resume_writing()  # a stream waiting for room sees the hang-up

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None

    async def _stream(self, head: RequestHead) -> None:
        """`/__sim/stream`: filler bytes, paced and bounded (see the module docstring)."""
        query = dict(parse_qsl(urlsplit(head.target).query))
        try:
            total = min(int(query.get("bytes", "0")), STREAM_MAX_BYTES)
            seconds = min(float(query.get("seconds", "0")), STREAM_MAX_S)
        except ValueError:
            self._send(http_response(400, b"bytes and seconds are numbers\n", "text/plain"), True)
            return
        announce = query.get("length") == "1"
        framing = f"Content-Length: {total}" if announce else "Transfer-Encoding: chunked"
        ctype = "text/html" if query.get("type") == "html" else "application/octet-stream"
        self.transport.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{framing}\r\n".encode()
            + b"Connection: close\r\nServer: fetchfleet-sim\r\n\r\n"
        )
        self.state.bump("streams")
        loop = asyncio.get_running_loop()
        began, sent, filler = loop.time(), 0, b"x" * 65536
        while sent < total and not self.transport.is_closing():
            n = min(len(filler), total - sent)
            self.transport.write(filler[:n] if announce else b"%x\r\n%s\r\n" % (n, filler[:n]))
            sent += n
            self.state.counts["stream_bytes"] = self.state.counts.get("stream_bytes", 0) + n
            if self.paused is not None:
                await self.paused
            if seconds > 0:
                await asyncio.sleep(max(0.0, began + seconds * sent / total - loop.time()))
        # Whether the client hung up before the end: what a test of a download limit checks.
        self.state.bump("streams_cut" if sent < total else "streams_done")
        if not self.transport.is_closing():
            if not announce:
                self.transport.write(b"0\r\n\r\n")
            self.transport.close()


async def start_shops(config: ShopsConfig) -> tuple[list[asyncio.Server], dict[str, Any]]:
    """Bind every shop and the SOCKS proxy; (servers, ready info with the ports)."""
    from sim.fleet import Behaviour, PlannedProxy, ProxyProtocol
    from sim.proxy_server import ProxyConnection
    from sim.shard import listener

    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}
    for spec in config.shops:
        state = ShopState(spec, config.socks_host, random.Random(f"{spec.seed}:{spec.name}:5xx"))
        state.by_id = {p["id"]: p for p in _products(spec)}
        sock = listener(config.host, spec.port)
        server = await loop.create_server(
            functools.partial(ShopConnection, state), sock=sock, backlog=1024
        )
        servers.append(server)
        ports[spec.name] = sock.getsockname()[1]
    socks = PlannedProxy(
        index=0,
        host=config.socks_host,
        port=0,
        protocol=ProxyProtocol.SOCKS5,
        behaviour=Behaviour.ELITE,
        username=None,
        password=None,
        latency_ms=0,
        with_scheme=True,
    )
    sock = listener(config.socks_host, 0)
    rng = random.Random(0)
    servers.append(
        await loop.create_server(
            functools.partial(ProxyConnection, socks, rng), sock=sock, backlog=1024
        )
    )
    info = {"ready": True, "pid": os.getpid(), "ports": ports, "socks_port": sock.getsockname()[1]}
    return servers, info


async def _serve(config: ShopsConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()

    def watch_stdin() -> None:  # EOF: the parent closed our stdin or died
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    servers, info = await start_shops(config)
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            if os.getppid() != parent:
                break
    for server in servers:
        server.close()


def _config_from_json(d: dict[str, Any]) -> ShopsConfig:
    return ShopsConfig(
        tuple(ShopSpec(**s) for s in d["shops"]),
        host=d.get("host", SHOP_HOST),
        socks_host=d.get("socks_host", SOCKS_HOST),
    )


def serve_main() -> int:
    """The shop process (started by ShopWorld): config on stdin, one ready line on stdout."""
    logging.basicConfig(level=logging.WARNING, format="sim-shops[%(process)d] %(message)s")
    line = sys.stdin.buffer.readline()
    if not line:
        return 2
    import uvloop

    uvloop.run(_serve(_config_from_json(json.loads(line))))
    sys.stdout.flush()
    os._exit(0)


# -- the client side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShopInfo:
    spec: ShopSpec
    base_url: str  # http://127.0.0.4:PORT

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def catalog_url(self, page: int = 1) -> str:
        return f"{self.base_url}/catalog?page={page}"

    def products(self) -> list[dict[str, Any]]:
        return shop_products(self.spec)


class ShopWorld:
    """The shops (and their SOCKS proxy) in one child process.

    with ShopWorld() as shops:                      # default_shops()
        shops["my-guarded"].catalog_url(2)           # http://127.0.0.4:PORT/catalog?page=2
        shops.socks_proxy                            # socks5://127.0.0.5:PORT
        shops.stats("rate-limited")                  # the shop's counters
    """

    def __init__(self, config: ShopsConfig | None = None) -> None:
        self.config = config or default_shops()
        self.shops: dict[str, ShopInfo] = {}
        self.socks_proxy = ""
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ShopWorld:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __getitem__(self, name: str) -> ShopInfo:
        return self.shops[name]

    def start(self) -> ShopWorld:
        if self._proc is not None:
            raise RuntimeError("the shop world is already running")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self._proc = subprocess.Popen(
            # -c rather than -m: `sim` imports this module first, runpy would then warn
            [sys.executable, "-c", "import sys, sim.shops as s; sys.exit(s.serve_main())"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        atexit.register(self.stop)
        self.pid = self._proc.pid
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(self.config.to_json()).encode() + b"\n")
        self._proc.stdin.flush()
        ready = self._read_ready(self._proc)
        for spec in self.config.shops:
            port = ready["ports"][spec.name]
            self.shops[spec.name] = ShopInfo(spec, f"http://{self.config.host}:{port}")
        self.socks_proxy = f"socks5://{self.config.socks_host}:{ready['socks_port']}"
        return self

    def _read_ready(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise RuntimeError("sim shops did not start in time")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    code = proc.wait(timeout=5)
                    self.stop()
                    raise RuntimeError(f"sim shops exited with code {code} before they were ready")
                buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        atexit.unregister(self.stop)

    def stats(self, name: str) -> dict[str, Any]:
        return self._control(name, "/__sim/stats")

    def _control(self, name: str, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.shops[name].url(path), timeout=10) as resp:
            return json.loads(resp.read())

    @contextlib.contextmanager
    def holding(self, name: str, after: int = 0) -> Iterator[None]:
        """Inside the block the shop sends ``after`` answers, then holds the rest; leaving it
        sends them. What a test uses to act on a run that cannot finish before it acts."""
        self._control(name, f"/__sim/hold?after={after}")
        try:
            yield
        finally:
            self._control(name, "/__sim/release")

    def wait_held(
        self, name: str, timeout_s: float = 60.0, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """Wait until the shop holds an answer (the client is mid-run and waiting on it);
        ``alive`` False (the client exited) or ``timeout_s`` raises."""
        deadline = time.monotonic() + timeout_s
        while not self.stats(name).get("held"):
            if not alive():
                raise RuntimeError(f"{name}: the client ended before an answer was held")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no answer held within {timeout_s:.0f} s")
            time.sleep(0.05)

    def endpoints(self) -> dict[str, Any]:
        return {
            "shops": {
                name: {
                    "url": info.base_url,
                    "country": info.spec.country,
                    "guard": info.spec.guard,
                    "products": info.spec.n_products,
                    "pages": info.spec.pages,
                }
                for name, info in self.shops.items()
            },
            "socks_proxy": self.socks_proxy,
            "pid": self.pid,
        }

    def write_truth(self, path: Path) -> Path:
        """Every shop's products as JSON ({shop: [product, ...]})."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {name: info.products() for name, info in self.shops.items()}
        path.write_text(json.dumps(doc))
        return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sim.shops",
        description="Serve the default sim shops (one per country, plus rate-limited, slow "
        "and flaky ones) on 127.0.0.4 and their SOCKS proxy on 127.0.0.5; prints one JSON "
        "line with the endpoints and runs until Ctrl-C.",
    )
    parser.add_argument("--products", type=int, default=100, help="products per shop (100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--truth", type=Path, help="write every shop's products here (JSON)")
    parser.add_argument(
        "--base-port",
        type=int,
        help="serve the shops on fixed ports BASE, BASE+1, … in the listed order (default: "
        "free ports); specs/sim_shops.toml expects 8401 (my-pharmacy 8401, in-market 8403)",
    )
    args = parser.parse_args(argv)
    config = default_shops(args.seed, args.products)
    if args.base_port:
        from dataclasses import replace

        config = replace(
            config,
            shops=tuple(replace(s, port=args.base_port + i) for i, s in enumerate(config.shops)),
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with ShopWorld(config) as world:
        if args.truth:
            world.write_truth(args.truth)
        print(json.dumps(world.endpoints()), flush=True)
        while not stop.wait(1.0):
            if world._proc is None or world._proc.poll() is not None:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
