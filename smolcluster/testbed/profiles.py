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
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Iterable

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import checked, parse_fields, shown
from smolcluster.common.yamlfile import read_yaml
from smolcluster.resources import resource_path

PROFILES_FILE = "profiles.yaml"


def default_profiles_path() -> Path:
    """The shipped netem/profiles.yaml (package data, so a plain `pip install .` has it too)."""
    return resource_path("netem", PROFILES_FILE)


_RATE = {"above": 0, "unit": "Mbit/s"}


@dataclass(frozen=True)
class LinkProfile:
    name: str
    _: KW_ONLY
    delay_ms: float = checked(min=0, unit="ms")  # one way
    jitter_ms: float = checked(0.0, min=0, unit="ms")
    loss_pct: float = checked(0.0, min=0, below=100, unit="%")
    rate_mbit: float = checked(**_RATE)
    up_rate_mbit: float | None = checked(None, **_RATE)  # towards the server; None -> rate_mbit
    down_rate_mbit: float | None = checked(None, **_RATE)  # away from the server; None -> rate_mbit

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
    _: KW_ONLY
    speed: float = checked(above=0, max=1000, fix="a relative speed > 0 (mac-mini = 1.0)")  # a node computes 1/speed times slower
    cores: int = checked(min=1, max=4096)
    memory_mb: int = checked(min=64, unit="MB")
    # the virtual backend's compute model: a training step's milliseconds per sample on this device (unset: the
    # reference device's figure x the node's slowdown). `smolcluster sim FILE --backend virtual --calibrate` measures it.
    ms_per_sample: float | None = checked(None, above=0, unit="ms")


def series_loss_pct(losses: Iterable[float]) -> float:
    """Loss over links in series, percent: a packet gets through only if it survives every link."""
    survive = 1.0
    for pct in losses:
        survive *= 1.0 - pct / 100.0
    return 100.0 * (1.0 - survive)


TCP_MSS_BYTES = 1448  # an Ethernet MTU's TCP payload (1500 - IP - TCP with timestamps)


def mathis_mbit(rtt_ms: float, loss_pct: float, mss_bytes: int = TCP_MSS_BYTES) -> float:
    """The steady-state TCP throughput bound of Mathis et al. (1997), Mbit/s: MSS/RTT * sqrt(3/2)/sqrt(p).

    For one long-lived Reno-like flow under random loss p. It does not describe slow start (a
    short transfer, or a connection idle for longer than its RTO, starts from a small window),
    and CUBIC gets more than it on paths with a large bandwidth-delay product.
    """
    if loss_pct <= 0 or rtt_ms <= 0:
        return math.inf
    return mss_bytes * 8 / (rtt_ms / 1000.0) * math.sqrt(1.5) / math.sqrt(loss_pct / 100.0) / 1e6


def series(a: LinkProfile, b: LinkProfile) -> LinkProfile:
    """Two links one after the other (e.g. Wi-Fi client -> access point -> Wi-Fi client)."""
    return LinkProfile(
        name=f"{a.name}+{b.name}",
        delay_ms=a.delay_ms + b.delay_ms,
        jitter_ms=math.hypot(a.jitter_ms, b.jitter_ms),  # independent jitter adds in quadrature
        loss_pct=series_loss_pct((a.loss_pct, b.loss_pct)),
        rate_mbit=min(a.rate_mbit, b.rate_mbit),
        up_rate_mbit=None if a.up_rate_mbit is None and b.up_rate_mbit is None else min(a.up_mbit, b.up_mbit),
        down_rate_mbit=None if a.down_rate_mbit is None and b.down_rate_mbit is None else min(a.down_mbit, b.down_mbit),
    )


# --------------------------------------------------------------------------- parsing

def _fields(file: Path | str, key: str, raw: Any, cls: type, required: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        names = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        raise ConfigError(file, key, f"must be a mapping, got {shown(raw)}", f"e.g. {key}: {{{', '.join(f'{k}: ...' for k in names)}}}")
    return parse_fields(cls, raw, file, f"{key}.", exclude=("name",), required=required)


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
        out[str(name)] = LinkProfile(name=str(name), **_fields(path, f"links.{name}", raw, LinkProfile, True))
    return out


def load_device_profiles(path: Path | None = None) -> dict[str, DeviceProfile]:
    """The `devices:` section of a profiles file (default: the shipped netem/profiles.yaml)."""
    path = Path(path) if path is not None else default_profiles_path()
    out: dict[str, DeviceProfile] = {}
    for name, raw in _section(path, "devices").items():
        out[str(name)] = DeviceProfile(name=str(name), **_fields(path, f"devices.{name}", raw, DeviceProfile, True))
    return out


def _resolve(spec: Any, known: dict, kind: str, cls: type, file: Path | str, key: str) -> Any:
    """A profile reference: NAME, or {profile: NAME, field: value, ...} overriding single values."""
    overrides: dict[str, Any] = {}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("profile", None)
        if name is None:
            raise ConfigError(file, f"{key}.profile", "missing", f"name the {kind} profile to start from, e.g. {{profile: {next(iter(known), 'NAME')}, ...}}")
        overrides = _fields(file, key, spec, cls, False)
        key = f"{key}.profile"
    else:
        name = spec
    if not isinstance(name, str) or name not in known:
        raise ConfigError(file, key, f"unknown {kind} profile {shown(name)}",
                          f"use one of: {', '.join(sorted(known))} (or add it to netem/{PROFILES_FILE} or the topology's profiles file)")
    return dataclasses.replace(known[name], **overrides) if overrides else known[name]


def resolve_link(spec: Any, known: dict[str, LinkProfile], file: Path | str, key: str) -> LinkProfile:
    return _resolve(spec, known, "link", LinkProfile, file, key)


def resolve_device(spec: Any, known: dict[str, DeviceProfile], file: Path | str, key: str) -> DeviceProfile:
    return _resolve(spec, known, "device", DeviceProfile, file, key)
