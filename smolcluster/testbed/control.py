"""What every sim backend (local processes, docker-compose) offers to the rest of smolcluster.

The fault injector, the link check and the tests only talk to a running cluster through this
interface, so a fault schedule means the same thing on every backend.

Run directory layout (all backends):
    RUN_DIR/topology.yaml            resolved topology (plain data)
    RUN_DIR/config/                  nn_config.yaml, cluster_config_<algo>.yaml (what the nodes read)
    RUN_DIR/nodes/<name>/            per node: metrics.jsonl, <role>.log, stdout.log (server: checkpoints/, summary.json)
    RUN_DIR/summary.json             the server's summary plus the sim's own fields (backend, faults, links)
    RUN_DIR/faults.jsonl             one line per fault fired / healed
    RUN_DIR/*.png                    plots
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.topology import Topology


ALL_WORKERS_GONE_S = 60.0  # every worker dead this long (after training began, or after a deliberate kill)
WORKERS_NEVER_STARTED_S = 3.0  # every worker dead before any trained a step: a setup error (data, config)


class WorkersGoneWatch:
    """Every worker exited with an error and none finished cleanly: the server would wait for nobody.
    A backend feeds it the workers' exit codes (None while running) on every poll."""

    def __init__(self) -> None:
        self.since: float | None = None

    def problem(self, codes: dict[str, int | None], *, on_purpose: bool, trained: bool) -> str | None:
        if any(code is None or code == 0 for code in codes.values()):
            self.since = None
            return None
        now = time.monotonic()
        self.since = self.since or now
        limit = ALL_WORKERS_GONE_S if on_purpose or trained else WORKERS_NEVER_STARTED_S
        if now - self.since <= limit:
            return None
        return (f"every worker exited ({', '.join(f'{n}: {c}' for n, c in codes.items())}); "
                "the server has nobody to train with.")


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
