"""How a topology becomes proxies and toxics, and how link counters become per-node bytes (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolcluster.testbed.report.summary import time_to_accuracy
from smolcluster.testbed.sim.hops import EMULABLE_MBIT, own_bytes, plan_hops, toxics_for, worker_paths
from smolcluster.testbed.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


def test_hybrid_has_one_proxy_per_hop_and_pi4_crosses_mini3():
    topo = load_topology(TOPOLOGIES / "hybrid.yaml")
    plans = {p.name: p for p in plan_hops(topo)}
    assert set(plans) == {"mini2->mini1", "mini3->mini1", "pi5->mini1", "pi4->mini3"}
    assert plans["pi4->mini3"].next == "mini3->mini1"  # pi4's traffic continues over mini3's link
    assert plans["mini3->mini1"].next is None
    order = [p.name for p in plan_hops(topo)]
    assert order.index("mini3->mini1") < order.index("pi4->mini3")  # upstream proxy exists first
    assert worker_paths(topo)["pi4"] == ["pi4->mini3", "mini3->mini1"]
    # Thunderbolt is too fast to pace on loopback: said, not pretended
    assert not plans["mini2->mini1"].rate_shaped() and "unshaped" in plans["mini2->mini1"].mechanism()
    assert plans["pi5->mini1"].rate_shaped() and plans["pi5->mini1"].mechanism() == "proxy"


def test_toxics_follow_the_profile_in_toxiproxy_units():
    topo = load_topology(TOPOLOGIES / "home-wifi.yaml")
    windows = next(p for p in plan_hops(topo) if p.name == "windows->server")
    toxics = {t["name"]: t for t in toxics_for(windows.profile, windows.rate_shaped())}
    assert toxics["latency_upstream"]["attributes"] == {"latency": 18, "jitter": 10}
    assert toxics["latency_downstream"]["stream"] == "downstream"
    assert toxics["bandwidth_upstream"]["attributes"]["rate"] == 5000  # 40 Mbit/s = 5000 KB/s
    assert toxics["bandwidth_downstream"]["attributes"]["rate"] == 10000  # 80 Mbit/s
    assert any("loss" in n and "not emulated" in n for n in windows.notes())
    fast = next(p for p in plan_hops(load_topology(TOPOLOGIES / "hybrid.yaml")) if p.name == "mini2->mini1")
    assert fast.profile.rate_mbit > EMULABLE_MBIT
    assert not [t for t in toxics_for(fast.profile, fast.rate_shaped()) if t["type"] == "bandwidth"]


def test_shared_link_bytes_are_split_per_node():
    paths = {"mini3": ["mini3->mini1"], "pi4": ["pi4->mini3", "mini3->mini1"], "mini2": ["mini2->mini1"]}
    hop_bytes = {"mini3->mini1": (1000, 900), "pi4->mini3": (300, 200), "mini2->mini1": (50, 40)}
    assert own_bytes(paths, hop_bytes) == {"pi4": (300, 200), "mini3": (700, 700), "mini2": (50, 40)}


def test_time_to_accuracy_counts_from_the_run_start():
    evals = [{"time": 105.0, "test_accuracy": 0.85}, {"time": 112.5, "test_accuracy": 0.91}, {"time": 130.0, "test_accuracy": 0.96}]
    assert time_to_accuracy(evals, 100.0, 0.90) == pytest.approx(12.5)
    assert time_to_accuracy(evals, 100.0, 0.95) == pytest.approx(30.0)
    assert time_to_accuracy(evals, 100.0, 0.99) is None
