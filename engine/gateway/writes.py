"""The writes of one loop pass, held and written together at its end.

Why: on loopback every `transport.write` runs the peer's receive path in the kernel and wakes
the peer (a member, the origin, the load generator), which can preempt the gateway's one
event loop in the middle of the batch of callbacks it is running, stalling every request it
holds. Writing at the end of the pass wakes the peers in a burst, as squid (which writes
when epoll reports writability) does.

`Batched` wraps a connection's transport: `write` appends to the connection's pending bytes
and marks it dirty; one `loop.call_soon` per pass (`Flusher.flush`) writes each dirty
connection's bytes in one call. Order is kept: `close` and `write_eof` write the pending
bytes first; `abort` drops them (as the transport would drop its own buffer).

With few client connections open (`BATCH_FROM`) writes go out at once: there is no batch for
a woken peer to stall, and a deferred write costs a loop pass (measured: more CPU and less
requests/s at one client).
"""

from __future__ import annotations

import asyncio
from typing import Any

BATCH_FROM = 8  # client connections open from which a loop pass's writes wait for its end


class Flusher:
    """The loop's dirty connections and the one pending flush."""

    __slots__ = ("batching", "dirty", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[Batched] = []
        self.batching = False  # set by the gateway from its open client connections

    def connections(self, n: int) -> None:
        self.batching = n >= BATCH_FROM

    def mark(self, conn: Batched) -> None:
        if not self.dirty:
            self.loop.call_soon(self.flush)
        self.dirty.append(conn)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()


class Batched:
    """A transport whose writes wait for the end of the loop pass (see the module)."""

    __slots__ = ("flusher", "pending", "real")

    def __init__(self, real: Any, flusher: Flusher) -> None:
        self.real = real
        self.flusher = flusher
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        pending = self.pending
        if not pending:
            flusher = self.flusher
            if not flusher.batching:
                self.real.write(data)
                return
            flusher.mark(self)
        pending.append(data)

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        self.pending = []
        real = self.real
        if real.is_closing():
            return
        if len(pending) == 1:
            real.write(pending[0])
        else:
            real.writelines(pending)

    def close(self) -> None:
        self.flush()
        self.real.close()

    def abort(self) -> None:
        self.pending = []
        self.real.abort()

    def write_eof(self) -> None:
        self.flush()
        self.real.write_eof()

    def can_write_eof(self) -> bool:
        return bool(self.real.can_write_eof())

    def is_closing(self) -> bool:
        return bool(self.real.is_closing())

    def pause_reading(self) -> None:
        self.real.pause_reading()

    def resume_reading(self) -> None:
        self.real.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.real.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return int(self.real.get_write_buffer_size()) + sum(map(len, self.pending))
