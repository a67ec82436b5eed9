"""Topology files: networks, nodes, routes, training defaults — one source of truth for sim and hardware.

    name: hybrid
    profiles: my-profiles.yaml          # optional, relative to this file; adds/overrides netem/profiles.yaml
    networks:
      thunderbolt: {subnet: 10.10.0.0/24, profile: thunderbolt}
    nodes:
      mini1:
        role: server
        device: mac-mini
        addresses: {thunderbolt: 10.10.0.1, pi5-eth: 192.168.50.1}
        forwarding: true
        routes: [{dest: 192.168.51.0/24, via: 10.10.0.3}]
    training: {algorithm: edp, epochs: 1}
    faults: []

Routing is simulated like a Linux host: an address in a directly attached subnet is
delivered on that network, anything else follows the longest matching static route; a node
that passes on traffic for others must have `forwarding: true`. Every worker must reach the
server, and the server's replies must find their way back. docs/topology.md has every key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import check_value, checked, parse_fields, rule_of, shown, unknown_key_fix
from smolcluster.common.text import table
from smolcluster.common.yamlfile import read_yaml, without_gc
from smolcluster.core import algorithms
from smolcluster.testbed.profiles import (
    DeviceProfile,
    LinkProfile,
    default_profiles_path,
    load_device_profiles,
    load_link_profiles,
    resolve_device,
    resolve_link,
    series,
    series_loss_pct,
)

ROLES = ("server", "worker")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: IPv4Network
    profile: LinkProfile
    gateway: IPv4Address | None  # docker needs a gateway that is no node's address; default: last usable host


@dataclass(frozen=True)
class Route:
    dest: IPv4Network
    via: IPv4Address


@dataclass(frozen=True)
class HostSpec:
    """How the real-hardware launcher reaches a node (the optional `host:` block; see docs/hardware.md)."""

    ssh: str  # ssh target or ~/.ssh/config alias; default: the node's name
    user: str | None = None
    port: int | None = checked(None, min=1, max=65535, fix="e.g. port: 22")
    jump: str | None = None  # a node name or ssh target to go through (ProxyJump), e.g. a Pi behind its Mac
    os: Literal["linux", "macos", "windows"] = checked("linux", fix="use one of: linux, macos, windows")
    python: str = "python3"  # the interpreter on that host
    workdir: str = "~/smolcluster"  # where the code, configs and runs live on that host
    interfaces: dict[str, str] = field(default_factory=dict)  # network -> interface name (topology netsetup)


@dataclass(frozen=True)
class Node:
    name: str
    role: str  # "server" | "worker"
    device: DeviceProfile
    addresses: dict[str, IPv4Address]  # network name -> address, in file order
    forwarding: bool
    routes: tuple[Route, ...]
    rank: int  # server 0, workers 1..n in file order
    links: dict[str, LinkProfile] = field(default_factory=dict)  # per-node link overrides: network name -> profile
    host: HostSpec | None = None  # how `smolcluster launch` reaches it; None: defaults (ssh to the node's name)

    @property
    def host_spec(self) -> HostSpec:
        return self.host or HostSpec(ssh=self.name)

    @cached_property
    def _routes_by_prefix(self) -> list[tuple[int, dict[IPv4Network, Route]]]:
        table: dict[int, dict[IPv4Network, Route]] = {}
        for r in self.routes:
            table.setdefault(r.dest.prefixlen, {}).setdefault(r.dest, r)  # the first route for a subnet wins
        return sorted(table.items(), reverse=True)

    def route_for(self, dest: IPv4Address) -> Route | None:
        """The static route with the longest prefix holding `dest` (the first in file order on a tie), in
        at most 33 lookups however many routes the node has."""
        for prefixlen, routes in self._routes_by_prefix:
            hit = routes.get(IPv4Network((int(dest) >> (32 - prefixlen) << (32 - prefixlen), prefixlen)))
            if hit is not None:
                return hit
        return None


@dataclass(frozen=True)
class Hop:
    src: str
    dst: str
    network: str
    profile: LinkProfile


_AT_LEAST_1 = {"min": 1, "fix": "use a positive integer or null"}


@dataclass(frozen=True)
class TrainingDefaults:
    algorithm: str = "edp"  # a name in the algorithm registry (checked in _parse_training)
    epochs: int = checked(1, min=1, fix="use a positive integer")
    max_steps: int | None = checked(None, **_AT_LEAST_1)
    batch_size: int = checked(32, min=1, fix="use a positive integer")
    learning_rate: float = checked(0.001, above=0, fix="use a positive number")
    seed: int = checked(42, min=0, fix="use e.g. 42")
    worker_update_interval: int | None = checked(None, **_AT_LEAST_1)  # None: the algorithm's default
    push_interval: int | None = checked(None, **_AT_LEAST_1)
    timeout: float | Literal["auto"] | None = checked(None, above=0, fix="use a positive number, or auto (adaptive)")
    min_workers: int | None = checked(None, **_AT_LEAST_1)
    use_quantization: bool = False
    server_trains: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other cluster/nn config keys, validated by smolcluster.core.training.config


@dataclass(frozen=True)
class Topology:
    file: Path
    name: str
    networks: dict[str, Network]
    nodes: dict[str, Node]
    training: TrainingDefaults
    faults: list[dict]  # raw entries; the faults module validates them

    @cached_property
    def server(self) -> Node:
        return next(n for n in self.nodes.values() if n.role == "server")

    @cached_property
    def workers(self) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.role == "worker"), key=lambda n: n.rank)

    @cached_property
    def _owners(self) -> dict[IPv4Address, tuple[Node, str]]:
        return {addr: (node, net) for node in self.nodes.values() for net, addr in node.addresses.items()}

    def owner(self, address: IPv4Address) -> tuple[Node, str] | None:
        """The node holding an address, and the network it holds it on."""
        return self._owners.get(address)

    @cached_property
    def paths(self) -> dict[str, tuple[IPv4Address, list[Hop], list[Hop]]]:
        """Per worker: the server address it dials, the path there and the path replies take back."""
        return {w.name: _paths(self, w.name) for w in self.workers}

    @cached_property
    def links(self) -> list[tuple[str, str]]:
        """Every hop on a worker's path to the server as (src, dst), src on the worker side, in order."""
        return list(dict.fromkeys((h.src, h.dst) for w in self.workers for h in self.paths[w.name][1]))

    def link_profile(self, node: str, network: str) -> LinkProfile:
        """How `node` is attached to `network`: its own override, else the network's profile."""
        return self.nodes[node].links.get(network, self.networks[network].profile)

    def hop_profile(self, src: str, dst: str, network: str) -> LinkProfile:
        """A hop between two nodes on one network. A per-node override replaces the network's
        profile for that node's traffic; when both ends override, the two links are in series."""
        a, b = self.nodes[src].links.get(network), self.nodes[dst].links.get(network)
        if a is not None and b is not None:
            return series(a, b)
        return a or b or self.networks[network].profile


