"""Job kinds by name, imported lazily so a worker loads only what its runs need."""

from __future__ import annotations

import importlib

from engine.jobs.base import JobKind
from engine.settings import Settings

KINDS: dict[str, str] = {
    "validate": "engine.jobs.validate:ValidateJob",
    "backfill": "engine.jobs.backfill:BackfillJob",
    "scrape": "engine.jobs.scrape:ScrapeJob",
    "pipeline": "engine.jobs.pipeline:PipelineJob",
}


def get_kind(name: str, settings: Settings) -> JobKind:
    try:
        module, cls = KINDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}: one of {', '.join(KINDS)}") from None
    return getattr(importlib.import_module(module), cls)(settings)
