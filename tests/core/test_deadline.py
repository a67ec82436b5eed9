"""SyncPS's adaptive deadline (`timeout: auto`) against simulated arrivals: SyncPS's step protocol on a
virtual clock (a step closes when every worker pushed, or at the deadline once min_workers did; a late
push gets the current step back and its sender starts on it), AdaptiveDeadline deciding each deadline."""

from __future__ import annotations

import random

import pytest

from smolcluster.core.algorithms.deadline import AdaptiveDeadline


def simulate(step_s: list[float], steps: int, deadline: AdaptiveDeadline, min_workers: int = 2, jitter: float = 0.1,
             seed: int = 0) -> list[dict]:
    """Per step: its deadline, which workers made it, and each push's arrival delay. Worker i needs
    step_s[i] x (1 +- jitter) seconds per gradient, starting when it last heard from the server."""
    rng = random.Random(seed)
    n = len(step_s)
    ready = [0.0] * n  # when each worker's push for its current step arrives
    working_on = [0] * n
    for i in range(n):
        ready[i] = step_s[i] * (1 + rng.uniform(-jitter, jitter))
    opened, out = 0.0, []
    for step in range(steps):
        d = deadline.next_step()
        close_at = opened + d
        on_time = [i for i in range(n) if working_on[i] == step and ready[i] <= close_at]
        everyone = [i for i in range(n) if working_on[i] == step]
        if len(on_time) == len(everyone) and on_time:  # everyone working on it arrived: closes at the last arrival
            closed = max(ready[i] for i in on_time)
        else:
            if len(on_time) < min_workers:  # waits past the deadline for min_workers
                by_time = sorted(everyone, key=lambda i: ready[i])[:min_workers]
                on_time = sorted(set(on_time) | set(by_time))
                closed = max(ready[i] for i in on_time)
            else:
                closed = close_at
        # late pushes for earlier steps that arrive while this step is open
        for i in range(n):
            if working_on[i] < step and ready[i] <= closed:
                deadline.observe(ready[i] - out[working_on[i]]["opened"])
                working_on[i], ready[i] = step + 1, max(ready[i], closed) + step_s[i] * (1 + rng.uniform(-jitter, jitter))
        for i in on_time:
            deadline.observe(ready[i] - opened)
        out.append({"step": step, "opened": opened, "deadline": d, "contributors": on_time,
                    "delays": {i: ready[i] - opened for i in on_time}})
        for i in on_time:  # STEP_DONE: start the next step
            working_on[i], ready[i] = step + 1, closed + step_s[i] * (1 + rng.uniform(-jitter, jitter))
        opened = closed
    return out


def test_one_worker_12x_slower_the_deadline_settles_at_the_fast_workers_arrivals():
    fast = 0.03
    steps = simulate([fast, fast, fast, 12.5 * fast], steps=300, deadline=AdaptiveDeadline())  # defaults: no tuning
    settled = steps[100:]
    fast_delays = [d for s in settled for i, d in s["delays"].items() if i < 3]
    deadlines = sorted(s["deadline"] for s in settled)
    median_deadline = deadlines[len(deadlines) // 2]
    assert max(fast_delays) * 0.9 <= median_deadline <= 2 * max(fast_delays), (median_deadline, max(fast_delays))
    assert median_deadline < 0.5 * 12.5 * fast  # nowhere near the straggler's step
    # the fast workers are not cut: almost every settled step has all three of them
    assert sum({0, 1, 2} <= set(s["contributors"]) for s in settled) >= 0.95 * len(settled)
    # the straggler still contributes sometimes, and most steps do not wait for it
    assert sum(3 not in s["contributors"] for s in settled) > 0.8 * len(settled)


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.3])
def test_equal_workers_no_step_closes_early(jitter):
    steps = simulate([0.03] * 4, steps=300, deadline=AdaptiveDeadline(), jitter=jitter, seed=1)
    assert all(sorted(s["contributors"]) == [0, 1, 2, 3] for s in steps)


def test_warmup_waits_up_to_the_upper_bound_and_bounds_hold():
    d = AdaptiveDeadline(k=3, window=8, lower=0.05, upper=2.0)
    assert d.next_step() == 2.0  # nothing seen yet: every step waits for everyone, up to the bound
    for _ in range(8):
        d.observe(0.001)
    assert d.seconds() == 0.05  # the lower bound
    for _ in range(8):
        d.observe(100.0)
    assert d.seconds() == 2.0  # the upper bound
    s = d.summary()
    assert s["mode"] == "auto" and s["min_s"] == 0.05 and s["max_s"] == 2.0 and s["warmup_steps"] == 1


def test_median_plus_k_mad():
    d = AdaptiveDeadline(k=2, window=5, warmup=5)
    for v in (1.0, 1.5, 0.5, 2.0, 0.0):  # median 1, absolute deviations 0, .5, .5, 1, 1: MAD 0.5
        d.observe(v)
    assert d.seconds() == pytest.approx(2.0)
    for v in (1.0,) * 5:  # identical delays: the MAD floor (a tenth of the median) keeps the deadline above them
        d.observe(v)
    assert d.seconds() == pytest.approx(1.2)
