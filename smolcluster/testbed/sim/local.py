"""The local sim backend: every node a process on this machine, every link hop an impairing proxy.

    pi4 --[proxy "pi4->mini3"]--> --[proxy "mini3->mini1"]--> server (mini1)
                     mini3 -----------^

One Toxiproxy proxy per hop (src->dst) of the workers' routed paths to the server. A hop's
upstream is the next hop's proxy (or the server for the last hop), so pi4's traffic crosses
pi4->mini3 and then mini3->mini1, and shares mini3->mini1 with mini3's own traffic: a link's
bandwidth is shared by every connection that crosses it, as on the wire.

Each proxy gets its hop's LinkProfile as toxics:
- latency (delay_ms, jitter_ms) on both streams (one way each, so RTT = 2 x delay). Toxiproxy's
  units are whole milliseconds, so delays are rounded (0.15 ms Thunderbolt -> 0: below what a
  loopback proxy can resolve anyway; the proxy itself adds ~0.1 ms).
- bandwidth (up rate on upstream, down rate on downstream, KB/s), only where the embedded proxy
  can actually pace it: rates above EMULABLE_MBIT are left unshaped and the link says so
  (a Python proxy moves ~5 Gbit/s on an idle loopback, less next to training processes).
- loss_pct is NOT emulated: a TCP proxy cannot lose bytes (TCP would retransmit them anyway);
  the link's `notes` say so. Kernel-level loss needs netem (compose backend, where available).

Node speed: a node computes 1/device.speed times slower than a Mac mini (--slowdown), capped at
MAX_SLOWDOWN so a default run stays a few minutes on a small machine.

Proxies go through the Toxiproxy HTTP API only (an embedded ToxiproxyServer, or a real Toxiproxy
at --toxiproxy URL), so fault injection works the same on either.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from smolcluster.common.errors import ProxyError, SimError
from smolcluster.testbed.linkemu.api import ToxiproxyServer
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.profiles import LinkProfile
from smolcluster.testbed.control import LinkHandle, WorkersGoneWatch
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.sim.processes import ProcessGroup
from smolcluster.testbed.topology import Hop, Topology, path_to_server, to_dict

EMULABLE_MBIT = 1000.0  # rates above this are not paced by the proxy (faster than loopback emulation here)
KILLED_SERVER_GRACE_S = 30.0  # wait() keeps going this long after kill(server), for a restart (server crash fault)
MAX_SLOWDOWN = 12.5  # a Pi 4 (speed 0.08) computes 12.5x slower than a Mac mini; nothing slower than that
SERVER_START_TIMEOUT_S = 90.0
WORKER_GRACE_S = 5.0  # after the server finished, how long workers get to exit on their own
MECHANISM_FULL = "proxy"
MECHANISM_UNSHAPED = "proxy (rate unshaped: faster than loopback emulation)"


# --------------------------------------------------------------------------- link plan


@dataclass(frozen=True)
class HopPlan:
    """One proxy: a hop of some worker's path, and where its traffic goes next."""

    name: str  # "pi4->mini3"
    hop: Hop
    next: Optional[str]  # next hop's proxy name, None when dst is the server
    depth: int  # hops from dst to the server (0: dst is the server)

    @property
    def profile(self) -> LinkProfile:
        return self.hop.profile

    def rate_shaped(self) -> bool:
        return max(self.profile.up_mbit, self.profile.down_mbit) <= EMULABLE_MBIT

    def mechanism(self) -> str:
        return MECHANISM_FULL if self.rate_shaped() else MECHANISM_UNSHAPED

    def notes(self) -> list[str]:
        p, out = self.profile, []
        if not self.rate_shaped():
            out.append(f"rate {p.up_mbit:g}/{p.down_mbit:g} Mbit/s not shaped: faster than loopback emulation (> {EMULABLE_MBIT:g} Mbit/s)")
        if p.delay_ms and round(p.delay_ms) != p.delay_ms:
            out.append(f"delay {p.delay_ms:g} ms applied as {round(p.delay_ms)} ms (Toxiproxy latency is whole ms)")
        if p.loss_pct:
            out.append(f"loss {p.loss_pct:g}% not emulated (a TCP proxy cannot drop packets)")
        return out


