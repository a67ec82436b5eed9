"""`smolcluster sim FILE --backend virtual`: the whole cluster in this process, in virtual time.

The run leaves the same RUN_DIR as the other backends (topology.yaml, config/, nodes/<name>/ with
metrics, logs and the server's summary and checkpoints, summary.json, faults.jsonl, plots), so
`report` and `compare` read it the same way; times in it are virtual seconds. What the run cost in
wall time and memory goes to RUN_DIR/virtual.json (the one file that differs between reruns).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import torch
import yaml

from smolcluster.common.errors import SimError
from smolcluster.common.files import write_atomic
from smolcluster.core import algorithms
from smolcluster.core.training.config import RunConfig, load_run_config, rank_of
from smolcluster.core.training.device import torch_info
from smolcluster.core.training.node import _transport
from smolcluster.core.training.telemetry import MetricsWriter, WandbRun, node_labels, setup_logging
from smolcluster.testbed.control import LinkHandle
from smolcluster.testbed.faults import FaultInjector, FaultSchedule, schedule_for
from smolcluster.testbed.report import LinkSummary
from smolcluster.testbed.sim.cluster import WORKER_GRACE_S, Progress, SimCluster
from smolcluster.testbed.sim.hops import plan_hops, worker_paths
from smolcluster.testbed.sim.options import SimOptions, default_run_dir, overrides_for
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.sim.virtual.calibrate import measure_ms_per_sample, reference_ms_per_sample, write_reference
from smolcluster.testbed.sim.virtual.network import VirtualNetwork, VirtualToxiproxy
from smolcluster.testbed.sim.virtual.nodes import (SharedTask, NodeTask, VirtualContext, VirtualServerIO, VirtualWorkerIO,
                                                   virtual_class)
from smolcluster.testbed.sim.virtual.scheduler import Process, Scheduler, VirtualClock
from smolcluster.testbed.topology import Topology, to_dict

FAULT_POLL_S = 0.1  # virtual seconds between fault trigger checks (the injector's poll, in virtual time)
VIRTUAL_FILE = "virtual.json"


@dataclass
class VirtualCluster(SimCluster):
    """A virtual run: one Process per node on a Scheduler, links on a VirtualNetwork."""

    overrides: RunOverrides = field(default_factory=RunOverrides)
    seed: int = 0
    reference_ms_per_sample: Optional[float] = None  # None: the profiles file's (calibrate.reference_ms_per_sample)

    backend = "virtual"
    teardown_note = "every simulated node was stopped"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference_ms_per_sample is None:
            self.reference_ms_per_sample = reference_ms_per_sample()
        self.sched = Scheduler()
        self.clock = VirtualClock(self.sched)
        self.plans = plan_hops(self.topology)
        self.paths = worker_paths(self.topology)
        self.net = VirtualNetwork(self.sched, self.plans, self.paths, self.server, self.seed)
        self.toxiproxy = VirtualToxiproxy(self.net)  # type: ignore[assignment]  # what the fault actions call
        self.config_dir = self.run_dir / "config"
        self.procs: dict[str, Process] = {}
        self.contexts: dict[str, VirtualContext] = {}
        self.server_node: Any = None
        self.cfg: Optional[RunConfig] = None
        self.task: Optional[SharedTask] = None
        self._server_ended_at: Optional[float] = None

    # ------------------------------------------------------------------ the compute model

    def ms_per_sample(self, node: str) -> float:
        """A node's modelled training step per sample: its device's own figure, else the reference x slowdown."""
        device = self.topology.nodes[node].device
        assert self.reference_ms_per_sample is not None
        return device.ms_per_sample if device.ms_per_sample is not None else self.reference_ms_per_sample * self.slowdown(node)

    # ------------------------------------------------------------------ nodes

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "topology.yaml", yaml.safe_dump(to_dict(self.topology), sort_keys=False))
        cfg = write_run_configs(self.topology, self.config_dir, self.overrides, server_address=lambda w: "virtual",
                                port=self.topology_port())
        self.cfg = load_run_config(self.config_dir, self.algorithm)
        if cfg.gpt is not None:
            raise SimError("the virtual backend trains the topology's MNIST model; --gpt-config runs on the local backend")
        torch.set_num_threads(1)  # as every node of the other backends; one thread also keeps float sums in one order
        self._start_server(resume=False)
        for w in self.topology.workers:
            self._start_worker(w.name)

    def topology_port(self) -> int:
        return 65432

    def _context(self, node: str, role: str, rank: int) -> VirtualContext:
        assert self.cfg is not None
        d = self.nodes_dir / node
        d.mkdir(parents=True, exist_ok=True)
        labels = node_labels(role=role, rank=rank, hostname=node, algorithm=self.algorithm, run=self.run_dir.name)
        log = setup_logging(d / f"{role}.log", labels=labels, stderr=False)
        metrics = MetricsWriter(d / "metrics.jsonl", now=self.clock.time)
        wandb = WandbRun(mode="off", algorithm=self.algorithm, role=role, hostname=node, rank=rank, lr=self.cfg.nn.learning_rate,
                         batch_size=self.cfg.nn.batch_size, config={}, run_dir=d, logger=log)
        ctx = VirtualContext(cfg=self.cfg, role=role, rank=rank, hostname=node, run_dir=d, log=log, metrics=metrics,
                             wandb=wandb, key=None, transport=_transport(self.cfg.cluster), slowdown=self.slowdown(node),
                             torch=torch_info() | {"import_rss_mb": None}, clock=self.clock,
                             ms_per_sample=self.ms_per_sample(node))
        if self.task is None:
            self.task = SharedTask(ctx.task)
        ctx.__dict__["task"] = NodeTask(self.task, ctx)  # NodeContext.task is a cached_property: this is its value
        self.contexts[node] = ctx
        return ctx

    def _start_server(self, resume: bool) -> None:
        algo = algorithms.get(self.algorithm)
        ctx = self._context(self.server, "server", 0)
        cls = virtual_class(algo.server_class(), VirtualServerIO, self.net, address=(self.server, self.topology_port()))
        server = cls(ctx, bind=self.server, port=self.topology_port(), resume=resume)
        self.server_node = server
        self.procs[self.server] = self.sched.spawn(self.server, self._running(ctx, server.serve))

    def _start_worker(self, name: str) -> None:
        assert self.cfg is not None
        algo = algorithms.get(self.algorithm)
        rank = rank_of(self.cfg.cluster, name)
        ctx = self._context(name, "worker", rank)
        cls = virtual_class(algo.worker_class(), VirtualWorkerIO, self.net)
        worker = cls(ctx, host=self.server, port=self.topology_port())
        self.procs[name] = self.sched.spawn(name, self._running(ctx, worker.run))

    @staticmethod
    def _running(ctx: VirtualContext, body: Any) -> Any:
        def target() -> None:
            try:
                body()
            finally:
                ctx.close()
        return target

    def stop(self) -> None:
        self.sched.shutdown()
        for ctx in self.contexts.values():
            ctx.close()

    # ------------------------------------------------------------------ ClusterControl

    def alive(self, node: str) -> bool:
        p = self.procs.get(node)
        return p is not None and not p.done and not p.killed

    def kill(self, node: str) -> None:
        self._killed(node)
        proc = self.procs[node]
        self.sched.kill(proc)
        self.contexts[node].metrics.close()  # a SIGKILLed process writes nothing more
        self.net.reset_node(node, f"{node} was killed")
        if node == self.server and self.server_node is not None:
            listener = self.server_node.listener
            if listener is not None:
                listener.close()

    def pause(self, node: str) -> None:
        self.sched.pause(self.procs[node])

    def resume(self, node: str) -> None:
        self.sched.resume(self.procs[node])

    def restart(self, node: str) -> None:
        if self.alive(node):
            self.kill(node)
        if node == self.server:
            self._start_server(resume=True)
        else:
            self._start_worker(node)
        self._restarted(node)

    def server_version(self) -> int:
        return self.server_node.version if self.server_node is not None else 0

    def elapsed(self) -> float:
        return self.sched.now

    def server_exit_code(self) -> Optional[int]:
        p = self.procs.get(self.server)
        if p is None or not p.done:
            return None
        return 1 if p.error is not None else 0

    def worker_exit_code(self, node: str) -> Optional[int]:
        p = self.procs.get(node)
        if p is None or not p.done:
            return None
        return 1 if p.error is not None else 0

    def worker_finished(self, node: str) -> bool:
        return not self.alive(node)

    # ------------------------------------------------------------------ links

    def links(self) -> list[LinkHandle]:
        return [LinkHandle(name=p.name, src=p.hop.src, dst=p.hop.dst, network=p.hop.network, mechanism="virtual")
                for p in self.plans]

    def summary_links(self) -> list[LinkSummary]:
        rows = []
        for p in self.plans:
            hop, prof = self.net.hops[p.name], p.profile
            rows.append(LinkSummary(
                name=p.name, src=p.hop.src, dst=p.hop.dst, network=p.hop.network,
                profile={"name": prof.name, "delay_ms": prof.delay_ms, "jitter_ms": prof.jitter_ms, "loss_pct": prof.loss_pct,
                         "up_mbit": prof.up_mbit, "down_mbit": prof.down_mbit},
                mechanism="virtual", rate_shaped=True, loss_emulated=False,
                notes=[f"loss {prof.loss_pct:g}% not modelled"] if prof.loss_pct else [],
                bytes_up=hop.up.bytes, bytes_down=hop.down.bytes, connections=hop.connections_total))
        return rows

    def toxiproxy_label(self) -> str:
        return "virtual"

    # ------------------------------------------------------------------ a whole run

    def run(self, schedule: FaultSchedule, *, seed: int, out: TextIO = sys.stdout, progress_interval: float = 5.0,
            announce: Any = None) -> int:
        wall0 = time.perf_counter()
        progress = Progress(out, progress_interval)
        try:
            with self:
                self.start()
                injector = FaultInjector(schedule, self, seed=seed, clock=self.clock.time)
                if injector.faults:
                    self._every(FAULT_POLL_S, injector.tick, until=lambda: self.server_exit_code() is not None)
                self._every(progress_interval, lambda: (self.tail.poll(), progress.update(self)),
                            until=lambda: self.server_exit_code() is not None)
                self.sched.run(stop=self._over)
                progress.done()
                code, server = self.server_exit_code(), self.procs[self.server]
                if server.error is not None:
                    print(f"the server failed: {type(server.error).__name__}: {server.error}", file=out)
                self.stopped_after_end = [w.name for w in self.topology.workers if self.alive(w.name)]
                self.final_link_stats = {name: {"upstream_bytes": h.up.bytes, "downstream_bytes": h.down.bytes}
                                         for name, h in self.net.hops.items()}
        except KeyboardInterrupt:
            progress.done()
            print(f"\ninterrupted: {self.teardown_note}; partial results in {self.run_dir}", file=out)
            return 130
        self.finish(code if code is not None else 1, injector.events, out)
        self._write_costs(time.perf_counter() - wall0, out)
        return 0

    def _over(self) -> bool:
        """The server ended and every worker finished, or had WORKER_GRACE_S (virtual) to (as on the local backend)."""
        if self.server_exit_code() is None:
            self._server_ended_at = None
            return False
        if self._server_ended_at is None:
            self._server_ended_at = self.sched.now
        workers_done = all(not self.alive(w.name) for w in self.topology.workers)
        return workers_done or self.sched.now - self._server_ended_at > WORKER_GRACE_S

    def _every(self, interval: float, action: Any, until: Any) -> None:
        def tick() -> None:
            if until():
                return
            action()
            self.sched.after(interval, tick)
        self.sched.after(0.0, tick)

    def _write_costs(self, wall_s: float, out: TextIO) -> None:
        """What the run cost here (wall time, memory): the only output that differs between reruns."""
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
        virtual_s = self.sched.now
        costs = {"wall_s": round(wall_s, 2), "virtual_s": round(virtual_s, 3),
                 "wall_s_per_virtual_s": round(wall_s / virtual_s, 4) if virtual_s else None,
                 "events": self.sched.events_run, "nodes": len(self.topology.nodes), "peak_rss_mb": round(peak_mb, 1),
                 "reference_ms_per_sample": self.reference_ms_per_sample}  # the compute model this run charged
        write_atomic(self.run_dir / VIRTUAL_FILE, json.dumps(costs, indent=2))
        print(f"virtual: {virtual_s:.2f} s simulated in {wall_s:.1f} s wall ({costs['wall_s_per_virtual_s']} wall s per "
              f"simulated s), {self.sched.events_run} events, peak memory {peak_mb:.0f} MB", file=out)


def run_calibrate(topo: Topology, opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """`smolcluster sim FILE --backend virtual --calibrate`: measure this machine's step, write it, no training."""
    import tempfile

    algo = opts.algo or topo.training.algorithm
    with tempfile.TemporaryDirectory() as d:
        cfg = write_run_configs(topo, Path(d), overrides_for(topo, opts, algo), server_address=lambda w: "virtual", port=1)
    before = reference_ms_per_sample()
    ms = measure_ms_per_sample(cfg)
    path = write_reference(ms)
    print(f"calibrated: {cfg.nn.model.type} step at batch {cfg.nn.batch_size} takes {ms:.4f} ms per sample here "
          f"(was {before:.4f}); written to {path} as the reference device's ms_per_sample", file=out)
    return 0


def run_virtual(topo: Topology, opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """`smolcluster sim FILE --backend virtual`. Returns the exit code."""
    if opts.calibrate:
        return run_calibrate(topo, opts, out)
    schedule = schedule_for(topo, opts.faults)
    algo = opts.algo or topo.training.algorithm
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir(topo, algo)
    seed = opts.seed if opts.seed is not None else topo.training.seed
    print(f"smolcluster sim: {topo.name} ({opts.file}), {algo}, virtual backend, run dir {run_dir}", file=out)
    cluster = VirtualCluster(topology=topo, run_dir=run_dir, algorithm=algo, overrides=overrides_for(topo, opts, algo),
                             seed=seed)
    for w in topo.workers:
        print(f"  node {w.name:<8} {w.device.name} -> {cluster.ms_per_sample(w.name):.4f} ms/sample, "
              f"path {' | '.join(cluster.paths[w.name])}", file=out)
    out.flush()
    return cluster.run(schedule, seed=seed, out=out, progress_interval=opts.progress_interval)
