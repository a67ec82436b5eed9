"""The docker-compose backend: a topology rendered into a compose project, brought up and torn down.

What gets rendered (into RUN_DIR/compose/, readable and usable by hand with `docker compose up`):

- one service per node, attached to its networks with static IPv4 addresses;
- one network per subnet, with an explicit gateway that is no node's address (docker would
  otherwise take .1, which the seed's nodes use);
- `net.ipv4.ip_forward` = 1 on forwarding nodes and 0 elsewhere (containers inherit 1);
- an entrypoint script per node (entrypoints/NAME.sh) that drops docker's default route,
  adds the topology's static routes (return routes included), shapes every interface with
  tc, then execs the node's command. Dropping the default route matters: otherwise traffic
  the topology does not route would leak through the docker host. Without netem, loss is
  dropped by iptables as packets arrive, and an interface whose senders could outpace its own
  receive rate (a Wi-Fi laptop's down rate on a cabled LAN) gets its ingress shaped on an IFB
  device (smolcluster.testbed.linkemu.netem); each probe's outcome goes into the ready file;
- NET_ADMIN for `ip route` / `tc` / `iptables`; cpu and memory limits from the device profiles;
- a Toxiproxy service standing in for the server on the networks workers dial: each worker
  dials its own proxy there, whose upstream is the server. Latency and jitter toxics go on
  these proxies when the kernel has no netem; network faults always go through them.

File format "2.4": the newest format compose v1 (1.29) accepts with `cpus`, `mem_limit` and
IPAM gateways; compose v2 reads it too (it ignores the version key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import yaml

from smolcluster.common.errors import ConfigError, DockerCommandFailed
from smolcluster.common.wait import wait_until
from smolcluster.testbed.linkemu import netem
from smolcluster.testbed.profiles import LinkProfile
from smolcluster.testbed.sim.cluster import node_slowdown
from smolcluster.testbed.sim.docker_env import DockerEnv
from smolcluster.testbed.sim.image import BindMount, container_python, offline_mounts, repo_root
from smolcluster.testbed.topology import Topology, path_to_server, server_address_for
from smolcluster.common.files import write_atomic

COMPOSE_FORMAT = "2.4"
CONTAINER_RUN_DIR = "/run"  # the run dir inside every container (configs at /run/config, nodes at /run/nodes/NAME)
TOXIPROXY_SERVICE = "toxiproxy"
TOXIPROXY_API_PORT = 8474
PROXY_BASE_PORT = 21000  # worker rank r dials the toxiproxy at PROXY_BASE_PORT + r
OFFICIAL_TOXIPROXY_IMAGE = "ghcr.io/shopify/toxiproxy:2.12.0"
AUTO = "auto"  # mechanism chosen by each container at start: netem if the kernel has it, else tbf


@dataclass(frozen=True)
class ImageSpec:
    """Which image the nodes run and how: the interpreter path, binds and environment it needs."""

    tag: str
    python: str
    mounts: tuple[BindMount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    offline: bool = False


def offline_image_spec(tag: str, data_dir: str | Path | None = None) -> ImageSpec:
    """The offline image (smolcluster image build --offline) with the host's /usr, Python and repo bound in."""
    env = {"PYTHONPATH": str(repo_root()), "PATH": f"{Path(container_python()).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"}
    if data_dir is not None:
        env["SMOLCLUSTER_DATA_DIR"] = str(Path(data_dir).resolve())
    return ImageSpec(tag=tag, python=container_python(), mounts=tuple(offline_mounts(data_dir)), env=env, offline=True)


def user_image_spec(tag: str, data_dir: str | Path | None = None) -> ImageSpec:
    """The image built from compose/Dockerfile; MNIST is bound in read-only when a data dir is given."""
    mounts: tuple[BindMount, ...] = ()
    env: dict[str, str] = {}
    if data_dir is not None:
        p = str(Path(data_dir).resolve())
        mounts = (BindMount(p, "/data/mnist", True),)
        env["SMOLCLUSTER_DATA_DIR"] = "/data/mnist"
    return ImageSpec(tag=tag, python="python", mounts=mounts, env=env)


@dataclass(frozen=True)
class LinkShaping:
    """How one interface (node, network) is emulated: what it sends (a qdisc), what it receives
    (IFB shaping where the senders could outpace it) and which of its arriving packets are lost."""

    node: str
    network: str
    address: str
    profile: LinkProfile
    rate_mbit: float  # egress rate of this interface (up towards the server, down away from it)
    commands: dict[str, list[list[str]]]  # mechanism -> tc commands
    index: int = 0  # this interface's number on its node (names its IFB device and iptables chain)
    ingress_mbit: Optional[float] = None  # what it receives, shaped on an IFB device; None: the senders' egress suffices
    loss_pct: float = 0.0  # of what it receives (without netem; netem drops on egress instead)
    loss_by_source: tuple[tuple[str, float], ...] = ()  # neighbours whose hop here has another loss
    exempt: tuple[str, ...] = ()  # sources neither dropped nor ingress-shaped (the toxiproxy <-> server leg)
    unsegmented: bool = False  # one TCP segment per packet: an end of a lossy hop (netem.unsegmented_commands)

    @property
    def ifb(self) -> str:
        return f"ifb{self.index}"

    @property
    def loss_chain(self) -> str:
        return f"smolcluster-loss{self.index}"

    @property
    def lossy(self) -> bool:
        return self.loss_pct > 0 or any(pct > 0 for _, pct in self.loss_by_source)

    def ingress(self) -> list[list[str]]:
        return netem.ingress_commands(self.ifb, self.ingress_mbit, self.exempt) if self.ingress_mbit else []

    def loss(self) -> list[list[str]]:
        return netem.loss_commands(self.loss_chain, self.loss_pct, self.loss_by_source, self.exempt)


