"""Topology files: the shipped ones load, paths follow routes, and every mistake is named with its fix."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from smolcluster.common.errors import ConfigError
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


def expect_error(tmp_path: Path, raw: dict | str, key: str, *fix_words: str) -> ConfigError:
    """Load a broken topology; the error must name the file, the exact key and a fix."""
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    err = info.value
    msg = str(err)
    assert str(path) in msg, msg
    assert err.key == key, msg
    assert f"'{key}'" in msg
    assert "fix:" in msg and err.fix, msg
    for word in fix_words:
        assert word in err.fix, msg
    return err


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


# --------------------------------------------------------------------------- validation errors


def test_duplicate_address(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["mini3"]["addresses"]["thunderbolt"] = "10.10.0.2"
    err = expect_error(tmp_path, raw, "nodes.mini3.addresses.thunderbolt", "own address")
    assert "mini2" in err.problem


def test_address_outside_its_subnet(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["pi5"]["addresses"]["pi5-eth"] = "192.168.51.9"
    expect_error(tmp_path, raw, "nodes.pi5.addresses.pi5-eth", "192.168.50.0/24")


def test_address_on_an_unknown_network(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["pi5"]["addresses"] = {"pi5-ethernet": "192.168.50.2"}
    expect_error(tmp_path, raw, "nodes.pi5.addresses.pi5-ethernet", "pi5-eth")


def test_address_that_is_the_docker_gateway(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["mini2"]["addresses"]["thunderbolt"] = "10.10.0.254"
    expect_error(tmp_path, raw, "nodes.mini2.addresses.thunderbolt", "gateway")


def test_route_via_an_address_nobody_owns(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["pi4"]["routes"][0]["via"] = "192.168.51.3"
    expect_error(tmp_path, raw, "nodes.pi4.routes[0].via", "address of a node")


def test_route_via_a_node_that_does_not_forward(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["mini3"]["forwarding"] = False
    expect_error(tmp_path, raw, "nodes.mini1.routes[0].via", "nodes.mini3.forwarding: true")


def test_route_via_a_node_not_on_a_shared_network(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["pi4"]["routes"][0]["via"] = "10.10.0.3"  # mini3's Thunderbolt address: pi4 has no cable there
    err = expect_error(tmp_path, raw, "nodes.pi4.routes[0].via", "pi4-eth")
    assert "thunderbolt" in err.problem


def test_worker_with_no_path_to_the_server(tmp_path):
    raw = hybrid_raw()
    del raw["nodes"]["pi4"]["routes"]
    err = expect_error(tmp_path, raw, "nodes.pi4.routes", "10.10.0.0/24")
    assert "pi4 has no route to 10.10.0.1" in err.problem
    assert "no path to the server mini1" in err.problem


def test_worker_whose_replies_cannot_come_back(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["mini1"]["routes"] = []  # mini1 forgets the return route to pi4's subnet
    err = expect_error(tmp_path, raw, "nodes.mini1.routes", "{dest: 192.168.51.0/24, via: 10.10.0.3}")
    assert "pi4" in err.problem and "replies" in err.problem


def test_routing_loop(tmp_path):
    raw = hybrid_raw()
    # pi4 -> mini3, which now sends 10.10.0.1 back to pi4 (a /32 beats the attached /24)
    raw["nodes"]["pi4"]["forwarding"] = True
    raw["nodes"]["mini3"]["routes"].append({"dest": "10.10.0.1/32", "via": "192.168.51.4"})
    err = expect_error(tmp_path, raw, "nodes.mini3.routes", "not back to pi4")
    assert "routing loop: pi4 -> mini3 -> pi4" in err.problem


@pytest.mark.parametrize("where,key", [
    (lambda r: r["networks"]["pi4-eth"].__setitem__("profile", "ethernet-10g"), "networks.pi4-eth.profile"),
    (lambda r: r["nodes"]["pi4"].__setitem__("links", {"pi4-eth": "carrier-pigeon"}), "nodes.pi4.links.pi4-eth"),
])
def test_unknown_link_profile(tmp_path, where, key):
    raw = hybrid_raw()
    where(raw)
    expect_error(tmp_path, raw, key, "ethernet-1g", "thunderbolt")


def test_unknown_device_profile(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["pi4"]["device"] = "raspberry-pi-3"
    expect_error(tmp_path, raw, "nodes.pi4.device", "raspberry-pi-4")


@pytest.mark.parametrize("roles", [("worker",), ("server", "server")])
def test_exactly_one_server(tmp_path, roles):
    raw = hybrid_raw()
    raw["nodes"]["mini1"]["role"] = roles[0]
    if len(roles) > 1:
        raw["nodes"]["mini2"]["role"] = roles[1]
    expect_error(tmp_path, raw, "nodes", "exactly one")


def test_misspelt_role(tmp_path):
    raw = hybrid_raw()
    raw["nodes"]["mini1"]["role"] = "srever"
    expect_error(tmp_path, raw, "nodes.mini1.role", "server or worker")


@pytest.mark.parametrize("edit,key", [
    (lambda r: r.__setitem__("netwroks", {}), "netwroks"),
    (lambda r: r["nodes"]["pi5"].__setitem__("forward", True), "nodes.pi5.forward"),
    (lambda r: r["networks"]["thunderbolt"].__setitem__("mtu", 9000), "networks.thunderbolt.mtu"),
    (lambda r: r["nodes"]["pi5"]["routes"][0].__setitem__("gw", "1.2.3.4"), "nodes.pi5.routes[0].gw"),
    (lambda r: r["training"].__setitem__("epoch", 2), "training.epoch"),
])
def test_unknown_keys(tmp_path, edit, key):
    raw = hybrid_raw()
    edit(raw)
    expect_error(tmp_path, raw, key, "remove it")


def test_unknown_key_suggests_the_close_spelling(tmp_path):
    raw = hybrid_raw()
    raw["training"]["epoch"] = 2
    expect_error(tmp_path, raw, "training.epoch", "did you mean 'epochs'?")


def test_bad_yaml(tmp_path):
    expect_error(tmp_path, "networks:\n  lan: {subnet: 10.0.0.0/24\nnodes: [", "<file>", "YAML")


def test_subnet_with_host_bits(tmp_path):
    raw = hybrid_raw()
    raw["networks"]["thunderbolt"]["subnet"] = "10.10.0.1/24"
    expect_error(tmp_path, raw, "networks.thunderbolt.subnet", "10.10.0.0/24")


def test_overlapping_subnets(tmp_path):
    raw = hybrid_raw()
    raw["networks"]["pi4-eth"]["subnet"] = "192.168.48.0/22"
    expect_error(tmp_path, raw, "networks.pi4-eth.subnet", "non-overlapping")


def test_training_rejects_bad_values_and_passes_config_keys_through(tmp_path):
    raw = hybrid_raw()
    raw["training"]["algorithm"] = "allreduce"
    expect_error(tmp_path, raw, "training.algorithm", "edp or syncps")
    raw = hybrid_raw()
    raw["training"]["host_ip"] = {"mini2": "10.10.0.1"}
    expect_error(tmp_path, raw, "training.host_ip", "nodes")
    raw = hybrid_raw()
    raw["training"].update(push_mode="gradients", eval_steps=50, max_steps=100)
    topo = load_topology(write(tmp_path, raw))
    assert topo.training.extra == {"push_mode": "gradients", "eval_steps": 50}
    assert topo.training.max_steps == 100


def test_faults_must_be_a_list(tmp_path):
    raw = hybrid_raw()
    raw["faults"] = {"at": 10, "kill": "pi4"}
    expect_error(tmp_path, raw, "faults", "faults: []")


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
