"""`smolcluster sim FILE --backend compose`: a topology trained (or link-checked) in containers.

    configs -> RUN_DIR/config          (same files as on hardware; workers dial their Toxiproxy proxy)
    render  -> RUN_DIR/compose/        (docker-compose.yml, entrypoints/, toxiproxy.json; usable by hand)
    up      -> routes + tc shaping in every container (netem where the kernel has it, else tbf)
    toxics  -> latency/jitter on each worker's proxy when the kernel cannot delay (tbf / none)
    wait    -> progress from RUN_DIR/nodes/<server>/metrics.jsonl until the server container exits
    collect -> RUN_DIR/summary.json (+ backend "compose", links with their mechanism), container logs
    down    -> always: on success, failure, Ctrl-C or SIGTERM

ComposeCluster implements smolcluster.testbed.control.ClusterControl with docker kill / pause /
unpause / start, so fault schedules mean the same thing as on the local backend. A restarted
server resumes from its checkpoint (the entrypoint passes --resume when RUN_DIR/nodes/<server>/resume
exists, which restart() writes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from smolcluster.core.training.data import DATA_DIR_ENV, default_cache_dir
from smolcluster.common.errors import ProxyError, SimError
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.sim import compose as cmp
from smolcluster.testbed.control import LinkHandle, WorkersGoneWatch
from smolcluster.testbed.sim.docker_env import DockerEnv, DockerUnavailable, detect_docker
from smolcluster.testbed.sim.local import KILLED_SERVER_GRACE_S, WORKER_GRACE_S, MetricsTail
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.topology import Topology, path_expectation, path_to_server, server_address_for, to_dict

SERVER_PORT = 65432


# --------------------------------------------------------------------------- image and data


def host_mnist_dir() -> Optional[Path]:
    """The MNIST IDX folder on the host to bind into the containers ($SMOLCLUSTER_DATA_DIR, else the cache)."""
    env = os.environ.get(DATA_DIR_ENV)
    for p in ([Path(env).expanduser()] if env else []) + [default_cache_dir()]:
        if any(p.glob("train-images-idx3-ubyte*")):
            return p.resolve()
    return None


def image_for(env: DockerEnv, data_dir: Optional[Path]) -> tuple[cmp.ImageSpec, str]:
    """(image spec, container path of the MNIST dir). The offline image (host's /usr and Python bound in)
    on Linux; elsewhere the user image from compose/Dockerfile (built when missing)."""
    from smolcluster.testbed.sim.image import USER_IMAGE, build_offline_image, build_user_image, check_offline_host, image_exists

    try:
        check_offline_host()
    except DockerUnavailable:
        if not image_exists(env, USER_IMAGE):
            build_user_image(env, USER_IMAGE)
        spec = cmp.user_image_spec(USER_IMAGE, data_dir)
        return spec, "/data/mnist"
    spec = cmp.offline_image_spec(build_offline_image(env), data_dir)
    return spec, str(data_dir) if data_dir else ""


# --------------------------------------------------------------------------- the cluster


def path_mechanism(kernel: set[str]) -> str:
    """How a worker's path is emulated, from the qdiscs its interfaces got."""
    if kernel == {"netem"}:
        return "netem"
    if kernel <= {"tbf", "netem"}:
        return "tbf+proxy"  # rate by tbf, latency/jitter by the Toxiproxy proxy
    return "proxy (rate unshaped: no tc qdisc)"


@dataclass
class ComposeCluster:
    """A compose project brought up for one run (implements ClusterControl). Use as a context manager:
    leaving it saves every container's log and removes every container and network of the project."""

    topology: Topology
    run_dir: Path
    algorithm: str
    env: DockerEnv
    cp: cmp.ComposeProject
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.nodes_dir = self.run_dir / "nodes"
        self.server = self.topology.server.name
        self.tail = MetricsTail(self.nodes_dir, self.server, [w.name for w in self.topology.workers])
        self.toxiproxy = ToxiproxyClient("http://127.0.0.1:0")  # replaced by the service's API once up
        self.toxiproxy_url: Optional[str] = None
        self.paths = {p.worker: [p.name] for p in self.cp.proxies}  # one proxy per worker path (for own_bytes)
        self.plans: list[Any] = []  # run.build_summary's per-hop rows; compose links are per path (summary_links)
        self.final_link_stats: dict[str, dict[str, int]] = {}
        self.stopped_after_end: list[str] = []
        self.toxics: dict[str, list[dict]] = {}
        self._ids: dict[str, str] = {}
        self._killed_at: dict[str, float] = {}
        self._gone = WorkersGoneWatch()
        self._t0 = time.time()
        self._up = False

    def __enter__(self) -> "ComposeCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ lifecycle

    def start(self, add_toxics: bool = True) -> None:
        """Bring the project up (routes, shaping), find the Toxiproxy API, add latency toxics where needed."""
        self._up = True  # from here on stop() must tear down, whatever fails next
        cmp.up(self.env, self.cp)
        self._t0 = time.time()
        # one `docker ps` for every container (compose v1's `ps -q SERVICE` takes ~1 s each)
        r = self.env.run(["ps", "-a", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.cp.project}",
                          "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}'], timeout=60)
        for line in r.stdout.splitlines():
            cid, _, svc = line.partition(" ")
            self._ids[svc.strip()] = cid
        missing = [s for s in self.cp.services if s not in self._ids]
        if missing:
            raise SimError(f"services {', '.join(missing)} of {self.cp.project} have no container after `up`")
        if self.cp.proxies:
            self.toxiproxy_url = cmp.toxiproxy_api_url(self.env, self.cp)
            self.toxiproxy = ToxiproxyClient(self.toxiproxy_url)
            self._wait_api()
            if add_toxics:
                self._add_latency_toxics()

    def _wait_api(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                names = set(self.toxiproxy.proxies())
                if {p.name for p in self.cp.proxies} <= names:
                    return
            except ProxyError:
                pass
            if time.monotonic() > deadline:
                raise SimError(f"the Toxiproxy service did not come up with the worker proxies within {timeout:.0f} s; "
                               f"logs:\n{cmp.logs(self.env, self.cp)[-2000:]}")
            time.sleep(0.2)

    def kernel_mechanisms(self, worker: str) -> set[str]:
        """The qdisc kinds applied on every interface the worker's traffic leaves through."""
        out = set()
        for hop in path_to_server(self.topology, worker):
            for node in (hop.src, hop.dst):
                m = self.cp.mechanisms.get(f"{node}/{hop.network}")
                if m:
                    out.add(m)
        return out or {"none"}

    def _add_latency_toxics(self) -> None:
        """Latency/jitter of the whole path on each worker's proxy, both directions, unless netem delays in the kernel."""
        for p in self.cp.proxies:
            self.toxics[p.name] = []
            if path_mechanism(self.kernel_mechanisms(p.worker)) == "netem":
                continue
            delay, jitter = round(p.latency_ms), round(p.jitter_ms)
            if not (delay or jitter):
                continue
            for stream in ("upstream", "downstream"):
                body = {"name": f"latency_{stream}", "type": "latency", "stream": stream,
                        "attributes": {"latency": delay, "jitter": jitter}}
                self.toxiproxy.add_toxic(p.name, "latency", body["attributes"], stream=stream, name=body["name"])
                self.toxics[p.name].append(body)

    def stop(self) -> None:
        """Save container logs and link counters, then tear the project down. Idempotent."""
        if not self._up:
            return
        self._up = False
        try:
            try:
                self.final_link_stats = self.link_stats()
            except ProxyError:
                pass
            self.save_logs()
        finally:
            cmp.down(self.env, self.cp)

    def save_logs(self) -> None:
        for node in self.topology.nodes:
            cid = self._ids.get(cmp._service(node))
            if cid is None:
                continue
            r = self.env.run(["logs", cid], timeout=60, check=False)
            d = self.nodes_dir / node
            d.mkdir(parents=True, exist_ok=True)
            (d / "stdout.log").write_text(r.stdout + r.stderr)

    def states(self) -> dict[str, tuple[str, int]]:
        """node -> (docker state: running / paused / exited / ..., exit code)."""
        names = {cid: node for node in self.topology.nodes if (cid := self._ids.get(cmp._service(node)))}
        if not names:
            return {}
        r = self.env.run(["inspect", "-f", "{{.Id}} {{.State.Status}} {{.State.ExitCode}}", *names], timeout=60, check=False)
        out = {}
        for line in r.stdout.splitlines():
            cid, status, code = line.split()
            node = next((n for c, n in names.items() if cid.startswith(c) or c.startswith(cid)), None)
            if node:
                out[node] = (status, int(code))
        return out

    def wait(self, poll: float = 0.5, on_tick: Any = None) -> int:
        """Until the server container exits (a killed server gets KILLED_SERVER_GRACE_S to be restarted);
        then give the workers a moment to finish. Returns the server's exit code."""
        while True:
            self.tail.poll()
            if on_tick is not None:
                on_tick(self)
            status, code = self.states().get(self.server, ("missing", 1))
            killed = self._killed_at.get(self.server)
            if status not in ("running", "paused", "restarting", "created") and (
                    killed is None or time.monotonic() - killed > KILLED_SERVER_GRACE_S):
                break
            self._check_workers_alive()
            time.sleep(poll)
        # a router's container keeps running after its training process ended (it still routes): "done"
        # is an exited container or an `end` line in the worker's metrics
        def unfinished() -> list[str]:
            self.tail.poll()
            return [w.name for w in self.topology.workers if w.name not in self.tail.ended and self.alive(w.name)]

        deadline = time.monotonic() + WORKER_GRACE_S
        while time.monotonic() < deadline and unfinished():
            time.sleep(0.2)
        self.stopped_after_end = unfinished()
        return code

    def _worker_exit_code(self, node: str, states: dict[str, tuple[str, int]]) -> int | None:
        """None while the worker trains; its exit code once the training process ended (a router's
        container keeps running to route, so its wrapper records the code in a file)."""
        if node in self.tail.ended:
            return 0
        status, code = states.get(node, ("missing", 1))
        if status not in ("running", "paused", "restarting", "created"):
            return code
        marker = self.nodes_dir / node / cmp.TRAINING_EXIT_CODE
        try:
            return int(marker.read_text().strip())
        except (OSError, ValueError):
            return None

    def _check_workers_alive(self) -> None:
        """Every worker gone with an error: fail now with its output instead of waiting for the server."""
        states = self.states()
        codes = {w.name: self._worker_exit_code(w.name, states) for w in self.topology.workers}
        on_purpose = any(w.name in self._killed_at for w in self.topology.workers)
        problem = self._gone.problem(codes, on_purpose=on_purpose, trained=any(self.tail.steps.values()))
        if problem:
            first = self.topology.workers[0].name
            log = self.nodes_dir / first / "stdout.log"
            self.save_logs()
            raise SimError(f"{problem} {first}'s output: {log}\n{log.read_text()[-2000:] if log.exists() else ''}")

    # ------------------------------------------------------------------ ClusterControl

    def links(self) -> list[LinkHandle]:
        """One handle per hop of each worker's path, named by the Toxiproxy proxy that carries that path.

        A worker's whole path goes through one proxy here, so a fault on hop mini3->mini1 acts on every
        proxy whose path crosses it (mini3's and pi4's), and a hop's traffic is cut wherever it is.
        """
        out = []
        for p in self.cp.proxies:
            mechanism = path_mechanism(self.kernel_mechanisms(p.worker))
            for hop in path_to_server(self.topology, p.worker):
                out.append(LinkHandle(name=p.name, src=hop.src, dst=hop.dst, network=hop.network, mechanism=mechanism))
        return out

    def links_of(self, node: str) -> list[LinkHandle]:
        """Every worker path that touches `node` (a router's partition cuts the workers behind it too), once."""
        seen: dict[str, LinkHandle] = {}
        for link in self.links():
            if node in (link.src, link.dst) and link.name not in seen:
                seen[link.name] = link
        return list(seen.values())

    def _docker(self, node: str, *args: str) -> None:
        cid = self._ids.get(cmp._service(node))
        if cid is None:
            raise SimError(f"unknown node {node!r}: nodes are {', '.join(self.topology.nodes)}")
        self.env.run([*args, cid], timeout=60)

    def kill(self, node: str) -> None:
        self._killed_at[node] = time.monotonic()
        self._docker(node, "kill")

    def pause(self, node: str) -> None:
        self._docker(node, "pause")

    def resume(self, node: str) -> None:
        self._docker(node, "unpause")

    def restart(self, node: str) -> None:
        """Start the node's container again: its entrypoint redoes routes and shaping; a worker rejoins,
        the server resumes from its checkpoint (the resume marker makes its command add --resume)."""
        state = self.states().get(node, ("missing", 0))[0]
        if state == "paused":
            self._docker(node, "unpause")
        if state in ("running", "paused"):
            self._docker(node, "kill")
            self._wait_state(node, {"exited", "dead"})
        if node == self.server:
            d = self.nodes_dir / node
            d.mkdir(parents=True, exist_ok=True)
            (d / cmp.RESUME_MARKER).write_text("resume from checkpoints/ on the next start\n")
        self._docker(node, "start")
        self._killed_at.pop(node, None)

    def _wait_state(self, node: str, wanted: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.states().get(node, ("missing", 0))[0] not in wanted and time.monotonic() < deadline:
            time.sleep(0.1)

    def alive(self, node: str) -> bool:
        return self.states().get(node, ("missing", 0))[0] in ("running", "paused")

    def slowdown(self, node: str) -> float:
        return 1.0 / self.topology.nodes[node].device.speed  # as rendered into the node commands

    def server_version(self) -> int:
        self.tail.poll()
        return self.tail.version

    def elapsed(self) -> float:
        return time.time() - self._t0

    # ------------------------------------------------------------------ links

    def link_stats(self) -> dict[str, dict[str, int]]:
        if self.toxiproxy_url is None:
            return self.final_link_stats
        mine = {p.name for p in self.cp.proxies}
        return {name: body["stats"] for name, body in self.toxiproxy.proxies().items()
                if name in mine and isinstance(body.get("stats"), dict)}

    def summary_links(self) -> list[dict]:
        """One row per worker path: its proxy, the hops' profiles, and how each part was emulated."""
        rows = []
        stats = self.final_link_stats
        for p in self.cp.proxies:
            hops = path_to_server(self.topology, p.worker)
            rtt, mbps = path_expectation(hops)
            kernel = {f"{n}/{h.network}": self.cp.mechanisms.get(f"{n}/{h.network}", "none") for h in hops for n in (h.src, h.dst)}
            s = stats.get(p.name)
            rows.append({"name": p.name, "src": p.worker, "dst": self.server, "network": self.links_network(p.worker),
                         "hops": [f"{h.src}->{h.dst}" for h in hops],
                         "profile": {"name": " | ".join(h.profile.name for h in hops), "delay_ms": round(p.latency_ms, 3),
                                     "jitter_ms": round(p.jitter_ms, 3), "loss_pct": max((h.profile.loss_pct for h in hops), default=0.0),
                                     "up_mbit": mbps, "down_mbit": min(h.profile.down_mbit for h in hops), "rtt_ms": round(rtt, 3)},
                         "mechanism": path_mechanism(self.kernel_mechanisms(p.worker)), "kernel": kernel,
                         "toxics": self.toxics.get(p.name, []), "rate_shaped": all(m in ("tbf", "netem") for m in kernel.values()),
                         "loss_emulated": all(m == "netem" for m in kernel.values()),
                         "notes": _link_notes(kernel, p),
                         "bytes_up": s.get("upstream_bytes") if s else None, "bytes_down": s.get("downstream_bytes") if s else None,
                         "connections": s.get("connections_total") if s else None})
        return rows

    def links_network(self, worker: str) -> str:
        dial = server_address_for(self.topology, worker)
        return next(n for n, a in self.topology.server.addresses.items() if a == dial)


def _link_notes(kernel: dict[str, str], p: cmp.ProxyRoute) -> list[str]:
    kinds = set(kernel.values())
    out = []
    if kinds != {"netem"}:
        out.append(f"latency {p.latency_ms:g}±{p.jitter_ms:g} ms one way by the Toxiproxy proxy "
                   f"(whole ms: {round(p.latency_ms)}±{round(p.jitter_ms)}); loss not emulated (needs netem)")
    if "none" in kinds:
        out.append("rate not shaped on " + ", ".join(k for k, m in kernel.items() if m == "none") + " (no tc qdisc)")
    return out


# --------------------------------------------------------------------------- entry point


def _prepare(topo: Topology, run_dir: Path, algo: str, overrides: RunOverrides, env: Optional[DockerEnv]
             ) -> cmp.ComposeProject:
    """Configs and the rendered project. env None (render only): the image is named, not built."""
    data = host_mnist_dir()
    if env is not None:
        image, container_data = image_for(env, data)
    else:
        from smolcluster.testbed.sim.image import offline_image_tag

        image = cmp.offline_image_spec(offline_image_tag(), data)
        container_data = str(data) if data else ""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "topology.yaml").write_text(yaml.safe_dump(to_dict(topo), sort_keys=False))
    write_run_configs(topo, run_dir / "config", overrides, server_address=lambda w: str(server_address_for(topo, w)),
                      port=SERVER_PORT, data_dir=container_data or None)
    (run_dir / "nodes" / topo.server.name / cmp.RESUME_MARKER).unlink(missing_ok=True)
    # the proxies' addresses come from rendering; the commands need them (and the chosen algorithm)
    cp = cmp.render_compose(topo, run_dir, image, server_port=SERVER_PORT, commands={n: [] for n in topo.nodes})
    commands = cmp.default_commands(topo, image, cp.proxies, algorithm=algo)
    return cmp.render_compose(topo, run_dir, image, server_port=SERVER_PORT, commands=commands, project=cp.project)


def run_compose(opts: Any, out: TextIO = sys.stdout) -> int:
    """`smolcluster sim FILE --backend compose` (opts: smolcluster.testbed.sim.run.SimOptions). Returns the exit code."""
    from smolcluster.testbed.sim.run import Progress, default_run_dir, overrides_for
    from smolcluster.testbed.topology import load_topology

    topo = load_topology(opts.file)
    if opts.toxiproxy:
        raise SimError("--toxiproxy URL is for the local backend; the compose backend runs Toxiproxy as a service "
                       "of the project (see RUN_DIR/compose/docker-compose.yml)")
    algo = opts.algo or topo.training.algorithm
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir(topo, algo)
    run_dir = run_dir.resolve()
    if getattr(opts, "render_only", False):
        cp = _prepare(topo, run_dir, algo, overrides_for(topo, opts, algo), env=None)
        print(render_only_text(cp), file=out)
        return 0
    try:
        env = detect_docker()
    except DockerUnavailable as e:
        raise SimError(f"--backend compose needs Docker: {e}. Use --backend local (no Docker needed), "
                       "or --render-only to write the compose project without running it") from None
    if opts.check:
        from smolcluster.testbed.sim.compose_check import run_compose_check

        return run_compose_check(topo, env, run_dir, as_json=opts.as_json, out=out)

    from smolcluster.testbed.faults import FaultInjector, schedule_for

    schedule = schedule_for(topo, opts.faults)  # a bad fault entry fails here, before anything starts
    cp = _prepare(topo, run_dir, algo, overrides_for(topo, opts, algo), env)
    cluster = ComposeCluster(topology=topo, run_dir=run_dir, algorithm=algo, env=env, cp=cp, seed=opts.seed)
    progress = Progress(out, opts.progress_interval)
    print(f"smolcluster sim: {topo.name} ({opts.file}), {algo}, compose backend ({' '.join(env.compose)}), "
          f"project {cp.project}, run dir {run_dir}", file=out)
    out.flush()
    injector = None
    try:
        with cluster:
            cluster.start()
            for link in cluster.summary_links():
                pr = link["profile"]
                print(f"  link {link['name']:<16} {pr['name']}: {pr['delay_ms']:g}±{pr['jitter_ms']:g} ms one way, "
                      f"{pr['up_mbit']:g} Mbit/s up  [{link['mechanism']}]", file=out)
            kinds = sorted(set(cp.mechanisms.values()))
            print(f"  kernel shaping: {', '.join(kinds) or 'none'} on {len(cp.mechanisms)} interfaces", file=out)
            out.flush()
            injector = FaultInjector(schedule, cluster, seed=opts.seed if opts.seed is not None else topo.training.seed)
            injector.start()
            try:
                code = cluster.wait(on_tick=progress.update)
            finally:
                injector.stop()
            progress.done()
    except KeyboardInterrupt:
        progress.done()
        print(f"\ninterrupted: every container and network of {cp.project} was removed; partial results in {run_dir}", file=out)
        return 130
    return _finish(cluster, code, injector, out)


def _finish(cluster: ComposeCluster, code: int, injector: Any, out: TextIO) -> int:
    from smolcluster.testbed.sim.run import _write_plots, build_summary, format_summary

    topo, run_dir = cluster.topology, cluster.run_dir
    summary_path = cluster.nodes_dir / topo.server.name / "summary.json"
    if code != 0 or not summary_path.exists():
        raise SimError(f"the server exited with code {code} without a summary; see {summary_path.parent / 'stdout.log'}")
    summary = build_summary(cluster, json.loads(summary_path.read_text()))
    summary.update(backend="compose", toxiproxy=cluster.toxiproxy_url and "embedded (service)", links=cluster.summary_links(),
                   compose_project=cluster.cp.project, compose_file=str(cluster.cp.compose_file),
                   shaping=dict(cluster.cp.mechanisms))
    if injector is not None and injector.events:
        from smolcluster.testbed.report import describe_fault, fault_reactions, load_run

        summary["faults"] = fault_reactions(load_run(run_dir))
        summary["faults_failed"] = [e for e in injector.events if e["action"] == "failed"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), file=out)
    if injector is not None and injector.events:
        print("faults", *[describe_fault(r) for r in summary["faults"]],
              *[f"FAILED {e['fault']}: {e['error']}" for e in summary["faults_failed"]], sep="\n  ", file=out)
    _write_plots(run_dir, out)
    print(f"run dir: {run_dir}", file=out)
    return 0


def render_only_text(cp: cmp.ComposeProject) -> str:
    f = cp.compose_file
    lat = [p for p in cp.proxies if round(p.latency_ms) or round(p.jitter_ms)]
    lines = [f"rendered {f} (+ entrypoints/, toxiproxy.json) and configs in {cp.run_dir / 'config'}",
             "run it by hand (compose v2, or Debian's docker-compose v1):",
             f"  docker compose -p {cp.project} -f {f} up",
             f"  docker-compose -p {cp.project} -f {f} up",
             "stop and clean up:",
             f"  docker compose -p {cp.project} -f {f} down -v --remove-orphans"]
    if lat:
        lines += ["on kernels without netem, add the paths' latency on the Toxiproxy API (port 8474 of the toxiproxy "
                  "service, published on 127.0.0.1) — `smolcluster sim --backend compose` does this itself:"]
        lines += [f"  {p.name}: latency {round(p.latency_ms)} ms, jitter {round(p.jitter_ms)} ms on upstream and downstream"
                  for p in lat]
    return "\n".join(lines)