@dataclass(frozen=True)
class ProxyRoute:
    """One worker's proxy on the Toxiproxy service: the worker dials listen, the proxy dials upstream."""

    name: str
    worker: str
    listen: str  # "ADDR:PORT" on the toxiproxy container
    upstream: str  # the server's "ADDR:PORT"
    latency_ms: float  # one way, whole path (used when the kernel cannot delay)
    jitter_ms: float


@dataclass
class ComposeProject:
    """A rendered compose project. `mechanisms` is filled in from the containers once they are up."""

    project: str
    run_dir: Path
    compose_dir: Path
    compose_file: Path
    topology: Topology
    image: ImageSpec
    mechanism: str  # requested: auto | netem | tbf | none
    links: list[LinkShaping]
    proxies: list[ProxyRoute]
    toxiproxy_address: dict[str, str]  # network -> address of the toxiproxy service there
    services: list[str]
    mechanisms: dict[str, str] = field(default_factory=dict)  # "node/network" -> mechanism actually applied
    # "node/network" -> how loss / ingress shaping was applied there ("iptables", "netem", "ifb", or
    # "none: <why>"), for the interfaces that needed it; filled in from the containers like `mechanisms`
    loss: dict[str, str] = field(default_factory=dict)
    ingress: dict[str, str] = field(default_factory=dict)
    toxiproxy_links: list[LinkShaping] = field(default_factory=list)  # the Toxiproxy service's interfaces

    def path_links(self) -> dict[str, LinkShaping]:
        """"node/network" -> shaping of the interfaces the proxied training traffic crosses: every node's,
        with the Toxiproxy service's in place of the server's on the networks it stands in for the server."""
        server = self.topology.server.name
        out = {f"{l.node}/{l.network}": l for l in self.links
               if not (l.node == server and l.network in self.toxiproxy_address)}
        return out | {f"{l.node}/{l.network}": l for l in self.toxiproxy_links}

    @property
    def ready_dir(self) -> Path:
        return self.compose_dir / "ready"


# --------------------------------------------------------------------------- naming


def project_name(topology_name: str, suffix: str | None = None) -> str:
    """A compose project name unique per run; only the characters compose v1 and v2 both keep."""
    base = re.sub(r"[^a-z0-9_-]+", "-", topology_name.lower()).strip("-_") or "topology"
    return f"smolcluster-{base}-{suffix or uuid.uuid4().hex[:8]}"


def service_name(name: str) -> str:
    """A node name as a compose service name (same rule as project names, never empty)."""
    s = re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).strip("-.") or "node"
    return s


# --------------------------------------------------------------------------- planning


def _free_address(topo: Topology, network: str, taken: set[IPv4Address]) -> IPv4Address:
    """The highest host address of the network that no node and no gateway uses."""
    net = topo.networks[network]
    used = {a for n in topo.nodes.values() for a in n.addresses.values()} | taken
    if net.gateway is not None:
        used.add(net.gateway)
    last = int(net.subnet.broadcast_address) - 1
    for i in range(last, int(net.subnet.network_address), -1):
        a = IPv4Address(i)
        if a not in used:
            return a
    raise ConfigError(topo.file, f"networks.{network}.subnet", f"{net.subnet} has no free address for the Toxiproxy service",
                      "use a larger subnet (one address more than the nodes and the gateway need)")


def towards_server(topo: Topology, node: str, network: str) -> bool:
    """Whether `node` reaches the server through `network` (its first hop's network): then it sends up
    and receives down there. The server, and a router on the networks it routes for, send down."""
    if node == topo.server.name:
        return False
    return path_to_server(topo, node)[0].network == network


def _rates(topo: Topology, node: str, network: str) -> tuple[float, float]:
    """(send, receive) rate of a node's attachment to a network, from its link profile."""
    p = topo.link_profile(node, network)
    return (p.up_mbit, p.down_mbit) if towards_server(topo, node, network) else (p.down_mbit, p.up_mbit)


