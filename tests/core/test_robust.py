"""The robust-aggregation rule on plain numbers: outliers out, honest updates in, floods of one rank ignored."""

from __future__ import annotations

import random

from smolcluster.core.training.robust import MovementLedger, NormFilter


def _honest(f: NormFilter, rank: int, n: int, rng: random.Random) -> int:
    """n honest-looking norms (around 2, noisy); returns how many were refused."""
    refused = 0
    for _ in range(n):
        norm = abs(rng.gauss(2.0, 0.6))
        if f.check(rank, norm, prior=1000.0):
            refused += 1
        else:
            f.accept(rank, norm)
    return refused


def test_absurd_norms_are_refused_and_honest_ones_kept():
    rng, f = random.Random(0), NormFilter()
    assert _honest(f, 1, 500, rng) == 0
    assert "far above the recent ones" in f.check(1, 1e30)  # the prior alone would not catch this one:
    assert "far above" in f.check(1, 50.0, prior=1000.0)  # 25x the median, under the prior
    assert f.check(2, 1e30, prior=1000.0).startswith("update norm 1e+30 is above 1000")  # a new rank: the prior


def test_a_flood_of_tiny_pushes_from_one_rank_does_not_lock_the_others_out():
    rng, f = random.Random(1), NormFilter()
    for _ in range(1000):  # rank 2 floods with no-op updates before the honest ranks even start
        f.accept(2, 0.0)
    refused = sum(_honest(f, rank, 1, rng) for _ in range(300) for rank in (1, 3))
    assert refused == 0
    # Even one honest rank against the flood (no honest majority) is not locked out, only trimmed at the top.
    f = NormFilter()
    for _ in range(1000):
        f.accept(2, 0.0)
    assert _honest(f, 1, 600, rng) < 0.05 * 600


def test_a_flood_of_large_pushes_from_one_rank_does_not_raise_the_bar_for_it():
    rng, f = random.Random(2), NormFilter()
    _honest(f, 1, 50, rng)
    _honest(f, 3, 50, rng)
    refused = sum(1 for _ in range(200) if f.check(2, 1e3, prior=1e4) or f.accept(2, 1e3))
    assert refused == 200 - f.min_history  # only its warm-up passes, under the prior


def test_the_movement_ledger_bounds_the_progress_since_a_version():
    ledger = MovementLedger(window=4)
    assert ledger.since(0) == 0.0  # nothing recorded yet
    for version, moved in enumerate([1.0, 2.0, 0.5, 0.25, 4.0], start=1):
        ledger.record(version, moved)
    assert ledger.since(5) == 0.0 and ledger.since(4) == 4.0 and ledger.since(3) == 4.25
    assert ledger.since(0) == ledger.since(1) == 4.75  # older than the window: from the oldest kept version
    ledger.record(9, 1.0)  # a gap (a resume from a checkpoint): the history starts afresh
    assert ledger.since(8) == 1.0 and ledger.since(1) == 1.0
