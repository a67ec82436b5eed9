"""Where a node's time comes from. The socket backends use the machine's clocks (WallClock); the virtual
sim backend hands every node a clock that reads and advances simulated time instead, so the same
algorithm code runs under either. Only the node's own timing goes through here (deadlines, staleness
spans, compute and communication splits, metrics timestamps); the transport keeps its own clocks.
"""

from __future__ import annotations

import queue
import time


class WallClock:
    """The real clocks: what a node on real hardware, the local or the compose backend reads."""

    def monotonic(self) -> float:
        return time.monotonic()

    def perf_counter(self) -> float:
        return time.perf_counter()

    def time(self) -> float:
        """Unix time, for metrics lines."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def queue(self) -> queue.SimpleQueue:
        """The server's event queue (its get(timeout) waits in this clock's time). SimpleQueue: a hand-off
        from a receiving thread to the main thread costs ~10 us less than through queue.Queue (measured)."""
        return queue.SimpleQueue()