def plan_links(topo: Topology, toxi_addr: dict[str, str] | None = None) -> list[LinkShaping]:
    """Every node's interfaces. `toxi_addr` (network -> address of the Toxiproxy service there): the
    service stands in for the server, so its leg to the server is exempt from loss and ingress shaping."""
    toxi_addr = toxi_addr or {}
    server = topo.server
    out: list[LinkShaping] = []
    for node in topo.nodes.values():
        for index, (net, addr) in enumerate(node.addresses.items()):
            p = topo.link_profile(node.name, net)
            rate, receive = _rates(topo, node.name, net)
            cmds = {m: netem.shaping_commands(p, m, "$DEV", rate_mbit=rate) for m in netem.MECHANISMS}
            peers = [n for n in topo.nodes.values() if n.name != node.name and net in n.addresses]
            # the fastest a neighbour (or the toxiproxy, sending as the server) can send towards this interface
            fastest = max((_rates(topo, n.name, net)[0] for n in peers), default=0.0)
            by_source: list[tuple[str, float]] = []
            for n in peers:
                hop_loss = topo.hop_profile(n.name, node.name, net).loss_pct
                if hop_loss != p.loss_pct:
                    by_source.append((str(n.addresses[net]), hop_loss))
                    if n.name == server.name and net in toxi_addr:
                        by_source.append((toxi_addr[net], hop_loss))
            exempt = (toxi_addr[net],) if node.name == server.name and net in toxi_addr else ()
            out.append(LinkShaping(node=node.name, network=net, address=str(addr), profile=p, rate_mbit=rate, commands=cmds,
                                   index=index, ingress_mbit=receive if receive < fastest else None, loss_pct=p.loss_pct,
                                   loss_by_source=tuple(by_source), exempt=exempt))
    # An interface sends one segment per packet where every hop of the workers' paths through it is lossy: its
    # drops are then per segment. Where a lossless path shares it (a server on a LAN with a cabled Pi), GSO
    # stays on: segmenting in software would cap that path far below its rate, and drops of what this end
    # sends to the lossy neighbour land on GSO packets (netem.py says what that costs).
    carried: dict[tuple[str, str], list[float]] = {}
    for w in topo.workers:
        for hop in path_to_server(topo, w.name):
            for node in (hop.src, hop.dst):
                carried.setdefault((node, hop.network), []).append(hop.profile.loss_pct)
    lossy_only = {end for end, losses in carried.items() if all(pct > 0 for pct in losses)}
    return [dataclasses.replace(l, unsegmented=True) if (l.node, l.network) in lossy_only else l for l in out]


def toxiproxy_links(topo: Topology, links: Sequence[LinkShaping], toxi_addr: dict[str, str]) -> list[LinkShaping]:
    """The Toxiproxy service's interfaces: the server's shaping on each network it stands in for the server.
    Its leg to the server is not a link of the topology: packets from the server (and from the server's
    other subnets, routed through the server) are neither dropped nor shaped on arrival."""
    server = topo.server
    behind_server = [str(topo.networks[n].subnet) for n in server.addresses if n not in toxi_addr]
    out = []
    for index, (net, addr) in enumerate(sorted(toxi_addr.items())):
        l = next(l for l in links if l.node == server.name and l.network == net)
        out.append(dataclasses.replace(l, node=TOXIPROXY_SERVICE, address=addr, index=index,
                                       exempt=(str(server.addresses[net]), *behind_server)))
    return out


def plan_proxies(topo: Topology, toxi_addr: dict[str, str], server_port: int) -> list[ProxyRoute]:
    """One proxy per worker, on the toxiproxy address in the network of the server address it dials."""
    import math

    out: list[ProxyRoute] = []
    server = topo.server
    for w in topo.workers:
        dial = server_address_for(topo, w.name)
        net = next(n for n, a in server.addresses.items() if a == dial)
        hops = path_to_server(topo, w.name)
        latency = sum(h.profile.delay_ms for h in hops)
        jitter = math.sqrt(sum(h.profile.jitter_ms ** 2 for h in hops))
        out.append(ProxyRoute(name=f"{w.name}-to-{server.name}", worker=w.name,
                              listen=f"{toxi_addr[net]}:{PROXY_BASE_PORT + w.rank}", upstream=f"{dial}:{server_port}",
                              latency_ms=latency, jitter_ms=jitter))
    return out


# --------------------------------------------------------------------------- entrypoints


_ENTRY_HEAD = r"""#!/bin/sh
# Generated by smolcluster for {name}: routes and link shaping, then the node's command.
# Needs NET_ADMIN (ip route, tc). Mechanism: {mechanism} (auto = netem if the kernel has it, else tbf).
set -u
READY={ready}
MECH={mechanism}
dev_of() {{ set -- $(ip -4 -o addr show to "$1"); echo "${{2%%@*}}"; }}  # "7: eth1 inet ADDR/24 ..." -> eth1
fail() {{ echo "smolcluster[{name}]: $*" >&2; echo "error: $*" > "$READY.failed"; exit 1; }}
if [ "$MECH" = auto ]; then
  # probe on lo: the kernel decides, not an assumption (CI's kernel has no sch_netem)
  if tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then tc qdisc del dev lo root; MECH=netem
  elif tc qdisc add dev lo root tbf rate 1mbit burst 32kbit latency 50ms 2>/dev/null; then tc qdisc del dev lo root; MECH=tbf
  else MECH=none; fi
fi
# Only the topology's routes: without docker's default route, traffic the topology does not
# route cannot leak through the docker host.
ip route del default 2>/dev/null || true
"""


