"""What every sim backend shares: following the nodes' metrics, waiting for the run to end, noticing
that every worker is gone, kill timing for faults, node speed, the live progress line, and the end of
a run (summary.json, the summary table, plots).

A backend subclasses SimCluster and supplies the node primitives (start, stop, kill, pause, resume,
restart, alive, exit codes) and what it knows about its links; SimCluster.run() drives it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from smolcluster.common.errors import SimError
from smolcluster.common.jsonl import JsonlFollower
from smolcluster.common.wait import wait_until
from smolcluster.core.training.lokipush import LokiPusher, push_fault_line
from smolcluster.testbed import report
from smolcluster.testbed.control import LinkHandle
from smolcluster.testbed.faults import FaultInjector, FaultSchedule
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.profiles import DeviceProfile
from smolcluster.testbed.report.summary import SUMMARY_FILE
from smolcluster.testbed.sim.hops import own_bytes
from smolcluster.testbed.sim.processes import last_error_line, tail_text
from smolcluster.testbed.topology import Topology

KILLED_SERVER_GRACE_S = 30.0  # wait() keeps going this long after kill(server), for a restart (server crash fault)
WORKER_GRACE_S = 5.0  # after the server finished, how long workers get to finish on their own
MAX_SLOWDOWN = 12.5  # a Pi 4 (speed 0.08) computes 12.5x slower than a Mac mini; nothing slower than that
ALL_WORKERS_GONE_S = 60.0  # every worker dead this long (after training began, or after a deliberate kill)
WORKERS_NEVER_STARTED_S = 3.0  # every worker dead before any trained a step: a setup error (data, config)


def node_slowdown(device: DeviceProfile) -> float:
    """How much slower than a Mac mini a node computes: 1/speed, at least 1 (a faster device cannot be
    emulated by stretching) and at most MAX_SLOWDOWN (so a default run stays a few minutes)."""
    return min(MAX_SLOWDOWN, max(1.0, 1.0 / device.speed))


class MetricsTail:
    """Follows the nodes' metrics.jsonl files (the live progress and fault triggers). The main loop and the
    fault injector's thread both poll it."""

    def __init__(self, nodes_dir: Path, server: str, workers: list[str]):
        self.server, self.workers = server, workers
        self._files = {node: JsonlFollower(nodes_dir / node / "metrics.jsonl") for node in [server, *workers]}
        self._lock = threading.Lock()
        self.version = 0
        self.start_time: Optional[float] = None  # the server's "start" event (run start)
        self.evals: list[dict] = []
        self.steps: dict[str, int] = {w: 0 for w in workers}
        self.ended: set[str] = set()

    def poll(self) -> None:
        with self._lock:
            for node, follower in self._files.items():
                for rec in follower.read_new():
                    self._apply(node, rec)

    def _apply(self, node: str, rec: dict) -> None:
        ev = rec.get("event")
        if node == self.server:
            if ev == "start" and self.start_time is None:
                self.start_time = rec["time"]
            if "version" in rec and ev in ("update", "eval", "resume", "end"):
                self.version = max(self.version, int(rec["version"]))
            if ev == "eval":
                self.evals.append(rec)
        else:
            if ev == "step":
                self.steps[node] = max(self.steps[node], int(rec.get("step", 0)) + 1)
            elif ev == "end":
                self.ended.add(node)

    def latest_accuracy(self) -> Optional[float]:
        return self.evals[-1]["test_accuracy"] if self.evals else None


class WorkersGoneWatch:
    """Every worker exited with an error and none finished cleanly: the server would wait for nobody.
    Fed the workers' exit codes (None while running) on every poll."""

    def __init__(self) -> None:
        self.since: Optional[float] = None

    def problem(self, codes: dict[str, Optional[int]], *, on_purpose: bool, trained: bool) -> Optional[str]:
        if any(code is None or code == 0 for code in codes.values()):
            self.since = None
            return None
        now = time.monotonic()
        self.since = self.since or now
        limit = ALL_WORKERS_GONE_S if on_purpose or trained else WORKERS_NEVER_STARTED_S
        if now - self.since <= limit:
            return None
        return (f"every worker exited ({', '.join(f'{n}: {c}' for n, c in codes.items())}); "
                "the server has nobody to train with.")


class Progress:
    """One updating line on a terminal; a line every `interval` seconds otherwise (logs, CI)."""

    def __init__(self, out: TextIO, interval: float):
        self.out = out
        self.interval = interval
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.last = 0.0
        self.width = 0

    def update(self, cluster: "SimCluster") -> None:
        now = time.time()
        if not self.tty and now - self.last < self.interval:
            return
        self.last = now
        t = cluster.tail
        acc = t.latest_accuracy()
        if len(t.workers) <= 8:
            steps = " ".join(f"{w} {t.steps[w]}" + ("✓" if w in t.ended else "") for w in t.workers)
        else:  # a rack of workers: the range, not a line per node
            counts = [t.steps[w] for w in t.workers]
            steps = f"{min(counts)}..{max(counts)} over {len(counts)} workers, {len(t.ended)} done"
        line = (f"[{cluster.elapsed():6.1f}s] version {t.version:5d} | acc {acc:.4f}" if acc is not None
                else f"[{cluster.elapsed():6.1f}s] version {t.version:5d} | acc   -   ") + f" | steps {steps}"
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()
            self.width = 0


