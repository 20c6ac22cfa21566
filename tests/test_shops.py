"""The sim shops (sim/shops.py): ground truth, pagination, product pages, the API, and each
guard as a plain client meets it; SimWorld wiring."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from selectolax.lexbor import LexborHTMLParser

from sim import SimWorld, WorldConfig
from sim.shops import ShopsConfig, ShopSpec, ShopWorld, clearance_token, shop_products

TOKEN = "t0ken-for-tests"
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0"


@pytest.fixture(scope="module")
def shops() -> Iterator[ShopWorld]:
    config = ShopsConfig(
        (
            ShopSpec("plain", "Malaysia", n_products=45, api_token=TOKEN),
            ShopSpec("guarded", "Malaysia", "js_challenge"),
            ShopSpec("captcha", "Russia", "captcha"),
            ShopSpec("limited", "Brazil", "rate_limit", rate_limit=3, retry_after_s=1),
            ShopSpec("flaky", "Brazil", "flaky", error_rate=0.5),
            ShopSpec("onion", "Argentina", "socks_only"),
            ShopSpec("slow", "Chile", "slow", latency_ms=300),
        )
    )
    with ShopWorld(config) as world:
        yield world


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": UA, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_products_are_deterministic_by_seed():
    a = shop_products(ShopSpec("x", "India", n_products=30, seed=5))
    assert a == shop_products(ShopSpec("x", "India", n_products=30, seed=5))
    assert a != shop_products(ShopSpec("x", "India", n_products=30, seed=6))
    assert len({p["id"] for p in a}) == 30 and a[0]["currency"] == "INR"


def test_catalog_pages_have_20_products_and_match_the_truth(shops: ShopWorld):
    shop = shops["plain"]
    truth = shop.products()
    seen = []
    url = shop.catalog_url(1)
    pages = 0
    while url:
        status, _, body = get(url)
        assert status == 200
        tree = LexborHTMLParser(body)
        items = tree.css("li.product")
        assert len(items) == (20 if pages < 2 else 5)
        for li in items:
            seen.append(
                {
                    "id": li.attributes["data-id"],
                    "name": li.css_first(".name").text(),
                    "price": li.css_first(".price").text(),
                    "sku": li.css_first(".sku").text(),
                }
            )
        nxt = tree.css_first("a.next")
        url = shop.base_url + nxt.attributes["href"] if nxt else None
        pages += 1
    assert pages == 3 == shop.spec.pages
    assert seen == [{k: p[k] for k in ("id", "name", "price", "sku")} for p in truth]
    assert get(shop.catalog_url(4))[0] == 404


def test_product_page_and_api(shops: ShopWorld):
    shop = shops["plain"]
    p = shop.products()[7]
    status, _, body = get(shop.url(f"/product/{p['id']}"))
    tree = LexborHTMLParser(body)
    assert status == 200 and tree.css_first(".product-detail .name").text() == p["name"]
    assert tree.css_first(".price").text() == p["price"]
    assert get(shop.url("/product/NOPE"))[0] == 404
    assert get(shop.url("/api/products?page=1"))[0] == 401
    status, _, body = get(shop.url("/api/products?page=3"), {"Authorization": f"Bearer {TOKEN}"})
    doc = json.loads(body)
    assert status == 200 and doc["next"] is None and len(doc["items"]) == 5
    assert doc["items"] == shop.products()[40:]


def test_js_challenge_needs_the_cookie_a_script_sets(shops: ShopWorld):
    shop = shops["guarded"]
    status, headers, body = get(shop.catalog_url(1))
    assert status == 503 and headers["cf-mitigated"] == "challenge"
    assert b"Just a moment..." in body and b"_cf_chl_opt" in body
    token = clearance_token(shop.spec, UA, "127.0.0.1")
    status, _, body = get(shop.catalog_url(1), {"Cookie": f"ff_clearance={token}"})
    assert status == 200 and b'class="product"' in body
    # bound to the User-Agent, like cf_clearance
    other = get(shop.catalog_url(1), {"Cookie": f"ff_clearance={token}", "User-Agent": "curl/8"})
    assert other[0] == 503


def test_captcha_for_non_browsers_is_a_200_page(shops: ShopWorld):
    status, _, body = get(shops["captcha"].catalog_url(1), {"User-Agent": "python-urllib/3"})
    assert status == 200 and b"g-recaptcha" in body and b"ff_js" not in body
    status, _, body = get(shops["captcha"].catalog_url(1))
    assert status == 200 and b"g-recaptcha" in body and b"ff_js=" in body  # a script to run


def test_rate_limit_answers_429_with_retry_after(shops: ShopWorld):
    shop = shops["limited"]
    statuses = [get(shop.catalog_url(1))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    status, headers, body = get(shop.catalog_url(1))
    assert status == 429 and headers["retry-after"] == "1" and b"Too Many Requests" in body
    time.sleep(1.1)
    assert get(shop.catalog_url(1))[0] == 200
    stats = shops.stats("limited")
    assert stats["rate_limited"] == 2 and stats["early_retries"] == 1


def test_flaky_and_slow(shops: ShopWorld):
    statuses = [get(shops["flaky"].catalog_url(1))[0] for _ in range(40)]
    errors = sum(s >= 500 for s in statuses)
    assert 8 <= errors <= 32 and set(statuses) <= {200, 500, 502, 503}
    t0 = time.monotonic()
    assert get(shops["slow"].catalog_url(1))[0] == 200
    assert time.monotonic() - t0 >= 0.28


def test_socks_only_shop_denies_direct_clients(shops: ShopWorld):
    status, _, body = get(shops["onion"].catalog_url(1))
    assert status == 403 and b"cf-error-code" in body
    assert shops.socks_proxy.startswith("socks5://127.0.0.5:")


def test_sim_world_starts_and_stops_the_shops():
    config = ShopsConfig((ShopSpec("w", "India", n_products=5),))
    with SimWorld(WorldConfig(n_proxies=2, shops=config)) as world:
        assert world.shops is not None
        url = world.shops["w"].catalog_url(1)
        assert get(url)[0] == 200
        assert world.endpoints()["shops"]["shops"]["w"]["products"] == 5
        pid = world.shops.pid
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
