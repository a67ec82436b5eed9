"""Fire a fault schedule at a running cluster, and write down what happened.

    injector = FaultInjector(schedule, cluster, seed=42)
    injector.start()          # background thread: checks triggers every 0.1 s
    ...                       # the run
    injector.stop()           # heals every fault still active

Every fault fired or healed is one line in RUN_DIR/faults.jsonl:
    {"time": unix, "elapsed": s, "fault": name, "action": "fired"|"healed"|"failed", "target": ...,
     "target_kind": "node"|"link", "kind": action, "version": server version, "took_s": s, ...}
`time` is when the action began; `took_s` how long it took (restarting a server takes seconds).
A fault that cannot be applied (e.g. its proxy is gone) is logged as "failed" with the error; the
run goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from smolcluster.common.errors import SmolclusterError
from smolcluster.common.jsonl import read_jsonl
from smolcluster.testbed.faults import actions
from smolcluster.testbed.faults.schedule import Fault, FaultSchedule
from smolcluster.testbed.control import ClusterControl

FAULTS_LOG = "faults.jsonl"


@dataclass
class _Active:
    fault: Fault
    heal_at: float | None  # elapsed seconds; None: until an explicit undo or stop()


class FaultInjector:
    def __init__(self, schedule: FaultSchedule | Sequence[Fault], cluster: ClusterControl, seed: int = 0,
                 poll_s: float = 0.1, logger: logging.Logger | None = None,
                 ship: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time):
        # `seed` draws random: entries that do not name their own seed (the run's seed, typically)
        self.seed = seed
        self.faults: list[Fault] = schedule.expand(seed) if isinstance(schedule, FaultSchedule) else list(schedule)
        self.cluster = cluster
        self.poll_s = poll_s
        self.log = logger or logging.getLogger("smolcluster.testbed.faults")
        self.path = Path(cluster.run_dir) / FAULTS_LOG
        self.pending: list[Fault] = list(self.faults)
        self.active: list[_Active] = []
        self.events: list[dict[str, Any]] = []  # what was written to faults.jsonl
        self._ship = ship  # also gets every faults.jsonl line (e.g. to Loki); must not block
        self._clock = clock  # unix time for the lines (the virtual backend's is simulated)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FaultInjector":
        if self._thread is None and self.faults:
            self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop firing and heal whatever is still active (latest first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for act in reversed(self.active):
                self._heal(act.fault, reason="run ended")
            self.active.clear()

    def __enter__(self) -> "FaultInjector":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def done(self) -> bool:
        """Every fault fired and healed (or permanent)."""
        with self._lock:
            return not self.pending and all(a.heal_at is None for a in self.active)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # never let a broken cluster query kill the injector silently
                self.log.warning(f"fault injector: {type(e).__name__}: {e}")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        """Fire every due fault and heal every expired one (also usable without the thread)."""
        with self._lock:
            now = self.cluster.elapsed()
            for act in [a for a in self.active if a.heal_at is not None and a.heal_at <= now]:
                self.active.remove(act)
                self._heal(act.fault, reason="duration over")
            version = self._version() if any(f.at_step is not None for f in self.pending) else None
            due = [f for f in self.pending if (f.at is not None and f.at <= now)
                   or (f.at_step is not None and version is not None and version >= f.at_step)]
            for fault in due:
                self.pending.remove(fault)
                self._fire(fault, now)

    def _version(self) -> int | None:
        try:
            return self.cluster.server_version()
        except (SmolclusterError, OSError, ValueError):
            return None

    def _fire(self, fault: Fault, now: float) -> None:
        started = self._clock()  # the line's time is when the fault began, so reactions are never "before" it
        try:
            touched = actions.fire(fault, self.cluster)
        except (SmolclusterError, OSError, KeyError, RuntimeError) as e:
            self._write(fault, "failed", started, error=f"{type(e).__name__}: {e}")
            self.log.warning(f"fault {fault.name} ({fault.describe()}) could not be applied: {e}")
            return
        self._write(fault, "fired", started, touched=touched, trigger=fault.trigger, duration=fault.duration,
                    params=fault.params, origin=fault.origin)
        self.log.info(f"fault {fault.name}: {fault.describe()} fired")
        if fault.action in ("resume", "heal", "restart"):
            for act in [a for a in self.active if actions.undoes(fault, a.fault)]:
                self.active.remove(act)
                self._write(act.fault, "healed", started, by=fault.name)
        elif fault.duration is not None or fault.action not in ("kill", "server_crash"):
            # a kill without a duration is permanent: stop() does not bring the node back
            self.active.append(_Active(fault, now + fault.duration if fault.duration is not None else None))

    def _heal(self, fault: Fault, reason: str) -> None:
        started = self._clock()
        try:
            actions.heal(fault, self.cluster)
        except (SmolclusterError, OSError, KeyError, RuntimeError) as e:
            self._write(fault, "failed", started, error=f"heal: {type(e).__name__}: {e}")
            self.log.warning(f"fault {fault.name} could not be healed: {e}")
            return
        self._write(fault, "healed", started, reason=reason)
        self.log.info(f"fault {fault.name} healed ({reason})")

    def _write(self, fault: Fault, what: str, at: float, **extra: Any) -> None:
        """One faults.jsonl line; `at` (unix time) is when the action started (a restart can take seconds)."""
        elapsed = self.cluster.elapsed() - (self._clock() - at)
        record = {"time": at, "elapsed": round(elapsed, 3), "fault": fault.name, "action": what,
                  "target": fault.target, "target_kind": fault.target_kind, "kind": fault.action,
                  "version": self._version(), "took_s": round(self._clock() - at, 3)} | extra
        self.events.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self._ship is not None:
            self._ship(line)


def read_fault_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of RUN_DIR/faults.jsonl (empty when no fault fired)."""
    return read_jsonl(Path(run_dir) / FAULTS_LOG)
