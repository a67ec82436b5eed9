"""The local backend's links for an all-reduce: gloo's connections between workers through hop proxies.

A DDP rank with `ddp_routes` (core/algorithms/ddp.py) publishes its gloo address in the rendezvous store
and, before gloo dials a peer, waits for a route to it. This router, in the sim's process, reads each rank's
address and builds a chain of proxies along the topology's path from every other worker's node to that
rank's node (each hop's link profile as toxics, exactly as hops.py does for the paths to the server; rates
towards the server for hops that lead there, away from it for hops that lead back), then publishes the
chain's first address as the route.

What differs from the paths to the server: a chain carries one pair of nodes, so two pairs crossing the
same link do not share its bandwidth; the store's rendezvous traffic is not shaped. A pair the topology
gives no route (hybrid.yaml's Pis route only the Macs' subnet) goes the way a default route via the Macs
would take it: to the server's node and on from there; the summary names such pairs.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Optional

import random
import socket
import sys

from smolcluster.common.errors import ProxyError, SmolclusterError
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.report import LinkSummary
from smolcluster.testbed.sim.hops import HopPlan, create_link_proxies, profile_json, toxics_for
from smolcluster.testbed.topology import Hop, Topology, path_between, path_to_server


@dataclasses.dataclass
class PairPath:
    src: str
    dst: str
    hops: list[HopPlan]
    via_server: bool  # the topology has no route from src to dst: taken the way a default route via the server would


def pair_paths(topo: Topology) -> dict[tuple[str, str], PairPath]:
    """Every ordered pair of workers, its hops as proxies (first hop first)."""
    towards = {(h.src, h.dst) for w in topo.workers for h in path_to_server(topo, w.name)}
    out = {}
    for a in topo.workers:
        for b in topo.workers:
            if a is b:
                continue
            via_server = False
            try:
                hops = path_between(topo, a.name, b.name)
            except SmolclusterError:
                hops, via_server = path_to_server(topo, a.name) + path_between(topo, topo.server.name, b.name), True
            plans = []
            for i, hop in enumerate(hops):
                name = f"gloo:{a.name}>{b.name}:{hop.src}->{hop.dst}"
                nxt = f"gloo:{a.name}>{b.name}:{hops[i + 1].src}->{hops[i + 1].dst}" if i + 1 < len(hops) else None
                plans.append(HopPlan(name=name, hop=_oriented(hop, towards), next=nxt, depth=len(hops) - 1 - i))
            out[(a.name, b.name)] = PairPath(a.name, b.name, plans, via_server)
    return out


def _oriented(hop: Hop, towards: set[tuple[str, str]]) -> Hop:
    """A hop as a proxy's upstream sees it: a hop leading away from the server carries the down rate one way."""
    if (hop.dst, hop.src) in towards and (hop.src, hop.dst) not in towards:
        p = hop.profile
        return dataclasses.replace(hop, profile=dataclasses.replace(p, up_rate_mbit=p.down_mbit, down_rate_mbit=p.up_mbit))
    return hop


def _gloo_key(address: str) -> tuple[bytes, int]:
    """What gloo compares for an IPv4 "ip:port": the address bytes, then sin_port as this host reads it."""
    host, _, port = address.rpartition(":")
    return socket.inet_aton(host), int.from_bytes(int(port).to_bytes(2, "big"), sys.byteorder)


def gloo_dials(a: str, b: str) -> bool:
    """Whether gloo at address `a` dials its peer at `b` (else it waits for b to dial): the side whose
    address compares higher initiates (gloo's tcp Device::isInitiator)."""
    return _gloo_key(a) > _gloo_key(b)


def ports_dialled_from(address: str, tries: int = 50) -> list[int]:
    """Unprivileged ports a proxy on 127.0.0.1 can listen on so that gloo at `address` (on 127.0.0.1) still
    dials it, in random order."""
    mine = _gloo_key(address)
    ok = [p for p in range(1024, 65536) if _gloo_key(f"127.0.0.1:{p}") < mine]
    return random.sample(ok, min(tries, len(ok)))


