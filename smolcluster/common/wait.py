"""Wait until something is true, checking every so often, for at most so long."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from smolcluster.common.errors import WaitTimeout

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, *, interval: float = 0.1, what: str | None = None) -> T:
    """Call `condition` every `interval` seconds until it returns something truthy, and return that.

    After `timeout` seconds it is called one last time; if it is still falsy, WaitTimeout is raised
    when `what` names the thing waited for, else the falsy value is returned (the caller decides).
    An exception from `condition` (e.g. "the process died") ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            if what is not None:
                raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
            return result
        time.sleep(min(interval, left))
