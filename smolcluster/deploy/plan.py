"""A launch plan: who runs what where, derived from the topology file (or a config dir), and saved.

On every host (relative to its `workdir`):
    smolcluster/                 the synced package (what `python -m smolcluster` runs there)
    runs/RUN/config/             the generated nn and cluster configs (the same on every host)
    runs/RUN/nodes/NODE/         the node's logs, metrics, checkpoints; pid, exit_code, stdout.log
    data/mnist/                  MNIST, synced when the host has none
    .smolcluster/cluster.key     the run's cluster key, mode 0600 (never on a command line)
On the controller: runs/RUN/ holds launch.json (this plan), the configs and, after --collect, a run
directory with the same layout as a sim run. runs/.latest-launch names the newest run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.common.files import write_atomic
from smolcluster.common.yamlfile import read_yaml
from smolcluster.core.training.config import ClusterConfig, load_run_config
from smolcluster.deploy.hosts import Host, hosts_of
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.topology import HostSpec, Topology, path_to_server, server_address_for, to_dict

DATA_SUBDIR = "data/mnist"
TEXT_SUBDIR = "data/wikitext-2"  # the GPT's data (launch --gpt-config)
KEY_FILE = ".smolcluster/cluster.key"
LATEST = ".latest-launch"
# What a real run uses when neither the topology nor the command line says otherwise (the sim's
# own defaults turn W&B off and shorten timeouts for emulated runs; a real cluster keeps W&B on).
HARDWARE_DEFAULTS: dict[str, Any] = {"wandb": "auto", "checkpoint_interval": 200, "idle_timeout": 60.0}


@dataclass(frozen=True)
class NodePlan:
    name: str
    role: str  # server | worker
    rank: int
    host: Host
    dials: str | None = None  # a worker: the server address it connects to
    first_hop: str | None = None  # a worker: the next hop the topology expects towards the server (None: direct)
    loki_url: str | None = None  # with --logging: where this node pushes its lines

    def run_dir(self, run: str) -> str:
        return f"runs/{run}/nodes/{self.name}"


@dataclass
class DeployPlan:
    run_name: str
    algorithm: str
    port: int
    nodes: list[NodePlan]  # the server first, then workers in rank order
    local_dir: Path  # runs/RUN on the controller
    topology_file: str | None = None
    created: float = dataclasses.field(default_factory=time.time)

    @property
    def server(self) -> NodePlan:
        return self.nodes[0]

    @property
    def workers(self) -> list[NodePlan]:
        return self.nodes[1:]

    @property
    def config_dir(self) -> Path:
        return self.local_dir / "config"

    @property
    def key_path(self) -> Path:
        return self.local_dir / "cluster.key"

    def session_of(self, node: NodePlan) -> str:
        """One tmux session per host, named after the run (tmux forbids '.' and ':' in names)."""
        return f"{self.run_name}-{node.name}".replace(".", "_").replace(":", "_")

    def remote_config_dir(self) -> str:
        return f"runs/{self.run_name}/config"

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        data = {"run_name": self.run_name, "algorithm": self.algorithm, "port": self.port, "created": self.created,
                "topology_file": self.topology_file,
                "nodes": [{"name": n.name, "role": n.role, "rank": n.rank, "dials": n.dials, "first_hop": n.first_hop,
                           "loki_url": n.loki_url, "host": _host_json(n.host)} for n in self.nodes]}
        write_atomic(self.local_dir / "launch.json", json.dumps(data, indent=2))
        write_atomic(self.local_dir.parent / LATEST, self.run_name + "\n")


def load_plan(runs_dir: Path, run_name: str | None) -> DeployPlan:
    """The plan of a launched run: the named one, else the latest launched from this controller."""
    if run_name is None:
        latest = runs_dir / LATEST
        if not latest.is_file():
            raise ConfigError(latest, "<file>", "no run launched from this controller yet",
                              "launch one first, or name it with --run-name")
        run_name = latest.read_text().strip()
    path = runs_dir / run_name / "launch.json"
    if not path.is_file():
        known = sorted(p.parent.name for p in runs_dir.glob("*/launch.json"))
        raise ConfigError(path, "--run-name", f"no launched run named {run_name!r}",
                          f"use one of: {', '.join(known)}" if known else "launch a run first")
    data = json.loads(path.read_text())
    nodes = [NodePlan(name=n["name"], role=n["role"], rank=n["rank"], host=_host_from_json(n["host"]),
                      dials=n.get("dials"), first_hop=n.get("first_hop"), loki_url=n.get("loki_url")) for n in data["nodes"]]
    return DeployPlan(run_name=data["run_name"], algorithm=data["algorithm"], port=data["port"], nodes=nodes,
                      local_dir=runs_dir / run_name, topology_file=data.get("topology_file"), created=data["created"])


def _host_json(h: Host) -> dict:
    return {"node": h.node, "spec": dataclasses.asdict(h.spec), "via": _host_json(h.via) if h.via else None}


def _host_from_json(d: dict) -> Host:
    return Host(node=d["node"], spec=HostSpec(**d["spec"]), via=_host_from_json(d["via"]) if d.get("via") else None)


# --------------------------------------------------------------------------- building


def default_run_name(label: str, algorithm: str) -> str:
    return f"{label}-{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan_from_topology(topo: Topology, *, algorithm: str, runs_dir: Path, run_name: str | None,
                       overrides: RunOverrides, port: int | None = None) -> DeployPlan:
    """Nodes and hosts from the topology; configs generated by the sim's own code (one source of truth)."""
    hosts = hosts_of(topo)
    run = run_name or default_run_name(topo.name, algorithm)
    server = topo.server
    nodes = [NodePlan(name=server.name, role="server", rank=0, host=hosts[server.name])]
    for w in topo.workers:
        dials = str(server_address_for(topo, w.name))
        first = path_to_server(topo, w.name)[0]
        gateway = str(topo.nodes[first.dst].addresses[first.network])  # what the worker's OS should route through
        nodes.append(NodePlan(name=w.name, role="worker", rank=w.rank, host=hosts[w.name], dials=dials,
                              first_hop=None if gateway == dials else gateway))
    plan = DeployPlan(run_name=run, algorithm=algorithm, port=port or ClusterConfig.port, nodes=nodes,
                      local_dir=runs_dir / run, topology_file=str(topo.file))
    extra = {"data_dir": f"../../../{DATA_SUBDIR}", "cluster_key_file": f"../../../{KEY_FILE}"}
    dials = {n.name: n.dials or str(next(iter(server.addresses.values()))) for n in nodes}
    write_run_configs(topo, plan.config_dir, dataclasses.replace(overrides, extra={**extra, **overrides.extra}),
                      server_address=lambda name: dials[name], port=plan.port, defaults=HARDWARE_DEFAULTS,
                      generated_by="smolcluster launch", device="auto", text_dir=f"../../../{TEXT_SUBDIR}")
    plan.config_dir.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.local_dir / "topology.yaml", yaml.safe_dump(to_dict(topo), sort_keys=False))
    return plan


