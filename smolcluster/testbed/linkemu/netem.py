"""Kernel link shaping with tc: the commands for each mechanism (each container probes its own kernel
at start, in its entrypoint, and picks netem or tbf).

Where the kernel has `sch_netem`, one netem qdisc per interface gives delay, jitter, loss and
rate together. Where it does not (the CI kernel here: "Specified qdisc kind is unknown"),
`tbf` shapes the rate in the kernel and latency/jitter come from Toxiproxy toxics on the
worker's proxy instead (see smolcluster/testbed/sim/compose.py). Loss has no kernel fallback without
netem; the report says so rather than pretending it was applied.

A profile's delay is one way, so the qdisc goes on the egress of both ends of a hop:
each direction then sees delay_ms once and the round trip 2 * delay_ms.
"""

from __future__ import annotations

from smolcluster.testbed.profiles import LinkProfile

NETEM = "netem"  # delay, jitter, loss and rate all in the kernel
TBF = "tbf"  # rate in the kernel (tbf); latency/jitter by Toxiproxy; loss not applied
NONE = "none"  # no usable qdisc (no NET_ADMIN, no tc): everything by Toxiproxy, rate too
MECHANISMS: tuple[str, ...] = (NETEM, TBF, NONE)

# TCP goodput is ~1448 of every 1514 bytes on the wire: scale qdisc rates so goodput matches the profile.
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
    direction this interface sends in). Returns argv lists.
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
