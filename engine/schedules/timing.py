"""When a schedule is due: a cron expression read in a time zone (croniter), or an interval.

Times in and out are naive UTC, the form the database stores; the zone only decides what a
cron expression means ("03:00 in Europe/Berlin" follows daylight saving time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter


@dataclass(frozen=True)
class Timing:
    cron: str | None = None
    every_s: float | None = None
    tz: str = "UTC"

    def check(self) -> None:
        """Raise ValueError saying what is wrong (one of cron/every, its syntax, the zone)."""
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give either a cron expression or an interval, not both")
        if self.every_s is not None and not self.every_s > 0:
            raise ValueError(f"interval {self.every_s}: must be more than zero seconds")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(
                f"cron {self.cron!r} is not a cron expression: five fields, minute hour "
                "day-of-month month day-of-week, e.g. '0 3 * * *' (03:00 every day)"
            )
        zone(self.tz)

    def next_after(self, now: datetime) -> datetime:
        """The first due time strictly after ``now`` (naive UTC)."""
        if self.every_s is not None:
            return now + timedelta(seconds=self.every_s)
        assert self.cron is not None
        local = now.replace(tzinfo=UTC).astimezone(zone(self.tz))
        nxt = croniter(self.cron, local).get_next(datetime)
        return nxt.astimezone(UTC).replace(tzinfo=None)

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz})"
        return f"every {format_seconds(self.every_s or 0)}"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"time zone {name!r} is unknown: write an IANA name like Europe/Berlin or UTC"
        ) from None


def format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
