"""Topology files: the shipped ones load, paths follow routes, and every mistake is named with its fix."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from smolcluster.testbed.profiles import load_link_profiles
from smolcluster.testbed.topology import (
    format_topology,
    load_topology,
    path_expectation,
    path_from_server,
    path_to_server,
    server_address_for,
)

REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = sorted((REPO / "topologies").glob("*.yaml"))
HYBRID = REPO / "topologies" / "hybrid.yaml"


def hybrid_raw() -> dict:
    return yaml.safe_load(HYBRID.read_text())


def write(tmp_path: Path, raw: dict | str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- shipped files


def test_the_three_topologies_are_shipped():
    assert {p.stem for p in TOPOLOGIES} >= {"hybrid", "thunderbolt", "home-wifi"}


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_shipped_topologies_validate_and_show(path: Path):
    topo = load_topology(path)
    assert topo.server.rank == 0
    assert [w.rank for w in topo.workers] == list(range(1, len(topo.workers) + 1))
    text = format_topology(topo)
    for node in topo.nodes:
        assert node in text
    for w in topo.workers:
        assert path_to_server(topo, w.name)[-1].dst == topo.server.name


def test_hybrid_matches_the_seed_cluster():
    topo = load_topology(HYBRID)
    assert topo.server.name == "mini1"
    assert [w.name for w in topo.workers] == ["mini2", "mini3", "pi5", "pi4"]
    assert topo.nodes["mini1"].addresses["thunderbolt"] == IPv4Address("10.10.0.1")
    assert topo.nodes["pi5"].addresses["pi5-eth"] == IPv4Address("192.168.50.2")
    assert topo.nodes["pi4"].addresses["pi4-eth"] == IPv4Address("192.168.51.4")
    assert topo.networks["thunderbolt"].gateway == IPv4Address("10.10.0.254")  # .1 stays free for mini1
    for w in topo.workers:
        assert server_address_for(topo, w.name) == IPv4Address("10.10.0.1")
    assert topo.training.algorithm in ("edp", "syncps") and topo.training.epochs == 1
    assert topo.faults == []


def test_pi4_path_goes_through_mini3_and_replies_come_back_the_same_way():
    topo = load_topology(HYBRID)
    hops = path_to_server(topo, "pi4")
    assert [(h.src, h.dst, h.network) for h in hops] == [("pi4", "mini3", "pi4-eth"), ("mini3", "mini1", "thunderbolt")]
    back = path_from_server(topo, "pi4")
    assert [(h.src, h.dst) for h in back] == [("mini1", "mini3"), ("mini3", "pi4")]
    links = load_link_profiles()
    rtt, bw = path_expectation(hops)
    assert rtt == pytest.approx(links["ethernet-1g"].rtt_ms() + links["thunderbolt"].rtt_ms())
    assert bw == min(links["ethernet-1g"].up_mbit, links["thunderbolt"].up_mbit)


def test_validate_and_show_on_the_command_line(tmp_path: Path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "smolcluster", "topology", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=REPO, timeout=60)
    ok = run("validate", "topologies/hybrid.yaml")
    assert ok.returncode == 0 and "OK: 5 nodes, 3 networks" in ok.stdout, ok.stderr
    show = run("show", "topologies/hybrid.yaml")
    assert show.returncode == 0, show.stderr
    pi4_line = next(line for line in show.stdout.splitlines() if line.startswith("pi4 ") and "->" in line)
    assert "pi4 -> mini3 [pi4-eth] -> mini1 [thunderbolt]" in pi4_line
    assert "1.80 ms" in pi4_line and "940 Mbit/s" in pi4_line
    raw = hybrid_raw()
    raw["nodes"]["pi4"]["addresses"]["pi4-eth"] = "192.168.50.2"
    bad = run("validate", str(write(tmp_path, raw)))
    assert bad.returncode == 2
    assert "nodes.pi4.addresses.pi4-eth" in bad.stderr and "fix:" in bad.stderr


# --------------------------------------------------------------------------- training keys
# Every validation error (bad address, route, profile, key, ...) is a row of tests/config/test_config_errors.py.


def test_training_passes_config_keys_through(tmp_path):
    raw = hybrid_raw()
    raw["training"].update(push_mode="gradients", eval_steps=50, max_steps=100)
    topo = load_topology(write(tmp_path, raw))
    assert topo.training.extra == {"push_mode": "gradients", "eval_steps": 50}
    assert topo.training.max_steps == 100


def test_asymmetric_routes_are_followed_and_shown(tmp_path):
    # W reaches S through R1, but S sends replies through R2: valid, and `show` says so.
    raw = {
        "networks": {n: {"subnet": f"10.0.{i}.0/24", "profile": "ethernet-1g"} for i, n in enumerate("abc", start=1)},
        "nodes": {
            "s": {"role": "server", "device": "mac-mini", "addresses": {"a": "10.0.1.1", "b": "10.0.2.1"},
                  "routes": [{"dest": "10.0.3.0/24", "via": "10.0.2.2"}]},
            "r1": {"role": "worker", "device": "mac-mini", "addresses": {"a": "10.0.1.2", "c": "10.0.3.2"}, "forwarding": True},
            "r2": {"role": "worker", "device": "mac-mini", "addresses": {"b": "10.0.2.2", "c": "10.0.3.3"}, "forwarding": True},
            "w": {"role": "worker", "device": "raspberry-pi-5", "addresses": {"c": "10.0.3.4"},
                  "routes": [{"dest": "default", "via": "10.0.3.2"}]},
        },
    }
    topo = load_topology(write(tmp_path, raw))
    assert [h.dst for h in path_to_server(topo, "w")] == ["r1", "s"]
    assert [h.dst for h in path_from_server(topo, "w")] == ["r2", "w"]
    assert "replies: s -> r2 -> w" in format_topology(topo)


def test_both_ends_overriding_a_link_puts_them_in_series(tmp_path):
    raw = yaml.safe_load((REPO / "topologies" / "home-wifi.yaml").read_text())
    raw["nodes"]["server"]["links"] = {"home": {"profile": "ethernet-1g", "delay_ms": 5}}
    topo = load_topology(write(tmp_path, raw))
    wifi = load_link_profiles()["wifi"]
    hop = path_to_server(topo, "macbook")[0].profile
    assert hop.delay_ms == wifi.delay_ms + 5 and hop.up_mbit == wifi.up_mbit
    assert path_to_server(topo, "pi")[0].profile.delay_ms == 5  # the cabled Pi sees only the server's override


def test_the_example_in_docs_is_a_valid_topology(tmp_path):
    doc = (REPO / "docs" / "topology.md").read_text()
    example = doc.split("## Example\n\n```yaml\n", 1)[1].split("```", 1)[0]
    topo = load_topology(write(tmp_path, example))
    assert [h.dst for h in path_to_server(topo, "pi4")] == ["mini3", "mini1"]


def test_resolved_topology_is_plain_data():
    from smolcluster.testbed.topology import to_dict

    data = yaml.safe_load(yaml.safe_dump(to_dict(load_topology(HYBRID))))
    assert data["nodes"]["pi4"]["addresses"] == {"pi4-eth": "192.168.51.4"}
    assert data["nodes"]["pi4"]["device"]["name"] == "raspberry-pi-4"
    assert data["networks"]["thunderbolt"]["gateway"] == "10.10.0.254"
    assert data["nodes"]["pi4"]["routes"] == [{"dest": "10.10.0.0/24", "via": "192.168.51.2"}]
