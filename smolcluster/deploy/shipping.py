"""`smolcluster launch --logging`: where each node pushes its log and metrics lines (Loki's push API).

With --loki-url every node pushes there. Otherwise the logging/ stack starts on this machine (the
controller), and each node is given the controller's address as seen from that node, from the
topology: the controller must be one of its nodes (found by this machine's own addresses, or named
with --controller). A node's URL reaches it through $SMOLCLUSTER_LOKI_URL in its start command.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from smolcluster.deploy.plan import DeployPlan
from smolcluster.testbed.topology import Topology

LOKI_PORT = 3100


def local_addresses() -> set[IPv4Address]:
    import psutil

    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                out.add(IPv4Address(a.address))
            except ValueError:
                continue  # IPv6, MAC
    return out


def controller_node(topo: Topology, named: str | None) -> str | None:
    if named is not None:
        return named
    mine = local_addresses()
    return next((n.name for n in topo.nodes.values() if mine & set(n.addresses.values())), None)


def address_of(topo: Topology, plan: DeployPlan, controller: str, node: str) -> str:
    """The controller's address that `node` reaches: itself by loopback, the server's dial address when the
    controller is the server, else the controller's address on a network the two share (else its first)."""
    if node == controller:
        return "127.0.0.1"
    if controller == plan.server.name:
        dials = next((n.dials for n in plan.nodes if n.name == node), None)
        if dials:
            return dials
    c, n = topo.nodes[controller], topo.nodes[node]
    shared = [net for net in c.addresses if net in n.addresses]
    return str(c.addresses[shared[0]] if shared else next(iter(c.addresses.values())))


def loki_urls(topo: Topology | None, plan: DeployPlan, *, loki_url: str | None, controller: str | None,
              runs_dir: Path, echo: Callable[[str], None], dry_run: bool) -> dict[str, str]:
    """node -> the Loki push URL it gets; {} when nothing will be shipped (said in one line)."""
    if loki_url:
        echo(f"logging    every node pushes to {loki_url}")
        return {n.name: loki_url for n in plan.nodes}
    if topo is None:
        echo("logging    --config-dir runs have no topology to find the controller's address: give --loki-url; not shipping")
        return {}
    me = controller_node(topo, controller)
    if me is None:
        echo("logging    this machine is none of the topology's nodes, so the nodes cannot be told its address: "
             "give --controller NODE or --loki-url http://ADDRESS:3100; not shipping")
        return {}
    if dry_run:
        echo(f"logging    would start the logging/ stack here ({me}) and point every node at it")
        port = LOKI_PORT
    else:
        from smolcluster.testbed.logstack import loki_for_run

        base = loki_for_run(runs_dir, echo, bind="0.0.0.0")
        if base is None:
            return {}
        port = urlsplit(base).port or LOKI_PORT
    return {n.name: f"http://{address_of(topo, plan, me, n.name)}:{port}" for n in plan.nodes}