@dataclass
class SimCluster:
    """A running simulated cluster (implements smolcluster.testbed.control.ClusterControl). Use as a
    context manager: leaving it stops every node and link, whatever happened."""

    topology: Topology
    run_dir: Path
    algorithm: str

    backend = ""  # "local", "compose"
    teardown_note = ""  # what leaving the context manager cleaned up, for the Ctrl-C message

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.nodes_dir = self.run_dir / "nodes"
        self.server = self.topology.server.name
        self.tail = MetricsTail(self.nodes_dir, self.server, [w.name for w in self.topology.workers])
        self.toxiproxy = ToxiproxyClient("http://127.0.0.1:0")  # replaced by the real API once it is up
        self.paths: dict[str, list[str]] = {}  # worker -> the proxies its traffic crosses, first hop first
        self.final_link_stats: dict[str, dict[str, int]] = {}  # proxy -> its counters when the run stopped
        self.stopped_after_end: list[str] = []
        self._gone = WorkersGoneWatch()
        self._killed_at: dict[str, float] = {}  # node -> when kill() hit it (cleared by restart)
        self._t0 = time.time()

    def __enter__(self) -> "SimCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what a backend supplies

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self, node: str) -> bool:
        raise NotImplementedError

    def kill(self, node: str) -> None:  # call _killed(node) first: wait() then allows for a restart
        raise NotImplementedError

    def pause(self, node: str) -> None:
        raise NotImplementedError

    def resume(self, node: str) -> None:
        raise NotImplementedError

    def restart(self, node: str) -> None:  # call _restarted(node) once it runs again
        raise NotImplementedError

    def links(self) -> list[LinkHandle]:
        raise NotImplementedError

    def server_exit_code(self) -> Optional[int]:
        """None while the server runs (or is paused); its exit code once it stopped."""
        raise NotImplementedError

    def worker_exit_code(self, node: str) -> Optional[int]:
        """None while the worker trains; its exit code once its training process ended."""
        raise NotImplementedError

    def worker_finished(self, node: str) -> bool:
        """Nothing left to wait for after the server's end."""
        raise NotImplementedError

    def save_logs(self) -> None:
        """Make every node's stdout.log current (a container's log is copied out)."""

    def summary_links(self) -> list[report.LinkSummary]:
        raise NotImplementedError

    def toxiproxy_label(self) -> Optional[str]:
        """What served the links' Toxiproxy API, for the summary."""
        raise NotImplementedError

    def summary_fields(self) -> dict[str, Any]:
        """Backend-only fields of the summary (RunSummary field -> value)."""
        return {}

    def node_bytes(self) -> dict[str, tuple[int, int]]:
        """Each worker's own (up, down) bytes, from the final counters of the proxies on its path."""
        stats = self.final_link_stats
        hop_bytes = {name: (s.get("upstream_bytes", 0), s.get("downstream_bytes", 0)) for name, s in stats.items()}
        return own_bytes(self.paths, hop_bytes) if stats else {}

    # ------------------------------------------------------------------ ClusterControl, shared part

    def links_of(self, node: str) -> list[LinkHandle]:
        """Every link that touches `node` (partitioning a node cuts all of them), each proxy once."""
        seen: dict[str, LinkHandle] = {}
        for link in self.links():
            if node in (link.src, link.dst) and link.name not in seen:
                seen[link.name] = link
        return list(seen.values())

    def slowdown(self, node: str) -> float:
        return node_slowdown(self.topology.nodes[node].device)

    def server_version(self) -> int:
        self.tail.poll()
        return self.tail.version

    def elapsed(self) -> float:
        return time.time() - self._t0

    def _killed(self, node: str) -> None:
        self._killed_at[node] = time.monotonic()

    def _restarted(self, node: str) -> None:
        self._killed_at.pop(node, None)  # only now: wait() must never see it dead and unexpected in between

    # ------------------------------------------------------------------ waiting

    def wait(self, poll: float = 0.5, on_tick: Optional[Callable[["SimCluster"], Any]] = None) -> int:
        """Until the server exits (a killed server gets KILLED_SERVER_GRACE_S to be restarted); then give the
        workers WORKER_GRACE_S to finish. Returns the server's exit code."""
        while True:
            self.tail.poll()
            if on_tick is not None:
                on_tick(self)
            code = self.server_exit_code()
            killed = self._killed_at.get(self.server)
            if code is not None and (killed is None or time.monotonic() - killed > KILLED_SERVER_GRACE_S):
                break
            self._check_workers_alive()
            time.sleep(poll)
        # The server said BYE to every worker; one that missed it (a close racing the message) would keep
        # redialling. Nothing is left to do for it: after the grace the backend stops it (`stopped_after_end`).
        def unfinished() -> list[str]:
            self.tail.poll()
            return [w.name for w in self.topology.workers if not self.worker_finished(w.name)]

        wait_until(lambda: not unfinished(), WORKER_GRACE_S, interval=0.2)
        self.stopped_after_end = unfinished()
        return code

    def _check_workers_alive(self) -> None:
        """Every worker gone (and none finished cleanly) means the server would wait for nobody: fail with
        the first worker's output instead. A fault injector restarting nodes has ALL_WORKERS_GONE_S to bring
        one back (WORKERS_NEVER_STARTED_S when none ever trained)."""
        codes = {w.name: self.worker_exit_code(w.name) for w in self.topology.workers}
        on_purpose = any(w.name in self._killed_at for w in self.topology.workers)  # a fault: give it time to restart
        problem = self._gone.problem(codes, on_purpose=on_purpose, trained=any(self.tail.steps.values()))
        if problem:
            self.save_logs()
            log = self.nodes_dir / self.topology.workers[0].name / "stdout.log"
            raise SimError(f"{problem} {log.parent.name}'s output ({log}):\n{tail_text(log)}")

    # ------------------------------------------------------------------ a whole run

    def run(self, schedule: FaultSchedule, *, seed: int, out: TextIO = sys.stdout, progress_interval: float = 5.0,
            announce: Optional[Callable[[], None]] = None) -> int:
        """Start, fire the fault schedule, wait for the end, stop, then summarise. Returns the exit code
        (130 on Ctrl-C / SIGTERM). `announce` runs once everything is up (e.g. to print the links)."""
        progress = Progress(out, progress_interval)
        shipper = self.fault_shipper()
        try:
            with self:
                self.start()
                if announce is not None:
                    announce()
                injector = FaultInjector(schedule, self, seed=seed,
                                         ship=(lambda line: push_fault_line(shipper, line)) if shipper else None)
                injector.start()
                try:
                    code = self.wait(on_tick=progress.update)
                finally:
                    injector.stop()  # heals what is still active before the nodes are stopped
                progress.done()
        except KeyboardInterrupt:
            progress.done()
            print(f"\ninterrupted: {self.teardown_note}; partial results in {self.run_dir}", file=out)
            return 130
        finally:
            if shipper is not None:
                shipper.close(timeout=3.0)
        self.finish(code, injector.events, out)
        return 0

    def fault_shipper(self) -> Optional[LokiPusher]:
        """With Loki on (loki_url among the run's configs), fault events go there too, as the
        controller's stream (job smolcluster-faults, kind faults)."""
        url = self.loki_url()
        if not url:
            return None
        labels = {"job": "smolcluster-faults", "component": "faults", "host": "controller", "rank": 0,
                  "algorithm": self.algorithm, "run": self.run_dir.name}
        return LokiPusher(url, labels)

    def loki_url(self) -> Optional[str]:
        return None  # a backend whose nodes ship says where

    def finish(self, code: int, fault_events: list[dict], out: TextIO) -> report.RunSummary:
        """RUN_DIR/summary.json from the server's summary and this backend's view, the summary table, plots."""
        server_summary = self.nodes_dir / self.server / SUMMARY_FILE
        if code != 0 or not server_summary.exists():
            log = server_summary.parent / "stdout.log"
            reason = last_error_line(log)
            raise SimError(f"the server exited with code {code} without a summary" + (f": {reason}" if reason else "")
                           + f"; see {log}")
        topo = self.topology
        summary = report.build_summary(
            json.loads(server_summary.read_text()), backend=self.backend, nodes_dir=self.nodes_dir, server_name=self.server,
            workers=[w.name for w in topo.workers], devices={n.name: n.device.name for n in topo.nodes.values()},
            slowdown={n: self.slowdown(n) for n in topo.nodes}, topology=topo.name, topology_file=str(topo.file),
            links=self.summary_links(), node_bytes=self.node_bytes(), wall_time_s=self.elapsed(),
            toxiproxy=self.toxiproxy_label(), stopped_after_end=self.stopped_after_end)
        for name, value in self.summary_fields().items():
            setattr(summary, name, value)
        if fault_events:  # what each fault hit and how the cluster reacted
            summary.faults = report.fault_reactions(report.load_run(self.run_dir))
            summary.faults_failed = [e for e in fault_events if e["action"] == "failed"]
        report.write_summary(self.run_dir / SUMMARY_FILE, summary)
        print(report.summary_table(report.load_run(self.run_dir)), file=out)
        if not report.plots_available():
            print(report.PLOTS_MISSING, file=out)
        else:
            try:
                print(f"plots: {', '.join(str(p) for p in report.write_plots(self.run_dir))}", file=out)
            except Exception as e:  # a plotting failure must not lose the run's summary
                print(f"plots: failed ({type(e).__name__}: {e})", file=out)
        print(f"run dir: {self.run_dir}", file=out)
        return summary
