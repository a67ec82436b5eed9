"""Robust aggregation: refuse updates whose size is far outside what the others' have been.

NaN and Inf are rejected on arrival; this catches the finite but absurd (a gradient of norm 1e30, a
weights push that would throw the model away). For every rank the server keeps the norms of its last
`per_rank` accepted updates; the reference pools as many from each rank, so each weighs the same however
often it pushes (a flood of one peer's tiny no-op pushes cannot drag the median to zero and lock an
honest worker out, nor can a flood of large ones raise it). An update is rejected when its norm is
above median + k * MAD of that pool (the MAD floored at a tenth of the median, so a stretch of
near-identical norms does not make every wobble an outlier), or above a prior: the most one update can
honestly move, derived by the server from the config and the model (ServerBase.norm_prior). Until a
rank has `min_history` accepted updates of its own, only the prior applies to it.

This holds while honest ranks are the majority of the pool: a majority of ranks pushing in concert can
move the median, and then only the prior bounds them. Plain values in, a verdict out: no sockets, no clock.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any


class NormFilter:
    def __init__(self, k: float = 20.0, per_rank: int = 16, min_history: int = 4):
        self.k, self.per_rank, self.min_history = k, per_rank, min_history
        self.norms: dict[int, deque[float]] = {}
        self.rejected = 0

    def threshold(self) -> float | None:
        """median + k * MAD of the ranks' recent accepted norms, as many from each rank (the last m, m the
        shortest history past its warm-up); None while no rank is past its warm-up."""
        ready = [h for h in self.norms.values() if len(h) >= self.min_history]
        if not ready:
            return None
        m = min(len(h) for h in ready)
        pool = [n for h in ready for n in list(h)[-m:]]
        median = statistics.median(pool)
        mad = statistics.median(abs(n - median) for n in pool)
        return median + self.k * max(mad, 0.1 * median)

    def check(self, rank: int, norm: float, prior: float | None = None) -> str:
        """Why an update of this norm from `rank` is refused, or "" when it may be applied."""
        if prior is not None and norm > prior:
            return f"update norm {norm:.4g} is above {prior:.4g}, the most one update can honestly move"
        if len(self.norms.get(rank, ())) < self.min_history:
            return ""
        limit = self.threshold()
        if limit is not None and norm > limit:
            return f"update norm {norm:.4g} is far above the recent ones (median + {self.k:g} MAD = {limit:.4g})"
        return ""

    def accept(self, rank: int, norm: float) -> None:
        self.norms.setdefault(rank, deque(maxlen=self.per_rank)).append(norm)

    def summary(self) -> dict[str, Any]:
        limit = self.threshold()
        return {"enabled": True, "k": self.k, "per_rank": self.per_rank, "rejected": self.rejected,
                "threshold": None if limit is None else round(limit, 6)}


class MovementLedger:
    """How far the model has moved since each recent version: the running sum of the norms of the updates
    applied, one entry per version. A weights push is the worker's own progress minus everyone's since its
    base version, so its norm minus the movement since that base is a lower bound on what the worker itself
    did (the triangle inequality) — a number staleness does not inflate. Updates whose movement is not
    known are recorded as 0, which only makes the bound looser, never unsafe. Keeps the last `window`
    versions; a base older than that is measured from the oldest one kept."""

    def __init__(self, window: int = 4096):
        self.window = window
        self._sums: deque[float] = deque(maxlen=window)
        self._last = 0  # the version of the newest entry

    def record(self, version: int, moved: float) -> None:
        """The model reached `version` by moving `moved` (an L2 norm) from the version before."""
        if not self._sums or version != self._last + 1:  # first entry, or a gap (a resume): start afresh
            self._sums = deque([0.0], maxlen=self.window)
        self._sums.append(self._sums[-1] + moved)
        self._last = version

    def since(self, version: int) -> float:
        """The movement from `version` to now (at most: the sum of the norms, not the norm of the sum)."""
        if not self._sums:
            return 0.0
        first = self._last - len(self._sums) + 1
        return self._sums[-1] - self._sums[max(0, min(version - first, len(self._sums) - 1))]
