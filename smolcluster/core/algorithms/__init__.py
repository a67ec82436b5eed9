"""The algorithm registry: what each training algorithm is, in one place.

An algorithm is a module defining `Server` (a base.ServerBase) and `Worker` (a base.WorkerBase), plus
one `Algorithm` entry. Everything else — the node, its config, W&B names, the topology check, the
sim's defaults, the fault matrix, the benchmark — asks this registry. Adding an algorithm means
writing its module and adding its entry to BUILTIN; an algorithm kept outside smolcluster is a
module with an `ALGORITHM = Algorithm(...)` entry, named in $SMOLCLUSTER_ALGORITHMS (comma-separated
module names, importable by every node process).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from smolcluster.common.errors import ConfigError

PLUGINS_ENV = "SMOLCLUSTER_ALGORITHMS"


@dataclass(frozen=True)
class FaultMatrixBounds:
    """How `smolcluster faults matrix` runs this algorithm on topologies/faults-small.yaml."""

    max_steps: int  # server updates per run
    trigger_step: int  # server version at which the scenario's faults fire
    floor: float  # final test accuracy a run must still reach


@dataclass(frozen=True)
class Algorithm:
    name: str  # the --algo value, the suffix of cluster_config_<name>.yaml, what a worker's HELLO names
    display_name: str  # in W&B run names and reports
    description: str  # one line for --help
    module: str  # defines Server and Worker; imported on first use (it imports torch)
    synchronous: bool  # a server update is one step of every worker (SyncPS), not one worker's push (EDP)
    config_defaults: Mapping[str, Any]  # cluster keys a generated config (sim, bench) uses unless told otherwise
    sim_eval_steps: int  # server updates between evaluations in a sim when the topology does not set eval_steps
    fault_matrix: FaultMatrixBounds | None  # None: not in `smolcluster faults matrix` (it does not survive faults)
    collective: bool = False  # workers exchange with each other (all-reduce), not only with the server

    def server_class(self) -> type:
        return importlib.import_module(self.module).Server

    def worker_class(self) -> type:
        return importlib.import_module(self.module).Worker


BUILTIN: tuple[Algorithm, ...] = (
    Algorithm(
        name="edp", display_name="EDP", description="asynchronous, elastic", module="smolcluster.core.algorithms.edp",
        synchronous=False,
        config_defaults=MappingProxyType({"worker_update_interval": 5, "push_interval": 5}),
        # one update per push: ~190 for hybrid.yaml's epoch, so ~20 evaluations
        sim_eval_steps=10,
        fault_matrix=FaultMatrixBounds(max_steps=330, trigger_step=90, floor=0.85),
    ),
    Algorithm(
        name="syncps", display_name="SyncPS", description="synchronous, straggler deadline",
        module="smolcluster.core.algorithms.syncps", synchronous=True,
        config_defaults=MappingProxyType({"worker_update_interval": 1, "timeout": 2.0}),
        sim_eval_steps=25,  # one update per step: ~470 for hybrid.yaml's epoch
        fault_matrix=FaultMatrixBounds(max_steps=220, trigger_step=60, floor=0.85),
    ),
    Algorithm(
        name="ddp", display_name="DDP", description="PyTorch DistributedDataParallel (gloo), the all-reduce baseline",
        module="smolcluster.core.algorithms.ddp", synchronous=True, config_defaults=MappingProxyType({}),
        sim_eval_steps=25,  # one update per step, as SyncPS
        fault_matrix=None,  # a DDP group stops when a rank dies: nothing for the matrix to measure
        collective=True,
    ),
)


def _plugins() -> list[Algorithm]:
    out = []
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            entry = importlib.import_module(module).ALGORITHM
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"${PLUGINS_ENV}", module, f"cannot load its ALGORITHM ({type(e).__name__}: {e})",
                              "name importable modules that define ALGORITHM = Algorithm(...)") from None
        if not isinstance(entry, Algorithm):
            raise ConfigError(f"${PLUGINS_ENV}", module, f"ALGORITHM is a {type(entry).__name__}",
                              "make it a smolcluster.core.algorithms.Algorithm")
        out.append(entry)
    return out


def algorithms() -> tuple[Algorithm, ...]:
    """The built-in algorithms, then those named in $SMOLCLUSTER_ALGORITHMS."""
    return BUILTIN + tuple(_plugins())


def names() -> tuple[str, ...]:
    return tuple(a.name for a in algorithms())


def in_fault_matrix() -> tuple[str, ...]:
    """The algorithms `smolcluster faults matrix` runs: those with fault-matrix bounds."""
    return tuple(a.name for a in algorithms() if a.fault_matrix is not None)


def choices() -> str:
    """The names for an error's fix: "edp or syncps"."""
    return " or ".join(names())


def get(name: str) -> Algorithm:
    """The algorithm called `name`; a ConfigError naming --algo when there is none."""
    for a in algorithms():
        if a.name == name:
            return a
    raise ConfigError("command line", "--algo", f"unknown algorithm {name!r}", f"use {choices()}")


def display_name(name: str) -> str:
    """"EDP" for "edp"; an unknown name as it is."""
    return next((a.display_name for a in algorithms() if a.name == name.lower()), name)