def hop_name(hop: Hop) -> str:
    return f"{hop.src}->{hop.dst}"


def plan_hops(topo: Topology) -> list[HopPlan]:
    """Every hop of every worker's path to the server, once, nearest to the server first
    (so each proxy's upstream exists when it is created)."""
    plans: dict[str, HopPlan] = {}
    for w in topo.workers:
        path = path_to_server(topo, w.name)
        for i, hop in enumerate(path):
            name = hop_name(hop)
            if name not in plans:
                nxt = hop_name(path[i + 1]) if i + 1 < len(path) else None
                plans[name] = HopPlan(name=name, hop=hop, next=nxt, depth=len(path) - 1 - i)
    return sorted(plans.values(), key=lambda p: (p.depth, p.name))


def worker_paths(topo: Topology) -> dict[str, list[str]]:
    """worker -> the proxy names its traffic crosses, first hop first."""
    return {w.name: [hop_name(h) for h in path_to_server(topo, w.name)] for w in topo.workers}


def toxics_for(profile: LinkProfile, shape_rate: bool) -> list[dict[str, Any]]:
    """Toxiproxy toxic bodies for one hop's profile."""
    out: list[dict[str, Any]] = []
    delay, jitter = round(profile.delay_ms), round(profile.jitter_ms)
    if delay or jitter:
        for stream in ("upstream", "downstream"):
            out.append({"name": f"latency_{stream}", "type": "latency", "stream": stream, "toxicity": 1.0,
                        "attributes": {"latency": delay, "jitter": jitter}})
    if shape_rate:
        for stream, mbit in (("upstream", profile.up_mbit), ("downstream", profile.down_mbit)):
            out.append({"name": f"bandwidth_{stream}", "type": "bandwidth", "stream": stream, "toxicity": 1.0,
                        "attributes": {"rate": max(1, round(mbit * 1e6 / 8 / 1000))}})  # KB/s, 1 KB = 1000 bytes
    return out


def create_link_proxies(client: ToxiproxyClient, plans: list[HopPlan], server_addr: str) -> dict[str, str]:
    """Create one proxy per hop (with its toxics); returns name -> listen address."""
    listen: dict[str, str] = {}
    for p in plans:
        upstream = server_addr if p.next is None else listen[p.next]
        proxy = client.create_proxy(p.name, "127.0.0.1:0", upstream)
        listen[p.name] = proxy["listen"]
        for body in toxics_for(p.profile, p.rate_shaped()):
            client.add_toxic(p.name, body["type"], body["attributes"], stream=body["stream"], name=body["name"])
    return listen