# --------------------------------------------------------------------------- parsing helpers

_TOP_KEYS = ("name", "description", "profiles", "networks", "nodes", "training", "faults")
_NETWORK_KEYS = ("subnet", "profile", "gateway")
_NODE_KEYS = ("role", "device", "addresses", "forwarding", "routes", "links", "host")
_HOST_KEYS = ("ssh", "user", "port", "jump", "os", "python", "workdir", "interfaces")
_ROUTE_KEYS = ("dest", "via")
# Cluster-config keys that the topology itself decides; setting them under training: is a mistake.
_DERIVED_KEYS = ("host_ip", "workers", "num_workers", "server")
# nn/cluster config spellings of keys that training: names differently.
_RENAMED_KEYS = {"num_epochs": "epochs"}


def _unknown(file: Path, key: str, raw: dict, allowed: tuple[str, ...]) -> None:
    for k in raw:
        if k not in allowed:
            raise ConfigError(file, f"{key}.{k}" if key else str(k), "unknown key", unknown_key_fix(k, allowed))


def _mapping(file: Path, key: str, raw: Any, example: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(file, key, f"must be a mapping, got {shown(raw)}", f"e.g. {example}")
    return raw


def _address(file: Path, key: str, raw: Any) -> IPv4Address:
    try:
        if not isinstance(raw, str):
            raise ValueError
        return IPv4Address(raw)
    except ValueError:
        raise ConfigError(file, key, f"{shown(raw)} is not an IPv4 address", "write it like 10.10.0.2") from None


def _subnet(file: Path, key: str, raw: Any) -> IPv4Network:
    text = "0.0.0.0/0" if raw == "default" else raw
    try:
        if not isinstance(text, str):
            raise ValueError
        return IPv4Network(text)
    except ValueError as e:
        if "host bits set" in str(e):
            fixed = IPv4Network(text, strict=False)
            raise ConfigError(file, key, f"{shown(raw)} has host bits set", f"use the network address: {fixed}") from None
        raise ConfigError(file, key, f"{shown(raw)} is not an IPv4 subnet", "write it like 10.10.0.0/24") from None


def _default_gateway(subnet: IPv4Network) -> IPv4Address | None:
    """The last usable host (.254 in a /24): docker takes .1 otherwise, and the seed's nodes use .1."""
    if subnet.num_addresses < 4:
        return None  # /31 and /32 have no room for a gateway next to the nodes
    return subnet.broadcast_address - 1


def _load_profiles(file: Path, raw: Any) -> tuple[dict[str, LinkProfile], dict[str, DeviceProfile]]:
    links = load_link_profiles(default_profiles_path())
    devices = load_device_profiles(default_profiles_path())
    if raw is None:
        return links, devices
    if not isinstance(raw, str):
        raise ConfigError(file, "profiles", f"must be a file path, got {raw!r}", "e.g. profiles: my-profiles.yaml (relative to this topology file)")
    extra = (file.parent / raw)
    if not extra.exists():
        raise ConfigError(file, "profiles", f"{extra} does not exist", "give a path relative to the topology file")
    links.update(load_link_profiles(extra))
    devices.update(load_device_profiles(extra))
    return links, devices


# --------------------------------------------------------------------------- sections


def _parse_networks(file: Path, raw: Any, links: dict[str, LinkProfile]) -> dict[str, Network]:
    raw = _mapping(file, "networks", raw, "networks: {lan: {subnet: 10.10.0.0/24, profile: ethernet-1g}}")
    if not raw:
        raise ConfigError(file, "networks", "no networks", "add at least one, e.g. lan: {subnet: 10.10.0.0/24, profile: ethernet-1g}")
    out: dict[str, Network] = {}
    for name, body in raw.items():
        key = f"networks.{name}"
        body = _mapping(file, key, body, f"{name}: {{subnet: 10.10.0.0/24, profile: ethernet-1g}}")
        _unknown(file, key, body, _NETWORK_KEYS)
        if "subnet" not in body:
            raise ConfigError(file, f"{key}.subnet", "missing", "add subnet: e.g. 10.10.0.0/24")
        if "profile" not in body:
            raise ConfigError(file, f"{key}.profile", "missing", f"add profile: one of {', '.join(sorted(links))}")
        subnet = _subnet(file, f"{key}.subnet", body["subnet"])
        profile = resolve_link(body["profile"], links, file, f"{key}.profile")
        if "gateway" in body and body["gateway"] is not None:
            gateway = _address(file, f"{key}.gateway", body["gateway"])
            if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
                raise ConfigError(file, f"{key}.gateway", f"{gateway} is not a usable host of {subnet}",
                                  f"use an unused host address of {subnet}, e.g. {_default_gateway(subnet)}")
        else:
            gateway = _default_gateway(subnet)
        out[str(name)] = Network(name=str(name), subnet=subnet, profile=profile, gateway=gateway)
    _check_overlaps(file, out)
    return out


def _check_overlaps(file: Path, networks: dict[str, Network]) -> None:
    """Subnets either nest or are disjoint: sorted by first address, one overlaps an earlier one exactly when
    it starts before the widest earlier one ends. The later network in file order is named."""
    order = {name: i for i, name in enumerate(networks)}
    widest: Network | None = None
    for n in sorted(networks.values(), key=lambda n: (n.subnet.network_address, -n.subnet.num_addresses)):
        if widest is not None and n.subnet.network_address <= widest.subnet.broadcast_address:
            later, earlier = (n, widest) if order[n.name] > order[widest.name] else (widest, n)
            raise ConfigError(file, f"networks.{later.name}.subnet",
                              f"{later.subnet} overlaps network {earlier.name!r} ({earlier.subnet})",
                              "give each network its own, non-overlapping subnet")
        if widest is None or n.subnet.broadcast_address > widest.subnet.broadcast_address:
            widest = n


def _parse_node(file: Path, name: str, body: Any, rank: int, networks: dict[str, Network],
                links: dict[str, LinkProfile], devices: dict[str, DeviceProfile]) -> Node:
    key = f"nodes.{name}"
    body = _mapping(file, key, body, f"{name}: {{role: worker, device: mac-mini, addresses: {{lan: 10.10.0.2}}}}")
    _unknown(file, key, body, _NODE_KEYS)
    role = body["role"]  # checked by load_topology before any node is parsed
    if "device" not in body:
        raise ConfigError(file, f"{key}.device", "missing", f"add device: one of {', '.join(sorted(devices))}")
    device = resolve_device(body["device"], devices, file, f"{key}.device")

    addrs_raw = _mapping(file, f"{key}.addresses", body.get("addresses"), f"addresses: {{{next(iter(networks))}: <address>}}")
    if not addrs_raw:
        raise ConfigError(file, f"{key}.addresses", "empty", "give the node an address on at least one network")
    addresses: dict[str, IPv4Address] = {}
    for net, value in addrs_raw.items():
        akey = f"{key}.addresses.{net}"
        if net not in networks:
            raise ConfigError(file, akey, f"unknown network {net!r}", f"use one of: {', '.join(networks)} (or add it under networks:)")
        addr = _address(file, akey, value)
        n = networks[net]
        if addr not in n.subnet:
            raise ConfigError(file, akey, f"{addr} is outside the subnet of network {net!r} ({n.subnet})",
                              f"pick an address inside {n.subnet}, e.g. {next(n.subnet.hosts())}")
        if addr in (n.subnet.network_address, n.subnet.broadcast_address) and n.subnet.prefixlen < 31:
            raise ConfigError(file, akey, f"{addr} is the network or broadcast address of {n.subnet}", "use a host address")
        if addr == n.gateway:
            raise ConfigError(file, akey, f"{addr} is the gateway of network {net!r} (docker needs it for itself)",
                              f"use another address, or set networks.{net}.gateway to an unused address")
        addresses[str(net)] = addr

    forwarding = body.get("forwarding", False)
    if not isinstance(forwarding, bool):
        raise ConfigError(file, f"{key}.forwarding", f"got {forwarding!r}", "use true (this node routes for others) or false")

    routes_raw = body.get("routes") or []
    if not isinstance(routes_raw, list):
        raise ConfigError(file, f"{key}.routes", "must be a list", "e.g. routes: [{dest: 10.10.0.0/24, via: 192.168.50.1}]")
    routes = []
    for i, r in enumerate(routes_raw):
        rkey = f"{key}.routes[{i}]"
        r = _mapping(file, rkey, r, "{dest: 10.10.0.0/24, via: 192.168.50.1}")
        _unknown(file, rkey, r, _ROUTE_KEYS)
        for k in _ROUTE_KEYS:
            if k not in r:
                raise ConfigError(file, f"{rkey}.{k}", "missing", "a route needs dest (a subnet, or default) and via (a neighbour's address)")
        routes.append(Route(dest=_subnet(file, f"{rkey}.dest", r["dest"]), via=_address(file, f"{rkey}.via", r["via"])))

    links_raw = _mapping(file, f"{key}.links", body.get("links") or {}, "links: {lan: wifi}")
    node_links: dict[str, LinkProfile] = {}
    for net, spec in links_raw.items():
        if net not in addresses:
            raise ConfigError(file, f"{key}.links.{net}", f"the node has no address on network {net!r}",
                              f"override only networks the node is on: {', '.join(addresses)}")
        node_links[str(net)] = resolve_link(spec, links, file, f"{key}.links.{net}")
    host = _parse_host(file, key, name, body["host"], addresses) if body.get("host") is not None else None
    return Node(name=name, role=role, device=device, addresses=addresses, forwarding=forwarding,
                routes=tuple(routes), rank=rank, links=node_links, host=host)


def _host_word(file: Path, key: str, value: Any, example: str) -> str:
    """A non-empty string without whitespace (it lands in ssh arguments, never through a shell)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value) or value.startswith("-"):
        raise ConfigError(file, key, f"got {value!r}, expected a non-empty word (no spaces, not starting with '-')", f"e.g. {example}")
    return value


def _parse_host(file: Path, key: str, name: str, raw: Any, addresses: dict[str, IPv4Address]) -> HostSpec:
    hkey = f"{key}.host"
    raw = _mapping(file, hkey, raw, f"host: {{ssh: {name}, user: pi, workdir: ~/smolcluster}}")
    values = parse_fields(HostSpec, raw, file, f"{hkey}.")
    examples = {"ssh": f"{name} (an ~/.ssh/config alias) or ssh: pi@192.168.50.2", "user": "pi",
                "jump": "mini1 (a node name) or jump: admin@gateway"}
    for k, example in examples.items():  # these land in ssh arguments
        if values.get(k) is not None:
            _host_word(file, f"{hkey}.{k}", values[k], example)
    if values.get("jump") == name:
        raise ConfigError(file, f"{hkey}.jump", f"{name} cannot jump through itself", "name the node it is cabled to, e.g. jump: mini1")
    for k in ("python", "workdir"):
        if k in values and (not values[k].strip() or "\n" in values[k]):
            raise ConfigError(file, f"{hkey}.{k}", f"got {values[k]!r}", f"e.g. {k}: " + ("python3" if k == "python" else "~/smolcluster"))
    interfaces = _mapping(file, f"{hkey}.interfaces", raw.get("interfaces") or {}, "interfaces: {thunderbolt: bridge0}")
    for net, ifname in interfaces.items():
        if net not in addresses:
            raise ConfigError(file, f"{hkey}.interfaces.{net}", f"{name} has no address on network {net!r}",
                              f"name interfaces only for its networks: {', '.join(addresses)}")
        _host_word(file, f"{hkey}.interfaces.{net}", ifname, "bridge0 (macOS Thunderbolt Bridge), eth0, en5")
    values.setdefault("ssh", name)
    return HostSpec(**values, interfaces={str(k): str(v) for k, v in interfaces.items()})


def _parse_training(file: Path, raw: Any, server: str, workers: list[str], prefix: str = "training") -> TrainingDefaults:
    from smolcluster.core.training.config import ClusterConfig, NNConfig

    raw = dict(_mapping(file, prefix, raw or {}, "training: {algorithm: edp, epochs: 1}"))
    known = {f.name: f for f in dataclasses.fields(TrainingDefaults) if f.name != "extra"}
    hints = typing.get_type_hints(TrainingDefaults)
    passthrough = {f.name for f in dataclasses.fields(ClusterConfig)} | {f.name for f in dataclasses.fields(NNConfig)}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}"
        if k in _DERIVED_KEYS:
            raise ConfigError(file, key, "is derived from the topology's nodes", "remove it: servers, workers and addresses come from nodes:")
        if k in _RENAMED_KEYS:
            raise ConfigError(file, key, f"is called {_RENAMED_KEYS[k]!r} here", f"rename it to training.{_RENAMED_KEYS[k]}")
        if k in known:
            values[k] = check_value(file, key, v, hints[k], rule_of(known[k]))
        elif k in passthrough and k != "algorithm":
            extra[k] = v
        else:
            raise ConfigError(file, key, "unknown key", unknown_key_fix(k, sorted(set(known) | passthrough - set(_DERIVED_KEYS) - set(_RENAMED_KEYS))))
    t = TrainingDefaults(**values, extra=extra)
    if t.algorithm not in algorithms.names():
        raise ConfigError(file, f"{prefix}.algorithm", f"got {t.algorithm!r}", f"use {algorithms.choices()}")
    _check_passthrough(file, t, server, workers)
    return t


def with_training(topo: Topology, overrides: dict[str, Any], file: Path, prefix: str) -> Topology:
    """`topo` with its training section overridden by `overrides` (e.g. an experiment's arm: algorithm,
    timeout, epochs), checked like a topology's own training keys; errors name `file` and `prefix.key`."""
    t = topo.training
    mine = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "extra"
            and getattr(t, f.name) != f.default}
    merged = {**mine, **t.extra, **overrides}
    training = _parse_training(file, merged, topo.server.name, [w.name for w in topo.workers], prefix)
    return dataclasses.replace(topo, training=training)


