"""SyncPS's adaptive straggler deadline (`timeout: auto`): close each step at the median plus k MADs of the
recent arrival delays, bounded below and above.

An arrival delay is how long after a step opened a worker's push for it arrived, on time or late. Pooled
over every worker, the recent delays are mostly the fast workers': a straggler that misses the deadline
pushes once every few steps, so its delays are a minority of the window and the median and MAD stay where
the fast workers are. A deadline set too short corrects itself: the pushes it cuts arrive late, their
delays enter the window and lift it. With equal workers the spread of their arrivals (they queue behind
each other at the server) is what the MAD measures, so the deadline sits above the last of them.

Until `warmup` delays are in, the deadline is the upper bound (every step waits for everyone, up to it).
The MAD is floored at MAD_FLOOR of the median: identical delays (a coarse clock, a quiet machine) would
otherwise put the deadline on the median and cut half the workers.

Plain numbers in, a deadline out: no sockets, no clock. The server passes the delays it measured.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

MAD_FLOOR = 0.1  # the MAD counts as at least this fraction of the median


class AdaptiveDeadline:
    def __init__(self, k: float = 3.0, window: int = 64, lower: float = 0.001, upper: float = 10.0,
                 warmup: int | None = None):
        if not 0 <= lower <= upper:
            raise ValueError(f"deadline bounds must satisfy 0 <= lower <= upper, got {lower}, {upper}")
        self.k, self.lower, self.upper = k, lower, upper
        self.delays: deque[float] = deque(maxlen=window)
        self.warmup = warmup if warmup is not None else max(4, window // 4)
        self.used: list[float] = []  # the deadline of every step so far (for the summary)
        self.warmup_steps = 0  # steps that opened before `warmup` delays were in

    def observe(self, delay: float) -> None:
        """One push arrived `delay` seconds after its step opened."""
        if delay >= 0:
            self.delays.append(delay)

    def seconds(self) -> float:
        """The deadline of the next step, in seconds from its opening."""
        if len(self.delays) < self.warmup:
            return self.upper
        median = statistics.median(self.delays)
        mad = statistics.median(abs(d - median) for d in self.delays)
        return min(self.upper, max(self.lower, median + self.k * max(mad, MAD_FLOOR * median)))

    def next_step(self) -> float:
        """The deadline of a step that opens now (remembered for the summary)."""
        self.warmup_steps += len(self.delays) < self.warmup
        self.used.append(self.seconds())
        return self.used[-1]

    def summary(self) -> dict[str, Any]:
        used = self.used or [self.seconds()]
        return {"mode": "auto", "k": self.k, "window": self.delays.maxlen, "min_s": self.lower, "max_s": self.upper,
                "median_s": round(statistics.median(used), 6), "last_s": round(used[-1], 6),
                "warmup_steps": self.warmup_steps}