def own_bytes(paths: dict[str, list[str]], hop_bytes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Each worker's own (up, down) bytes: its first hop carries it and every worker routed through it."""
    own: dict[str, tuple[int, int]] = {}
    for w in sorted(paths, key=lambda w: -len(paths[w])):  # longer paths first: they feed the shorter ones
        up, down = hop_bytes.get(paths[w][0], (0, 0))
        for other, path in paths.items():
            if other != w and paths[w][0] in path[1:] and other in own:
                up, down = up - own[other][0], down - own[other][1]
        own[w] = (max(up, 0), max(down, 0))
    return own


# --------------------------------------------------------------------------- metrics tail


class MetricsTail:
    """Reads the nodes' metrics.jsonl files incrementally (the live progress and fault triggers)."""

    def __init__(self, nodes_dir: Path, server: str, workers: list[str]):
        self.nodes_dir = nodes_dir
        self.server, self.workers = server, workers
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self.version = 0
        self.start_time: Optional[float] = None  # the server's "start" event (run start)
        self.evals: list[dict] = []
        self.steps: dict[str, int] = {w: 0 for w in workers}
        self.ended: set[str] = set()

    def poll(self) -> None:
        with self._lock:
            for node in [self.server, *self.workers]:
                for rec in self._read_new(node):
                    self._apply(node, rec)

    def _read_new(self, node: str) -> list[dict]:
        path = self.nodes_dir / node / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self._offsets.get(node, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines; a half-written one is read next time
        self._offsets[node] = self._offsets.get(node, 0) + end
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

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


# --------------------------------------------------------------------------- the cluster


@dataclass
class LocalCluster:
    """A running local sim (implements smolcluster.testbed.control.ClusterControl). Use as a context
    manager: leaving it stops every node process and every proxy, whatever happened."""

    topology: Topology
    run_dir: Path
    algorithm: str
    overrides: RunOverrides = field(default_factory=RunOverrides)
    toxiproxy_url: Optional[str] = None  # a real Toxiproxy; None: embedded
    env: dict[str, str] = field(default_factory=dict)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.procs = ProcessGroup(env=self.env)
        self.plans = plan_hops(self.topology)
        self.paths = worker_paths(self.topology)
        self.listen: dict[str, str] = {}
        self.server_port: Optional[int] = None
        self._embedded: Optional[ToxiproxyServer] = None
        self._created: list[str] = []
        self._t0 = time.time()
        self.toxiproxy = ToxiproxyClient(self.toxiproxy_url) if self.toxiproxy_url else ToxiproxyClient("http://127.0.0.1:0")
        self.config_dir = self.run_dir / "config"
        self.nodes_dir = self.run_dir / "nodes"
        self.tail = MetricsTail(self.nodes_dir, self.topology.server.name, [w.name for w in self.topology.workers])
        self.final_link_stats: dict[str, dict[str, int]] = {}
        self.stopped_after_end: list[str] = []
        self._gone = WorkersGoneWatch()
        self._killed_at: dict[str, float] = {}  # node -> when kill() hit it (cleared by restart)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write configs, start the server, the link proxies, then the workers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "topology.yaml").write_text(yaml.safe_dump(to_dict(self.topology), sort_keys=False))
        write_run_configs(self.topology, self.config_dir, self.overrides, server_address=lambda w: "127.0.0.1", port=0)
        self._t0 = time.time()
        self._start_toxiproxy()
        self._start_server(resume=False)
        self._created = [p.name for p in self.plans]  # before creating: a failure half-way still cleans up
        self.listen = create_link_proxies(self.toxiproxy, self.plans, f"127.0.0.1:{self.server_port}")
        self._write_proxies_file()
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
        (self.run_dir / "proxies.json").write_text(json.dumps(info, indent=2))

    def slowdown(self, node: str) -> float:
        return min(MAX_SLOWDOWN, max(1.0, 1.0 / self.topology.nodes[node].device.speed))

    def _node_dir(self, node: str) -> Path:
        return self.nodes_dir / node

    def _start_server(self, resume: bool) -> None:
        name = self.topology.server.name
        d = self._node_dir(name)
        (d / "server.json").unlink(missing_ok=True)
        args = ["server", "--algo", self.algorithm, "--config-dir", str(self.config_dir), "--run-dir", str(d),
                "--bind", "127.0.0.1", "--port", str(self.server_port or 0), "--slowdown", f"{self.slowdown(name):g}"]
        if resume:
            args.append("--resume")
        proc = self.procs.start(name, args, d / "stdout.log")
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            info = _read_json(d / "server.json")
            if info and info.get("pid") == proc.pid:
                break
            if not proc.alive():
                raise SimError(f"the server ({name}) exited with code {proc.returncode} before listening:\n"
                               f"{_tail(d / 'stdout.log')}")
            if time.monotonic() > deadline:
                raise SimError(f"the server ({name}) did not start listening within {SERVER_START_TIMEOUT_S:.0f} s; see {d / 'stdout.log'}")
            time.sleep(0.1)
        old, self.server_port = self.server_port, int(info["port"])
        if old is not None and old != self.server_port:  # re-point the last hops at the new port
            for p in self.plans:
                if p.next is None:
                    self.toxiproxy.update_proxy(p.name, upstream=f"127.0.0.1:{self.server_port}")

    def _start_worker(self, name: str) -> None:
        node = self.topology.nodes[name]
        d = self._node_dir(name)
        first = self.paths[name][0]
        self.procs.start(name, ["worker", str(node.rank), name, "--algo", self.algorithm, "--config-dir", str(self.config_dir),
                                "--run-dir", str(d), "--connect", self.listen[first], "--slowdown", f"{self.slowdown(name):g}"],
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

    def wait(self, poll: float = 0.5, on_tick=None) -> int:
        """Until the server exits; then give the workers a moment to finish. Returns the server's exit code."""
        server = self.topology.server.name
        while True:
            self.tail.poll()
            if on_tick is not None:
                on_tick(self)
            proc = self.procs.procs[server]
            # A server killed on purpose (a fault) may be restarted with --resume: wait a while for that.
            killed = self._killed_at.get(server)
            if not proc.alive() and (killed is None or time.monotonic() - killed > KILLED_SERVER_GRACE_S):
                break
            self._check_workers_alive()
            time.sleep(poll)
        # The server said BYE to every worker; one that missed it (a close racing the message) would
        # keep redialling its proxy, which accepts and then finds no server. Nothing is left to do for
        # it, so after a short grace the sim stops it (recorded in `stopped_after_end`).
        deadline = time.monotonic() + WORKER_GRACE_S
        for w in self.topology.workers:
            p = self.procs.procs.get(w.name)
            while p is not None and p.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.stopped_after_end = [w.name for w in self.topology.workers if self.alive(w.name)]
        self.tail.poll()
        return self.procs.procs[server].returncode or 0

    def _check_workers_alive(self) -> None:
        """Every worker gone (and none finished cleanly) means the server would wait for nobody:
        fail with the first worker's error instead. A fault injector restarting nodes has
        ALL_WORKERS_GONE_S to bring one back (WORKERS_NEVER_STARTED_S when none ever trained)."""
        codes = {}
        for w in self.topology.workers:
            p = self.procs.procs.get(w.name)
            codes[w.name] = 0 if p is None else p.returncode  # None while running
        on_purpose = any(w.name in self._killed_at for w in self.topology.workers)  # a fault: give it time to restart
        problem = self._gone.problem(codes, on_purpose=on_purpose, trained=any(self.tail.steps.values()))
        if problem:
            first = self.topology.workers[0].name
            raise SimError(f"{problem} {first}'s output:\n{_tail(self._node_dir(first) / 'stdout.log')}")

    # ------------------------------------------------------------------ ClusterControl

    def links(self) -> list[LinkHandle]:
        return [LinkHandle(name=p.name, src=p.hop.src, dst=p.hop.dst, network=p.hop.network, mechanism=p.mechanism())
                for p in self.plans]

    def links_of(self, node: str) -> list[LinkHandle]:
        return [link for link in self.links() if node in (link.src, link.dst)]

    def kill(self, node: str) -> None:
        self._killed_at[node] = time.monotonic()
        self.procs.signal(node, signal.SIGKILL)

    def pause(self, node: str) -> None:
        self.procs.signal(node, getattr(signal, "SIGSTOP", signal.SIGTERM))

    def resume(self, node: str) -> None:
        self.procs.signal(node, getattr(signal, "SIGCONT", signal.SIGTERM))

    def restart(self, node: str) -> None:
        if node in self.procs.procs and self.procs.procs[node].alive():
            self.kill(node)
            self.procs.wait(node, timeout=10)
        if node == self.topology.server.name:
            self._start_server(resume=True)  # same port when free, else the last hops are re-pointed
        else:
            self._start_worker(node)
        self._killed_at.pop(node, None)  # only now: wait() must never see it dead and unexpected in between

    def alive(self, node: str) -> bool:
        p = self.procs.procs.get(node)
        return p is not None and p.alive()

    def server_version(self) -> int:
        self.tail.poll()
        return self.tail.version

    def elapsed(self) -> float:
        return time.time() - self._t0

    # ------------------------------------------------------------------ link counters

    def link_stats(self) -> dict[str, dict[str, int]]:
        """Per proxy: bytes up/down (embedded proxy's `stats`; a real Toxiproxy has none)."""
        if not self._created:
            return self.final_link_stats
        out = {}
        for name, body in self.toxiproxy.proxies().items():
            if name in self._created and isinstance(body.get("stats"), dict):
                out[name] = body["stats"]
        return out


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no output)"
