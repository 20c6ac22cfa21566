"""The margin J follows the jitter measured, and is one number per key for every process.

Why measured: J is how much later than its slot a request may reach the server's counter
(``engine.ratelimit.base``), and it is paid for in throughput, ``W / (W + J)``. A fixed 0.1 s
cost 10 % of a 1 s window on a machine whose sends left their slots within 5 ms; a machine
under load, or a server that stalls, needs more. What one process can measure (``Lateness``):

- how late it wakes for its slots (the ``Gate``). A slot used too late is dropped, never sent,
  so this part is enforced; its 99th percentile sets how much room it gets;
- how the time to each answer varies within a window (the job reports it): a request that
  queued on the way or waited in a stalled server before the server counted it comes back
  late by at least as much, and the window it overfills is the one in which a request is
  counted late and a later one on time, so the largest such fall counts (a request on its
  way cannot be called back). It also counts the server's own variable work after counting
  (the sim's 5–25 ms), which only widens J: an API whose answer time varies by 300 ms costs
  0.3 s of margin, which ``--rate-margin`` overrides when the server is known to count on
  arrival. A delay that every answer shares, or that changes slowly (nginx pacing answers
  through its leaky bucket), costs nothing or little.

A process asks for ``2 * wake + path``. A stall is seen in the answers within a round trip,
and the window it could overfill ends W after it: the wider spacing of the rest of that window
makes the room, which is why a fall is asked for during two windows after it was seen (the
wake-ups, a percentile, over ``HORIZON_S`` or the window if longer). A 429 doubles the ask:
the server saw us closer than J allowed.

Why shared: every grant advances the key's one schedule by its own interval ``T(J)``, so the
window bound holds only for the smallest J in use. The key's margin is therefore stored next
to its TAT (the mmap'd file's slot, the ``rate_limits`` row, the ``MemoryLimiter``'s dict) and
every grant updates it in the same step as the TAT:

    J_key = min(cap, max(floor, ask, floor + (J_key - floor) * 2 ** (-age / HALF_LIFE_S)))

so all processes use the largest recent ask, and without asks above it J_key returns to the
floor (half the excess gone every ``HALF_LIFE_S``; a process that still measures a stall keeps
asking for it, so the decay only forgets processes that stopped asking). The floor covers what no process measures: the server's clock running at
another rate than ours (NTP slews a clock by up to 500 ppm, so two clocks may disagree on W
by 0.1 %) and the first requests, sent before anything was measured. ``--rate-margin`` given
explicitly is used as it is (the user's word), and is still reported so that adaptive runs on
the same key use at least it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

HALF_LIFE_S = 10.0  # the key's margin loses half its excess over the floor in this time
HORIZON_S = 30.0  # a process forgets its wake-ups after this, or after the window if longer
SAMPLES = 2048  # at most this many kept per process and key
TOP_SHARE = 0.01  # the latest wake-ups beyond this percentile are dropped slots, not asks


def next_margin(
    stored: float, stored_at: float, now: float, ask: float, floor: float, cap: float
) -> float:
    """The key's margin after one grant (the formula in the module docstring)."""
    if not math.isfinite(stored) or stored < floor:
        stored = floor
    if not math.isfinite(ask):
        ask = 0.0
    age = max(0.0, now - stored_at) if math.isfinite(stored_at) else HALF_LIFE_S * 64
    decayed = floor + (stored - floor) * 0.5 ** min(age / HALF_LIFE_S, 64.0)
    return min(cap, max(floor, ask, decayed))


class Lateness:
    """What one process measured of one key: its wake-ups over ``HORIZON_S`` (or the window if
    longer), its answers over two windows:

    - ``woke(late)``: how late it woke for a slot (the ``Gate``); ``wake`` is the 99th
      percentile (with fewer than 100 samples, the largest): a later slot is dropped, so a
      rare stall costs one slot, not a wider margin for everyone;
    - ``answered(seconds)``: how long after the send the answer's head came. What overfills a
      window is a request counted late followed, within the window, by one counted on time,
      so ``path`` is the largest *fall*: how much faster an answer came than the slowest one
      of the window before it. A stall (a server not scheduled, a queue on the way) shows as
      a fall the size of the stall; a delay that comes and goes slowly (a leaky bucket that
      paces its answers) as the little it changes within a window; a constant one not at all.

    ``refused(margin)`` (a 429) makes the ask at least twice that margin for the horizon.

    ``ask() = 2 * wake + path``. The Gate uses a slot at most ``(J - path) / 2`` late: ``wake``
    when this process asked for the key's J, leaving as much again for what happens between
    the check and the send, and ``path`` for the way to the server.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, window_s: float = HORIZON_S
    ) -> None:
        self.clock = clock
        self.window_s = window_s
        self.horizon_s = max(HORIZON_S, window_s)  # of the wake-ups and a refusal
        self.fall_horizon_s = 2 * window_s
        self._woke: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        self._falls: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        # the answers of the last window that no later one was slower than (a sliding max)
        self._peaks: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        self._wake = self._path = 0.0
        self._computed_at = -math.inf
        self._dirty = False
        self._refused = 0.0  # an ask raised by a 429, forgotten like a sample
        self._refused_at = -math.inf

    def woke(self, late: float) -> None:
        late = max(0.0, late)
        self._woke.append((self.clock(), late))
        self._dirty = self._dirty or late > self._wake

    def answered(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        now, peaks = self.clock(), self._peaks
        while peaks and peaks[0][0] <= now - self.window_s:
            peaks.popleft()
        fall = max(0.0, peaks[0][1] - seconds) if peaks else 0.0
        while peaks and peaks[-1][1] <= seconds:
            peaks.pop()
        peaks.append((now, seconds))
        self._falls.append((now, fall))
        self._dirty = self._dirty or fall > self._path

    def refused(self, margin: float) -> None:
        """The server refused a request sent under ``margin``: ask for twice that."""
        self._refused = max(self._refused, 2 * margin)
        self._refused_at = self.clock()
        self._dirty = True

    @property
    def wake(self) -> float:
        self._update()
        return self._wake

    @property
    def path(self) -> float:
        self._update()
        return self._path

    def ask(self) -> float:
        ask = 2 * self.wake + self.path
        if self.clock() - self._refused_at < self.horizon_s:
            ask = max(ask, self._refused)
        return ask

    def _update(self) -> None:
        now = self.clock()
        if not self._dirty and now - self._computed_at < 0.1:
            return
        for samples, horizon in ((self._woke, self.horizon_s), (self._falls, self.fall_horizon_s)):
            while samples and samples[0][0] < now - horizon:
                samples.popleft()
        woke = sorted(v for _, v in self._woke)
        self._wake = woke[len(woke) - 1 - int(len(woke) * TOP_SHARE)] if woke else 0.0
        self._path = max((v for _, v in self._falls), default=0.0)
        self._computed_at, self._dirty = now, False
