"""Which Toxiproxy proxies a fault acts on under the compose backend (no Docker needed: links come
from the rendered project). Each worker's whole path is one proxy there, so hop faults must reach
every path crossing the hop."""

from __future__ import annotations

from pathlib import Path

from smolcluster.testbed.faults.actions import links_for
from smolcluster.testbed.faults.schedule import parse_faults
from smolcluster.testbed.sim.compose import offline_image_spec, render_compose
from smolcluster.testbed.sim.compose_cluster import ComposeCluster
from smolcluster.testbed.topology import load_topology

HYBRID = Path(__file__).resolve().parents[2] / "topologies" / "hybrid.yaml"


def _cluster(tmp_path: Path) -> ComposeCluster:
    topo = load_topology(HYBRID)
    cp = render_compose(topo, tmp_path, offline_image_spec("smolcluster-offline:test"))
    return ComposeCluster(topology=topo, run_dir=tmp_path, algorithm="edp", env=None, cp=cp)  # type: ignore[arg-type]


def _targets(cluster: ComposeCluster, entry: dict) -> set[str]:
    fault = parse_faults([entry], cluster.topology).expand()[0]
    return {h.name for h in links_for(fault, cluster)}


def test_hop_fault_reaches_every_path_that_crosses_the_hop(tmp_path):
    c = _cluster(tmp_path)
    assert _targets(c, {"at": 1, "link": "mini3->mini1", "action": "partition"}) == {"mini3-to-mini1", "pi4-to-mini1"}
    assert _targets(c, {"at": 1, "link": "pi4->mini3", "action": "partition"}) == {"pi4-to-mini1"}
    assert _targets(c, {"at": 1, "link": "mini1->pi5", "action": "latency_spike", "latency_ms": 50}) == {"pi5-to-mini1"}


def test_node_fault_cuts_the_workers_routed_through_it(tmp_path):
    c = _cluster(tmp_path)
    assert {h.name for h in c.links_of("mini3")} == {"mini3-to-mini1", "pi4-to-mini1"}
    assert {h.name for h in c.links_of("pi5")} == {"pi5-to-mini1"}
    assert len(c.links_of("mini1")) == 4  # the server: every path, each proxy once
