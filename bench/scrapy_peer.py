"""The Scrapy peer of bench/scrape.py: a plain spider, the same selectors, JSON lines out.

    python bench/scrapy_peer.py URLS_FILE OUT.jsonl [--concurrency 64]

Reads one URL a line, fetches each page once, yields one item per `li.product` (data-id,
.name, .price, .price@data-currency, .sku, .category) to a JSON-lines feed. Scrapy's default
settings except: CONCURRENT_REQUESTS (and its per-domain cap, 8 by default: every page is on
one host here) raised to --concurrency, LOG_LEVEL WARNING, ROBOTSTXT_OBEY off (the default
outside a project; said explicitly), no telnet console (an unused port). Prints one JSON line
with the epoch marks (process ready, crawl started, crawl finished) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

READY = time.time()

import scrapy  # noqa: E402
from scrapy import signals  # noqa: E402
from scrapy.crawler import CrawlerProcess  # noqa: E402


class CatalogSpider(scrapy.Spider):
    name = "catalog"

    def __init__(self, urls_file: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.urls_file = urls_file

    async def start(self):  # Scrapy ≥ 2.13; lazily, like start_requests
        with open(self.urls_file) as fh:
            for line in fh:
                if url := line.strip():
                    yield scrapy.Request(url)

    def parse(self, response):
        for li in response.css("li.product"):
            yield {
                "id": li.attrib.get("data-id"),
                "name": li.css(".name::text").get(),
                "price": li.css(".price::text").get(),
                "currency": li.css(".price::attr(data-currency)").get(),
                "sku": li.css(".sku::text").get(),
                "category": li.css(".category::text").get(),
            }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("urls_file")
    ap.add_argument("out")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args(argv)
    process = CrawlerProcess(
        settings={
            "CONCURRENT_REQUESTS": args.concurrency,
            "CONCURRENT_REQUESTS_PER_DOMAIN": args.concurrency,
            "LOG_LEVEL": "WARNING",
            "ROBOTSTXT_OBEY": False,
            "TELNETCONSOLE_ENABLED": False,
            "FEEDS": {args.out: {"format": "jsonlines", "encoding": "utf-8", "overwrite": True}},
        }
    )
    marks: dict[str, float] = {}

    def opened() -> None:
        marks.setdefault("began", time.time())

    def closed() -> None:
        marks.setdefault("ended", time.time())

    crawler = process.create_crawler(CatalogSpider)
    # Scrapy's signals hold receivers weakly: these two live as long as main()
    crawler.signals.connect(opened, signals.spider_opened)
    crawler.signals.connect(closed, signals.spider_closed)
    process.crawl(crawler, urls_file=args.urls_file)
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    print(
        json.dumps(
            {
                "marks": [READY, marks.get("began", 0.0), marks.get("ended", 0.0)],
                "responses": stats.get("downloader/response_count", 0),
                "status_200": stats.get("downloader/response_status_count/200", 0),
                "items": stats.get("item_scraped_count", 0),
                "finish_reason": stats.get("finish_reason"),
            },
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