def plan_from_config_dir(config_dir: Path, *, algorithm: str, runs_dir: Path, run_name: str | None,
                         host_defaults: HostSpec) -> DeployPlan:
    """The original project's layout: configs/cluster_config_<algo>.yaml names the server and workers,
    which are ssh hosts; host_ip says what each dials. The configs are used as they are."""
    cfg = load_run_config(config_dir, algorithm)
    cl = cfg.cluster
    run = run_name or default_run_name("cluster", algorithm)

    def host(name: str) -> Host:
        return Host(node=name, spec=dataclasses.replace(host_defaults, ssh=name))

    nodes = [NodePlan(name=cl.server, role="server", rank=0, host=host(cl.server))]
    nodes += [NodePlan(name=w, role="worker", rank=r, host=host(w), dials=cl.host_ip[w]) for r, w in enumerate(cl.workers, 1)]
    plan = DeployPlan(run_name=run, algorithm=algorithm, port=cl.port, nodes=nodes, local_dir=runs_dir / run)
    plan.config_dir.mkdir(parents=True, exist_ok=True)
    # The user's configs, pointed at the synced key and data unless they name their own.
    cluster_file = f"cluster_config_{algorithm}.yaml"
    cluster = read_yaml(Path(config_dir) / cluster_file)
    cluster.setdefault("cluster_key_file", f"../../../{KEY_FILE}")
    write_atomic(plan.config_dir / cluster_file, yaml.safe_dump(cluster, sort_keys=False))
    nn = read_yaml(Path(config_dir) / "nn_config.yaml")
    nn.setdefault("data_dir", f"../../../{DATA_SUBDIR}")
    write_atomic(plan.config_dir / "nn_config.yaml", yaml.safe_dump(nn, sort_keys=False))
    load_run_config(plan.config_dir, algorithm)  # still valid after our two keys
    return plan


def ensure_key(plan: DeployPlan, key_file: Path | None) -> bytes:
    """The run's cluster key: the user's (a key file, or $SMOLCLUSTER_CLUSTER_KEY), else a fresh one.
    Kept in runs/RUN/cluster.key (0600) so later --status/--stop need nothing else."""
    from smolcluster.core.net.auth import load_cluster_key

    if plan.key_path.is_file():
        return plan.key_path.read_bytes()
    key = load_cluster_key(key_file)  # $SMOLCLUSTER_CLUSTER_KEY first, then the file; None: neither
    text = key.hex().encode() if key else secrets.token_hex(32).encode()
    plan.local_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(plan.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text + b"\n")
    return text + b"\n"
