"""Link and device profiles: what a network hop and a machine look like to the emulator.

Both live in one file, `netem/profiles.yaml` at the repo root, in two sections:

    links:                       # one entry per link profile
      wifi: {delay_ms: 10, jitter_ms: 5, loss_pct: 0.1, rate_mbit: 200, up_rate_mbit: 100}
    devices:                     # one entry per device profile
      raspberry-pi-5: {speed: 0.2, cores: 4, memory_mb: 8192}

A topology may name its own profiles file (`profiles:` key); its entries are added to the
shipped ones and replace those with the same name. Anywhere a topology names a profile it
may instead give a mapping `{profile: NAME, <field>: value, ...}` to override single values.

Directions: "up" is towards the server, "down" away from it. `delay_ms` is one way, so the
round trip over one hop is 2 * delay_ms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from smolcluster.core.training.config import read_yaml
from smolcluster.common.errors import ConfigError
from smolcluster.resources import resource_path

PROFILES_FILE = "profiles.yaml"


def default_profiles_path() -> Path:
    """The shipped netem/profiles.yaml (package data, so a plain `pip install .` has it too)."""
    return resource_path("netem", PROFILES_FILE)


@dataclass(frozen=True)
class LinkProfile:
    name: str
    delay_ms: float  # one way
    jitter_ms: float
    loss_pct: float  # 0..100
    rate_mbit: float
    up_rate_mbit: float | None = None  # towards the server; None -> rate_mbit
    down_rate_mbit: float | None = None  # away from the server; None -> rate_mbit

    def rtt_ms(self) -> float:
        return 2.0 * self.delay_ms

    @property
    def up_mbit(self) -> float:
        return self.rate_mbit if self.up_rate_mbit is None else self.up_rate_mbit

    @property
    def down_mbit(self) -> float:
        return self.rate_mbit if self.down_rate_mbit is None else self.down_rate_mbit


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    speed: float  # relative compute speed, mac-mini = 1.0 (a node computes 1/speed times slower)
    cores: int
    memory_mb: int


def series(a: LinkProfile, b: LinkProfile) -> LinkProfile:
    """Two links one after the other (e.g. Wi-Fi client -> access point -> Wi-Fi client)."""
    return LinkProfile(
        name=f"{a.name}+{b.name}",
        delay_ms=a.delay_ms + b.delay_ms,
        jitter_ms=math.hypot(a.jitter_ms, b.jitter_ms),  # independent jitter adds in quadrature
        loss_pct=100.0 * (1.0 - (1.0 - a.loss_pct / 100.0) * (1.0 - b.loss_pct / 100.0)),
        rate_mbit=min(a.rate_mbit, b.rate_mbit),
        up_rate_mbit=None if a.up_rate_mbit is None and b.up_rate_mbit is None else min(a.up_mbit, b.up_mbit),
        down_rate_mbit=None if a.down_rate_mbit is None and b.down_rate_mbit is None else min(a.down_mbit, b.down_mbit),
    )


# --------------------------------------------------------------------------- parsing

# field -> (type, optional, check, what the check means)
_LINK_FIELDS: dict[str, tuple[type, bool, Any, str]] = {
    "delay_ms": (float, False, lambda v: v >= 0, "a one-way delay >= 0 ms"),
    "jitter_ms": (float, False, lambda v: v >= 0, "a jitter >= 0 ms"),
    "loss_pct": (float, False, lambda v: 0 <= v < 100, "a loss percentage in [0, 100)"),
    "rate_mbit": (float, False, lambda v: v > 0, "a rate > 0 Mbit/s"),
    "up_rate_mbit": (float, True, lambda v: v > 0, "a rate > 0 Mbit/s, or null"),
    "down_rate_mbit": (float, True, lambda v: v > 0, "a rate > 0 Mbit/s, or null"),
}
_DEVICE_FIELDS: dict[str, tuple[type, bool, Any, str]] = {
    "speed": (float, False, lambda v: v > 0, "a relative speed > 0 (mac-mini = 1.0)"),
    "cores": (int, False, lambda v: v >= 1, "a core count >= 1"),
    "memory_mb": (int, False, lambda v: v >= 64, "a memory size >= 64 MB"),
}
_LINK_DEFAULTS = {"jitter_ms": 0.0, "loss_pct": 0.0, "up_rate_mbit": None, "down_rate_mbit": None}


def _value(file: Path | str, key: str, value: Any, spec: tuple[type, bool, Any, str]) -> Any:
    kind, optional, check, meaning = spec
    if value is None and optional:
        return None
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = ok_type and float(value).is_integer()
    if not ok_type or not check(value):
        raise ConfigError(file, key, f"got {value!r}, expected {meaning}", f"set '{key}' to {meaning}")
    return kind(value)


def _fields(file: Path | str, key: str, raw: Any, specs: dict, required: bool, defaults: dict) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(file, key, f"must be a mapping, got {raw!r}", f"e.g. {key}: {{{', '.join(f'{k}: ...' for k in specs)}}}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in specs:
            raise ConfigError(file, f"{key}.{name}", "unknown key", f"remove it or use one of: {', '.join(specs)}")
        out[name] = _value(file, f"{key}.{name}", value, specs[name])
    if required:
        for name in specs:
            if name not in out:
                if name not in defaults:
                    raise ConfigError(file, f"{key}.{name}", "missing", f"add {name}: <{specs[name][3]}>")
                out[name] = defaults[name]
    return out


def _read(path: Path) -> dict:
    data = read_yaml(path, what="profiles file", missing_fix="create it, or fix the 'profiles:' key of the topology",
                     layout="write 'links:' and 'devices:' sections")
    unknown = set(data) - {"links", "devices"}
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], "unknown key", "use only 'links:' and 'devices:' sections")
    return data


def _section(path: Path, section: str) -> dict:
    raw = _read(path).get(section) or {}
    if not isinstance(raw, dict):
        raise ConfigError(path, section, "must be a mapping of profile name to values", f"e.g. {section}: {{name: {{...}}}}")
    return raw


def load_link_profiles(path: Path | None = None) -> dict[str, LinkProfile]:
    """The `links:` section of a profiles file (default: the shipped netem/profiles.yaml)."""
    path = Path(path) if path is not None else default_profiles_path()
    out: dict[str, LinkProfile] = {}
    for name, raw in _section(path, "links").items():
        out[str(name)] = LinkProfile(name=str(name), **_fields(path, f"links.{name}", raw, _LINK_FIELDS, True, _LINK_DEFAULTS))
    return out


def load_device_profiles(path: Path | None = None) -> dict[str, DeviceProfile]:
    """The `devices:` section of a profiles file (default: the shipped netem/profiles.yaml)."""
    path = Path(path) if path is not None else default_profiles_path()
    out: dict[str, DeviceProfile] = {}
    for name, raw in _section(path, "devices").items():
        out[str(name)] = DeviceProfile(name=str(name), **_fields(path, f"devices.{name}", raw, _DEVICE_FIELDS, True, {}))
    return out


def _resolve(spec: Any, known: dict, kind: str, specs: dict, file: Path | str, key: str) -> Any:
    """A profile reference: NAME, or {profile: NAME, field: value, ...} overriding single values."""
    overrides: dict[str, Any] = {}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("profile", None)
        if name is None:
            raise ConfigError(file, f"{key}.profile", "missing", f"name the {kind} profile to start from, e.g. {{profile: {next(iter(known), 'NAME')}, ...}}")
        overrides = _fields(file, key, spec, specs, False, {})
        key = f"{key}.profile"
    else:
        name = spec
    if not isinstance(name, str) or name not in known:
        raise ConfigError(file, key, f"unknown {kind} profile {name!r}",
                          f"use one of: {', '.join(sorted(known))} (or add it to netem/{PROFILES_FILE} or the topology's profiles file)")
    return dataclasses.replace(known[name], **overrides) if overrides else known[name]


def resolve_link(spec: Any, known: dict[str, LinkProfile], file: Path | str, key: str) -> LinkProfile:
    return _resolve(spec, known, "link", _LINK_FIELDS, file, key)


def resolve_device(spec: Any, known: dict[str, DeviceProfile], file: Path | str, key: str) -> DeviceProfile:
    return _resolve(spec, known, "device", _DEVICE_FIELDS, file, key)
