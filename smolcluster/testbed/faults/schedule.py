"""Fault schedules: what goes wrong, where, and when — parsed and checked against a topology.

A schedule is a list of entries, in a topology's `faults:` list or in a file of its own
(`smolcluster sim FILE --faults FAULTS.yaml`, a mapping with a `faults:` list):

    faults:
      - {at: 12.5, node: w2, action: kill, duration: 5}          # killed at 12.5 s, restarted 5 s later
      - {at_step: 100, action: server_crash, duration: 2}        # server killed, back with --resume 2 s later
      - {at: 5, link: w1->srv, action: latency_spike, latency_ms: 200, jitter_ms: 20, duration: 10}
      - {at: 8, link: {from: w1, to: srv}, action: partition}    # until a `heal` entry or the end of the run
      - {at: 20, link: w1->srv, action: heal}
      - random: {seed: 7, rate_per_min: 6, actions: [pause, partition], targets: [w1, w2], duration: 3, start: 5, end: 60}

Triggers: `at` (seconds since the run started) or `at_step` (server model version).
Targets: `node: NAME` or `link: A->B` (either direction of a hop between adjacent nodes).
`duration` (s): the fault heals itself that long after it fired.
`random:` entries expand into concrete faults from their own seeded generator (`seed`, else the
run's seed): the same seed gives the same schedule.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import check_field, checked, shown
from smolcluster.common.yamlfile import load_yaml
from smolcluster.testbed.topology import Topology

# action -> (allowed target kinds, parameters with their defaults). A parameter default of None
# means the parameter is required.
PROCESS_ACTIONS = ("kill", "pause", "resume", "restart", "server_crash")
NETWORK_ACTIONS = ("partition", "heal", "latency_spike", "bandwidth_collapse", "connection_reset", "slow_close", "data_limit")
ACTIONS: dict[str, tuple[tuple[str, ...], dict[str, float | int | str | None]]] = {
    "kill": (("node",), {}),
    "pause": (("node",), {}),
    "resume": (("node",), {}),
    "restart": (("node",), {}),
    "server_crash": (("node",), {}),
    "partition": (("link", "node"), {}),
    "heal": (("link", "node"), {}),
    "latency_spike": (("link", "node"), {"latency_ms": None, "jitter_ms": 0}),
    "bandwidth_collapse": (("link", "node"), {"rate_kbps": None}),  # KB/s, Toxiproxy's bandwidth unit
    "connection_reset": (("link", "node"), {"timeout_ms": 0}),
    "slow_close": (("link", "node"), {"delay_ms": None}),
    "data_limit": (("link", "node"), {"bytes": None}),
}
# Network toxics apply to both directions unless `stream` says otherwise.
STREAMS = ("both", "upstream", "downstream")
# How long a fault with no `duration` of its own lasts when healing is part of its meaning:
# a server crash is down this long; a connection reset cuts connections for this long.
DEFAULT_DURATION: dict[str, float] = {"server_crash": 2.0, "connection_reset": 0.5}
# Actions that undo something; they cannot heal themselves and make no sense drawn at random.
UNDO_ACTIONS = ("resume", "heal")
# Parameters random faults use unless `params:` says otherwise.
RANDOM_PARAMS: dict[str, dict[str, Any]] = {"latency_spike": {"latency_ms": 200}, "bandwidth_collapse": {"rate_kbps": 50},
                                            "slow_close": {"delay_ms": 1000}, "data_limit": {"bytes": 200_000}}

_ENTRY_KEYS = ("name", "at", "at_step", "node", "link", "action", "duration", "stream")
_RANDOM_KEYS = ("seed", "rate_per_min", "actions", "targets", "duration", "start", "end", "params")


@dataclass(frozen=True)
class Fault:
    """One concrete fault: fires once when its trigger is due, heals `duration` s later if set."""

    name: str
    action: str
    target_kind: str  # "node" | "link"
    target: str  # node name, or link name "src->dst" (src on the worker side)
    at: float | None = checked(None, min=0)  # seconds since the run started
    at_step: int | None = checked(None, min=0)  # server model version
    duration: float | None = checked(None, above=0)
    params: dict[str, Any] = field(default_factory=dict)  # action parameters (latency_ms, bytes, stream, ...)
    origin: str = "schedule"  # "schedule" | "random"

    @property
    def trigger(self) -> str:
        return f"at {self.at:g}s" if self.at is not None else f"at step {self.at_step}"

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params.items() if k != "stream" or v != "both")
        heal = f" for {self.duration:g}s" if self.duration is not None else ""
        return f"{self.action} {self.target_kind} {self.target} {self.trigger}{heal}{' ' + extra if extra else ''}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "action": self.action, self.target_kind: self.target}
        if self.at is not None:
            out["at"] = self.at
        if self.at_step is not None:
            out["at_step"] = self.at_step
        if self.duration is not None:
            out["duration"] = self.duration
        return out | self.params | {"origin": self.origin}


@dataclass(frozen=True)
class RandomFaults:
    """`random:` entry: faults drawn as a Poisson process of `rate_per_min` between start and end."""

    seed: int | None = checked(min=0)  # None: the run's seed (the injector's), offset by the entry's index
    rate_per_min: float = checked(above=0)
    actions: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]  # (kind, name)
    server: str  # server_crash always hits the server
    duration: float = checked(above=0)
    start: float = checked(min=0)
    end: float = checked(min=0)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # action -> parameters
    index: int = 0  # position in the schedule, for names

    def expand(self, default_seed: int = 0) -> list[Fault]:
        rng = random.Random(self.seed if self.seed is not None else default_seed * 1_000_003 + self.index)
        out: list[Fault] = []
        t = self.start
        while True:
            t += rng.expovariate(self.rate_per_min / 60.0)
            if t >= self.end:
                return out
            action = rng.choice(self.actions)
            allowed = ACTIONS[action][0]
            if action == "server_crash":
                candidates = [("node", self.server)]
            else:
                candidates = [tg for tg in self.targets if tg[0] in allowed]
            kind, target = rng.choice(candidates)
            params = dict(self.params.get(action, {}))
            out.append(Fault(name=f"random{self.index}-{len(out)}-{action}-{target}", action=action, target_kind=kind,
                             target=target, at=round(t, 3), duration=self.duration, params=params, origin="random"))


@dataclass(frozen=True)
class FaultSchedule:
    faults: tuple[Fault, ...] = ()
    random: tuple[RandomFaults, ...] = ()

    def expand(self, seed: int = 0) -> list[Fault]:
        """Every concrete fault, random ones drawn, ordered by trigger (time faults first, then steps).
        `seed` is used by random: entries that do not set their own."""
        drawn = [f for r in self.random for f in r.expand(seed)]
        return sorted([*self.faults, *drawn], key=lambda f: (f.at is None, f.at if f.at is not None else f.at_step))

    def __add__(self, other: "FaultSchedule") -> "FaultSchedule":
        return FaultSchedule(self.faults + other.faults, self.random + other.random)

    def __len__(self) -> int:
        return len(self.faults) + len(self.random)


# --------------------------------------------------------------------------- parsing


def topology_links(topo: Topology) -> list[tuple[str, str]]:
    """Every hop on a worker's path to the server as (src, dst), src on the worker side."""
    return topo.links