# Loss where the kernel has no netem: iptables' statistic match in the raw table, probed like tc (a
# rule that matches nothing, added and removed). Debian's iptables (nft or legacy backend) is tried.
_LOSS_PROBE = r"""LOSS=netem; LOSS_WHY=""
if [ "$MECH" != netem ]; then
  LOSS=none; LOSS_WHY="no iptables command in the container (install Debian's iptables)"
  export XTABLES_LOCKFILE=/tmp/xtables.lock  # not /run: that is the run dir, shared by every container
  for IPT in iptables iptables-legacy; do
    command -v "$IPT" >/dev/null 2>&1 || continue
    if OUT=$("$IPT" -w -t raw -A PREROUTING -i lo -s 192.0.2.1 -m statistic --mode random --probability 0.5 -j DROP 2>&1); then
      "$IPT" -w -t raw -D PREROUTING -i lo -s 192.0.2.1 -m statistic --mode random --probability 0.5 -j DROP
      LOSS=iptables; LOSS_WHY=""; break
    fi
    LOSS_WHY="$IPT failed: $(echo "$OUT" | head -n 1 | tr -d ';')"
  done
fi
"""


def _shell(cmds: Sequence[Sequence[str]], what: str) -> str:
    """Commands joined with `;`, each failing the setup with `what` in the message; $DEV/$IPT stay variables."""
    return "; ".join(shlex.join(c).replace("'$DEV'", '"$DEV"').replace("'$IPT'", '"$IPT"') + f" || fail '{what}'"
                     for c in cmds) or ":"


def _entrypoint(name: str, mechanism: str, routes: Sequence[tuple[str, str]], links: Sequence[LinkShaping],
                ready_file: str) -> str:
    lines = [_ENTRY_HEAD.format(name=name, mechanism=mechanism, ready=shlex.quote(ready_file))]
    for dest, via in routes:
        lines.append(f"ip route replace {dest} via {via} || fail 'cannot add route {dest} via {via}'")
    if any(l.lossy for l in links):
        lines.append(_LOSS_PROBE)
    lines.append('STATUS="mechanism $MECH"')
    for link in links:
        lines.append(f"# {link.network}: {link.profile.name} (egress {link.rate_mbit:g} Mbit/s"
                     + (f", ingress {link.ingress_mbit:g} Mbit/s" if link.ingress_mbit else "")
                     + (f", loss {link.loss_pct:g}% of what arrives" if link.loss_pct else "")
                     + (", loss from " + ", ".join(f"{a} {pct:g}%" for a, pct in link.loss_by_source) if link.loss_by_source else "")
                     + ")")
        lines.append(f"DEV=$(dev_of {link.address}); [ -n \"$DEV\" ] || fail 'no interface has {link.address}'")
        if link.unsegmented:
            lines.append(_shell(netem.unsegmented_commands(), f"ip link (gso) failed on {link.network}"))
        lines.append('case "$MECH" in')
        for mech in netem.MECHANISMS:
            lines.append(f"  {mech}) {_shell(link.commands[mech], f'tc ({mech}) failed on {link.network}')} ;;")
        lines.append("esac")
        lines.append(f'STATUS="$STATUS;link {link.network} $MECH"')
        if link.ingress_mbit:
            # what this interface receives: its senders may be faster than its own down rate
            lines.append('if [ "$MECH" = none ]; then ING="none: no tc qdisc"')
            lines.append(f'elif OUT=$(ip link add {link.ifb} type ifb 2>&1); then')
            lines.append(f"  {_shell(link.ingress(), f'ingress shaping failed on {link.network}')}; ING={netem.INGRESS_IFB}")
            lines.append(f'else ING="none: ip link add {link.ifb} type ifb failed: $(echo "$OUT" | head -n 1 | tr -d \';\')"; fi')
            lines.append(f'STATUS="$STATUS;ingress {link.network} $ING"')
        if link.lossy:
            lines.append(f'if [ "$LOSS" = {netem.LOSS_IPTABLES} ]; then {_shell(link.loss(), f"iptables failed on {link.network}")}; fi')
            lines.append(f'STATUS="$STATUS;loss {link.network} $LOSS${{LOSS_WHY:+: $LOSS_WHY}}"')
    lines.append('echo "$STATUS" | tr ";" "\\n" > "$READY.tmp" && mv "$READY.tmp" "$READY"')
    lines.append('echo "smolcluster[' + name + ']: ready (mechanism $MECH)"')
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rendering


