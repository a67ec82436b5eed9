"""The local backend's link plan: one impairing proxy per hop of the workers' routed paths to the server.

    pi4 --[proxy "pi4->mini3"]--> --[proxy "mini3->mini1"]--> server (mini1)
                     mini3 -----------^

A hop's upstream is the next hop's proxy (or the server for the last hop), so pi4's traffic crosses
pi4->mini3 and then mini3->mini1, and shares mini3->mini1 with mini3's own traffic: a link's
bandwidth is shared by every connection that crosses it, as on the wire.

Each proxy gets its hop's LinkProfile as toxics:
- latency (delay_ms, jitter_ms) on both streams (one way each, so RTT = 2 x delay). Toxiproxy's
  units are whole milliseconds, so delays are rounded (0.15 ms Thunderbolt -> 0: below what a
  loopback proxy can resolve anyway; the proxy itself adds ~0.1 ms).
- bandwidth (up rate on upstream, down rate on downstream, KB/s), only where the embedded proxy
  can actually pace it: rates above EMULABLE_MBIT are left unshaped and the link says so
  (a Python proxy moves ~5 Gbit/s on an idle loopback, less next to training processes).
- loss_pct is NOT emulated: a TCP proxy cannot lose bytes (TCP would retransmit them anyway);
  the link's `notes` say so. Kernel-level loss needs netem (compose backend, where available).

The link check (linkcheck.py) builds the same chain towards an echo server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.profiles import LinkProfile
from smolcluster.testbed.topology import Hop, Topology, path_to_server

EMULABLE_MBIT = 1000.0  # rates above this are not paced by the proxy (faster than loopback emulation here)
MECHANISM_FULL = "proxy"
MECHANISM_UNSHAPED = "proxy (rate unshaped: faster than loopback emulation)"


@dataclass(frozen=True)
class HopPlan:
    """One proxy: a hop of some worker's path, and where its traffic goes next."""

    name: str  # "pi4->mini3"
    hop: Hop
    next: Optional[str]  # next hop's proxy name, None when dst is the server
    depth: int  # hops from dst to the server (0: dst is the server)

    @property
    def profile(self) -> LinkProfile:
        return self.hop.profile

    def rate_shaped(self) -> bool:
        return max(self.profile.up_mbit, self.profile.down_mbit) <= EMULABLE_MBIT

    def mechanism(self) -> str:
        return MECHANISM_FULL if self.rate_shaped() else MECHANISM_UNSHAPED

    def notes(self) -> list[str]:
        p, out = self.profile, []
        if not self.rate_shaped():
            out.append(f"rate {p.up_mbit:g}/{p.down_mbit:g} Mbit/s not shaped: faster than loopback emulation (> {EMULABLE_MBIT:g} Mbit/s)")
        if p.delay_ms and round(p.delay_ms) != p.delay_ms:
            out.append(f"delay {p.delay_ms:g} ms applied as {round(p.delay_ms)} ms (Toxiproxy latency is whole ms)")
        if p.loss_pct:
            out.append(f"loss {p.loss_pct:g}% not emulated (a TCP proxy cannot drop packets)")
        return out


def hop_name(hop: Hop) -> str:
    return f"{hop.src}->{hop.dst}"


def plan_hops(topo: Topology) -> list[HopPlan]:
    """Every hop of every worker's path to the server, once, nearest to the server first
    (so each proxy's upstream exists when it is created)."""
    plans: dict[str, HopPlan] = {}
    for w in topo.workers:
        path = path_to_server(topo, w.name)
        for i, hop in enumerate(path):
            name = hop_name(hop)
            if name not in plans:
                nxt = hop_name(path[i + 1]) if i + 1 < len(path) else None
                plans[name] = HopPlan(name=name, hop=hop, next=nxt, depth=len(path) - 1 - i)
    return sorted(plans.values(), key=lambda p: (p.depth, p.name))


def worker_paths(topo: Topology) -> dict[str, list[str]]:
    """worker -> the proxy names its traffic crosses, first hop first."""
    return {w.name: [hop_name(h) for h in path_to_server(topo, w.name)] for w in topo.workers}


def profile_json(p: LinkProfile) -> dict[str, Any]:
    """A link profile as a summary's `links` entry gives it."""
    return {"name": p.name, "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms, "loss_pct": p.loss_pct,
            "up_mbit": p.up_mbit, "down_mbit": p.down_mbit}


def toxics_for(profile: LinkProfile, shape_rate: bool) -> list[dict[str, Any]]:
    """Toxiproxy toxic bodies for one hop's profile."""
    out: list[dict[str, Any]] = []
    delay, jitter = round(profile.delay_ms), round(profile.jitter_ms)
    if delay or jitter:
        for stream in ("upstream", "downstream"):
            out.append({"name": f"latency_{stream}", "type": "latency", "stream": stream, "toxicity": 1.0,
                        "attributes": {"latency": delay, "jitter": jitter}})
    if shape_rate:
        for stream, mbit in (("upstream", profile.up_mbit), ("downstream", profile.down_mbit)):
            out.append({"name": f"bandwidth_{stream}", "type": "bandwidth", "stream": stream, "toxicity": 1.0,
                        "attributes": {"rate": max(1, round(mbit * 1e6 / 8 / 1000))}})  # KB/s, 1 KB = 1000 bytes
    return out


def create_link_proxies(client: ToxiproxyClient, plans: list[HopPlan], server_addr: str) -> dict[str, str]:
    """Create one proxy per hop (with its toxics); returns name -> listen address."""
    listen: dict[str, str] = {}
    for p in plans:
        upstream = server_addr if p.next is None else listen[p.next]
        proxy = client.create_proxy(p.name, "127.0.0.1:0", upstream)
        listen[p.name] = proxy["listen"]
        for body in toxics_for(p.profile, p.rate_shaped()):
            client.add_toxic(p.name, body["type"], body["attributes"], stream=body["stream"], name=body["name"])
    return listen


def own_bytes(paths: dict[str, list[str]], hop_bytes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Each worker's own (up, down) bytes: its first hop carries it and every worker routed through it."""
    own: dict[str, tuple[int, int]] = {}
    for w in sorted(paths, key=lambda w: -len(paths[w])):  # longer paths first: they feed the shorter ones
        up, down = hop_bytes.get(paths[w][0], (0, 0))
        for other, path in paths.items():
            if other != w and paths[w][0] in path[1:] and other in own:
                up, down = up - own[other][0], down - own[other][1]
        own[w] = (max(up, 0), max(down, 0))
    return own

