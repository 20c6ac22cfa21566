"""The local pool's limiter: GCRA state in a small memory-mapped file shared by its processes.

Why an mmap'd file rather than a ``multiprocessing.Value`` handed to workers at spawn: the
state must outlive the coordinator. After ``kill -9`` of the CLI, ``backfill --resume``
starts a new coordinator and new workers; if they began from an empty schedule while the
old run had just spent its window, the server would see more than N in a window that
straddles the crash. A file beside the DuckDB database (``fetchfleet.duckdb.ratelimit``)
keeps every key's TAT across processes and restarts; orphaned workers still finishing their
last requests share the same schedule. The memory is shared (the page cache), the lock is
``flock`` on the file (held for microseconds: read one slot, compute, write it back).

Layout: a 64-byte header (magic, boot id) and ``SLOTS`` slots of 48 bytes: a 16-byte digest
of the key, then three doubles — the TAT, the key's margin J and when J was last set (both
times CLOCK_MONOTONIC seconds: one clock for every process of the machine) — and 8 spare
bytes. The monotonic clock restarts at boot, so a file written under another boot id is
cleared, and so is a file of another layout (another magic: the 32-byte slots of v001).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from pathlib import Path

from engine.ratelimit.base import KeyState, Rate, Slot, penalized, reserve_slot

MAGIC = b"FFRLv002"
HEADER = 64
SLOT = 48
SLOTS = 4096
SIZE = HEADER + SLOT * SLOTS
_STATE = struct.Struct("<ddd")  # TAT, margin, margin set at; after the 16-byte digest


def boot_id() -> bytes:
    try:
        return bytes.fromhex(
            Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        )
    except (OSError, ValueError):
        return b"\0" * 16


def shared_path_for(db_url: str | None, coordinator_pid: int | None = None) -> Path:
    """Beside the DuckDB file; for an in-memory database, per coordinator (by default our
    parent). The coordinator computes it for its pool workers, which do not import
    ``storage.db`` (SQLAlchemy)."""
    from storage.db import duckdb_path

    path = duckdb_path(db_url) if db_url else None
    if path is not None:
        return path.with_name(path.name + ".ratelimit")
    from engine.private_dir import private_dir  # not the shared /tmp: see private_dir

    pid = os.getppid() if coordinator_pid is None else coordinator_pid
    return private_dir() / f"ratelimit-{pid}.bin"


class SharedLimiter:
    """GCRA over an mmap'd file: every process that opens the same path shares the limits."""

    def __init__(self, path: Path | str, clock=time.monotonic) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # never through a symlink planted at our name (it would be truncated and written)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        self._tlock = threading.Lock()  # flock does not exclude threads sharing one fd
        with self._locked():
            if os.fstat(self._fd).st_size < SIZE:
                os.ftruncate(self._fd, SIZE)
            self._map = mmap.mmap(self._fd, SIZE)
            header = MAGIC + boot_id()
            if self._map[: len(header)] != header:
                self._map[:] = b"\0" * SIZE
                self._map[: len(header)] = header
        self._slots: dict[bytes, int] = {}

    @contextlib.contextmanager
    def _locked(self):
        with self._tlock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slot(self, key: str) -> int:
        """Offset of the key's slot (claimed on first use); call with the lock held."""
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if (off := self._slots.get(digest)) is not None:
            return off
        start = int.from_bytes(digest[:8], "little") % SLOTS
        for i in range(SLOTS):
            off = HEADER + ((start + i) % SLOTS) * SLOT
            found = self._map[off : off + 16]
            if found == digest:
                break
            if found == b"\0" * 16:
                self._map[off : off + 16] = digest
                _STATE.pack_into(self._map, off + 16, 0.0, 0.0, 0.0)
                break
        else:
            raise RuntimeError(f"rate-limit file {self.path} is full ({SLOTS} keys); delete it")
        self._slots[digest] = off
        return off

    def reserve_now(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        with self._locked():
            off = self._slot(key) + 16
            state = KeyState(*_STATE.unpack_from(self._map, off))
            slot = reserve_slot(state, self.clock(), rate, ask)
            _STATE.pack_into(self._map, off, state.tat, state.margin, state.margin_at)
        return slot

    def acquire_now(self, key: str, rate: Rate, ask: float = 0.0) -> float:
        """Seconds to wait for the next slot (``reserve_now``'s wait)."""
        return self.reserve_now(key, rate, ask).wait

    def margin_of(self, key: str) -> float:
        with self._locked():
            return _STATE.unpack_from(self._map, self._slot(key) + 16)[1]

    async def reserve(self, key: str, rate: Rate, ask: float = 0.0) -> Slot:
        return self.reserve_now(key, rate, ask)

    def penalize_now(self, key: str, rate: Rate, seconds: float) -> None:
        with self._locked():
            off = self._slot(key) + 16
            tat = penalized(_STATE.unpack_from(self._map, off)[0], self.clock(), seconds, rate)
            struct.pack_into("<d", self._map, off, tat)

    async def penalize(self, key: str, rate: Rate, seconds: float) -> None:
        self.penalize_now(key, rate, seconds)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    async def aclose(self) -> None:
        self.close()
