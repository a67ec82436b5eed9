"""RUN_DIR/summary.json as typed records: what a finished run says about itself.

One schema for every way a run is made: the sim's backends write it (build_summary), and so can a
real cluster's `collect` or a virtual backend, from the same inputs — the server's own summary
(nodes/<server>/summary.json, written by the training core), the nodes' metrics, and what the
backend knows about its links and nodes. `smolcluster report` and `compare` read it back.

Every field may be missing on reading: a run started by hand has only the server's summary, a
crashed one none. Keys this schema does not know are kept (`extra`) and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

from smolcluster.common.files import write_atomic
from smolcluster.common.jsonl import read_jsonl

SUMMARY_FILE = "summary.json"
ACCURACY_TARGETS = (0.90, 0.95)  # the summary's time_to_90_s and time_to_95_s


def _omit_if_none() -> Any:
    """A field written only when it has a value (the key is absent otherwise, as before it existed)."""
    return field(default=None, metadata={"omit_if_none": True})


@dataclass
class _Record:
    """A JSON object as a dataclass. `LISTS` names fields holding lists of other records."""

    LISTS: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        for name, record in cls.LISTS.items():
            if name in values:
                values[name] = [record.from_json(x) for x in values[name] or [] if isinstance(x, dict)]
        record = cls(**values)
        record.extra = {k: v for k, v in data.items() if k not in known}
        return record

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("omit_if_none")):
                continue
            out[f.name] = [x.to_json() for x in value] if f.name in self.LISTS else value
        return out | self.extra


@dataclass
class WorkerStats(_Record):
    """One `per_worker` entry: the server's accounting of one worker."""

    rank: Optional[int] = _omit_if_none()
    hostname: Optional[str] = _omit_if_none()
    steps: Optional[int] = _omit_if_none()
    pushes: Optional[int] = _omit_if_none()  # every push the server received from it: applied + late + rejected
    applied: Optional[int] = _omit_if_none()
    samples_per_s: Optional[float] = _omit_if_none()
    mean_staleness: Optional[float] = _omit_if_none()
    max_staleness: Optional[int] = _omit_if_none()
    late: Optional[int] = _omit_if_none()
    rejected: Optional[int] = _omit_if_none()
    joins: Optional[int] = _omit_if_none()
    finished: Optional[bool] = _omit_if_none()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeSummary(_Record):
    """One `nodes` entry: a node as the backend saw it (also a row of the report's node table). A worker's
    bytes are its own traffic, not what it forwards for others; out = towards the server."""

    node: Optional[str] = None
    role: Optional[str] = None
    host: Optional[str] = _omit_if_none()  # where it ran (real hardware: its ssh destination)
    device: Optional[str] = None
    slowdown: Optional[float] = None
    steps: Optional[int] = None
    samples_per_s: Optional[float] = None
    mean_staleness: Optional[float] = None
    pushes: Optional[int] = _omit_if_none()
    bytes_out: Optional[int] = None
    bytes_in: Optional[int] = None
    late: Optional[int] = None
    rejected: Optional[int] = None
    joins: Optional[int] = _omit_if_none()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LinkSummary(_Record):
    """One `links` entry: an emulated link (a hop, or a worker's whole path), its profile, how it was
    applied and what crossed it (up = towards the server)."""

    name: Optional[str] = None
    src: Optional[str] = None
    dst: Optional[str] = None
    network: Optional[str] = None
    hops: Optional[list[str]] = _omit_if_none()  # a path's hops, when one link stands for several
    profile: dict[str, Any] = field(default_factory=dict)  # name, delay_ms, jitter_ms, loss_pct, up_mbit, down_mbit
    mechanism: Optional[str] = None  # "proxy", "tbf+proxy", "netem", ...
    kernel: Optional[dict[str, str]] = _omit_if_none()  # "node/network" -> qdisc, where the kernel shapes
    loss: Optional[dict[str, str]] = _omit_if_none()  # "node/network" -> iptables / netem / "none: why", where loss is due
    ingress: Optional[dict[str, str]] = _omit_if_none()  # "node/network" -> ifb / "none: why", where what arrives is shaped
    toxics: Optional[list[dict[str, Any]]] = _omit_if_none()  # Toxiproxy toxics carrying the profile
    rate_shaped: Optional[bool] = None
    loss_emulated: Optional[bool] = None
    notes: list[str] = field(default_factory=list)
    bytes_up: Optional[int] = None
    bytes_down: Optional[int] = None
    connections: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LinkSummary":
        link = super().from_json(data)
        if isinstance(link.profile, str):  # a hand-written summary may name the profile only
            link.profile = {"name": link.profile}
        if (link.src is None or link.dst is None) and "->" in str(link.name or ""):
            link.src, link.dst = str(link.name).split("->", 1)
        return link


