"""A run directory read back: every node's metrics, the summary, the fault log, and the numbers the
report quotes (falling back to the metrics where a crashed server left no summary).

Layout (smolcluster/testbed/control.py): RUN_DIR/nodes/<name>/metrics.jsonl per node, or, for runs
started by hand / by the training tests, RUN_DIR/<name>/metrics.jsonl; RUN_DIR/summary.json (else the
server's own summary.json); RUN_DIR/faults.jsonl (optional).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from smolcluster.common.errors import ReportError
from smolcluster.common.jsonl import read_jsonl
from smolcluster.testbed.report.summary import SUMMARY_FILE, NodeSummary, RunSummary, read_summary, time_to_accuracy


@dataclass
class RunData:
    """Everything a report needs from one run directory."""

    run_dir: Path
    summary: RunSummary
    events: dict[str, list[dict[str, Any]]]  # node name -> its metrics.jsonl lines, in time order
    faults: list[dict[str, Any]]  # faults.jsonl lines, in time order (empty if none)
    start_time: float  # unix seconds: the server's first "start" event, else the earliest event
    server: Optional[str]  # node name of the server (the node with "start"/"update"/"eval" events)
    workers: list[str] = field(default_factory=list)  # node names of the workers, sorted

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def algorithm(self) -> str:
        start = next((e for e in self.server_events("start")), {})
        return str(self.summary.algorithm or start.get("algorithm") or "?")

    @property
    def end_time(self) -> float:
        times = [e["time"] for evs in self.events.values() for e in evs]
        times += [f["time"] for f in self.faults]
        return max(times) if times else self.start_time

    def server_events(self, *kinds: str) -> list[dict[str, Any]]:
        evs = self.events.get(self.server, []) if self.server else []
        return [e for e in evs if not kinds or e["event"] in kinds]

    def node_events(self, node: str, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(node, []) if not kinds or e["event"] in kinds]

    def rel(self, t: float) -> float:
        """Seconds since the run started."""
        return t - self.start_time

    def rank_names(self) -> dict[int, str]:
        """Worker rank -> node name, from the server's join events and the summary's per_worker."""
        out: dict[int, str] = {}
        for pw in self.summary.per_worker:
            if pw.rank is not None and pw.hostname:
                out[int(pw.rank)] = str(pw.hostname)
        for e in self.server_events("join"):
            if "rank" in e and e.get("host"):
                out.setdefault(int(e["rank"]), str(e["host"]))
        return out

    # ------------------------------------------------------------------ numbers

    def time_to_accuracy(self, mark: float) -> Optional[float]:
        """Seconds from the run's start to the first evaluation with test accuracy >= mark (None: never)."""
        return time_to_accuracy(self.server_events("eval"), self.start_time, mark)

    def final_accuracy(self) -> Optional[float]:
        if self.summary.final_test_accuracy is not None:
            return float(self.summary.final_test_accuracy)
        evals = [e for e in self.server_events("eval") if e.get("test_accuracy") is not None]
        return float(evals[-1]["test_accuracy"]) if evals else None

    def wall_time(self) -> float:
        if self.summary.wall_time_s is not None:
            return float(self.summary.wall_time_s)
        return self.end_time - self.start_time

    def count(self, summary_field: str, event: str) -> int:
        """A summary counter, else the number of such server events (a crashed server writes no summary)."""
        value = getattr(self.summary, summary_field)
        return int(value) if value is not None else len(self.server_events(event))

    def staleness_values(self, t0: float = -math.inf, t1: float = math.inf) -> list[float]:
        return [float(e["staleness"]) for e in self.server_events("update")
                if e.get("staleness") is not None and t0 <= e["time"] <= t1]

    def mean_staleness(self) -> Optional[float]:
        vals = self.staleness_values()
        if vals:
            return statistics.fmean(vals)
        per = [(pw.mean_staleness, pw.pushes or 0) for pw in self.summary.per_worker]
        per = [(m, n) for m, n in per if m is not None and n]
        return sum(m * n for m, n in per) / sum(n for _, n in per) if per else None


def _node_dirs(run_dir: Path) -> dict[str, Path]:
    """Node name -> its metrics file: RUN_DIR/nodes/* first, else any direct subdirectory with metrics."""
    for base in (run_dir / "nodes", run_dir):
        found = {p.parent.name: p for p in sorted(base.glob("*/metrics.jsonl"))}
        if found:
            return found
    return {}


