"""The process's budget for response bodies held while they are judged (block pages, cache).

Why: every plain-HTTP answer is read whole, up to `max_buffer_bytes` (4 MB), before the client
sees it, so failover can skip a block page. Without a shared bound that is 4 MB × every open
connection (4 GB at 1,024). With it, a connection asks the budget before it keeps more bytes;
when the budget is spent it stops buffering and streams the answer as it comes (that answer
then gets no block-page failover and is not cached). Heads are not counted: each is bounded
by `max_head_bytes` and must be whole before anything can be streamed.

One per process, used from the event loop's thread only (no locks).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BufferBudget:
    capacity: int  # bytes; 0 = buffer nothing (every answer streamed)
    used: int = 0
    peak: int = 0
    fallbacks: int = 0  # answers streamed because the budget was spent

    def reserve(self, n: int) -> bool:
        """Take `n` bytes if they fit; False leaves the budget as it was."""
        used = self.used + n
        if used > self.capacity:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, n: int) -> None:
        self.used -= n

    def snapshot(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "used": self.used,
            "peak": self.peak,
            "fallbacks": self.fallbacks,
        }


def parse_size(text: str) -> int:
    """'256MB', '64k', '1G', '1048576' → bytes (binary multiples, as memory is counted)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:] if t else "", 1)
    digits = t[:-1] if mult != 1 else t
    if not digits.strip().isdigit():
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 64KB, 1GB)")
    return int(digits) * mult