@dataclass
class EvalPoint(_Record):
    t: Optional[float] = None  # seconds since the run start
    version: Optional[int] = None
    test_accuracy: Optional[float] = None
    test_loss: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary(_Record):
    """summary.json. The first block is the server's own summary; the rest is what the backend adds."""

    LISTS: ClassVar[dict[str, type]] = {"per_worker": WorkerStats, "evals": EvalPoint, "links": LinkSummary,
                                        "nodes": NodeSummary}

    algorithm: Optional[str] = _omit_if_none()
    workers: Optional[int] = _omit_if_none()
    epochs: Optional[int] = _omit_if_none()
    steps: Optional[int] = _omit_if_none()  # server updates (the final model version)
    wall_time_s: Optional[float] = _omit_if_none()  # the server's, from its start to its end
    final_test_accuracy: Optional[float] = _omit_if_none()
    final_test_loss: Optional[float] = _omit_if_none()
    model_sha256: Optional[str] = _omit_if_none()  # SHA-256 of the final parameters (names sorted): equal = bit-identical
    pushes_applied: Optional[int] = _omit_if_none()
    pushes_late: Optional[int] = _omit_if_none()
    pushes_rejected: Optional[int] = _omit_if_none()
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    connections_rejected: Optional[int] = _omit_if_none()
    bytes_sent: Optional[int] = _omit_if_none()  # by the server
    bytes_received: Optional[int] = _omit_if_none()
    stop_reason: Optional[str] = _omit_if_none()
    stop_status: Optional[str] = _omit_if_none()  # finished | stopped (interrupted, idle) | error
    messages_rejected: Optional[dict[str, int]] = _omit_if_none()  # not pushes: bad HELLO/PULL/BYE fields, early pulls
    handler_errors: Optional[int] = _omit_if_none()  # messages the server could not handle (their peer was dropped)
    robust_aggregation: Optional[dict[str, Any]] = _omit_if_none()  # enabled, k, per_rank, rejected, threshold
    connections_refused: Optional[int] = _omit_if_none()  # closed at accept: over a limit, or a throttled address
    checkpoint_failures: Optional[int] = _omit_if_none()  # checkpoints that could not be written (a full disk)
    final_checkpoint: Optional[str] = _omit_if_none()  # its path (None: it could not be written)
    per_worker: list[WorkerStats] = field(default_factory=list)
    deadline: Optional[dict[str, Any]] = _omit_if_none()  # SyncPS: mode fixed (seconds) or auto (k, window, bounds, median_s, ...)
    torch: Optional[dict[str, Any]] = _omit_if_none()  # version, build, import_rss_mb: what the nodes ran
    config: dict[str, Any] = field(default_factory=dict)

    topology: Optional[str] = _omit_if_none()
    topology_file: Optional[str] = _omit_if_none()
    backend: Optional[str] = _omit_if_none()  # local, compose, hardware (a virtual backend: its name)
    run_name: Optional[str] = _omit_if_none()  # hardware: the launched run
    toxiproxy: Optional[str] = _omit_if_none()  # what served the links' Toxiproxy API
    run_start: Optional[float] = None  # unix time of the server's `start` event; times count from it
    sim_wall_time_s: Optional[float] = _omit_if_none()  # the whole run, start-up included
    time_to_90_s: Optional[float] = None  # None: never reached
    time_to_95_s: Optional[float] = None
    evals: list[EvalPoint] = field(default_factory=list)
    links: list[LinkSummary] = field(default_factory=list)
    nodes: list[NodeSummary] = field(default_factory=list)
    stopped_after_end: Optional[list[str]] = _omit_if_none()  # workers the backend had to stop after the server's end
    faults: Optional[list[dict[str, Any]]] = _omit_if_none()  # how the cluster reacted to each (report.reactions)
    faults_failed: Optional[list[dict[str, Any]]] = _omit_if_none()  # faults that could not be applied
    compose_project: Optional[str] = _omit_if_none()
    compose_file: Optional[str] = _omit_if_none()
    shaping: Optional[dict[str, str]] = _omit_if_none()  # compose: "node/network" -> qdisc
    ddp_links: Optional[dict[str, Any]] = _omit_if_none()  # DDP, local: mode routed | partly routed | direct (unshaped), pairs
    extra: dict[str, Any] = field(default_factory=dict)