class _ReadableDumper(yaml.SafeDumper):
    """Block style, except argv lists on one line: `command: [python, -m, smolcluster, ...]` (volumes stay one per line)."""

    def represent_list(self, data):  # type: ignore[no-untyped-def]
        flow = all(isinstance(x, (str, int, float)) and ":/" not in str(x) for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ReadableDumper.add_representer(list, _ReadableDumper.represent_list)


def _toxiproxy_routes(topo: Topology, toxi_nets: set[str]) -> list[tuple[str, str]]:
    """The server's routes, plus the server's other subnets via the server itself (it stands in for the server)."""
    server = topo.server
    out = [(str(r.dest), str(r.via)) for r in server.routes]
    via_server = next(str(server.addresses[n]) for n in server.addresses if n in toxi_nets)
    for net in server.addresses:
        if net not in toxi_nets:
            out.append((str(topo.networks[net].subnet), via_server))
    return out


def render_compose(topo: Topology, run_dir: str | Path, image: ImageSpec, *,
                   commands: dict[str, list[str]] | None = None, mechanism: str = AUTO,
                   toxiproxy: str = "embedded", server_port: int = 65432,
                   project: str | None = None, node_env: dict[str, dict[str, str]] | None = None) -> ComposeProject:
    """Write RUN_DIR/compose/{docker-compose.yml, entrypoints/*.sh} and return what was rendered.

    commands: node name -> argv run after setup (default: the training command for the node).
    toxiproxy: "embedded" (smolcluster's own, in the node image), "official" (Shopify's image,
    needs a registry) or "none".
    node_env: node name -> extra environment variables of its container.
    """
    if mechanism not in (AUTO, *netem.MECHANISMS):
        raise ValueError(f"mechanism must be one of auto, {', '.join(netem.MECHANISMS)}")
    if toxiproxy not in ("embedded", "official", "none"):
        raise ValueError("toxiproxy must be embedded, official or none")
    run_dir = Path(run_dir).resolve()
    compose_dir = run_dir / "compose"
    (compose_dir / "entrypoints").mkdir(parents=True, exist_ok=True)
    ready_dir = compose_dir / "ready"
    ready_dir.mkdir(exist_ok=True)
    for stale in ready_dir.iterdir():
        stale.unlink()
    project = project or project_name(topo.name)
    cpu_cap = float(os.cpu_count() or 1)

    # toxiproxy on the networks workers dial the server on
    toxi_nets: set[str] = set()
    if toxiproxy != "none":
        for w in topo.workers:
            dial = server_address_for(topo, w.name)
            toxi_nets.add(next(n for n, a in topo.server.addresses.items() if a == dial))
    toxi_addr = {n: str(_free_address(topo, n, set())) for n in sorted(toxi_nets)}
    proxies = plan_proxies(topo, toxi_addr, server_port) if toxi_nets else []
    links = plan_links(topo, toxi_addr)
    commands = commands if commands is not None else default_commands(topo, image, proxies)

    def volumes() -> list[str]:
        return [m.compose() for m in image.mounts] + [f"{run_dir}:{CONTAINER_RUN_DIR}"]

    def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": "/tmp/matplotlib",
               "WANDB_MODE": "offline", "HOME": "/root", "SMOLCLUSTER_RUN_NAME": run_dir.name, **image.env}
        env.update(extra or {})
        return env

    services: dict[str, dict] = {}
    for node in topo.nodes.values():
        svc = service_name(node.name)
        script = compose_dir / "entrypoints" / f"{svc}.sh"
        node_links = [l for l in links if l.node == node.name]
        routes = [(str(r.dest), str(r.via)) for r in node.routes]
        write_atomic(script, _entrypoint(node.name, mechanism, routes, node_links, f"{CONTAINER_RUN_DIR}/compose/ready/{svc}"))
        services[svc] = {
            "image": image.tag,
            "hostname": svc,
            "entrypoint": ["/bin/sh", f"{CONTAINER_RUN_DIR}/compose/entrypoints/{svc}.sh"],
            "command": list(commands[node.name]),
            "networks": {net: {"ipv4_address": str(a)} for net, a in node.addresses.items()},
            "cap_add": ["NET_ADMIN"],
            "sysctls": {"net.ipv4.ip_forward": 1 if node.forwarding else 0},
            "cpus": round(min(float(node.device.cores), cpu_cap), 2),
            "mem_limit": f"{node.device.memory_mb}m",
            "volumes": volumes(),
            "environment": environment((node_env or {}).get(node.name)),
            "working_dir": CONTAINER_RUN_DIR,
            # PID 1 ignores SIGTERM unless it handles it; Python turns SIGINT into a clean exit
            "stop_signal": "SIGINT",
            "stop_grace_period": "5s",
            "labels": {"smolcluster.core.training.node": node.name, "smolcluster.role": node.role},
        }

    toxi_links = toxiproxy_links(topo, links, toxi_addr)
    if toxi_nets:
        script = compose_dir / "entrypoints" / f"{TOXIPROXY_SERVICE}.sh"
        write_atomic(script, _entrypoint(TOXIPROXY_SERVICE, mechanism, _toxiproxy_routes(topo, toxi_nets), toxi_links,
                                      f"{CONTAINER_RUN_DIR}/compose/ready/{TOXIPROXY_SERVICE}"))
        holder = {
            "image": image.tag,
            "hostname": TOXIPROXY_SERVICE,
            "entrypoint": ["/bin/sh", f"{CONTAINER_RUN_DIR}/compose/entrypoints/{TOXIPROXY_SERVICE}.sh"],
            "networks": {n: {"ipv4_address": a} for n, a in toxi_addr.items()},
            "cap_add": ["NET_ADMIN"],
            "sysctls": {"net.ipv4.ip_forward": 0},
            # the API only on the host's loopback, at a port docker picks (no clash between runs)
            "ports": [f"127.0.0.1::{TOXIPROXY_API_PORT}"],
            "volumes": volumes(),
            "environment": environment(),
            "working_dir": CONTAINER_RUN_DIR,
            "stop_signal": "SIGINT",
            "stop_grace_period": "5s",
            "labels": {"smolcluster.core.training.node": TOXIPROXY_SERVICE, "smolcluster.role": "toxiproxy"},
        }
        if toxiproxy == "embedded":
            holder["command"] = [image.python, "-m", "smolcluster", "proxy", "--api", f"0.0.0.0:{TOXIPROXY_API_PORT}",
                                 "--config", f"{CONTAINER_RUN_DIR}/compose/toxiproxy.json"]
            services[TOXIPROXY_SERVICE] = holder
        else:
            # Shopify's image has no shell or `ip`: our image holds the network namespace (routes,
            # shaping) and the official server joins it.
            holder["command"] = ["sleep", "infinity"]
            services[f"{TOXIPROXY_SERVICE}-net"] = holder
            services[TOXIPROXY_SERVICE] = {
                "image": OFFICIAL_TOXIPROXY_IMAGE,
                "network_mode": f"service:{TOXIPROXY_SERVICE}-net",
                "command": ["-host=0.0.0.0", f"-port={TOXIPROXY_API_PORT}", f"-config={CONTAINER_RUN_DIR}/compose/toxiproxy.json"],
                "volumes": [f"{run_dir}/compose:{CONTAINER_RUN_DIR}/compose:ro"],
                "labels": {"smolcluster.core.training.node": TOXIPROXY_SERVICE, "smolcluster.role": "toxiproxy"},
            }

    networks = {
        n.name: {
            "driver": "bridge",
            "ipam": {"config": [{"subnet": str(n.subnet), **({"gateway": str(n.gateway)} if n.gateway else {})}]},
            "labels": {"smolcluster.network": n.name},
        }
        for n in topo.networks.values()
    }
    data = {"version": COMPOSE_FORMAT, "services": services, "networks": networks}
    compose_file = compose_dir / "docker-compose.yml"
    header = (f"# smolcluster compose project for topology '{topo.name}' ({topo.file}).\n"
              f"# Run by hand:  docker compose -p {project} -f {compose_file.name} up    (or docker-compose)\n"
              f"#   stop:       docker compose -p {project} -f {compose_file.name} down -v --remove-orphans\n"
              "# Each node's entrypoints/NODE.sh sets routes and tc shaping, then runs its command.\n"
              "# Workers dial their proxy on the toxiproxy service (see toxiproxy.json); on kernels\n"
              "# without netem, `smolcluster sim --backend compose` adds the links' latency there.\n")
    write_atomic(compose_file, header + yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, width=120))
    write_atomic(compose_dir / "toxiproxy.json", json.dumps(
        [{"name": p.name, "listen": p.listen, "upstream": p.upstream, "enabled": True} for p in proxies], indent=2) + "\n")
    return ComposeProject(project=project, run_dir=run_dir, compose_dir=compose_dir, compose_file=compose_file,
                          topology=topo, image=image, mechanism=mechanism, links=links, proxies=proxies,
                          toxiproxy_address=toxi_addr, services=list(services), toxiproxy_links=toxi_links)


