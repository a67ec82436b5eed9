"""hybrid.yaml in containers: addresses, routes, what gets through and what does not, link rates."""

from __future__ import annotations

import json
import urllib.request
from ipaddress import IPv4Address

import pytest

from smolcluster.testbed.sim.compose import (
    ComposeProject,
    can_connect,
    exec_in,
    measure_server,
    measure_throughput,
    toxiproxy_api_url,
)
from smolcluster.testbed.topology import Topology

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _addresses(docker_env, cp: ComposeProject, service: str) -> set[IPv4Address]:
    out = exec_in(docker_env, cp, service, ["ip", "-4", "-o", "addr", "show"]).stdout
    found = {IPv4Address(line.split()[3].split("/")[0]) for line in out.splitlines() if line.strip()}
    return {a for a in found if not a.is_loopback}


def test_every_node_has_exactly_its_addresses(docker_env, hybrid_up: ComposeProject, hybrid: Topology):
    for node in hybrid.nodes.values():
        assert _addresses(docker_env, hybrid_up, node.name) == set(node.addresses.values()), node.name


def test_links_are_shaped_and_the_mechanism_is_recorded(hybrid_up: ComposeProject, hybrid: Topology):
    for node in hybrid.nodes.values():
        for net in node.addresses:
            assert hybrid_up.mechanisms[f"{node.name}/{net}"] in ("netem", "tbf"), (node.name, net)


@pytest.mark.parametrize("pi, via", [("pi5", "192.168.50.1"), ("pi4", "192.168.51.2")])
def test_pis_reach_the_thunderbolt_subnet_through_their_mac(docker_env, hybrid_up: ComposeProject, pi: str, via: str):
    route = exec_in(docker_env, hybrid_up, pi, ["ip", "route", "get", "10.10.0.3"]).stdout
    assert f"via {via} " in route, route
    # and real TCP gets there and back (mini3 answers the routed pi, replies take the return routes)
    with measure_server(docker_env, hybrid_up, "mini3", 5301):
        ok, err = can_connect(docker_env, hybrid_up, pi, "10.10.0.3", 5301)
    assert ok, err


def test_each_pi_reaches_the_server_address_workers_dial(docker_env, hybrid_up: ComposeProject):
    with measure_server(docker_env, hybrid_up, "mini1", 5302, count=2):
        for pi in ("pi5", "pi4"):
            ok, err = can_connect(docker_env, hybrid_up, pi, "10.10.0.1", 5302)
            assert ok, f"{pi}: {err}"


def test_traffic_the_topology_does_not_route_does_not_get_through(docker_env, hybrid_up: ComposeProject):
    # pi4 listens; pi5 has no route to pi4's subnet (only 10.10.0.0/24 via mini1)
    with measure_server(docker_env, hybrid_up, "pi4", 5303):
        ok, err = can_connect(docker_env, hybrid_up, "pi5", "192.168.51.4", 5303)
        assert not ok
        # the control: a node that does route there gets through to the same listener
        ok2, err2 = can_connect(docker_env, hybrid_up, "mini3", "192.168.51.4", 5303)
        assert ok2, err2
    assert "unreachable" in err.lower() or "timed out" in err.lower(), err
    # nor via the docker host: docker's default route is gone, so the host's address on pi4's
    # network is as unreachable for pi5 as pi4 itself
    ok, err = can_connect(docker_env, hybrid_up, "pi5", "192.168.51.254", 5303, timeout=2)
    assert not ok and "unreachable" in err.lower(), err


def test_shaped_link_throughput_matches_its_profile(docker_env, hybrid_up: ComposeProject, hybrid: Topology):
    """pi5 -> mini1 over pi5-eth (ethernet-1g): goodput within ±15 % of the profile's rate."""
    profile = hybrid.link_profile("pi5", "pi5-eth")
    r = measure_throughput(docker_env, hybrid_up, "pi5", "mini1", "192.168.50.1", port=5304, seconds=3.0)
    print(f"pi5 -> mini1: measured {r['mbit']:.0f} Mbit/s, profile {profile.up_mbit:g} Mbit/s "
          f"({hybrid_up.mechanisms['pi5/pi5-eth']})")
    assert abs(r["mbit"] - profile.up_mbit) <= 0.15 * profile.up_mbit, r


def test_toxiproxy_serves_one_proxy_per_worker(hybrid_up: ComposeProject, hybrid: Topology, docker_env):
    url = toxiproxy_api_url(docker_env, hybrid_up)
    with urllib.request.urlopen(f"{url}/proxies", timeout=10) as resp:
        proxies = json.load(resp)
    assert {p.name for p in hybrid_up.proxies} == set(proxies)
    for p in hybrid_up.proxies:
        assert proxies[p.name]["listen"] == p.listen and proxies[p.name]["upstream"] == p.upstream
