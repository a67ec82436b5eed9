"""Robust aggregation: refuse updates whose size is far outside what the honest ones have been.

NaN and Inf are rejected on arrival; this catches the finite but absurd (a gradient of norm 1e30, a
weights push that would throw the model away). The server keeps the norms of the last `window`
updates it accepted and rejects one above median + k * MAD of them. The MAD is floored at a tenth of
the median, so a stretch of near-identical norms does not make every small wobble an outlier. Until
`min_history` norms are in, an update is checked against a prior instead: an upper bound the server
derives from the config and the model (see ServerBase.norm_prior). Plain values in, a verdict out: no
sockets, no clock.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any


class NormFilter:
    def __init__(self, k: float = 20.0, window: int = 64, min_history: int = 8):
        self.k, self.window, self.min_history = k, window, min_history
        self.norms: deque[float] = deque(maxlen=window)
        self.rejected = 0

    def threshold(self) -> float | None:
        """The largest norm accepted now; None until there is enough history."""
        if len(self.norms) < self.min_history:
            return None
        median = statistics.median(self.norms)
        mad = statistics.median(abs(n - median) for n in self.norms)
        return median + self.k * max(mad, 0.1 * median)

    def check(self, norm: float, prior: float | None = None) -> str:
        """Why an update of this norm is refused, or "" when it may be applied."""
        limit = self.threshold()
        if limit is not None:
            if norm > limit:
                return f"update norm {norm:.4g} is far above the recent ones (limit median + {self.k:g} MAD = {limit:.4g})"
        elif prior is not None and norm > prior:
            return f"update norm {norm:.4g} is above {prior:.4g}, the most an update can move before there is a history"
        return ""

    def accept(self, norm: float) -> None:
        self.norms.append(norm)

    def summary(self) -> dict[str, Any]:
        limit = self.threshold()
        return {"enabled": True, "k": self.k, "window": self.window, "rejected": self.rejected,
                "threshold": None if limit is None else round(limit, 6)}