RESUME_MARKER = "resume"  # RUN_DIR/nodes/<server>/resume: the next start of the server container passes --resume


def default_commands(topo: Topology, image: ImageSpec, proxies: Sequence[ProxyRoute] = (),
                     algorithm: str | None = None) -> dict[str, list[str]]:
    """The training command per node: server on rank 0, each worker dialing its proxy (if any).

    The server's command resumes from its checkpoint when RUN_DIR/nodes/<server>/resume exists, so
    `docker start` after a crash (a fault, or by hand) continues the run instead of restarting it.
    """
    dial = {p.worker: p.listen for p in proxies}
    algo = algorithm or topo.training.algorithm
    cfg = f"{CONTAINER_RUN_DIR}/config"
    out: dict[str, list[str]] = {}
    server = topo.server
    marker = f"{CONTAINER_RUN_DIR}/nodes/{server.name}/{RESUME_MARKER}"
    # `$$`: compose interpolates `$` in the file; `$$@` reaches the shell as `$@`
    resume_if_marked = f'if [ -e {shlex.quote(marker)} ]; then exec "$$@" --resume; else exec "$$@"; fi'
    out[server.name] = ["/bin/sh", "-c", resume_if_marked, "server",
                        image.python, "-m", "smolcluster", "server", "--algo", algo, "--config-dir", cfg,
                        "--run-dir", f"{CONTAINER_RUN_DIR}/nodes/{server.name}", "--slowdown", f"{node_slowdown(server.device):g}"]
    for w in topo.workers:
        out[w.name] = [image.python, "-m", "smolcluster", "worker", str(w.rank), w.name, "--algo", algo,
                       "--config-dir", cfg, "--run-dir", f"{CONTAINER_RUN_DIR}/nodes/{w.name}",
                       "--slowdown", f"{node_slowdown(w.device):g}"]
        if w.name in dial:
            out[w.name] += ["--connect", dial[w.name]]
        if w.forwarding:
            out[w.name] = [*KEEP_ROUTING, w.name, *out[w.name]]
    return out


