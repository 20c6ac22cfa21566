"""The ``backfill`` kind: a long ID list through a rate-limited JSON API."""

from engine.jobs.registry import KindInfo, PageInfo

KIND = KindInfo(
    name="backfill",
    title="Backfill",
    job="engine.jobs.backfill.kind:BackfillJob",
    cli="engine.jobs.backfill.cli:add_commands",
    page=PageInfo("pages/backfill.py", "Backfill", ":material/history:"),
    order=30,
)