def _check_passthrough(file: Path, t: TrainingDefaults, server: str, workers: list[str]) -> None:
    """The training keys a run passes on to nn_config / cluster_config get those files' own checks now,
    not only when a run starts."""
    from smolcluster.core.training.config import parse_cluster_config, parse_nn_config, split_config_keys

    nn, cluster = split_config_keys(t.extra)
    nn |= {"batch_size": t.batch_size, "learning_rate": t.learning_rate, "num_epochs": t.epochs}
    cluster |= {k: getattr(t, k) for k in ("worker_update_interval", "push_interval", "timeout", "min_workers", "max_steps")
                if getattr(t, k) is not None}
    cluster |= {"seed": t.seed, "server": server, "workers": workers, "num_workers": len(workers),
                "host_ip": {h: "127.0.0.1" for h in [server, *workers]}}
    try:
        parse_nn_config(nn, file)
        parse_cluster_config(cluster, file, t.algorithm)
    except ConfigError as e:
        key = {"num_epochs": "epochs"}.get(e.key, e.key)
        raise ConfigError(file, f"training.{key}", e.problem, e.fix) from None


# --------------------------------------------------------------------------- loading


def load_topology(path: str | Path) -> Topology:
    """Parse and validate a topology file. Every problem is a ConfigError naming file, key and fix."""
    with without_gc():  # tens of thousands of small objects, none of them cyclic (see without_gc)
        return _load_topology(Path(path))


