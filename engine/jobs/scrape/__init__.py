"""The ``scrape`` kind: a spec's sources through the fetcher cascade, entities stored."""

from engine.jobs.registry import KindInfo, PageInfo

KIND = KindInfo(
    name="scrape",
    title="Scraping",
    job="engine.jobs.scrape.kind:ScrapeJob",
    cli="engine.jobs.scrape.cli:add_commands",
    page=PageInfo("pages/scraping.py", "Scraping", ":material/travel_explore:"),
    order=20,
)