def read_summary(path: str | Path) -> RunSummary:
    """A summary.json (ValueError when it is not a JSON object)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return RunSummary.from_json(data)


def write_summary(path: str | Path, summary: RunSummary) -> None:
    """Atomically: a reader never sees half a summary."""
    write_atomic(path, json.dumps(summary.to_json(), indent=2))


def time_to_accuracy(evals: Sequence[Mapping[str, Any]], start: Optional[float], mark: float) -> Optional[float]:
    """Seconds from `start` to the first evaluation (metrics `eval` events) with test accuracy >= mark."""
    if start is None:
        return None
    for e in evals:
        acc = e.get("test_accuracy")
        if acc is not None and acc >= mark:
            return e["time"] - start
    return None


def build_summary(server: Mapping[str, Any], *, backend: str, nodes_dir: Path, server_name: str, workers: Sequence[str],
                  devices: Mapping[str, str] | None = None, slowdown: Mapping[str, float] | None = None,
                  hosts: Mapping[str, str] | None = None, topology: Optional[str] = None,
                  topology_file: Optional[str] = None, run_name: Optional[str] = None,
                  links: Sequence[LinkSummary] = (), node_bytes: Mapping[str, tuple[int, int]] | None = None,
                  wall_time_s: Optional[float] = None, toxiproxy: Optional[str] = None,
                  stopped_after_end: Optional[Sequence[str]] = None) -> RunSummary:
    """The server's summary plus what the backend adds: times to accuracy and the evaluation curve from the
    server's metrics (nodes_dir/<server>/metrics.jsonl), a row per node (the workers' own metrics where the
    server lacks them), the links. Every backend that leaves RUN_DIR/nodes/<node>/ fills it the same way.

    devices / slowdown / hosts: per node, where the backend knows them; node_bytes: each worker's own
    (up, down) bytes, where it measured them; wall_time_s: the whole run, start-up included."""
    s = RunSummary.from_json(server)
    devices, slowdown, hosts, node_bytes = devices or {}, slowdown or {}, hosts or {}, node_bytes or {}
    server_metrics = read_jsonl(nodes_dir / server_name / "metrics.jsonl")
    start = next((m["time"] for m in server_metrics if m.get("event") == "start"), None)
    evals = [m for m in server_metrics if m.get("event") == "eval"]
    nodes = [NodeSummary(node=server_name, role="server", host=hosts.get(server_name), device=devices.get(server_name),
                         slowdown=slowdown.get(server_name), steps=s.steps, bytes_out=s.bytes_sent,
                         bytes_in=s.bytes_received, late=s.pushes_late, rejected=s.pushes_rejected)]
    per_worker = {w.hostname: w for w in s.per_worker}
    for name in workers:
        pw = per_worker.get(name, WorkerStats())
        own = read_jsonl(nodes_dir / name / "metrics.jsonl")
        end = next((m for m in reversed(own) if m.get("event") == "end"), {})
        steps = [m.get("step", 0) for m in own if m.get("event") == "step"]
        # a worker stopped by the backend wrote no `end`: count its step lines instead
        sps = end.get("samples_per_s", pw.samples_per_s)
        up, down = node_bytes.get(name, (None, None))
        nodes.append(NodeSummary(node=name, role="worker", host=hosts.get(name), device=devices.get(name),
                                 slowdown=slowdown.get(name), steps=end.get("steps", max(steps) + 1 if steps else pw.steps),
                                 samples_per_s=round(sps, 2) if isinstance(sps, float) else sps,
                                 mean_staleness=pw.mean_staleness, pushes=pw.pushes, bytes_out=up, bytes_in=down,
                                 late=pw.late, rejected=pw.rejected))
    t90, t95 = (time_to_accuracy(evals, start, mark) for mark in ACCURACY_TARGETS)
    return dataclasses.replace(
        s, topology=topology, topology_file=topology_file, backend=backend, run_name=run_name, toxiproxy=toxiproxy,
        run_start=start, sim_wall_time_s=round(wall_time_s, 2) if wall_time_s is not None else None,
        time_to_90_s=round(t90, 2) if t90 is not None else None, time_to_95_s=round(t95, 2) if t95 is not None else None,
        evals=[EvalPoint(t=round(e["time"] - start, 2) if start else None, version=e.get("version"),
                         test_accuracy=e.get("test_accuracy"), test_loss=e.get("test_loss")) for e in evals],
        links=list(links), nodes=nodes, stopped_after_end=list(stopped_after_end) if stopped_after_end is not None else None,
        faults=[])