def _load_topology(file: Path) -> Topology:
    raw = read_yaml(file, what="topology file", missing_fix="check the path, e.g. topologies/hybrid.yaml",
                    layout="start with 'networks:' and 'nodes:' sections")
    _unknown(file, "", raw, _TOP_KEYS)
    links, devices = _load_profiles(file, raw.get("profiles"))
    networks = _parse_networks(file, raw.get("networks"), links)

    nodes_raw = _mapping(file, "nodes", raw.get("nodes"), "nodes: {mini1: {role: server, ...}}")
    for name, body in nodes_raw.items():  # roles first, so a typo is named before "no server" is
        role = body.get("role") if isinstance(body, dict) else None
        if role not in ROLES:
            raise ConfigError(file, f"nodes.{name}.role", f"got {role!r}", "use server or worker")
    servers = [n for n, b in nodes_raw.items() if b["role"] == "server"]
    if len(servers) != 1:
        raise ConfigError(file, "nodes", f"found {len(servers)} servers ({', '.join(map(str, servers)) or 'none'}), need exactly one",
                          "give exactly one node role: server, the rest role: worker")
    nodes: dict[str, Node] = {}
    seen: dict[IPv4Address, str] = {}
    next_rank = 1
    for name, body in nodes_raw.items():
        name = str(name)
        is_server = body["role"] == "server"
        node = _parse_node(file, name, body, 0 if is_server else next_rank, networks, links, devices)
        next_rank += 0 if is_server else 1
        for net, addr in node.addresses.items():
            if addr in seen:
                raise ConfigError(file, f"nodes.{name}.addresses.{net}", f"{addr} is already used by {seen[addr]}",
                                  "give every node its own address")
            seen[addr] = f"nodes.{name}.addresses.{net}"
        nodes[name] = node
    if next_rank == 1:
        raise ConfigError(file, "nodes", "no workers", "add at least one node with role: worker")

    faults = raw.get("faults") or []
    if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
        raise ConfigError(file, "faults", "must be a list of mappings", "e.g. faults: [] (see the faults docs for entries)")

    training = _parse_training(file, raw.get("training"), servers[0], [n.name for n in nodes.values() if n.role == "worker"])
    topo = Topology(file=file, name=str(raw.get("name") or file.stem), networks=networks, nodes=nodes,
                    training=training, faults=list(faults))
    _check_routes(topo)
    _check_jumps(topo)
    topo.paths  # every worker reaches the server and back (raises otherwise)
    return topo