# A router's container must outlive its training process (the Pis behind mini3 still need mini3 when
# mini3's worker is done, as on the real cluster); it stops on SIGINT/SIGTERM (compose down).
# The training exit code goes to /run/nodes/NAME/training_exit_code, so the runner can tell a
# router whose worker crashed from one still training.
KEEP_ROUTING = ["/bin/sh", "-c", '"$$@"; code=$$?; mkdir -p "/run/nodes/$$0"; echo $$code > "/run/nodes/$$0/training_exit_code"; '
                'echo "training exited ($$code); still routing"; trap "exit 0" INT TERM; sleep 2147483647 & wait']
TRAINING_EXIT_CODE = "training_exit_code"


# --------------------------------------------------------------------------- running


def container_id(env: DockerEnv, cp: ComposeProject, service: str) -> str:
    out = env.compose_run(cp.project, cp.compose_file, ["ps", "-q", service], timeout=60).stdout.strip()
    if not out:
        raise DockerCommandFailed(f"service {service} of project {cp.project} has no container")
    return out.splitlines()[0]


def exec_in(env: DockerEnv, cp: ComposeProject, service: str, cmd: Sequence[str], timeout: float = 60.0,
            check: bool = True):
    """Run a command inside a service's container (docker exec), output captured."""
    return env.run(["exec", container_id(env, cp, service), *cmd], timeout=timeout, check=check)


def up(env: DockerEnv, cp: ComposeProject, timeout: float = 300.0,
       before_start: Callable[[], None] | None = None) -> None:
    """`compose up -d`, then wait until every node's entrypoint finished its setup.

    before_start: called once the networks exist (their gateways are on the host's bridges) and
    before any container starts, e.g. to listen on a gateway address the nodes dial from the start."""
    if before_start is not None:
        env.compose_run(cp.project, cp.compose_file, ["up", "--no-start", "--no-build"], timeout=timeout)
        before_start()
    env.compose_run(cp.project, cp.compose_file, ["up", "-d", "--no-build"], timeout=timeout)
    wait_ready(env, cp, timeout=min(timeout, 120.0))


def wait_ready(env: DockerEnv, cp: ComposeProject, timeout: float = 120.0) -> dict[str, str]:
    """Wait for each service's ready file; fill cp.mechanisms ("node/network" -> mechanism)."""
    expected = [s for s in cp.services if not (s == TOXIPROXY_SERVICE and f"{TOXIPROXY_SERVICE}-net" in cp.services)]

    def missing() -> list[str]:
        failed = list(cp.ready_dir.glob("*.failed"))
        if failed:
            msgs = "; ".join(f"{p.stem}: {p.read_text().strip()}" for p in failed)
            raise DockerCommandFailed(f"container setup failed: {msgs}. Logs: {logs(env, cp)[-3000:]}")
        return [s for s in expected if not (cp.ready_dir / s).exists()]

    if not wait_until(lambda: not missing(), timeout, interval=0.2):
        raise DockerCommandFailed(f"containers {', '.join(missing())} did not finish setup within {timeout:.0f}s. "
                                  f"Logs:\n{logs(env, cp)[-3000:]}")
    for s in expected:
        node = next((n for n in cp.topology.nodes if service_name(n) == s), s)
        for line in (cp.ready_dir / s).read_text().splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[0] in ("link", "loss", "ingress"):
                {"link": cp.mechanisms, "loss": cp.loss, "ingress": cp.ingress}[parts[0]][f"{node}/{parts[1]}"] = parts[2]
    return cp.mechanisms


def logs(env: DockerEnv, cp: ComposeProject) -> str:
    proc = env.compose_run(cp.project, cp.compose_file, ["logs", "--no-color", "--tail", "50"], timeout=60, check=False)
    return proc.stdout + proc.stderr


def down(env: DockerEnv, cp: ComposeProject, timeout: float = 120.0) -> None:
    """Remove the project's containers, networks and volumes; then make sure nothing is left."""
    env.compose_run(cp.project, cp.compose_file, ["down", "-v", "--remove-orphans", "-t", "3"], timeout=timeout, check=False)
    remove_project_leftovers(env, cp.project)


def remove_project_leftovers(env: DockerEnv, project: str) -> None:
    """Force-remove anything still labelled with the project (after a failed `down`, or a crash)."""
    label = f"label=com.docker.compose.project={project}"
    ids = env.run(["ps", "-aq", "--filter", label], timeout=60, check=False).stdout.split()
    if ids:
        env.run(["rm", "-f", "-v", *ids], timeout=120, check=False)
    nets = env.run(["network", "ls", "-q", "--filter", label], timeout=60, check=False).stdout.split()
    if nets:
        env.run(["network", "rm", *nets], timeout=120, check=False)


