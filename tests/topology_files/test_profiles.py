"""Link and device profiles: the shipped numbers are in the documented ranges and can be overridden."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.testbed.profiles import LinkProfile, load_device_profiles, load_link_profiles, series
from smolcluster.testbed.topology import load_topology, path_expectation, path_to_server

REPO = Path(__file__).resolve().parents[2]
HYBRID = REPO / "topologies" / "hybrid.yaml"
HOME = REPO / "topologies" / "home-wifi.yaml"


def test_shipped_link_profiles_are_in_their_documented_ranges():
    links = load_link_profiles()
    tb, eth, wifi = links["thunderbolt"], links["ethernet-1g"], links["wifi"]
    assert 20_000 <= tb.rate_mbit <= 40_000 and tb.rtt_ms() < 0.5
    assert 900 <= eth.rate_mbit <= 1000 and 1 <= eth.rtt_ms() <= 2
    assert 50 <= wifi.up_mbit <= wifi.down_mbit <= 500 and 10 <= wifi.rtt_ms() <= 50 and wifi.jitter_ms > 0
    wan = [p for name, p in links.items() if name.startswith("wan") or name == "lte"]
    assert len(wan) >= 2 and all(p.rtt_ms() >= 20 for p in wan)
    assert any(p.up_mbit < p.down_mbit for p in wan)  # home broadband uploads slower than it downloads


def test_shipped_device_profiles():
    devices = load_device_profiles()
    assert set(devices) >= {"mac-mini", "macbook", "raspberry-pi-5", "raspberry-pi-4", "windows-laptop"}
    assert devices["mac-mini"].speed == 1.0
    assert devices["raspberry-pi-4"].speed < devices["raspberry-pi-5"].speed < devices["mac-mini"].speed
    assert all(d.cores >= 1 and d.memory_mb >= 1024 for d in devices.values())


def test_asymmetric_rates_default_to_the_symmetric_rate():
    p = LinkProfile("x", delay_ms=1, jitter_ms=0, loss_pct=0, rate_mbit=100)
    assert (p.up_mbit, p.down_mbit, p.rtt_ms()) == (100, 100, 2)
    q = LinkProfile("y", delay_ms=2, jitter_ms=0, loss_pct=1, rate_mbit=50, up_rate_mbit=10)
    s = series(p, q)
    assert (s.delay_ms, s.up_mbit, s.down_mbit) == (3, 10, 50)
    assert s.loss_pct == pytest.approx(1.0)


def test_bad_profile_file_names_file_key_and_fix(tmp_path):
    bad = tmp_path / "profiles.yaml"
    bad.write_text("links:\n  slow: {delay_ms: -1, rate_mbit: 10}\n")
    with pytest.raises(ConfigError) as info:
        load_link_profiles(bad)
    assert info.value.key == "links.slow.delay_ms" and str(bad) in str(info.value) and "fix:" in str(info.value)
    bad.write_text("devices:\n  pi: {speed: 0.1, cores: 4}\n")
    with pytest.raises(ConfigError) as info:
        load_device_profiles(bad)
    assert info.value.key == "devices.pi.memory_mb" and "add memory_mb" in info.value.fix


def test_per_node_overrides_of_profile_values():
    topo = load_topology(HOME)
    links, devices = load_link_profiles(), load_device_profiles()
    pi = topo.nodes["pi"].device
    assert pi.name == "raspberry-pi-4" and pi.memory_mb == 8192
    assert (pi.speed, pi.cores) == (devices["raspberry-pi-4"].speed, devices["raspberry-pi-4"].cores)
    # The MacBook takes the plain wifi profile; the Windows laptop overrides some of its values.
    mac_rtt, mac_bw = path_expectation(path_to_server(topo, "macbook"))
    assert (mac_rtt, mac_bw) == (links["wifi"].rtt_ms(), links["wifi"].up_mbit)
    win = path_to_server(topo, "windows")[0].profile
    assert win.delay_ms == 18 and win.up_mbit == 40 and win.loss_pct == links["wifi"].loss_pct
    # The cabled Pi has no override: its hop is the network's ethernet profile.
    assert path_to_server(topo, "pi")[0].profile == links["ethernet-1g"]


def test_override_on_a_network_and_a_custom_profiles_file(tmp_path):
    raw = yaml.safe_load(HYBRID.read_text())
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "mine.yaml").write_text(
        "links:\n  usb-ethernet: {delay_ms: 1.5, jitter_ms: 0.5, loss_pct: 0, rate_mbit: 300}\n"
        "devices:\n  raspberry-pi-4: {speed: 0.1, cores: 4, memory_mb: 2048}\n")
    raw["profiles"] = "extra/mine.yaml"  # relative to the topology file
    raw["networks"]["pi4-eth"]["profile"] = "usb-ethernet"
    raw["networks"]["pi5-eth"]["profile"] = {"profile": "ethernet-1g", "delay_ms": 2.0}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    topo = load_topology(path)
    assert topo.nodes["pi4"].device.memory_mb == 2048  # the custom file replaces the shipped entry
    assert topo.nodes["mini1"].device == load_device_profiles()["mac-mini"]  # the rest are still there
    rtt, bw = path_expectation(path_to_server(topo, "pi4"))
    assert bw == 300 and rtt == pytest.approx(3.0 + load_link_profiles()["thunderbolt"].rtt_ms())
    assert path_expectation(path_to_server(topo, "pi5"))[0] == 4.0


def test_override_with_an_unknown_field_is_an_error(tmp_path):
    raw = yaml.safe_load(HYBRID.read_text())
    raw["nodes"]["pi4"]["device"] = {"profile": "raspberry-pi-4", "ram": 8192}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert info.value.key == "nodes.pi4.device.ram" and "memory_mb" in info.value.fix and str(path) in str(info.value)


def test_missing_profiles_file(tmp_path):
    raw = yaml.safe_load(HYBRID.read_text())
    raw["profiles"] = "nope.yaml"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert info.value.key == "profiles" and "relative to the topology file" in info.value.fix
