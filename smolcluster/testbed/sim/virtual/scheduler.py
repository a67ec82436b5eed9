"""A discrete-event scheduler with a virtual clock, and the simulated processes it runs.

Every simulated node (server, each worker) is a Process: a thread that runs only while the scheduler
hands it the baton, so exactly one piece of node code runs at any moment and the order is fixed by
the event heap alone: (virtual time, sequence number). A process gives the baton back whenever its
code would wait (a sleep, a receive, an empty event queue); the scheduler then runs the next event.
Nothing reads the wall clock, so the same inputs give the same run, bit for bit.

Why threads and not a rewrite of the nodes as coroutines: the algorithm code (server loops, worker
training loops) is plain blocking Python; run like this it stays exactly the code the socket
backends run, with the clock and the transport swapped (smolcluster.core.training.clock).
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections import deque
from typing import Any, Callable, Optional

VIRTUAL_EPOCH = 1_767_225_600.0  # 2026-01-01 UTC: unix time of virtual t = 0 in metrics lines
POLL_QUANTUM_S = 1e-4  # an empty-queue poll still takes this long: a real loop's iteration is never free


class ProcessKilled(BaseException):
    """Unwinds a killed process's code (a BaseException, so the node's `except Exception` cannot catch it)."""


class Process:
    """A simulated node's thread of control; runs only when the scheduler switches to it."""

    def __init__(self, sched: "Scheduler", name: str, target: Callable[[], Any]):
        self.sched, self.name, self.target = sched, name, target
        self.token = 0  # bumped at every wait: a wake-up for an older wait is stale
        self.paused = False
        self.wake_on_resume: Optional[int] = None
        self.killed = False  # frozen: never woken again; unwound when the run ends
        self.started = False
        self.done = False
        self.error: Optional[BaseException] = None
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"virtual-{name}", daemon=True)

    def _main(self) -> None:
        self._go.wait()
        self._go.clear()
        try:
            if not self.killed:
                self.target()
        except ProcessKilled:
            pass
        except BaseException as e:  # the node's own failure: the backend reports it like an exit code
            self.error = e
        finally:
            self.done = True
            self.sched._back.set()

    def block(self) -> None:
        """Give the baton back until woken (from this process's own thread)."""
        if self.killed:
            raise ProcessKilled
        self.sched._back.set()
        self._go.wait()
        self._go.clear()
        if self.killed:
            raise ProcessKilled


class Waitable:
    """Something processes wait on (an inbox, an event queue): notify() wakes every waiter."""

    def __init__(self, sched: "Scheduler"):
        self.sched = sched
        self.waiters: list[tuple[Process, int]] = []

    def notify(self) -> None:
        waiters, self.waiters = self.waiters, []
        for proc, token in waiters:
            self.sched.at(self.sched.now, lambda p=proc, t=token: self.sched.wake(p, t))


class Scheduler:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._back = threading.Event()
        self.current: Optional[Process] = None
        self.processes: list[Process] = []
        self.events_run = 0

    # ------------------------------------------------------------------ events

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` (in the scheduler, not in a process) at virtual time `when` (never in the past)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        self.at(self.now + delay, action)

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run events in (time, sequence) order until none are left or `stop()` is true."""
        while self._heap and not stop():
            when, _, action = heapq.heappop(self._heap)
            self.now = when
            self.events_run += 1
            action()

    # ------------------------------------------------------------------ processes

    def spawn(self, name: str, target: Callable[[], Any], delay: float = 0.0) -> Process:
        proc = Process(self, name, target)
        self.processes.append(proc)
        proc._thread.start()
        self.after(delay, lambda: self._start(proc))
        return proc

    def _start(self, proc: Process) -> None:
        if proc.killed or proc.started:
            return
        if proc.paused:
            proc.wake_on_resume = proc.token
            return
        proc.started = True
        self._switch(proc)

    def _switch(self, proc: Process) -> None:
        previous, self.current = self.current, proc
        proc._go.set()
        self._back.wait()
        self._back.clear()
        self.current = previous

    def wake(self, proc: Process, token: int) -> None:
        if proc.done or proc.killed or proc.token != token:
            return
        if proc.paused:
            proc.wake_on_resume = token
            return
        proc.token += 1
        self._switch(proc)

    def pause(self, proc: Process) -> None:
        proc.paused = True

    def resume(self, proc: Process) -> None:
        proc.paused = False
        token, proc.wake_on_resume = proc.wake_on_resume, None
        if token is not None:
            self.after(0.0, (lambda: self._start(proc)) if not proc.started else (lambda: self.wake(proc, token)))

    def kill(self, proc: Process) -> None:
        """Freeze it: it never runs again (its thread is unwound by shutdown())."""
        proc.killed = True

    def shutdown(self) -> None:
        """Unwind every process still alive (killed or blocked), so no thread or model outlives the run."""
        for proc in self.processes:
            if proc.done:
                continue
            proc.killed = True
            if not proc.started:
                proc.started = True
            self._switch(proc)
        for proc in self.processes:
            proc._thread.join(timeout=5)

    # ------------------------------------------------------------------ waiting (from inside a process)

    def _me(self) -> Process:
        if self.current is None or threading.current_thread() is not self.current._thread:
            raise RuntimeError("virtual time can only be waited for inside a simulated process")
        return self.current

    def sleep(self, seconds: float) -> None:
        proc = self._me()
        token = proc.token
        self.after(max(0.0, seconds), lambda: self.wake(proc, token))
        proc.block()

    def wait(self, ready: Callable[[], bool], on: Waitable, timeout: Optional[float]) -> bool:
        """Until ready() (re-checked whenever `on` is notified) or `timeout` virtual seconds: ready() then."""
        proc = self._me()
        deadline = None if timeout is None else self.now + max(0.0, timeout)
        while not ready():
            if deadline is not None and self.now >= deadline:
                return False
            token = proc.token
            on.waiters.append((proc, token))
            if deadline is not None:
                self.at(deadline, lambda t=token: self.wake(proc, t))
            proc.block()
        return True


class VirtualClock:
    """A node's clock (smolcluster.core.training.clock.WallClock's interface) in virtual time."""

    def __init__(self, sched: Scheduler):
        self.sched = sched

    def monotonic(self) -> float:
        return self.sched.now

    def perf_counter(self) -> float:
        return self.sched.now

    def time(self) -> float:
        return VIRTUAL_EPOCH + self.sched.now

    def sleep(self, seconds: float) -> None:
        self.sched.sleep(seconds)

    def queue(self) -> "VirtualQueue":
        return VirtualQueue(self.sched)


class VirtualQueue:
    """The server's event queue: get(timeout) waits in virtual time (queue.Queue's interface, what it uses)."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.items: deque = deque()
        self.changed = Waitable(sched)

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.changed.notify()

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        if not self.items and block:
            self.sched.wait(lambda: bool(self.items), self.changed,
                            None if timeout is None else max(timeout, POLL_QUANTUM_S))
        if not self.items:
            raise queue.Empty
        return self.items.popleft()

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def empty(self) -> bool:
        return not self.items

    def qsize(self) -> int:
        return len(self.items)
