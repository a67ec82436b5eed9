"""Medians over seeds with percentile-bootstrap intervals.

A time to a target that a seed never reached is +inf: the median is then the median of a censored
sample (finite while more than half the seeds got there), and an interval bound that lands on an
unreached seed is None (open). Plain numbers in, plain numbers out; the resampling is seeded, so the
same runs always give the same interval.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Optional, Sequence

RESAMPLES = 2000
LEVEL = 0.95


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); inf stays inf."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(b):
        return b
    return a + (b - a) * (pos - lo)


def bootstrap_median(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, lo, hi): the median of `values` and a `level` percentile-bootstrap interval of it.
    None for a bound that is +inf; (None, None, None) for no values."""
    if not values:
        return None, None, None
    vals = [float(v) for v in values]
    median = statistics.median(vals)
    if len(vals) == 1:
        return _finite(median), _finite(median), _finite(median)
    rng = random.Random(seed)
    n = len(vals)
    medians = sorted(statistics.median(rng.choices(vals, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return _finite(median), _finite(_quantile(medians, tail)), _finite(_quantile(medians, 1 - tail))


def interval(values: Sequence[float], **kw) -> dict[str, Optional[float]]:
    """{"median", "lo", "hi"} as results.json gives it (rounded)."""
    m, lo, hi = bootstrap_median(values, **kw)
    r = (lambda v: None if v is None else round(v, 6))
    return {"median": r(m), "lo": r(lo), "hi": r(hi)}


def time_to_interval(times: Sequence[Optional[float]], **kw) -> dict[str, Optional[float]]:
    """A time to a target over seeds (None: that seed never reached it), with `reached` = how many did."""
    out = interval([math.inf if t is None else float(t) for t in times], **kw)
    return {**out, "reached": sum(t is not None for t in times)}
