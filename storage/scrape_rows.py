"""The scrape job's item and result rows, free of SQL imports: pool workers build them
(importing SQLAlchemy in every worker process would cost start-up time and memory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Entity", "PageResult", "UrlItem"]


@dataclass(slots=True)
class UrlItem:
    """An executable scrape item: one registered URL of a run."""

    id: int
    url: str
    depth: int
    country: str


class Entity(NamedTuple):
    """A tuple, read by the store the same way as the plain 4-tuple it travels as."""

    external_id: str
    content_hash: str
    attributes: list[tuple[str, str | None, str]]  # (name, value, value_type)
    source_url: str | None = None


@dataclass(slots=True)
class PageResult:
    """What a worker hands over for one page (lists of tuples: cheap to pickle)."""

    url_id: int
    url: str
    depth: int
    country: str
    status: str  # done, failed, blocked
    method: str | None = None
    http_status: int | None = None
    bytes: int = 0
    error_type: str | None = None
    error: str | None = None
    entities: list[Entity] = field(default_factory=list)  # or plain 4-tuples off the wire
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (entity key, reason)
    links: list[str] = field(default_factory=list)  # normalized absolute URLs to follow
    files: list[tuple[Any, ...]] = field(default_factory=list)
    # (url, path, sha256, bytes, content_type, status, error, external_id)
    attempts: list[tuple[Any, ...]] = field(default_factory=list)
    # (method, proxy, status, bytes, ms, error_type, blocked_reason, domain, avoided)
    fetched_at: Any = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    # (error type, message): what went wrong on the page without failing it (a bad link)
    snapshots: list[tuple[Any, ...]] = field(default_factory=list)
    # error snapshots made by the worker since its last page (fetchers.snapshots.Snapshot
    # wire tuples): rare, each kind once a worker

    def to_wire(self) -> tuple[Any, ...]:
        """Plain tuples for the trip to the coordinator: a slotted dataclass unpickles through
        Python-level ``__setstate__``, ~5x slower than a tuple, and the coordinator unpickles
        every page of every worker; an Entity (a NamedTuple) pickles through its class and
        ``__getnewargs__``, so entities travel as the plain tuples they are."""
        return (
            self.url_id,
            self.url,
            self.depth,
            self.country,
            self.status,
            self.method,
            self.http_status,
            self.bytes,
            self.error_type,
            self.error,
            [tuple(e) for e in self.entities],
            self.invalid,
            self.links,
            self.files,
            self.attempts,
            self.fetched_at,
            self.errors,
            self.snapshots,
        )

    @classmethod
    def from_wire(cls, t: tuple[Any, ...] | PageResult) -> PageResult:
        if isinstance(t, PageResult):
            return t
        return cls(*t)  # entities stay (external_id, hash, attributes, source_url) tuples
