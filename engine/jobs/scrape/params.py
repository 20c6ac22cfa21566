"""The ``scrape`` kind's parameters: the one place for their bounds, defaults and flags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from engine.jobs.params import TaskParams, param

STRATEGIES = ("adaptive", "round_robin", "least_connections", "weighted")


class ScrapeParams(TaskParams):
    """A spec (a file, or its text with a name and the directory its paths are relative to)
    and what narrows or routes the run."""

    kind = "scrape"
    stop_metrics = (
        "error_ratio",
        "blocked_ratio",
        "http_429",
        "browser_s",
        "proxy_mb",
        "no_progress",
    )
    default_stop_rules = ("blocked_ratio>0.8/50", "no_progress>30m")

    spec: str | None = param(None, description="the scrape spec (TOML)", metavar="FILE")
    spec_text: str | None = param(None, description="the spec's TOML text", cli=False)
    spec_name: str | None = param(None, description="the spec's name in messages", cli=False)
    base_dir: str | None = param(
        None, description="where the spec's start_urls_file paths are relative to", cli=False
    )
    file_roots: tuple[str, ...] | None = param(
        None,
        description="the only directories files may be read from (the console: specs/ and "
        "the uploads); none: anywhere (the CLI)",
        cli=False,
    )
    country: str | None = param(None, description="only this country's sources of the spec")
    methods: tuple[str, ...] | None = param(
        None,
        description="fetch order for this run, e.g. http,playwright (default: the spec's, "
        "else the country's row of the policy)",
        metavar="LIST",
    )
    max_pages: int | None = param(
        None,
        description="stop registering new pages after N (default: the spec's cap, or none)",
        label="max pages",
        metavar="N",
        ge=1,
    )
    proxies: str | None = param(
        None,
        description="route through the stored proxies with this status (e.g. active)",
        metavar="STATUS",
    )
    strategy: Literal["adaptive", "round_robin", "least_connections", "weighted"] = param(
        "adaptive", description="proxy selection with --proxies", label="the strategy"
    )
    files_dir: str | None = param(
        None, description="where downloaded files go (default: data/files)", metavar="DIR"
    )

    @field_validator("proxies")
    @classmethod
    def _routable(cls, value: str | None) -> str | None:
        """Never through proxies that modify content (the `tampering` status)."""
        if value in ("tampering",):
            raise ValueError(
                "proxies with status 'tampering' modify the content they relay and are never "
                "used: route through 'active' ones"
            )
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        """'http,playwright' or a list: known method names, in order, each once."""
        from fetchers.cascade import parse_methods

        if value is None or value == [] or value == ():
            return None
        return tuple(parse_methods(value))  # PolicyError (a ValueError) names the bad one
