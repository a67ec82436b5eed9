"""Token buckets and the once-per-interval log, driven by a fake clock."""

from __future__ import annotations

import logging

from smolcluster.common.ratelimit import LogThrottle, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate_per_key():
    clock = Clock()
    b = TokenBuckets(burst=3, per_second=1.0, clock=clock)
    for _ in range(3):
        assert b.allows("a")
        b.take("a")
    assert not b.allows("a") and b.allows("b")  # per key
    clock.now = 1.0
    assert b.allows("a")


def test_the_number_of_keys_is_bounded():
    b = TokenBuckets(burst=1, per_second=0.0, max_keys=10, clock=Clock())
    for i in range(1000):
        b.take(str(i))
    assert len(b._buckets) == 10


def test_a_repeated_problem_is_one_line_per_interval_with_a_count(caplog):
    clock = Clock()
    say = LogThrottle(logging.getLogger("test.throttle"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for i in range(1000):
            clock.now = i * 0.01  # 1000 in 10 s
            say.warning("bad-frame", "rejected a bad frame")
        clock.now = 10.5
        say.warning("bad-frame", "rejected a bad frame")
        say.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "rejected a bad frame", "rejected a bad frame (and 999 more like it in the last 10 s)"]
