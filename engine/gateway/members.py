"""The gateway's members: the stored pool, filtered by status, country, anonymity and type,
read again every `refresh_s` so validation runs that change the pool change the gateway.

Passwords are decrypted in memory only (`storage.secrets.SecretBox`, as the fetchers do). The
database is opened for each read and closed after it: with DuckDB the file is then free for
the console or a validation run between reads (one read-write process at a time); when it is
busy, or PostgreSQL is restarting, the gateway keeps its last members and says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fetchers.pool import ProxyPool, ProxyState
from fetchers.proxy_parse import ProxySpec

log = logging.getLogger(__name__)

MAX_MEMBERS = 100_000


@dataclass(frozen=True, slots=True)
class Member:
    """What the gateway knows of a member beyond its address (the pool state's `meta`)."""

    protocol: str  # http, https, socks4, socks5
    country: str | None
    anonymity: str | None
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class MemberFilter:
    status: str = "active"
    countries: frozenset[str] = frozenset()
    anonymity: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.status == "tampering":
            raise ValueError(
                "--status tampering: those proxies modify the content they relay and are never "
                "gateway members; serve 'active' ones"
            )

    def accepts(self, m: Member) -> bool:
        return (
            (not self.countries or (m.country or "").upper() in self.countries)
            and (not self.anonymity or (m.anonymity or "") in self.anonymity)
            and (not self.types or m.protocol in self.types)
        )


Row = Sequence[object]


def members_from_rows(
    rows: Sequence[Row], flt: MemberFilter, decrypt: Callable[[str | None], str | None]
) -> list[tuple[tuple[ProxySpec, float], Member]]:
    """Rows of `storage.proxies.gateway_members` → (spec, weight), Member pairs. The weight
    (for the `weighted` strategy until the gateway has measured a member) is the inverse of
    the stored latency."""
    out = []
    for _key, protocol, scheme, host, port, user, pw_enc, country, anonymity, latency in rows:
        proto = str(protocol or scheme or "http")
        member = Member(
            proto,
            str(country).upper() if country else None,
            str(anonymity) if anonymity else None,
            float(latency) if latency is not None else None,  # type: ignore[arg-type]
        )
        if not flt.accepts(member):
            continue
        spec = ProxySpec(
            proto,
            str(host),
            int(port),  # type: ignore[arg-type]
            str(user) if user else None,
            decrypt(pw_enc),  # type: ignore[arg-type]
        )
        weight = 1000.0 / (member.latency_ms + 50.0) if member.latency_ms else 1.0
        out.append(((spec, weight), member))
    return out


def member_of(state: ProxyState) -> Member:
    m = state.meta
    assert isinstance(m, Member)
    return m


class MemberSource:
    """Reads the members from the database into the pool, now and every `refresh_s`."""

    def __init__(
        self,
        db_url: str,
        flt: MemberFilter,
        pool: ProxyPool,
        decrypt: Callable[[str | None], str | None],
        refresh_s: float = 30.0,
        reader: Callable[[str], list[Row]] | None = None,
    ) -> None:
        self.db_url = db_url
        self.reader = reader  # the console passes its own open database's read
        self.filter = flt
        self.pool = pool
        self.decrypt = decrypt
        self.refresh_s = refresh_s
        self.last_error: str | None = None
        self.loads = 0

    def read(self) -> list[Row]:
        from engine.cli.common import open_database
        from storage.proxies import gateway_members

        if self.reader is not None:
            return self.reader(self.filter.status)
        db = open_database(self.db_url)
        try:
            with db.connect() as conn:
                return gateway_members(conn, self.filter.status, MAX_MEMBERS)
        finally:
            db.dispose()

    def load(self, rows: Sequence[Row]) -> int:
        members = members_from_rows(rows, self.filter, self.decrypt)
        added, removed = self.pool.update(members)
        if added or removed:
            log.info("gateway members: %d (+%d, -%d)", len(members), added, removed)
        self.loads += 1
        return len(members)

    def refresh(self) -> int:
        return self.load(self.read())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_s)
                return
            except TimeoutError:
                pass
            try:
                rows = await asyncio.to_thread(self.read)
            except Exception as e:  # busy DuckDB file, PostgreSQL restarting: keep serving
                if str(e) != self.last_error:
                    log.warning("gateway: cannot refresh members (keeping %d): %s",
                                len(self.pool), e)  # fmt: skip
                self.last_error = str(e)
                continue
            self.last_error = None
            self.load(rows)
