"""A test's grip on a server's pace: let N answers go, hold every later one until released.

A run against a held server is in progress until the test releases it, however fast or
loaded the machine, so a test acts mid-run (kill a worker, cut a link) without racing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Hold:
    after: int | None = None  # answers still sent before holding (None: not holding)
    held: list[Callable[[], None]] = field(default_factory=list)  # sends waiting for release
    held_total: int = 0

    def hold(self, after: int) -> None:
        """Send ``after`` more answers, then hold every later one until ``release``."""
        self.after = max(0, after)

    def release(self) -> int:
        """Stop holding and send every held answer; returns how many there were."""
        self.after = None
        held, self.held = self.held, []
        for send in held:
            send()
        return len(held)

    def send_or_hold(self, send: Callable[[], None]) -> None:
        """Send an answer now, or keep it until ``release`` once the hold's quota is used."""
        if self.after is None:
            send()
        elif self.after > 0:
            self.after -= 1
            send()
        else:
            self.held_total += 1
            self.held.append(send)
