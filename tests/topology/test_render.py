"""Rendering a topology into a compose project (no Docker engine needed), and the no-Docker errors."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest
import yaml

from smolcluster.common.errors import DockerUnavailable
from smolcluster.testbed.sim.compose import ImageSpec, render_compose
from smolcluster.testbed.sim.docker_env import detect_docker
from smolcluster.testbed.topology import load_topology

IMAGE = ImageSpec(tag="smolcluster:test", python="python")


@pytest.fixture()
def rendered(tmp_path):
    from pathlib import Path

    topo = load_topology(Path(__file__).resolve().parents[2] / "topologies" / "hybrid.yaml")
    cp = render_compose(topo, tmp_path, IMAGE)
    return topo, cp, yaml.safe_load(cp.compose_file.read_text())


def test_one_service_per_node_plus_toxiproxy_with_static_addresses(rendered):
    topo, cp, data = rendered
    assert set(data["services"]) == set(topo.nodes) | {"toxiproxy"}
    for node in topo.nodes.values():
        nets = data["services"][node.name]["networks"]
        assert {n: IPv4Address(v["ipv4_address"]) for n, v in nets.items()} == node.addresses


def test_networks_have_their_subnet_and_a_gateway_no_node_uses(rendered):
    topo, cp, data = rendered
    used = {a for n in topo.nodes.values() for a in n.addresses.values()}
    for name, net in topo.networks.items():
        ipam = data["networks"][name]["ipam"]["config"][0]
        assert IPv4Network(ipam["subnet"]) == net.subnet
        gw = IPv4Address(ipam["gateway"])
        assert gw in net.subnet and gw not in used and gw != IPv4Address("10.10.0.1")
    toxi = {IPv4Address(v["ipv4_address"]) for v in data["services"]["toxiproxy"]["networks"].values()}
    assert not toxi & used


def test_forwarding_limits_and_capabilities(rendered):
    topo, cp, data = rendered
    for node in topo.nodes.values():
        svc = data["services"][node.name]
        assert svc["sysctls"]["net.ipv4.ip_forward"] == (1 if node.forwarding else 0)
        assert "NET_ADMIN" in svc["cap_add"]
        assert svc["mem_limit"] == f"{node.device.memory_mb}m"
        assert 0 < svc["cpus"] <= node.device.cores


def test_entrypoints_install_every_route_including_return_routes(rendered):
    topo, cp, data = rendered
    for node in topo.nodes.values():
        script = (cp.compose_dir / "entrypoints" / f"{node.name}.sh").read_text()
        assert "ip route del default" in script
        for r in node.routes:
            assert f"ip route replace {r.dest} via {r.via}" in script
    # mini1 carries the return route to pi4's subnet through mini3
    assert "ip route replace 192.168.51.0/24 via 10.10.0.3" in (cp.compose_dir / "entrypoints" / "mini1.sh").read_text()


def test_training_commands_dial_each_workers_proxy(rendered):
    topo, cp, data = rendered
    listen = {p.worker: p.listen for p in cp.proxies}
    for w in topo.workers:
        cmd = data["services"][w.name]["command"]
        if w.forwarding:  # a router keeps its container (and so its routing) after training ends
            assert cmd[0] == "/bin/sh" and "still routing" in cmd[2]
            cmd = cmd[cmd.index("python"):]
        assert cmd[:5] == ["python", "-m", "smolcluster", "worker", str(w.rank)]
        assert cmd[cmd.index("--connect") + 1] == listen[w.name]
        assert cmd[cmd.index("--run-dir") + 1] == f"/run/nodes/{w.name}"
    server = data["services"]["mini1"]["command"]
    assert server[3] == "server" and "--config-dir" in server


@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None, reason="no compose CLI")
def test_compose_accepts_the_rendered_file(rendered):
    """`compose config` parses and validates the file (no engine needed for v1)."""
    topo, cp, data = rendered
    for cmd in (["docker-compose"], ["docker", "compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        proc = subprocess.run([*cmd, "-f", str(cp.compose_file), "config", "-q"], capture_output=True, text=True,
                              cwd=cp.compose_dir)
        assert proc.returncode == 0, proc.stderr
        return
    pytest.skip("neither docker compose nor docker-compose runs here")


def test_no_docker_cli_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DockerUnavailable, match="no `docker` command"):
        detect_docker()


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")
def test_no_running_engine_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(DockerUnavailable, match="no Docker engine is running"):
        detect_docker()
