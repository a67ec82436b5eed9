"""Kernel link emulation: the tc and iptables commands for each mechanism (each container probes its
own kernel at start, in its entrypoint, and picks what exists).

Where the kernel has `sch_netem`, one netem qdisc per interface gives delay, jitter, loss and
rate together. Where it does not (the CI kernel here: "Specified qdisc kind is unknown"),
`tbf` shapes the rate in the kernel and latency/jitter come from Toxiproxy toxics on the
worker's proxy instead (see smolcluster/testbed/sim/compose.py), and loss comes from iptables:

- **loss without netem** (`loss_commands`): iptables' `statistic` match drops packets at random
  as they *arrive* on an interface (raw table, PREROUTING), so the sender's TCP never hears of
  the drop and recovers the way it does from loss on a wire: duplicate ACKs, fast retransmit,
  a smaller window. (Dropping in OUTPUT instead would hand the sending TCP an EPERM: it retries
  at once, without a loss event, which understates what loss costs.) Each end of a hop drops
  loss_pct of what it receives, so each direction of the hop loses loss_pct, as with netem.
  Drops are per packet, and a container's TCP hands its interface super-packets of up to 64 KB
  (GSO; a veth passes them on whole), so an interface whose every path is lossy sends one segment
  per packet (`unsegmented_commands`): otherwise one "packet" lost is ~40 segments lost at once,
  a single loss event for TCP, and 2 % loss would cost it far less than 2 % loss on a wire. An
  interface that also carries a lossless path (the server's, on a LAN with a cabled node) keeps
  GSO: segmenting in software caps every path through it (940 Mbit/s measured 128 here). Its
  sends towards a lossy neighbour are then dropped per GSO packet: the UDP loss probe still
  measures the profile's loss, but TCP downloads there lose fewer, larger bursts.
- **downlinks** (`ingress_commands`): a qdisc shapes what an interface sends; what it receives
  is shaped by redirecting its ingress to an IFB device and shaping that device's egress with
  tbf, so a Wi-Fi laptop's down rate holds for traffic towards it even when the sender sits on
  a faster network.

A profile's delay is one way, so the qdisc goes on the egress of both ends of a hop:
each direction then sees delay_ms once and the round trip 2 * delay_ms.
"""

from __future__ import annotations

from typing import Sequence

from smolcluster.testbed.profiles import LinkProfile

NETEM = "netem"  # delay, jitter, loss and rate all in the kernel
TBF = "tbf"  # rate in the kernel (tbf); latency/jitter by Toxiproxy; loss not applied
NONE = "none"  # no usable qdisc (no NET_ADMIN, no tc): everything by Toxiproxy, rate too
MECHANISMS: tuple[str, ...] = (NETEM, TBF, NONE)
LOSS_IPTABLES = "iptables"  # loss by iptables' statistic match where there is no netem
INGRESS_IFB = "ifb"  # what an interface receives, shaped on an IFB device
INGRESS_LATENCY_MS = 50  # tbf queue on the IFB: packets that would wait longer are dropped, as at a real bottleneck

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


def ingress_commands(ifb: str, rate_mbit: float, exempt: Sequence[str] = (), dev: str = "$DEV") -> list[list[str]]:
    """tc commands that shape what `dev` receives to `rate_mbit`: its ingress redirected to the IFB
    device `ifb` (created beforehand: `ip link add IFB type ifb`), whose egress a tbf shapes.

    `exempt`: source addresses or subnets whose packets skip the shaping (the Toxiproxy service's
    leg to the server it stands in for is not a link of the topology).
    """
    cmds = [["ip", "link", "set", ifb, "up"],
            ["tc", "qdisc", "replace", "dev", ifb, "root", "tbf", "rate", _mbit(rate_mbit),
             "burst", str(tbf_burst_bytes(rate_mbit)), "latency", f"{INGRESS_LATENCY_MS}ms"],
            ["tc", "qdisc", "replace", "dev", dev, "handle", "ffff:", "ingress"]]
    for src in exempt:
        cmds.append(["tc", "filter", "add", "dev", dev, "parent", "ffff:", "prio", "1", "protocol", "ip",
                     "u32", "match", "ip", "src", src, "action", "ok"])
    cmds.append(["tc", "filter", "add", "dev", dev, "parent", "ffff:", "prio", "2", "protocol", "all",
                 "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb])
    return cmds


def unsegmented_commands(dev: str = "$DEV") -> list[list[str]]:
    """Make TCP over `dev` send one segment per packet (no GSO super-packets), so per-packet drops are per segment."""
    return [["ip", "link", "set", "dev", dev, "gso_max_segs", "1"]]


def _probability(loss_pct: float) -> str:
    return f"{loss_pct / 100.0:.6g}"


def loss_commands(chain: str, loss_pct: float, by_source: Sequence[tuple[str, float]] = (),
                  exempt: Sequence[str] = (), dev: str = "$DEV", iptables: str = "$IPT") -> list[list[str]]:
    """iptables commands that drop `loss_pct` % of the packets `dev` receives, at random (raw table).

    `by_source`: (address, loss %) for neighbours whose hop to this interface has another loss
    (a per-node link override on one end); `exempt`: sources never dropped. One chain per
    interface (`chain`), jumped to from PREROUTING. Empty when nothing is to be dropped.
    """
    if loss_pct <= 0 and not any(pct > 0 for _, pct in by_source):
        return []
    ipt = [iptables, "-w", "-t", "raw"]
    cmds = [[*ipt, "-N", chain]]
    for src in exempt:
        cmds.append([*ipt, "-A", chain, "-s", src, "-j", "RETURN"])
    for src, pct in by_source:
        if pct > 0:
            cmds.append([*ipt, "-A", chain, "-s", src, "-m", "statistic", "--mode", "random",
                         "--probability", _probability(pct), "-j", "DROP"])
        cmds.append([*ipt, "-A", chain, "-s", src, "-j", "RETURN"])
    if loss_pct > 0:
        cmds.append([*ipt, "-A", chain, "-m", "statistic", "--mode", "random", "--probability", _probability(loss_pct),
                     "-j", "DROP"])
    cmds.append([*ipt, "-A", "PREROUTING", "-i", dev, "-j", chain])
    return cmds
