"""An experiment file: a topology, arms (an algorithm plus training overrides), seeds, targets.

    name: stragglers
    topology: ../topologies/hybrid.yaml   # relative to this file, or a bundled topology's name
    seeds: [1, 2, 3]
    targets: [0.90, 0.95]                 # test accuracies to time
    epochs: 2                             # every arm's, unless the arm says otherwise
    arms:
      - {name: edp, algo: edp}
      - {name: syncps-auto, algo: syncps, timeout: auto}

An arm's other keys are the topology's training keys (timeout, min_workers, push_interval, ...), checked
as the topology checks its own. Every problem is a ConfigError naming the file, the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import INT64_MAX, Rule, check_value, checked, parse_fields
from smolcluster.common.yamlfile import read_yaml
from smolcluster.core import algorithms
from smolcluster.resources import resource_path
from smolcluster.testbed.topology import Topology, load_topology, with_training

ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_TARGETS = (0.90, 0.95)


@dataclass(frozen=True)
class Arm:
    name: str
    algo: str
    overrides: dict[str, Any]  # training keys, as the file gives them (epochs included when the file sets it)
    topology: Topology  # the topology with this arm's training section


@dataclass(frozen=True)
class ExperimentFile:
    """The scalar keys (what parse_fields checks); seeds, targets and arms are lists, parsed below."""

    topology: str = checked(fix="e.g. topology: ../topologies/hybrid.yaml (relative to this file)")
    name: str = ""
    backend: Literal["local", "compose", "virtual"] = "local"
    epochs: int | None = checked(None, min=1, fix="use a positive integer, or leave it out (the topology's)")
    max_steps: int | None = checked(None, min=1, fix="use a positive integer, or leave it out")
    faults: str | None = checked(None, fix="a fault schedule file (faults: [...]) relative to this file")
    reference: bool = True  # also train the single-process references on the same samples, per seed
    seeds: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    arms: list = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    file: Path
    name: str
    topology_file: Path
    topology: Topology
    backend: str
    seeds: tuple[int, ...]
    targets: tuple[float, ...]
    arms: tuple[Arm, ...]
    faults: Path | None
    reference: bool
    raw: dict[str, Any]  # the file as read: a resumed run checks it is the same experiment

    def runs(self) -> list[tuple[Arm, int]]:
        """Every arm x seed, seed-major: an interrupted experiment has every arm's first seeds."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]


def _topology_path(file: Path, value: str) -> Path:
    near = (file.parent / value)
    if near.exists():
        return near
    bundled = resource_path("topologies", Path(value).name)
    if bundled.exists():
        return bundled
    raise ConfigError(file, "topology", f"{near} does not exist",
                      "give a path relative to the experiment file, or a bundled topology's name (e.g. hybrid.yaml)")


def _list(file: Path, key: str, raw: Any, example: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, key, f"must be a non-empty list, got {raw!r}", f"e.g. {key}: {example}")
    return raw


def load_experiment(path: str | Path) -> Experiment:
    file = Path(path)
    raw = read_yaml(file, what="experiment file", missing_fix="check the path, e.g. experiments/stragglers.yaml")
    scalars = parse_fields(ExperimentFile, raw, file, required=True)
    spec = ExperimentFile(**scalars)
    topology_file = _topology_path(file, spec.topology)
    topo = load_topology(topology_file)

    seeds = []
    for i, s in enumerate(_list(file, "seeds", raw.get("seeds"), "[1, 2, 3]")):
        seeds.append(check_value(file, f"seeds[{i}]", s, int, Rule(min=0, max=INT64_MAX - (1 << 20), fix="use e.g. 1")))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(file, "seeds", f"repeats a seed: {seeds}", "list each seed once")

    targets = []
    for i, t in enumerate(_list(file, "targets", raw.get("targets", list(DEFAULT_TARGETS)), "[0.90, 0.95]")):
        targets.append(check_value(file, f"targets[{i}]", t, float, Rule(above=0, max=1, fix="a test accuracy, e.g. 0.95")))

    base: dict[str, Any] = {k: v for k, v in (("epochs", spec.epochs), ("max_steps", spec.max_steps)) if v is not None}
    arms: list[Arm] = []
    for i, body in enumerate(_list(file, "arms", raw.get("arms"), "[{name: edp, algo: edp}]")):
        key = f"arms[{i}]"
        if not isinstance(body, dict):
            raise ConfigError(file, key, f"must be a mapping, got {body!r}", "e.g. {name: syncps-auto, algo: syncps, timeout: auto}")
        body = dict(body)
        name, algo = body.pop("name", None), body.pop("algo", None)
        if not isinstance(name, str) or not ARM_NAME.fullmatch(name):
            raise ConfigError(file, f"{key}.name", f"got {name!r}",
                              "name the arm with letters, digits, '.', '_' or '-' (it names its run directories)")
        if name in (a.name for a in arms):
            raise ConfigError(file, f"{key}.name", f"{name!r} names two arms", "give every arm its own name")
        if algo not in algorithms.names():
            raise ConfigError(file, f"{key}.algo", f"got {algo!r}", f"use {algorithms.choices()}")
        for k in ("algorithm", "seed"):
            if k in body:
                raise ConfigError(file, f"{key}.{k}", "is set by the experiment", "remove it: the arm's algo and the seeds list say it")
        overrides = {**base, **body, "algorithm": algo}
        arms.append(Arm(name=name, algo=algo, overrides=overrides, topology=with_training(topo, overrides, file, key)))

    faults = None
    if spec.faults is not None:
        faults = file.parent / spec.faults
        if not faults.exists():
            raise ConfigError(file, "faults", f"{faults} does not exist", "give a fault schedule file relative to the experiment file")
    return Experiment(file=file, name=spec.name or file.stem, topology_file=topology_file, topology=topo,
                      backend=spec.backend, seeds=tuple(seeds), targets=tuple(sorted(targets)), arms=tuple(arms),
                      faults=faults, reference=spec.reference, raw=raw)


def arm_topology_yaml(exp: Experiment, arm: Arm) -> dict[str, Any]:
    """The topology file an arm's runs use: the experiment's topology with the arm's training keys
    (written into the experiment directory, so `smolcluster sim` on any backend runs exactly the arm)."""
    raw = read_yaml(exp.topology_file, what="topology file")
    raw["training"] = {**(raw.get("training") or {}), **arm.overrides}
    if isinstance(raw.get("profiles"), str):  # relative to the original file
        raw["profiles"] = str((exp.topology_file.parent / raw["profiles"]).resolve())
    return raw