def _close(name: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(name, allowed, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ActionParams:
    """The parameters network faults take (Toxiproxy toxic attributes), with their ranges."""

    latency_ms: float = checked(min=0, max=_HOUR_MS)
    jitter_ms: float = checked(min=0, max=_HOUR_MS)
    rate_kbps: float = checked(above=0, max=1e9)  # KB/s, Toxiproxy's bandwidth unit
    timeout_ms: float = checked(min=0, max=_HOUR_MS)
    delay_ms: float = checked(min=0, max=_HOUR_MS)
    bytes: int = checked(above=0, max=2**62)


def _number(file: Path, key: str, value: Any, cls: type, name: str) -> Any:
    return check_field(file, key, value, cls, name, allow_none=False)


def _node(file: Path, key: str, value: Any, topo: Topology) -> str:
    if not isinstance(value, str) or value not in topo.nodes:
        raise ConfigError(file, key, f"unknown node {shown(value)}", f"{_close(str(value), list(topo.nodes))}use one of: {', '.join(topo.nodes)}")
    return value


def _link(file: Path, key: str, value: Any, topo: Topology) -> str:
    if isinstance(value, dict):
        unknown = set(value) - {"from", "to"}
        if unknown or not {"from", "to"} <= set(value):
            raise ConfigError(file, key, f"a link mapping needs exactly 'from' and 'to', got {sorted(value)}", "e.g. link: {from: w1, to: srv}")
        a, b = value["from"], value["to"]
    elif isinstance(value, str) and "->" in value:
        a, _, b = (s.strip() for s in value.partition("->"))
    else:
        raise ConfigError(file, key, f"got {shown(value)}, expected 'A->B' or {{from: A, to: B}}", "e.g. link: w1->srv")
    a, b = _node(file, key, a, topo), _node(file, key, b, topo)
    links = topology_links(topo)
    for src, dst in links:
        if {src, dst} == {a, b}:
            return f"{src}->{dst}"
    names = ", ".join(f"{s}->{d}" for s, d in links)
    raise ConfigError(file, key, f"{a} and {b} are not linked (no worker's path to the server crosses {a}->{b})",
                      f"use a hop of a worker's path: {names}")


def _target(file: Path, key: str, entry: dict, action: str, topo: Topology) -> tuple[str, str]:
    allowed = ACTIONS[action][0]
    if "node" in entry and "link" in entry:
        raise ConfigError(file, key, "has both node and link", "give one target: node: NAME or link: A->B")
    if action == "server_crash":
        node = _node(file, f"{key}.node", entry.get("node", topo.server.name), topo)
        if node != topo.server.name or "link" in entry:
            raise ConfigError(file, f"{key}.node", f"server_crash hits the server, not {entry.get('node', entry.get('link'))!r}",
                              f"leave out the target or use node: {topo.server.name} (kill a worker with action: kill)")
        return "node", node
    if "link" in entry:
        if "link" not in allowed:
            raise ConfigError(file, f"{key}.link", f"{action} acts on a node's process, not on a link",
                              "target a node (node: NAME), or use partition for a link")
        return "link", _link(file, f"{key}.link", entry["link"], topo)
    if "node" in entry:
        return "node", _node(file, f"{key}.node", entry["node"], topo)
    example = "node: w1" if allowed == ("node",) else "link: w1->srv or node: w1"
    raise ConfigError(file, key, f"{action} needs a target", f"add {example}")


def _params(file: Path, key: str, entry: dict, action: str) -> dict[str, Any]:
    spec = ACTIONS[action][1]
    params: dict[str, Any] = {}
    for name, default in spec.items():
        if name in entry:
            params[name] = _number(file, f"{key}.{name}", entry[name], ActionParams, name)
            if name != "bytes":
                params[name] = int(round(params[name]))  # Toxiproxy attributes are integers
        elif default is None:
            raise ConfigError(file, f"{key}.{name}", f"{action} needs {name}", f"add {name}: <value> to the entry")
        else:
            params[name] = default
    if action in NETWORK_ACTIONS:
        stream = entry.get("stream", "both")
        if stream not in STREAMS:
            raise ConfigError(file, f"{key}.stream", f"unknown stream {stream!r}", f"use one of: {', '.join(STREAMS)}")
        params["stream"] = stream
    elif "stream" in entry:
        raise ConfigError(file, f"{key}.stream", f"{action} is not a network fault", "remove stream")
    return params


def _action(file: Path, key: str, value: Any) -> str:
    if value not in ACTIONS:
        raise ConfigError(file, key, f"unknown action {shown(value)}", f"{_close(str(value), list(ACTIONS))}use one of: {', '.join(ACTIONS)}")
    return value


def parse_fault(file: Path, key: str, entry: Any, topo: Topology, index: int) -> Fault:
    if not isinstance(entry, dict):
        raise ConfigError(file, key, f"got {shown(entry)}, expected a mapping", "e.g. {at: 10, node: w1, action: kill}")
    if "action" not in entry:
        raise ConfigError(file, f"{key}.action", "missing", f"add action: one of {', '.join(ACTIONS)}")
    action = _action(file, f"{key}.action", entry["action"])
    allowed_keys = set(_ENTRY_KEYS) | set(ACTIONS[action][1])
    for k in entry:
        if k not in allowed_keys:
            raise ConfigError(file, f"{key}.{k}", f"unknown key for {action}",
                              f"{_close(str(k), sorted(allowed_keys))}use: {', '.join(sorted(allowed_keys))}")
    has_at, has_step = "at" in entry, "at_step" in entry
    if has_at == has_step:
        problem = "has both at and at_step" if has_at else "missing trigger"
        raise ConfigError(file, key, problem, "give exactly one of at: SECONDS or at_step: SERVER_VERSION")
    at = _number(file, f"{key}.at", entry["at"], Fault, "at") if has_at else None
    at_step = _number(file, f"{key}.at_step", entry["at_step"], Fault, "at_step") if has_step else None
    duration = None
    if entry.get("duration") is not None:
        duration = _number(file, f"{key}.duration", entry["duration"], Fault, "duration")
        if action in UNDO_ACTIONS or action == "restart":
            raise ConfigError(file, f"{key}.duration", f"{action} does not last, so it cannot have a duration", "remove duration")
    duration = duration if duration is not None else DEFAULT_DURATION.get(action)
    kind, target = _target(file, key, entry, action, topo)
    params = _params(file, key, entry, action)
    name = entry.get("name") or f"f{index}-{action}-{target}"
    if not isinstance(name, str):
        raise ConfigError(file, f"{key}.name", f"got {name!r}, expected a string", "name: my-fault")
    return Fault(name=name, action=action, target_kind=kind, target=target, at=at, at_step=at_step,
                 duration=duration, params=params)


def parse_random(file: Path, key: str, body: Any, topo: Topology, index: int) -> RandomFaults:
    if not isinstance(body, dict):
        raise ConfigError(file, key, f"got {shown(body)}, expected a mapping", "e.g. random: {seed: 1, rate_per_min: 4, actions: [pause], end: 60}")
    for k in body:
        if k not in _RANDOM_KEYS:
            raise ConfigError(file, f"{key}.{k}", "unknown key", f"{_close(str(k), list(_RANDOM_KEYS))}use: {', '.join(_RANDOM_KEYS)}")
    for required in ("rate_per_min", "actions", "end"):
        if required not in body:
            raise ConfigError(file, f"{key}.{required}", "missing", "random needs rate_per_min, actions and end (seed is optional)")
    seed = _number(file, f"{key}.seed", body["seed"], RandomFaults, "seed") if body.get("seed") is not None else None
    rate = _number(file, f"{key}.rate_per_min", body["rate_per_min"], RandomFaults, "rate_per_min")
    start = _number(file, f"{key}.start", body.get("start", 0.0), RandomFaults, "start")
    end = _number(file, f"{key}.end", body["end"], RandomFaults, "end")
    if end <= start:
        raise ConfigError(file, f"{key}.end", f"end {end:g} is not after start {start:g}", "set end later than start")
    duration = _number(file, f"{key}.duration", body.get("duration", 3.0), RandomFaults, "duration")
    actions = body["actions"]
    if not isinstance(actions, list) or not actions:
        raise ConfigError(file, f"{key}.actions", "must be a non-empty list", "e.g. actions: [pause, partition]")
    for i, a in enumerate(actions):
        _action(file, f"{key}.actions[{i}]", a)
        if a in UNDO_ACTIONS or a == "restart":
            raise ConfigError(file, f"{key}.actions[{i}]", f"{a} cannot be drawn at random (it undoes or repeats nothing by itself)",
                              "random faults heal after duration; list only fault actions such as kill, pause, partition")
    params: dict[str, dict[str, Any]] = {}
    raw_params = body.get("params", {}) or {}
    if not isinstance(raw_params, dict):
        raise ConfigError(file, f"{key}.params", "must map action -> parameters", "e.g. params: {latency_spike: {latency_ms: 300}}")
    for a in actions:
        p = raw_params.get(a, {})
        if not isinstance(p, dict):
            raise ConfigError(file, f"{key}.params.{a}", f"got {shown(p)}, expected a mapping", "e.g. {latency_ms: 300}")
        params[a] = _params(file, f"{key}.params.{a}", RANDOM_PARAMS.get(a, {}) | p, a)
    targets: list[tuple[str, str]] = []
    raw_targets = body.get("targets")
    if raw_targets is None:  # default: the workers, and every link
        targets = [("node", w.name) for w in topo.workers] + [("link", f"{s}->{d}") for s, d in topology_links(topo)]
    else:
        if not isinstance(raw_targets, list) or not raw_targets:
            raise ConfigError(file, f"{key}.targets", "must be a non-empty list", "e.g. targets: [w1, w2, w1->srv]")
        for i, t in enumerate(raw_targets):
            tkey = f"{key}.targets[{i}]"
            if isinstance(t, dict) or (isinstance(t, str) and "->" in t):
                targets.append(("link", _link(file, tkey, t, topo)))
            else:
                targets.append(("node", _node(file, tkey, t, topo)))
    for i, a in enumerate(actions):
        if a != "server_crash" and not any(t[0] in ACTIONS[a][0] for t in targets):
            raise ConfigError(file, f"{key}.actions[{i}]", f"none of the targets fits {a} (it needs a {' or '.join(ACTIONS[a][0])})",
                              f"add a {ACTIONS[a][0][0]} to targets")
    return RandomFaults(seed=seed, rate_per_min=rate, actions=tuple(actions), targets=tuple(targets), server=topo.server.name,
                        duration=duration, start=start, end=end, params=params, index=index)


def parse_faults(raw: Any, topo: Topology, file: str | Path | None = None, key: str = "faults") -> FaultSchedule:
    """Check a list of fault entries (from a topology or a faults file) against `topo`."""
    file = Path(file) if file is not None else topo.file
    if raw is None:
        return FaultSchedule()
    if not isinstance(raw, list):
        raise ConfigError(file, key, f"got {type(raw).__name__}, expected a list of faults", "faults: [{at: 10, node: w1, action: kill}]")
    faults: list[Fault] = []
    randoms: list[RandomFaults] = []
    for i, entry in enumerate(raw):
        ekey = f"{key}[{i}]"
        if isinstance(entry, dict) and "random" in entry:
            if len(entry) != 1:
                raise ConfigError(file, ekey, "a random entry has only the random key", "move its settings under random:")
            randoms.append(parse_random(file, f"{ekey}.random", entry["random"], topo, i))
        else:
            faults.append(parse_fault(file, ekey, entry, topo, i))
    names = [f.name for f in faults]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(file, f"{key}[{names.index(dup)}].name", f"two faults are named {dup!r}", "give each fault its own name")
    return FaultSchedule(tuple(faults), tuple(randoms))


def load_faults_file(path: str | Path, topo: Topology) -> FaultSchedule:
    """A faults file: a mapping with a `faults:` list (a bare list is accepted too)."""
    path = Path(path)
    raw = load_yaml(path, what="faults file", missing_fix="check the path given to --faults")
    if isinstance(raw, dict):
        unknown = set(raw) - {"faults"}
        if unknown:
            raise ConfigError(path, sorted(unknown)[0], "unknown key", "a faults file has only a faults: list")
        raw = raw.get("faults")
    return parse_faults(raw, topo, path)


def schedule_for(topo: Topology, faults_file: str | Path | None = None) -> FaultSchedule:
    """The topology's own faults plus those of a separate file."""
    schedule = parse_faults(topo.faults, topo, topo.file)
    if faults_file is not None:
        schedule = schedule + load_faults_file(faults_file, topo)
    return schedule