def _check_jumps(topo: Topology) -> None:
    """A jump through another node must not loop (pi -> mac -> pi)."""
    for node in topo.nodes.values():
        seen, here = [node.name], node
        while here.host is not None and here.host.jump in topo.nodes:
            here = topo.nodes[here.host.jump]
            if here.name in seen:
                raise ConfigError(topo.file, f"nodes.{node.name}.host.jump", "jumps loop: " + " -> ".join(seen + [here.name]),
                                  "jump through the node the host is cabled to, which is reached directly")
            seen.append(here.name)


def _check_routes(topo: Topology) -> None:
    """Each route's next hop must be a forwarding neighbour on a shared network."""
    for node in topo.nodes.values():
        for i, r in enumerate(node.routes):
            key = f"nodes.{node.name}.routes[{i}].via"
            hit = topo.owner(r.via)
            if hit is None:
                raise ConfigError(topo.file, key, f"no node has the address {r.via}", "route via the address of a node on a network this node shares")
            via_node, via_net = hit
            if via_node.name == node.name:
                raise ConfigError(topo.file, key, f"{r.via} is {node.name}'s own address", "route via a neighbour's address")
            if via_net not in node.addresses:
                raise ConfigError(topo.file, key, f"{r.via} belongs to {via_node.name} on network {via_net!r}, which {node.name} is not on",
                                  f"route via a neighbour's address on one of {node.name}'s networks ({', '.join(node.addresses)})")
            if not via_node.forwarding:
                raise ConfigError(topo.file, key, f"{via_node.name} ({r.via}) does not forward traffic for others",
                                  f"set nodes.{via_node.name}.forwarding: true, or route via a node that forwards")