class GlooRouter:
    """Builds the pair chains as the ranks publish their addresses (a background thread)."""

    def __init__(self, topo: Topology, toxiproxy: ToxiproxyClient, store_port: int, timeout_s: float = 120.0):
        self.topo, self.toxiproxy, self.store_port, self.timeout_s = topo, toxiproxy, store_port, timeout_s
        self.paths = pair_paths(topo)
        self.created: list[str] = []  # proxy names, for the cluster's cleanup and counters
        self.routed: list[tuple[str, str]] = []
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gloo-router", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import datetime

        import torch.distributed as dist

        from smolcluster.core.algorithms.ddp import LISTEN_KEY, ROUTE_KEY  # imports torch: only in a DDP run

        try:
            store = dist.TCPStore("127.0.0.1", self.store_port, is_master=False,
                                  timeout=datetime.timedelta(seconds=self.timeout_s))
            workers = [w.name for w in self.topo.workers]
            listen = [store.get(LISTEN_KEY.format(rank=r)).decode() for r in range(len(workers))]
            for a in range(len(workers)):
                for b in range(a + 1, len(workers)):
                    if self._stop.is_set():
                        return
                    # gloo makes one connection per pair, dialled by the side its rule picks: route that side
                    src, dst = (a, b) if gloo_dials(listen[a], listen[b]) else (b, a)
                    first = self._chain(workers[src], workers[dst], listen[src], listen[dst])
                    store.set(ROUTE_KEY.format(src=src, dst=dst), first)
                    store.set(ROUTE_KEY.format(src=dst, dst=src), listen[src])  # as published: it waits to be dialled
                    self.routed.append((workers[src], workers[dst]))
        except Exception as e:  # the run goes on unrouted or fails on its own; the summary says which
            self.error = f"{type(e).__name__}: {e}"

    def _chain(self, src: str, dst: str, src_listen: str, dst_listen: str) -> str:
        """The proxies from src's node to dst's gloo listener; returns the first one's address. That one
        listens on a port gloo's rule still has src dial (see gloo_dials), so both ends agree who dials."""
        plans = sorted(self.paths[(src, dst)].hops, key=lambda p: p.depth)
        *rest, first = plans
        self.created += [p.name for p in plans]
        listen = create_link_proxies(self.toxiproxy, rest, dst_listen) if rest else {}
        upstream = listen[first.next] if first.next else dst_listen
        for port in ports_dialled_from(src_listen):
            try:
                self.toxiproxy.create_proxy(first.name, f"127.0.0.1:{port}", upstream)
            except ProxyError:
                continue  # taken: the next candidate
            for body in toxics_for(first.profile, first.rate_shaped()):
                self.toxiproxy.add_toxic(first.name, body["type"], body["attributes"], stream=body["stream"], name=body["name"])
            return f"127.0.0.1:{port}"
        raise SmolclusterError(f"no free port for the gloo link {src}->{dst}")

    # ------------------------------------------------------------------ what the summary says

    def summary_links(self, stats: dict[str, dict[str, int]]) -> list[LinkSummary]:
        """One row per pair whose chain carried traffic: its hops, bottleneck profile, bytes (first hop)."""
        rows = []
        for (src, dst), path in self.paths.items():
            s = stats.get(path.hops[0].name)
            if not s or not (s.get("upstream_bytes") or s.get("downstream_bytes")):
                continue
            slowest = min(path.hops, key=lambda p: p.profile.up_mbit)
            notes = [f"gloo pair {src}->{dst}: its own chain of proxies (pairs do not share a link's bandwidth)"]
            if path.via_server:
                notes.append(f"the topology has no route from {src} to {dst}; routed through {self.topo.server.name}, "
                             "as a default route via the Macs would")
            rows.append(LinkSummary(
                name=f"gloo {src}->{dst}", src=src, dst=dst, network="+".join(dict.fromkeys(p.hop.network for p in path.hops)),
                hops=[f"{p.hop.src}->{p.hop.dst}" for p in path.hops], profile=profile_json(slowest.profile),
                mechanism="proxy" if all(p.rate_shaped() for p in path.hops) else slowest.mechanism(),
                rate_shaped=all(p.rate_shaped() for p in path.hops), loss_emulated=False, notes=notes,
                bytes_up=s.get("upstream_bytes"), bytes_down=s.get("downstream_bytes"), connections=s.get("connections_total")))
        return rows

    def node_bytes(self, stats: dict[str, dict[str, int]]) -> dict[str, tuple[int, int]]:
        """Per worker, the gloo bytes it sent and received (each pair's first hop counts them once)."""
        out: dict[str, list[int]] = {w.name: [0, 0] for w in self.topo.workers}
        for (src, dst), path in self.paths.items():
            s = stats.get(path.hops[0].name) or {}
            up, down = s.get("upstream_bytes", 0), s.get("downstream_bytes", 0)
            out[src][0] += up
            out[src][1] += down
            out[dst][0] += down
            out[dst][1] += up
        return {k: (v[0], v[1]) for k, v in out.items()}

    def summary(self) -> dict[str, Any]:
        pairs = len(self.paths) // 2  # gloo makes one connection per unordered pair
        mode = "routed" if len(self.routed) == pairs and not self.error else ("partly routed" if self.routed else "direct")
        out: dict[str, Any] = {"mode": mode, "pairs": pairs, "routed_pairs": len(self.routed),
                               "via_server": sorted(f"{a}->{b}" for (a, b), p in self.paths.items() if p.via_server)}
        if mode != "routed":
            out["note"] = "gloo's links are unshaped for the pairs not routed" + (f" ({self.error})" if self.error else "")
        return out
