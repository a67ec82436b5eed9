"""Kernel link shaping with tc: probe which qdiscs the kernel has, then generate the commands.

Where the kernel has `sch_netem`, one netem qdisc per interface gives delay, jitter, loss and
rate together. Where it does not (the CI kernel here: "Specified qdisc kind is unknown"),
`tbf` shapes the rate in the kernel and latency/jitter come from Toxiproxy toxics on the
worker's proxy instead (see smolcluster/sim/compose.py). Loss has no kernel fallback without
netem; the report says so rather than pretending it was applied.

A profile's delay is one way, so the qdisc goes on the egress of both ends of a hop:
each direction then sees delay_ms once and the round trip 2 * delay_ms.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Sequence

from smolcluster.profiles import LinkProfile

NETEM = "netem"  # delay, jitter, loss and rate all in the kernel
TBF = "tbf"  # rate in the kernel (tbf); latency/jitter by Toxiproxy; loss not applied
NONE = "none"  # no usable qdisc (no NET_ADMIN, no tc): everything by Toxiproxy, rate too
MECHANISMS: tuple[str, ...] = (NETEM, TBF, NONE)

# Each probe adds a qdisc to `lo` of a throwaway network namespace (a container), so nothing
# on the host is touched. Output lines: "<kind> ok" or "<kind> missing: <tc error>".
PROBE_SCRIPT = r"""
command -v tc >/dev/null 2>&1 || { echo "tc missing: no tc binary (install iproute2)"; exit 0; }
for q in "netem delay 1ms" "tbf rate 1mbit burst 32kbit latency 50ms" "htb default 1"; do
  kind=${q%% *}
  if err=$(tc qdisc add dev lo root $q 2>&1); then echo "$kind ok"; tc qdisc del dev lo root 2>/dev/null
  else echo "$kind missing: $err" | tr '\n' ' '; echo; fi
done
"""


@dataclass(frozen=True)
class QdiscSupport:
    """What `tc` can do in the probed kernel, and why not where it cannot."""

    netem: bool
    tbf: bool
    htb: bool
    details: dict[str, str]  # kind -> "ok" or the tc error

    @property
    def mechanism(self) -> str:
        """The best mechanism this kernel allows: netem, else tbf (+ Toxiproxy latency), else none."""
        if self.netem:
            return NETEM
        if self.tbf:
            return TBF
        return NONE


def parse_probe(output: str) -> QdiscSupport:
    details: dict[str, str] = {}
    for line in output.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind:
            details[kind] = "ok" if rest == "ok" else rest.removeprefix("missing:").strip()
    if "tc" in details:  # no tc binary at all
        details.update({k: details["tc"] for k in ("netem", "tbf", "htb")})
    return QdiscSupport(netem=details.get("netem") == "ok", tbf=details.get("tbf") == "ok",
                        htb=details.get("htb") == "ok", details=details)


def probe_qdiscs(exec_prefix: Sequence[str], timeout: float = 60.0) -> QdiscSupport:
    """Run the probe with `exec_prefix + ["sh", "-c", PROBE_SCRIPT]`.

    The prefix must give a private network namespace with NET_ADMIN, e.g.
    `docker run --rm --cap-add NET_ADMIN IMAGE` or `unshare -n` (root). Probing is how we
    know: a kernel's qdiscs differ between hosts (modules, Docker Desktop's VM, CI).
    """
    try:
        proc = subprocess.run([*exec_prefix, "sh", "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        return QdiscSupport(False, False, False, {"probe": f"could not run the probe: {e}"})
    if proc.returncode != 0 and not proc.stdout.strip():
        return QdiscSupport(False, False, False, {"probe": (proc.stderr.strip() or f"exit {proc.returncode}")[-500:]})
    return parse_probe(proc.stdout)


# Profiles give the rate TCP gets (goodput); tc counts whole frames. A full-size TCP segment
# carries 1448 payload bytes in a 1514-byte frame (Ethernet 14 + IP 20 + TCP 32 with
# timestamps), so the qdisc rate is scaled up by that ratio. Measured here with tbf:
# 940 Mbit/s configured as-is gave 902 Mbit/s of goodput (-4 %, as this predicts).
WIRE_BYTES_PER_PAYLOAD_BYTE = 1514 / 1448


def _mbit(rate: float) -> str:
    # tc takes integers with units; kbit keeps sub-Mbit profiles exact.
    return f"{max(1, round(rate * WIRE_BYTES_PER_PAYLOAD_BYTE * 1000))}kbit"


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bucket size: 10 ms worth of traffic, at least 32 KiB (tbf needs >= rate/HZ and a few MTUs)."""
    return max(32 * 1024, int(rate_mbit * 1e6 / 8 * 0.010))


def shaping_commands(profile: LinkProfile, mechanism: str, dev: str, rate_mbit: float | None = None) -> list[list[str]]:
    """tc commands that shape egress of `dev` to `profile` with `mechanism` (netem / tbf / none).

    `rate_mbit` overrides the profile's symmetric rate (pass up_mbit or down_mbit for the
    direction this interface sends in). Returns argv lists; `shaping_script` joins them.
    """
    rate = profile.rate_mbit if rate_mbit is None else rate_mbit
    if mechanism == NETEM:
        cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{profile.delay_ms:g}ms"]
        if profile.jitter_ms > 0:
            # netem needs jitter <= delay to stay causal-looking; a normal distribution is its usual shape
            cmd += [f"{min(profile.jitter_ms, max(profile.delay_ms, 0.001)):g}ms", "distribution", "normal"]
        if profile.loss_pct > 0:
            cmd += ["loss", f"{profile.loss_pct:g}%"]
        cmd += ["rate", _mbit(rate)]
        # netem's default queue (1000 packets) is too short for delay x multi-Gbit rates
        cmd += ["limit", str(max(1000, int(rate * 1e6 / 8 * (profile.delay_ms + profile.jitter_ms + 10) / 1e3 / 1500)))]
        return [cmd]
    if mechanism == TBF:
        return [["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", _mbit(rate),
                 "burst", str(tbf_burst_bytes(rate)), "latency", "50ms"]]
    if mechanism == NONE:
        return []
    raise ValueError(f"unknown shaping mechanism {mechanism!r}; expected one of {MECHANISMS}")


def shaping_script(commands: Sequence[Sequence[str]]) -> str:
    return "\n".join(shlex.join(c) for c in commands)


def kernel_applies(mechanism: str) -> dict[str, str]:
    """Which part of a profile each mechanism handles, for the run output and the report."""
    if mechanism == NETEM:
        return {"delay": "netem", "jitter": "netem", "loss": "netem", "rate": "netem"}
    if mechanism == TBF:
        return {"delay": "toxiproxy", "jitter": "toxiproxy", "loss": "not applied (needs netem)", "rate": "tbf"}
    return {"delay": "toxiproxy", "jitter": "toxiproxy", "loss": "not applied (needs netem)", "rate": "toxiproxy"}
