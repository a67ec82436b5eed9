"""The local sim backend: every node a process on this machine, every link hop an impairing proxy
(the hop plan: hops.py).

Node speed: a node computes 1/device.speed times slower than a Mac mini (--slowdown), capped at
MAX_SLOWDOWN so a default run stays a few minutes on a small machine (cluster.node_slowdown).

Proxies go through the Toxiproxy HTTP API only (an embedded ToxiproxyServer, or a real Toxiproxy
at --toxiproxy URL), so fault injection works the same on either.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from smolcluster.common.errors import ProxyError, SimError
from smolcluster.common.files import write_atomic
from smolcluster.common.wait import wait_until
from smolcluster.core import algorithms
from smolcluster.testbed.control import LinkHandle
from smolcluster.testbed.faults import schedule_for
from smolcluster.testbed.linkemu.api import ToxiproxyServer
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.report import LinkSummary
from smolcluster.testbed.sim.cluster import SimCluster
from smolcluster.testbed.sim.ddp_routes import GlooRouter
from smolcluster.testbed.sim.hops import create_link_proxies, plan_hops, profile_json, worker_paths
from smolcluster.testbed.logstack import loki_for_run
from smolcluster.testbed.sim.options import SimOptions, default_run_dir, overrides_for
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.sim.processes import ProcessGroup
from smolcluster.testbed.topology import Topology, to_dict


@dataclass
class LocalCluster(SimCluster):
    """A running local sim: node processes and one proxy per hop."""

    overrides: RunOverrides = field(default_factory=RunOverrides)
    toxiproxy_url: Optional[str] = None  # a real Toxiproxy; None: embedded
    env: dict[str, str] = field(default_factory=dict)
    seed: Optional[int] = None

    backend = "local"
    teardown_note = "every node process and link proxy was stopped"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.procs = ProcessGroup(env=self.env)
        self.plans = plan_hops(self.topology)
        self.paths = worker_paths(self.topology)
        self.listen: dict[str, str] = {}
        self.server_port: Optional[int] = None
        self._embedded: Optional[ToxiproxyServer] = None
        self._created: list[str] = []
        if self.toxiproxy_url:
            self.toxiproxy = ToxiproxyClient(self.toxiproxy_url)
        self.config_dir = self.run_dir / "config"
        self.router: Optional[GlooRouter] = None  # an all-reduce's worker-to-worker links (DDP)
        # an all-reduce's links go through the router's proxies unless the run says `ddp_routes: false`
        self.routes = algorithms.get(self.algorithm).collective and \
            {**self.topology.training.extra, **self.overrides.extra}.get("ddp_routes", True)
        if self.routes:  # gloo dials the routes the router publishes
            self.overrides = dataclasses.replace(self.overrides, extra={**self.overrides.extra, "ddp_routes": True})

    def loki_url(self) -> Optional[str]:
        return self.overrides.extra.get("loki_url") or self.topology.training.extra.get("loki_url")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Write configs, start the server, the link proxies, then the workers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "topology.yaml", yaml.safe_dump(to_dict(self.topology), sort_keys=False))
        write_run_configs(self.topology, self.config_dir, self.overrides, server_address=lambda w: "127.0.0.1", port=0)
        self._t0 = time.time()
        self._start_toxiproxy()
        self._start_server(resume=False)
        self._created = [p.name for p in self.plans]  # before creating: a failure half-way still cleans up
        self.listen = create_link_proxies(self.toxiproxy, self.plans, f"127.0.0.1:{self.server_port}")
        self._write_proxies_file()
        if self.routes:
            self._start_router()
        for w in self.topology.workers:
            self._start_worker(w.name)

    def _start_toxiproxy(self) -> None:
        if self.toxiproxy_url is None:
            self._embedded = ToxiproxyServer("127.0.0.1", 0, seed=self.seed)
            self._embedded.start()
            self.toxiproxy = ToxiproxyClient(self._embedded.api_url)
        else:
            self.toxiproxy.version()  # fail early with a clear message if it is not there
            for p in self.plans:
                if p.name in self.toxiproxy.proxies():
                    raise SimError(f"Toxiproxy at {self.toxiproxy_url} already has a proxy {p.name!r} "
                                   "(another sim running?); delete it or use another Toxiproxy")

    def _write_proxies_file(self) -> None:
        """RUN_DIR/proxies.json: where each link listens (to inspect a run, or to check it left nothing open)."""
        info = {"api": self.toxiproxy.api_url, "embedded": self._embedded is not None, "server_port": self.server_port,
                "proxies": [{"name": p.name, "listen": self.listen[p.name],
                             "upstream": self.listen[p.next] if p.next else f"127.0.0.1:{self.server_port}"} for p in self.plans]}
        write_atomic(self.run_dir / "proxies.json", json.dumps(info, indent=2))

    def _start_router(self) -> None:
        from smolcluster.core.algorithms.ddp import RENDEZVOUS_FILE  # imports torch: only in a DDP run

        path = self.nodes_dir / self.server / RENDEZVOUS_FILE
        info = wait_until(lambda: json.loads(path.read_text()) if path.exists() else None, 10.0)
        if not info:
            raise SimError(f"the DDP server wrote no {path}; see {path.parent / 'stdout.log'}")
        self.router = GlooRouter(self.topology, self.toxiproxy, int(info["store_port"]))
        self.router.created = self._created  # its proxies are cleaned up and counted with the others
        self.router.start()

    def _start_server(self, resume: bool) -> None:
        d = self.nodes_dir / self.server
        args = ["server", "--algo", self.algorithm, "--config-dir", str(self.config_dir), "--run-dir", str(d),
                "--bind", "127.0.0.1", "--port", str(self.server_port or 0), "--slowdown", f"{self.slowdown(self.server):g}"]
        info = self.procs.start_server(self.server, args + (["--resume"] if resume else []), d)
        old, self.server_port = self.server_port, int(info["port"])
        if old is not None and old != self.server_port:  # re-point the last hops at the new port
            for p in self.plans:
                if p.next is None:
                    self.toxiproxy.update_proxy(p.name, upstream=f"127.0.0.1:{self.server_port}")

    def _start_worker(self, name: str) -> None:
        d = self.nodes_dir / name
        self.procs.start(name, ["worker", str(self.topology.nodes[name].rank), name, "--algo", self.algorithm,
                                "--config-dir", str(self.config_dir), "--run-dir", str(d),
                                "--connect", self.listen[self.paths[name][0]], "--slowdown", f"{self.slowdown(name):g}"],
                         d / "stdout.log")

    def stop(self) -> None:
        """Stop every process, snapshot the link counters, then remove the proxies. Idempotent.
        A second Ctrl-C during this cleanup is ignored, so it cannot leave processes behind."""
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop()
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        try:
            self.procs.stop_all()
        finally:
            try:
                if self._created:
                    self.final_link_stats = self.link_stats()
            except ProxyError:
                pass
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None
            else:
                for name in self._created:
                    try:
                        self.toxiproxy.delete_proxy(name)
                    except ProxyError:
                        pass
            self._created = []

    # ------------------------------------------------------------------ node state

    def server_exit_code(self) -> Optional[int]:
        return self.procs.procs[self.server].returncode

    def worker_exit_code(self, node: str) -> Optional[int]:
        p = self.procs.procs.get(node)
        return 0 if p is None else p.returncode

    def worker_finished(self, node: str) -> bool:
        return not self.alive(node)  # its process exited (W&B may still be writing after the `end` line)

    # ------------------------------------------------------------------ ClusterControl

    def links(self) -> list[LinkHandle]:
        return [LinkHandle(name=p.name, src=p.hop.src, dst=p.hop.dst, network=p.hop.network, mechanism=p.mechanism())
                for p in self.plans]

    def kill(self, node: str) -> None:
        self._killed(node)
        self.procs.signal(node, signal.SIGKILL)

    def pause(self, node: str) -> None:
        self.procs.signal(node, getattr(signal, "SIGSTOP", signal.SIGTERM))

    def resume(self, node: str) -> None:
        self.procs.signal(node, getattr(signal, "SIGCONT", signal.SIGTERM))

    def restart(self, node: str) -> None:
        if self.alive(node):
            self.kill(node)
            self.procs.wait(node, timeout=10)
        if node == self.server:
            self._start_server(resume=True)  # same port when free, else the last hops are re-pointed
        else:
            self._start_worker(node)
        self._restarted(node)

    def alive(self, node: str) -> bool:
        p = self.procs.procs.get(node)
        return p is not None and p.alive()

    # ------------------------------------------------------------------ links

    def link_stats(self) -> dict[str, dict[str, int]]:
        """Per proxy: bytes up/down (embedded proxy's `stats`; a real Toxiproxy has none)."""
        if not self._created:
            return self.final_link_stats
        return {name: body["stats"] for name, body in self.toxiproxy.proxies().items()
                if name in self._created and isinstance(body.get("stats"), dict)}

    def summary_links(self) -> list[LinkSummary]:
        rows = []
        for p in self.plans:
            s = self.final_link_stats.get(p.name)
            rows.append(LinkSummary(
                name=p.name, src=p.hop.src, dst=p.hop.dst, network=p.hop.network, profile=profile_json(p.profile),
                mechanism=p.mechanism(), rate_shaped=p.rate_shaped(), loss_emulated=False, notes=p.notes(),
                bytes_up=s.get("upstream_bytes") if s else None, bytes_down=s.get("downstream_bytes") if s else None,
                connections=s.get("connections_total") if s else None))
        if self.router is not None:
            rows += self.router.summary_links(self.final_link_stats)
        return rows

    def node_bytes(self) -> dict[str, tuple[int, int]]:
        own = super().node_bytes()
        if self.router is None:
            return own
        gloo = self.router.node_bytes(self.final_link_stats)
        return {w: tuple(a + b for a, b in zip(own.get(w, (0, 0)), gloo.get(w, (0, 0)))) for w in set(own) | set(gloo)}

    def summary_fields(self) -> dict[str, Any]:
        if self.router is not None:
            return {"ddp_links": self.router.summary()}
        if algorithms.get(self.algorithm).collective:
            return {"ddp_links": {"mode": "direct", "note": "ddp_routes: false: gloo's links are unshaped"}}
        return {}

    def toxiproxy_label(self) -> str:
        return self.toxiproxy_url or "embedded"


def _profile_text(p: Any) -> str:
    rate = f"{p.up_mbit:g}/{p.down_mbit:g} Mbit/s" if p.up_mbit != p.down_mbit else f"{p.rate_mbit:g} Mbit/s"
    return f"{p.name}: {p.delay_ms:g}±{p.jitter_ms:g} ms, {rate}"


def run_local(topo: Topology, opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """`smolcluster sim FILE` on the local backend: run until the server finishes. Returns the exit code."""
    schedule = schedule_for(topo, opts.faults)  # a bad fault entry fails here, before anything starts
    algo = opts.algo or topo.training.algorithm
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir(topo, algo)
    print(f"smolcluster sim: {topo.name} ({opts.file}), {algo}, local backend, run dir {run_dir}", file=out)
    loki = loki_for_run(run_dir.parent, lambda line: print(line, file=out), loki_url=opts.loki_url) if opts.logging else None
    cluster = LocalCluster(topology=topo, run_dir=run_dir, algorithm=algo, overrides=overrides_for(topo, opts, algo, loki),
                           toxiproxy_url=opts.toxiproxy, seed=opts.seed)
    for link in cluster.plans:
        notes = "; ".join(link.notes())
        print(f"  link {link.name:<16} {_profile_text(link.profile)}  [{link.mechanism()}]" + (f"  ({notes})" if notes else ""), file=out)
    for w in topo.workers:
        print(f"  node {w.name:<8} {w.device.name} -> slowdown x{cluster.slowdown(w.name):g}, path {' | '.join(cluster.paths[w.name])}", file=out)
    out.flush()
    return cluster.run(schedule, seed=opts.seed if opts.seed is not None else topo.training.seed, out=out,
                       progress_interval=opts.progress_interval)