# --------------------------------------------------------------------------- paths


class _NoRoute(Exception):
    """Routing failed at node `at` on the way to `dest`; `key`/`fix` say what to change."""

    def __init__(self, at: str, dest: IPv4Address, reason: str, key: str, fix: str = ""):
        self.at, self.dest, self.reason, self.key, self.fix = at, dest, reason, key, fix


def _next_hop(topo: Topology, node: Node, dest: IPv4Address) -> tuple[IPv4Address, str]:
    """(next-hop address, network) by longest prefix; attached subnets win ties, like the kernel."""
    best: tuple[int, int, IPv4Address, str] | None = None
    for net, _ in node.addresses.items():
        subnet = topo.networks[net].subnet
        if dest in subnet and (best is None or (subnet.prefixlen, 1) > best[:2]):
            best = (subnet.prefixlen, 1, dest, net)
    r = node.route_for(dest)
    if r is not None and (best is None or (r.dest.prefixlen, 0) > best[:2]):
        via_net = next(n for n, _ in node.addresses.items() if r.via in topo.networks[n].subnet)
        best = (r.dest.prefixlen, 0, r.via, via_net)
    if best is None:
        raise _NoRoute(node.name, dest, f"{node.name} has no route to {dest}", f"nodes.{node.name}.routes")
    return best[2], best[3]


