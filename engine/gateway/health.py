"""Background health checks: members whose breaker is open (or half-open) are checked
against the judge every `interval_s`; one that passes gets its circuit closed at once instead
of waiting for a live request to be its trial. Without a judge URL the breaker's half-open
trial is the only way back."""

from __future__ import annotations

import asyncio
import logging

from engine.gateway.members import member_of
from fetchers.pool import ProxyPool

log = logging.getLogger(__name__)


class HealthChecker:
    def __init__(
        self, pool: ProxyPool, judge_url: str, interval_s: float = 15.0, timeout_s: float = 5.0
    ) -> None:
        self.pool = pool
        self.judge_url = judge_url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.checks = self.recovered = 0

    async def check_once(self) -> int:
        """Check the open members now; the number that came back."""
        from dataclasses import replace

        from fetchers.proxy_check import ProxyChecker

        states = self.pool.open_proxies()
        if not states:
            return 0
        back = 0
        async with ProxyChecker(self.judge_url, timeout=self.timeout_s) as checker:
            specs = [replace(s.spec, scheme=member_of(s).protocol) for s in states]
            results = await asyncio.gather(*(checker.check(spec) for spec in specs))
        for state, result in zip(states, results, strict=True):
            self.checks += 1
            if result.alive:
                self.pool.mark_healthy(state)
                back += 1
                log.info("gateway: %s passed its health check, back in rotation", state.redacted)
        self.recovered += back
        return back

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.check_once()
            except Exception as e:  # the judge is down: try again next round
                log.warning("gateway: health checks failed: %s", e)