def _timed(path: Path) -> list[dict[str, Any]]:
    """The lines with a numeric "time", in time order (stable: same-time lines keep file order)."""
    return sorted((e for e in read_jsonl(path) if isinstance(e.get("time"), (int, float))), key=lambda e: e["time"])


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Raises ReportError if it holds no metrics at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory (give the run directory, e.g. runs/latest)")
    files = _node_dirs(run_dir)
    if not files:
        raise ReportError(f"{run_dir}: no metrics.jsonl found in nodes/<name>/ or <name>/ "
                          "(is this a run directory, and did any node start?)")
    events = {name: _timed(path) for name, path in files.items()}

    server_marks = {"start", "update", "eval"}
    server = next((n for n, evs in events.items() if any(e.get("event") in server_marks for e in evs)), None)
    workers = sorted(n for n in events if n != server)

    summary = RunSummary()
    candidates = [run_dir / SUMMARY_FILE] + ([files[server].parent / SUMMARY_FILE] if server else [])
    for path in candidates:
        if path.is_file():
            try:
                summary = read_summary(path)
            except ValueError as e:
                raise ReportError(f"{path}: not valid JSON ({e}); the run may have been cut short") from None
            break

    starts = [e["time"] for e in events.get(server, []) if e.get("event") == "start"] if server else []
    all_times = [e["time"] for evs in events.values() for e in evs]
    start_time = min(starts) if starts else min(all_times, default=0.0)
    return RunData(run_dir=run_dir, summary=summary, events=events, faults=_timed(run_dir / "faults.jsonl"),
                   start_time=start_time, server=server, workers=workers)


def node_rows(run: RunData) -> list[NodeSummary]:
    """One row per node: the server's totals, then each worker from the summary's per_worker, its own
    metrics, the backend's per-node numbers (summary "nodes") and, last, the links it is the source of."""
    rows: list[NodeSummary] = []
    s = run.summary
    backend_nodes = {n.node: n for n in s.nodes}
    if run.server:
        updates = run.server_events("update")
        mine = backend_nodes.get(run.server)
        rows.append(NodeSummary(node=run.server, role="server", device=mine and mine.device, slowdown=mine and mine.slowdown,
                            steps=s.steps if s.steps is not None else (updates[-1].get("version") if updates else 0),
                            bytes_in=s.bytes_received, bytes_out=s.bytes_sent,
                            late=run.count("pushes_late", "late"), rejected=run.count("pushes_rejected", "reject"),
                            mean_staleness=run.mean_staleness()))
    rank_of = {v: k for k, v in run.rank_names().items()}
    per_worker = {str(pw.hostname): pw for pw in s.per_worker}
    for node in sorted(set(run.workers) | set(per_worker)):
        pw = per_worker.get(node)
        rank = pw.rank if pw is not None and pw.rank is not None else rank_of.get(node)
        mine = backend_nodes.get(node)
        row = NodeSummary(node=node, role="worker", device=mine and mine.device, slowdown=mine and mine.slowdown)
        if pw is not None:
            row.steps, row.samples_per_s, row.mean_staleness = pw.steps, pw.samples_per_s, pw.mean_staleness
            row.late, row.rejected, row.joins = pw.late, pw.rejected, pw.joins
        # A worker's own metrics fill what the server's summary lacks (e.g. the server crashed).
        own = run.node_events(node)
        ends = [e for e in own if e["event"] == "end"]
        steps = [e for e in own if e["event"] == "step"]
        if row.steps is None:
            row.steps = ends[-1].get("steps") if ends else (steps[-1].get("step") if steps else None)
        if row.samples_per_s is None and ends:
            row.samples_per_s = ends[-1].get("samples_per_s")
        if rank is not None:
            rank = int(rank)
            if row.mean_staleness is None:
                vals = [float(e["staleness"]) for e in run.server_events("update")
                        if e.get("source") == rank and e.get("staleness") is not None]
                row.mean_staleness = statistics.fmean(vals) if vals else None
            if row.late is None:
                row.late = sum(1 for e in run.server_events("late") if e.get("rank") == rank)
            if row.rejected is None:
                row.rejected = sum(1 for e in run.server_events("reject") if e.get("rank") == rank)
        if mine is not None and (mine.bytes_in is not None or mine.bytes_out is not None):
            row.bytes_in, row.bytes_out = mine.bytes_in, mine.bytes_out  # own traffic, not what it forwards
        else:
            links = [link for link in s.links if link.src == node]
            if any(link.bytes_up is not None or link.bytes_down is not None for link in links):
                row.bytes_out = sum(link.bytes_up or 0 for link in links)
                row.bytes_in = sum(link.bytes_down or 0 for link in links)
        rows.append(row)
    return rows