def _walk(topo: Topology, src: str, dest: IPv4Address) -> list[Hop]:
    """Follow routes from node `src` to the node owning `dest`, one hop at a time."""
    hops: list[Hop] = []
    here = topo.nodes[src]
    visited = {src}
    while dest not in here.addresses.values():
        nh, net = _next_hop(topo, here, dest)
        hit = topo.owner(nh)
        if hit is None or hit[1] != net:
            raise _NoRoute(here.name, dest, f"{here.name} sends it to {nh} on network {net!r}, which no node has",
                           f"nodes.{here.name}.routes", "route via an address a node has")
        nxt = hit[0]
        hops.append(Hop(src=here.name, dst=nxt.name, network=net, profile=topo.hop_profile(here.name, nxt.name, net)))
        if dest in nxt.addresses.values():
            break
        if not nxt.forwarding:
            raise _NoRoute(nxt.name, dest, f"{nxt.name} does not forward", f"nodes.{nxt.name}.forwarding",
                           f"set nodes.{nxt.name}.forwarding: true")
        if nxt.name in visited:
            raise _NoRoute(here.name, dest, "routing loop: " + " -> ".join([h.src for h in hops] + [nxt.name]),
                           f"nodes.{here.name}.routes",
                           f"make {here.name}'s route for {dest} point towards the server, not back to {nxt.name}")
        visited.add(nxt.name)
        here = nxt
    return hops


def _paths(topo: Topology, worker: str) -> tuple[IPv4Address, list[Hop], list[Hop]]:
    """The server address `worker` dials, the path there and the path replies take back.
    Tries the server's addresses in file order; the first with both directions working wins."""
    server = topo.server
    failures: list[tuple[str, _NoRoute, list[Hop]]] = []
    for addr in server.addresses.values():
        try:
            there = _walk(topo, worker, addr)
        except _NoRoute as e:
            failures.append(("to", e, []))
            continue
        # Linux uses the address of the outgoing interface as the source; replies go there.
        src_addr = topo.nodes[worker].addresses[there[0].network] if there else addr
        try:
            back = _walk(topo, server.name, src_addr)
        except _NoRoute as e:
            failures.append(("back", e, there))
            continue
        return addr, there, back
    _raise_unreachable(topo, worker, failures)
    raise AssertionError("unreachable")


def _raise_unreachable(topo: Topology, worker: str, failures: list[tuple[str, _NoRoute, list[Hop]]]) -> None:
    server = topo.server
    # Prefer explaining a missing return route (the forward path worked), else the first failure.
    direction, e, there = next((f for f in failures if f[0] == "back"), failures[0])
    subnet = next((n.subnet for n in topo.networks.values() if e.dest in n.subnet), e.dest)
    if direction == "to":
        fix = e.fix or f"add a route to nodes.{e.at}.routes for {subnet} via a forwarding neighbour that can reach {server.name}"
        raise ConfigError(topo.file, e.key, f"worker {worker} has no path to the server {server.name}: {e.reason}", fix)
    fix = e.fix
    if not fix:
        # The reverse of the forward path tells which neighbour the reply should be sent to.
        prev = next((h for h in there if h.dst == e.at), None)
        via = topo.nodes[prev.src].addresses[prev.network] if prev else "<a forwarding neighbour towards the worker>"
        fix = f"add {{dest: {subnet}, via: {via}}} to nodes.{e.at}.routes (a return route)"
    raise ConfigError(topo.file, e.key,
                      f"{worker} reaches the server {server.name} but replies to {e.dest} cannot come back: {e.reason}", fix)


def path_to_server(topo: Topology, worker: str) -> list[Hop]:
    """Hop-by-hop path from a worker to the server, following routes (pi4 -> mini3 -> mini1)."""
    if worker not in topo.nodes:
        raise ConfigError(topo.file, "nodes", f"no node named {worker!r}", f"use one of: {', '.join(topo.nodes)}")
    return _paths_of(topo, worker)[1]


def path_between(topo: Topology, src: str, dst: str) -> list[Hop]:
    """Hop-by-hop path from node `src` to node `dst` (workers talking to each other, as in an all-reduce):
    towards the first of dst's addresses that src's routes reach. ConfigError when none is reachable."""
    problems = []
    for addr in topo.nodes[dst].addresses.values():
        try:
            return _walk(topo, src, addr)
        except _NoRoute as e:
            problems.append(e)
    e = problems[0]
    raise ConfigError(topo.file, e.key, f"{src} has no path to {dst}: {e.reason}", e.fix or f"add a route to {dst}'s subnet")


def path_from_server(topo: Topology, worker: str) -> list[Hop]:
    """The path the server's replies take back to `worker` (may differ from the forward path)."""
    return _paths_of(topo, worker)[2]


def server_address_for(topo: Topology, worker: str) -> IPv4Address:
    """The server address this worker dials (e.g. 10.10.0.1 for every hybrid worker)."""
    return _paths_of(topo, worker)[0]


