"""Rate limits: per-key token buckets, and a log that says each kind of problem once per interval.

Both take their clock as an argument (monotonic by default), so wall-clock jumps do not open or close
them, and a simulated clock can drive them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable


class TokenBuckets:
    """One bucket per key (e.g. a peer's address): `burst` events at once, then `per_second` on average.
    At most `max_keys` buckets are kept (the least recently used go first), so a flood of keys is bounded."""

    def __init__(self, burst: float, per_second: float, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_second, self.max_keys, self.clock = burst, per_second, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def _tokens(self, key: str) -> float:
        tokens, when = self._buckets.get(key, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - when) * self.per_second)

    def allows(self, key: str) -> bool:
        """True while `key` has at least one token left (checking takes none)."""
        with self._lock:
            return key not in self._buckets or self._tokens(key) >= 1.0

    def take(self, key: str) -> None:
        with self._lock:
            self._buckets[key] = (max(0.0, self._tokens(key) - 1.0), self.clock())
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)


class LogThrottle:
    """Logs the first message of each kind at once; repeats within `interval` seconds are only counted,
    and the next message of that kind after the interval says how many there were. A flood of one
    problem (a thousand bad frames a second) is a line every `interval`, not a line per frame."""

    def __init__(self, log: logging.Logger, interval: float = 10.0, *, max_kinds: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.interval, self.max_kinds, self.clock = log, interval, max_kinds, clock
        self._kinds: OrderedDict[str, tuple[float, int]] = OrderedDict()  # kind -> (last logged, suppressed)
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str) -> None:
        self.emit(logging.WARNING, kind, message)

    def emit(self, level: int, kind: str, message: str) -> None:
        with self._lock:
            now = self.clock()
            last, suppressed = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self.interval:
                self._kinds[kind] = (last, suppressed + 1)
                return
            self._kinds[kind] = (now, 0)
            self._kinds.move_to_end(kind)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        more = f" (and {suppressed} more like it in the last {now - last:.0f} s)" if suppressed and last is not None else ""
        self.log.log(level, message + more)

    def flush(self) -> None:
        """Say how many repeats were not logged yet (at the end of a run)."""
        with self._lock:
            pending = [(kind, n) for kind, (_, n) in self._kinds.items() if n]
            self._kinds.clear()
        for kind, n in pending:
            self.log.warning(f"{kind}: {n} more not logged")
