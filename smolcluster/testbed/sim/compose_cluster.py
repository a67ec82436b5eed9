"""A compose project brought up for one run, as a SimCluster: docker kill / pause / unpause / start for
process faults, the project's Toxiproxy service for network faults, so fault schedules mean the same
thing as on the local backend. A restarted server resumes from its checkpoint (the entrypoint passes
--resume when RUN_DIR/nodes/<server>/resume exists, which restart() writes).

Also the image and data the containers get (image_for, host_mnist_dir), shared with the link check.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from smolcluster.common.errors import ProxyError, SimError
from smolcluster.common.files import write_atomic
from smolcluster.common.wait import wait_until
from smolcluster.core.training.data import DATA_DIR_ENV, default_cache_dir
from smolcluster.testbed.control import LinkHandle
from smolcluster.testbed.linkemu import netem
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.report import LinkSummary
from smolcluster.testbed.sim import compose as cmp
from smolcluster.testbed.sim.cluster import SimCluster
from smolcluster.testbed.sim.compose_logging import LokiRelay
from smolcluster.testbed.sim.docker_env import DockerEnv, DockerUnavailable
from smolcluster.testbed.sim.image import USER_IMAGE, build_offline_image, build_user_image, check_offline_host, image_exists
from smolcluster.testbed.topology import path_down_mbit, path_expectation, path_loss_pct, path_to_server, server_address_for

SERVER_PORT = 65432
RUNNING_STATES = ("running", "paused", "restarting", "created")  # docker states of a node not yet done


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


def path_mechanism(kernel: set[str], loss: Iterable[str] = (), ingress: Iterable[str] = ()) -> str:
    """How a worker's path is emulated: the qdiscs its interfaces got (`kernel`), and how loss and
    ingress shaping were applied where its profiles need them (iptables / netem / ifb / "none: why")."""
    if kernel == {"netem"}:
        parts = ["netem"]
    elif kernel <= {"tbf", "netem"}:
        parts = ["tbf"]  # rate by tbf, latency/jitter by the Toxiproxy proxy
    else:
        return "proxy (rate unshaped: no tc qdisc)"
    if netem.INGRESS_IFB in set(ingress):
        parts.append("ifb")  # what the worker receives, shaped to its down rate
    if netem.LOSS_IPTABLES in set(loss):
        parts.append("iptables-loss")
    if parts[0] != "netem":
        parts.append("proxy")
    return "+".join(parts)


@dataclass
class ComposeCluster(SimCluster):
    """A compose project brought up for one run. Leaving it (a context manager) saves every container's
    log and removes every container and network of the project."""

    env: DockerEnv
    cp: cmp.ComposeProject
    seed: Optional[int] = None
    loki_relay: Optional[LokiRelay] = None  # with --logging: the nodes' pushes relayed to the host's Loki

    backend = "compose"

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        super().__post_init__()
        self.toxiproxy_url: Optional[str] = None
        self.paths = {p.worker: [p.name] for p in self.cp.proxies}  # one proxy per worker path
        self.toxics: dict[str, list[dict]] = {}
        self._ids: dict[str, str] = {}
        self._up = False
        self._lossy = {k for k, l in self.cp.path_links().items() if l.lossy}
        self._ingress = {k for k, l in self.cp.path_links().items() if l.ingress_mbit}

    @property
    def teardown_note(self) -> str:  # type: ignore[override]
        return f"every container and network of {self.cp.project} was removed"

    # ------------------------------------------------------------------ lifecycle

    def start(self, add_toxics: bool = True) -> None:
        """Bring the project up (routes, shaping), find the Toxiproxy API, add latency toxics where needed."""
        self._up = True  # from here on stop() must tear down, whatever fails next
        cmp.up(self.env, self.cp, before_start=self.loki_relay.start if self.loki_relay else None)
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
        wanted = {p.name for p in self.cp.proxies}

        def proxies_up() -> bool:
            try:
                return wanted <= set(self.toxiproxy.proxies())
            except ProxyError:
                return False

        if not wait_until(proxies_up, timeout, interval=0.2):
            raise SimError(f"the Toxiproxy service did not come up with the worker proxies within {timeout:.0f} s; "
                           f"logs:\n{cmp.logs(self.env, self.cp)[-2000:]}")

    def kernel_mechanisms(self, worker: str) -> set[str]:
        """The qdisc kinds applied on every interface the worker's traffic leaves through."""
        out = {m for key in self.path_interfaces(worker) if (m := self.cp.mechanisms.get(key))}
        return out or {"none"}

    def path_interfaces(self, worker: str, lossy_hops_only: bool = False) -> list[str]:
        """"node/network" of both ends of every hop of the worker's path (the server's end on the networks
        the Toxiproxy service stands in for it is the service's interface: that is where packets arrive)."""
        out = []
        for hop in path_to_server(self.topology, worker):
            if lossy_hops_only and not hop.profile.loss_pct:
                continue
            for node in (hop.src, hop.dst):
                if node == self.server and hop.network in self.cp.toxiproxy_address:
                    out.append(f"{cmp.TOXIPROXY_SERVICE}/{hop.network}")
                out.append(f"{node}/{hop.network}")
        return list(dict.fromkeys(out))

    def path_loss(self, worker: str) -> dict[str, str]:
        """Interface -> how its loss was applied, for the interfaces that drop packets of the path's lossy hops."""
        return {k: self.cp.loss.get(k, "none: not set up") for k in self.path_interfaces(worker, lossy_hops_only=True)
                if k in self._lossy}

    def path_ingress(self, worker: str) -> dict[str, str]:
        """Interface -> how what it receives was shaped, for the path's interfaces that needed it."""
        return {k: self.cp.ingress.get(k, "none: not set up") for k in self.path_interfaces(worker) if k in self._ingress}

    def path_mechanism(self, worker: str) -> str:
        return path_mechanism(self.kernel_mechanisms(worker), self.path_loss(worker).values(), self.path_ingress(worker).values())

    def loss_applied(self, worker: str) -> bool:
        """Every interface of the path that should drop packets does (vacuously true on a lossless path)."""
        return all(m in (netem.LOSS_IPTABLES, netem.NETEM) for m in self.path_loss(worker).values())

    def _add_latency_toxics(self) -> None:
        """Latency/jitter of the whole path on each worker's proxy, both directions, unless netem delays in the kernel."""
        for p in self.cp.proxies:
            self.toxics[p.name] = []
            if self.kernel_mechanisms(p.worker) == {"netem"}:
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
            try:
                cmp.down(self.env, self.cp)
            finally:
                if self.loki_relay is not None:
                    self.loki_relay.stop()

    def loki_url(self) -> Optional[str]:
        return self.loki_relay.upstream if self.loki_relay else None  # fault events: straight from the host

    def save_logs(self) -> None:
        for node in self.topology.nodes:
            cid = self._ids.get(cmp.service_name(node))
            if cid is None:
                continue
            r = self.env.run(["logs", cid], timeout=60, check=False)
            d = self.nodes_dir / node
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / "stdout.log", r.stdout + r.stderr)

    # ------------------------------------------------------------------ node state

    def states(self) -> dict[str, tuple[str, int]]:
        """node -> (docker state: running / paused / exited / ..., exit code)."""
        names = {cid: node for node in self.topology.nodes if (cid := self._ids.get(cmp.service_name(node)))}
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

    def server_exit_code(self) -> Optional[int]:
        status, code = self.states().get(self.server, ("missing", 1))
        return None if status in RUNNING_STATES else code

    def worker_exit_code(self, node: str) -> Optional[int]:
        """A router's container keeps running to route after its training process ended, so its wrapper
        records the training's exit code in a file."""
        if node in self.tail.ended:
            return 0
        status, code = self.states().get(node, ("missing", 1))
        if status not in RUNNING_STATES:
            return code
        marker = self.nodes_dir / node / cmp.TRAINING_EXIT_CODE
        try:
            return int(marker.read_text().strip())
        except (OSError, ValueError):
            return None

    def worker_finished(self, node: str) -> bool:
        return node in self.tail.ended or not self.alive(node)  # a router's container keeps running

    # ------------------------------------------------------------------ ClusterControl

    def links(self) -> list[LinkHandle]:
        """One handle per hop of each worker's path, named by the Toxiproxy proxy that carries that path.

        A worker's whole path goes through one proxy here, so a fault on hop mini3->mini1 acts on every
        proxy whose path crosses it (mini3's and pi4's), and a hop's traffic is cut wherever it is.
        """
        out = []
        for p in self.cp.proxies:
            mechanism = self.path_mechanism(p.worker)
            for hop in path_to_server(self.topology, p.worker):
                out.append(LinkHandle(name=p.name, src=hop.src, dst=hop.dst, network=hop.network, mechanism=mechanism))
        return out

    def _docker(self, node: str, *args: str) -> None:
        cid = self._ids.get(cmp.service_name(node))
        if cid is None:
            raise SimError(f"unknown node {node!r}: nodes are {', '.join(self.topology.nodes)}")
        self.env.run([*args, cid], timeout=60)

    def kill(self, node: str) -> None:
        self._killed(node)
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
            wait_until(lambda: self.states().get(node, ("missing", 0))[0] in ("exited", "dead"), 30.0)
        if node == self.server:
            d = self.nodes_dir / node
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / cmp.RESUME_MARKER, "resume from checkpoints/ on the next start\n")
        self._docker(node, "start")
        self._restarted(node)

    def alive(self, node: str) -> bool:
        return self.states().get(node, ("missing", 0))[0] in ("running", "paused")

    # ------------------------------------------------------------------ links

    def link_stats(self) -> dict[str, dict[str, int]]:
        if self.toxiproxy_url is None:
            return self.final_link_stats
        mine = {p.name for p in self.cp.proxies}
        return {name: body["stats"] for name, body in self.toxiproxy.proxies().items()
                if name in mine and isinstance(body.get("stats"), dict)}

    def summary_links(self) -> list[LinkSummary]:
        """One row per worker path: its proxy, the hops' profiles, and how each part was emulated."""
        rows = []
        for p in self.cp.proxies:
            hops = path_to_server(self.topology, p.worker)
            rtt, mbps = path_expectation(hops)
            kernel = {f"{n}/{h.network}": self.cp.mechanisms.get(f"{n}/{h.network}", "none") for h in hops for n in (h.src, h.dst)}
            loss, ingress = self.path_loss(p.worker), self.path_ingress(p.worker)
            s = self.final_link_stats.get(p.name)
            rows.append(LinkSummary(
                name=p.name, src=p.worker, dst=self.server, network=self.links_network(p.worker),
                hops=[f"{h.src}->{h.dst}" for h in hops],
                profile={"name": " | ".join(h.profile.name for h in hops), "delay_ms": round(p.latency_ms, 3),
                         "jitter_ms": round(p.jitter_ms, 3), "loss_pct": round(path_loss_pct(hops), 4),
                         "up_mbit": mbps, "down_mbit": path_down_mbit(hops), "rtt_ms": round(rtt, 3)},
                mechanism=self.path_mechanism(p.worker), kernel=kernel, loss=loss or None, ingress=ingress or None,
                toxics=self.toxics.get(p.name, []), rate_shaped=all(m in ("tbf", "netem") for m in kernel.values()),
                loss_emulated=self.loss_applied(p.worker), notes=_link_notes(kernel, p, loss, ingress),
                bytes_up=s.get("upstream_bytes") if s else None, bytes_down=s.get("downstream_bytes") if s else None,
                connections=s.get("connections_total") if s else None))
        return rows

    def toxiproxy_label(self) -> Optional[str]:
        return "embedded (service)" if self.toxiproxy_url else None

    def summary_fields(self) -> dict[str, Any]:
        return {"compose_project": self.cp.project, "compose_file": str(self.cp.compose_file),
                "shaping": dict(self.cp.mechanisms)}

    def links_network(self, worker: str) -> str:
        dial = server_address_for(self.topology, worker)
        return next(n for n, a in self.topology.server.addresses.items() if a == dial)


def _link_notes(kernel: dict[str, str], p: cmp.ProxyRoute, loss: dict[str, str], ingress: dict[str, str]) -> list[str]:
    kinds = set(kernel.values())
    out = []
    if kinds != {"netem"}:
        out.append(f"latency {p.latency_ms:g}±{p.jitter_ms:g} ms one way by the Toxiproxy proxy "
                   f"(whole ms: {round(p.latency_ms)}±{round(p.jitter_ms)})")
    if "none" in kinds:
        out.append("rate not shaped on " + ", ".join(k for k, m in kernel.items() if m == "none") + " (no tc qdisc)")
    dropped = [k for k, m in loss.items() if m == netem.LOSS_IPTABLES]
    if dropped:
        out.append("loss by iptables (random drops of arriving packets) on " + ", ".join(dropped))
    out += [f"loss not applied on {k} ({m.removeprefix('none: ')})" for k, m in loss.items()
            if m not in (netem.LOSS_IPTABLES, netem.NETEM)]
    out += [f"down rate not shaped on arrival at {k} ({m.removeprefix('none: ')})" for k, m in ingress.items()
            if m != netem.INGRESS_IFB]
    return out