def leftovers(env: DockerEnv, project: str) -> tuple[list[str], list[str]]:
    """(container ids, network ids) still labelled with the project."""
    label = f"label=com.docker.compose.project={project}"
    return (env.run(["ps", "-aq", "--filter", label], timeout=60, check=False).stdout.split(),
            env.run(["network", "ls", "-q", "--filter", label], timeout=60, check=False).stdout.split())


def netns_service(cp: ComposeProject, node: str) -> str:
    """The service whose container holds `node`'s network setup (Shopify's image joins a holder's namespace)."""
    if node == TOXIPROXY_SERVICE and f"{TOXIPROXY_SERVICE}-net" in cp.services:
        return f"{TOXIPROXY_SERVICE}-net"
    return service_name(node)


# Insert (or delete) a RETURN at the top of an interface's loss chain, with whichever iptables set it up.
_LOSS_SWITCH = ('export XTABLES_LOCKFILE=/tmp/xtables.lock; for c in iptables iptables-legacy; do '
                '"$c" -w -t raw "$0" "$1" 1 $2 2>/dev/null && exit 0; done; echo "no iptables holds chain $1" >&2; exit 1')


@contextmanager
def loss_paused(env: DockerEnv, cp: ComposeProject, interfaces: Sequence[str]) -> Iterator[None]:
    """The iptables loss of these interfaces ("node/network") off for the `with` body, so shaping can be
    measured on its own; back on afterwards, whatever happens."""
    links = cp.path_links()
    chains = [(netns_service(cp, key.split("/")[0]), links[key].loss_chain) for key in interfaces]
    paused = []
    try:
        for service, chain in chains:
            exec_in(env, cp, service, ["/bin/sh", "-c", _LOSS_SWITCH, "-I", chain, "-j RETURN"], timeout=30)
            paused.append((service, chain))
        yield
    finally:
        for service, chain in paused:
            exec_in(env, cp, service, ["/bin/sh", "-c", _LOSS_SWITCH, "-D", chain, ""], timeout=30)


def toxiproxy_api_url(env: DockerEnv, cp: ComposeProject) -> str:
    """http://127.0.0.1:PORT of the toxiproxy service's API (published on the host's loopback only)."""
    holder = netns_service(cp, TOXIPROXY_SERVICE)
    out = env.run(["port", container_id(env, cp, holder), f"{TOXIPROXY_API_PORT}/tcp"], timeout=30).stdout.strip()
    host_port = out.splitlines()[0].rsplit(":", 1)[-1]
    return f"http://127.0.0.1:{int(host_port)}"


@contextmanager
def running(env: DockerEnv, cp: ComposeProject, timeout: float = 300.0) -> Iterator[ComposeProject]:
    """Bring the project up for the `with` body; always tear it down, also when up or the body fails."""
    try:
        up(env, cp, timeout=timeout)
        yield cp
    finally:
        down(env, cp)


# --------------------------------------------------------------------------- measuring inside containers


def _measure_cmd(cp: ComposeProject, *args: str) -> list[str]:
    return [cp.image.python, "-m", "smolcluster.testbed.linkemu.measure", *args]


@contextmanager
def measure_server(env: DockerEnv, cp: ComposeProject, service: str, port: int, count: int = 1,
                   timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """`measure serve` running in a service's container for the `with` body (its results on stdout)."""
    cmd = [env.docker, "exec", container_id(env, cp, service),
           *_measure_cmd(cp, "serve", "--port", str(port), "--count", str(count), "--timeout", str(timeout))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        if "listening" not in first:
            err = proc.stderr.read() if proc.stderr else ""
            raise DockerCommandFailed(f"measure server in {service} did not start: {first}{err}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def measure_result(proc: subprocess.CompletedProcess[str], what: str) -> dict:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise DockerCommandFailed(f"{what}: no result (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    return json.loads(lines[-1])


def measure_throughput(env: DockerEnv, cp: ComposeProject, src: str, dst: str, address: str, port: int = 5201,
                       seconds: float = 3.0) -> dict:
    """Bulk TCP from service `src` to `address` (served by `dst`), as the receiver measured it."""
    with measure_server(env, cp, dst, port):
        r = exec_in(env, cp, src, _measure_cmd(cp, "send", address, str(port), "--seconds", str(seconds)),
                    timeout=seconds + 60, check=False)
    return measure_result(r, f"throughput {src} -> {dst} ({address})")


def can_connect(env: DockerEnv, cp: ComposeProject, src: str, address: str, port: int, timeout: float = 3.0) -> tuple[bool, str]:
    """(True, "") when a TCP connection from `src` to address:port opens, else (False, the error)."""
    r = exec_in(env, cp, src, _measure_cmd(cp, "connect", address, str(port), "--timeout", str(timeout)),
                timeout=timeout + 60, check=False)
    res = measure_result(r, f"connect {src} -> {address}:{port}")
    return bool(res.get("connected")), res.get("error", "")
