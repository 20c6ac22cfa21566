"""A TCP relay that counts the connections made through it: what tests put in front of a
proxy or a gateway member to see how many connections a client opened to it; and the
canary check through such relays (tests/test_integrity.py, tests/test_real_proxies.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from fetchers.integrity import IntegrityCheck
from fetchers.proxy_check import CheckResult, Outcome
from fetchers.proxy_parse import ProxySpec


class CountingRelay:
    """Listens on 127.0.0.1 (any port), copies bytes both ways to ``target``, and counts the
    connections it accepted in ``accepted``. Runs in the caller's event loop."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        """Start listening; the port to connect to."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            with contextlib.suppress(Exception):
                b.close()

        with contextlib.suppress(asyncio.CancelledError):  # the test's loop is ending
            await asyncio.gather(pipe(r, uw), pipe(ur, w))


async def verify_counting(
    canary_url: str, cases: dict[str, tuple[ProxySpec, str]], timeout: float = 3.0
) -> dict[str, tuple[str | None, int]]:
    """Each case's integrity verdict through a counting relay in front of its proxy, with
    the connections the canary opened to it: name -> (integrity, connections)."""
    check = IntegrityCheck(canary_url, timeout)
    await check.start()
    out = {}
    for name, (spec, protocol) in cases.items():
        relay = CountingRelay((spec.host, spec.port))
        port = await relay.start()
        try:
            alive = CheckResult(Outcome.ALIVE, True, protocol=protocol)
            deadline = asyncio.get_running_loop().time() + timeout
            via = dataclasses.replace(spec, host="127.0.0.1", port=port)
            result = await check.verify(via, alive, deadline)
            out[name] = (result.integrity, relay.accepted)
        finally:
            relay.close()
    return out
