"""Example pipelines: a shop walked page by page, then its product pages, then a legacy script.

Try them against the sim shops (`python -m sim.shops` prints their URLs):

    export EXAMPLE_SHOP_URL=http://127.0.0.4:PORT      # any catalog like the sim's
    python -m engine.run pipeline examples/pipelines.py:shop
    python -m engine.run pipeline examples/pipelines.py:legacy --country India
    python -m engine.run pipeline examples/pipelines.py --list

`shop` stores `product` entities from the catalog (`li.product`, `a.next`), then a
`product_detail` entity per product page, then runs examples/legacy_scraper.py. Each step
keeps a cursor in ``ctx.state`` saved with every ``ctx.store``, so a stopped or killed run
resumes where it was: `python -m engine.run pipeline --resume RUN_ID`.

EXAMPLE_PAGE_DELAY_S slows the catalog walk down (to try a stop in the middle of it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urljoin

from selectolax.lexbor import LexborHTMLParser

from engine.pipelines.runner import Pipeline, ScriptStep, StepContext, register

LEGACY = Path(__file__).with_name("legacy_scraper.py")
MAX_PAGES = 1000  # every loop is bounded


def start_url() -> str:
    url = os.environ.get("EXAMPLE_SHOP_URL", "http://127.0.0.4:8080")
    return url if "/catalog" in url else url.rstrip("/") + "/catalog?page=1"


def catalog(ctx: StepContext) -> None:
    """Walk the catalog: one fetch, one store (entities + cursor) per page."""
    delay = float(os.environ.get("EXAMPLE_PAGE_DELAY_S", "0"))
    url = ctx.state.get("next", start_url())
    while url and ctx.state.get("pages", 0) < MAX_PAGES:
        ctx.check_stop()
        result = ctx.fetch(url, selectors=["li.product"])
        if not result.success:
            raise RuntimeError(f"{url}: {result.error_type} {result.error}")
        tree = LexborHTMLParser(result.content)
        products = []
        for li in tree.css("li.product"):
            link = li.css_first("a.product-link")
            products.append(
                {
                    "id": li.attributes.get("data-id"),
                    "name": li.css_first(".name").text(strip=True),
                    "price": li.css_first(".price").text(strip=True),
                    "sku": li.css_first(".sku").text(strip=True),
                    "url": urljoin(url, link.attributes.get("href") or "") if link else None,
                }
            )
        nxt = tree.css_first("a.next")
        ctx.state["next"] = urljoin(url, nxt.attributes["href"]) if nxt else None
        ctx.state["pages"] = ctx.state.get("pages", 0) + 1
        ctx.store("product", products)
        ctx.log(f"page {ctx.state['pages']}: {len(products)} products ({url})")
        url = ctx.state["next"]
        if delay:
            time.sleep(delay)


def details(ctx: StepContext) -> None:
    """Each product's own page, read from what `catalog` stored, 20 at a time."""
    while True:
        ctx.check_stop()
        batch = ctx.stored("product", after=ctx.state.get("after"), limit=20)
        if not batch:
            break
        found = []
        for product in batch:
            if not product.get("url"):
                continue
            result = ctx.fetch(product["url"], selectors=[".product-detail"])
            if not result.success:
                ctx.log(f"{product['id']}: {result.error_type}")
                continue
            tree = LexborHTMLParser(result.content)
            stock = tree.css_first(".stock")
            found.append(
                {
                    "id": product["id"],
                    "in_stock": stock is not None and stock.text(strip=True) == "in stock",
                    "url": product["url"],
                }
            )
        ctx.state["after"] = batch[-1]["id"]
        ctx.store("product_detail", found)
        ctx.log(f"details up to {batch[-1]['id']}: {len(found)} pages")


shop = register(Pipeline("shop", "Malaysia"))
shop.step(catalog)
shop.step(details)
shop.add(ScriptStep("legacy", [sys.executable, str(LEGACY), "--lines", "5"]))

# A pipeline for any country (`--country`): just the legacy script, slowly.
legacy = register(Pipeline("legacy", None))
legacy.add(
    ScriptStep("legacy", [sys.executable, str(LEGACY), "--lines", "50", "--interval", "0.1"])
)
