"""What a running cluster offers to the fault injector (ClusterControl), on every sim backend (local
processes, docker-compose; smolcluster.testbed.sim.cluster.SimCluster implements it), so a fault
schedule means the same thing on each. It sits beside faults/ and sim/ so both import it and
neither imports the other.

Run directory layout (all backends):
    RUN_DIR/topology.yaml            resolved topology (plain data)
    RUN_DIR/config/                  nn_config.yaml, cluster_config_<algo>.yaml (what the nodes read)
    RUN_DIR/nodes/<name>/            per node: metrics.jsonl, <role>.log, stdout.log (server: checkpoints/, summary.json)
    RUN_DIR/summary.json             the server's summary plus the sim's own fields (backend, faults, links)
    RUN_DIR/faults.jsonl             one line per fault fired / healed
    RUN_DIR/*.png                    plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.topology import Topology


@dataclass(frozen=True)
class LinkHandle:
    """One emulated link direction-pair between two nodes, as a Toxiproxy proxy."""

    name: str  # Toxiproxy proxy name, e.g. "pi4->mini3"
    src: str  # node on the worker side
    dst: str  # node on the server side
    network: str
    mechanism: str  # how the link's profile is applied: "proxy", "tbf+proxy", "netem", ...


class ClusterControl(Protocol):
    """A running simulated cluster."""

    topology: Topology
    run_dir: Path
    algorithm: str
    toxiproxy: ToxiproxyClient  # network faults go through this API (embedded proxy or real Toxiproxy)

    def links(self) -> list[LinkHandle]: ...

    def links_of(self, node: str) -> list[LinkHandle]:
        """Every link that touches `node` (partitioning a node cuts all of them)."""
        ...

    def kill(self, node: str) -> None: ...  # SIGKILL / docker kill

    def pause(self, node: str) -> None: ...  # SIGSTOP / docker pause

    def resume(self, node: str) -> None: ...  # SIGCONT / docker unpause

    def restart(self, node: str) -> None: ...  # start the node again (a worker rejoins; the server uses --resume)

    def alive(self, node: str) -> bool: ...

    def server_version(self) -> int:
        """Model updates applied so far (from the server's metrics); fault triggers at a step use it."""
        ...

    def elapsed(self) -> float:
        """Seconds since the run started (fault triggers at a time use it)."""
        ...