def _paths_of(topo: Topology, node: str) -> tuple[IPv4Address, list[Hop], list[Hop]]:
    return topo.paths[node] if node in topo.paths else _paths(topo, node)


def path_expectation(hops: list[Hop]) -> tuple[float, float]:
    """(expected RTT in ms = sum of 2*delay, bottleneck Mbit/s towards the server)."""
    rtt = sum(h.profile.rtt_ms() for h in hops)
    bw = min((h.profile.up_mbit for h in hops), default=float("inf"))
    return rtt, bw


def path_down_mbit(hops: list[Hop]) -> float:
    """Bottleneck Mbit/s away from the server (what the worker receives at)."""
    return min((h.profile.down_mbit for h in hops), default=float("inf"))


def path_loss_pct(hops: list[Hop]) -> float:
    """Packet loss over the whole path, each direction, percent (the hops' losses in series)."""
    return series_loss_pct(h.profile.loss_pct for h in hops)


# --------------------------------------------------------------------------- output


def to_dict(topo: Topology) -> dict:
    """The resolved topology as plain YAML/JSON data (profiles expanded), e.g. for a run dir."""
    def prof(p: Any) -> dict:
        return dataclasses.asdict(p)

    return {
        "name": topo.name,
        "file": str(topo.file),
        "networks": {n.name: {"subnet": str(n.subnet), "gateway": str(n.gateway) if n.gateway else None, "profile": prof(n.profile)}
                     for n in topo.networks.values()},
        "nodes": {n.name: {"role": n.role, "rank": n.rank, "device": prof(n.device),
                           "addresses": {k: str(v) for k, v in n.addresses.items()}, "forwarding": n.forwarding,
                           "routes": [{"dest": str(r.dest), "via": str(r.via)} for r in n.routes],
                           "links": {k: prof(v) for k, v in n.links.items()},
                           **({"host": dataclasses.asdict(n.host)} if n.host else {})}
                  for n in topo.nodes.values()},
        "training": dataclasses.asdict(topo.training),
        "faults": topo.faults,
    }


def _rate(mbit: float) -> str:
    return f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s"


def _link(p: LinkProfile) -> str:
    rate = _rate(p.rate_mbit) if p.up_mbit == p.down_mbit else f"{_rate(p.up_mbit)} up / {_rate(p.down_mbit)} down"
    extra = f" ±{p.jitter_ms:g}" if p.jitter_ms else ""
    loss = f", {p.loss_pct:g}% loss" if p.loss_pct else ""
    return f"{p.name}: {p.delay_ms:g}{extra} ms, {rate}{loss}"


def format_topology(topo: Topology) -> str:
    """The plain-text report of `smolcluster topology show`."""
    out = [f"topology {topo.name} ({topo.file})", ""]
    out.append(table(["network", "subnet", "gateway", "link profile"],
                      [[n.name, str(n.subnet), str(n.gateway or "-"), _link(n.profile)] for n in topo.networks.values()]))
    out.append("")
    nodes = sorted(topo.nodes.values(), key=lambda n: n.rank)
    out.append(table(["node", "rank", "role", "device", "addresses", "forwarding"],
                      [[n.name, str(n.rank), n.role,
                        f"{n.device.name} (speed {n.device.speed:g}, {n.device.cores} cores, {n.device.memory_mb} MB)",
                        ", ".join(f"{a} ({net})" for net, a in n.addresses.items()), "yes" if n.forwarding else "no"]
                       for n in nodes]))
    overrides = [[n.name, net, _link(p)] for n in nodes for net, p in n.links.items()]
    if overrides:
        out += ["", table(["node", "network", "link override"], overrides)]
    routes = [[n.name, str(r.dest), str(r.via), topo.owner(r.via)[0].name] for n in nodes for r in n.routes]  # type: ignore[index]
    out += ["", table(["node", "route to", "via", "(node)"], routes) if routes else "routes: none (all nodes share a network)"]
    out += ["", "paths to the server (expected RTT = sum of 2 x delay; bandwidth = slowest hop towards the server)"]
    rows = []
    for w in topo.workers:
        addr, there, back = topo.paths[w.name]
        rtt, bw = path_expectation(there)
        hops = " -> ".join([w.name] + [f"{h.dst} [{h.network}]" for h in there])
        rows.append([w.name, str(addr), hops, f"{rtt:.2f} ms", _rate(bw)])
        if [h.dst for h in back][:-1] != [h.src for h in there][1:][::-1]:  # asymmetric routing: say so
            rows.append(["", "", "replies: " + " -> ".join([topo.server.name] + [h.dst for h in back]), "", ""])
    out.append(table(["worker", "dials", "path", "RTT", "bandwidth"], rows))
    return "\n".join(out) + "\n"
