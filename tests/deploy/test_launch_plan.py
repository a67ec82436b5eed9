"""The launcher without hosts: host blocks validated like the rest of the topology, --dry-run printing
every ssh/rsync/tmux command (Windows: PowerShell, scp) and running none, netsetup per OS."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HYBRID = REPO / "topologies" / "hybrid.yaml"


def smolcluster(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolcluster", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def topology_with(tmp_path: Path, node: str, host: dict | None) -> Path:
    data = yaml.safe_load(HYBRID.read_text())
    if host is None:
        data["nodes"][node].pop("host", None)
    else:
        data["nodes"][node]["host"] = host
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("node, host, key, fix", [
    ("pi5", {"ssh": "pi5", "color": "red"}, "nodes.pi5.host.color", "remove it or use one of"),
    ("pi5", {"os": "beos"}, "nodes.pi5.host.os", "linux, macos, windows"),
    ("pi5", {"port": 70000}, "nodes.pi5.host.port", "e.g. port: 22"),
    ("pi5", {"ssh": "pi 5"}, "nodes.pi5.host.ssh", "no spaces"),
    ("pi5", {"jump": "pi5"}, "nodes.pi5.host.jump", "cabled to"),
    ("mini1", {"jump": "pi5"}, "nodes.mini1.host.jump", "jumps loop"),  # pi5 jumps through mini1 already
    ("pi5", {"interfaces": {"thunderbolt": "eth0"}}, "nodes.pi5.host.interfaces.thunderbolt", "only for its networks"),
])
def test_bad_host_blocks_name_file_key_and_fix(tmp_path, node, host, key, fix):
    p = smolcluster("topology", "validate", str(topology_with(tmp_path, node, host)))
    assert p.returncode == 2
    assert f"t.yaml: key '{key}'" in p.stderr and fix in p.stderr, p.stderr


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
    runs = tmp_path / "runs"
    p = subprocess.run(["bash", str(REPO / "launch_edp.sh"), "--dry-run", "--run-name", "dry", "--runs-dir", str(runs)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "dry (edp, 5 nodes from" in p.stdout and "hybrid.yaml" in p.stdout  # the script's default topology
    lines = p.stdout.splitlines()
    facts = [line for line in lines if line.startswith("ssh ") and " - facts " in line]
    assert len(facts) == 10  # preflight, then again after the sync (the synced code verified)
    # the Pis through their Mac, by an explicit ProxyCommand
    assert any("'ProxyCommand=ssh" in line and "mini1' pi@192.168.50.2" in line for line in facts)
    assert any("'ProxyCommand=ssh" in line and "mini3' pi@192.168.51.4" in line for line in facts)
    rsyncs = [line for line in lines if line.startswith("rsync ")]
    assert len([r for r in rsyncs if "--delete" in r and "smolcluster/smolcluster/" in r]) == 5  # the code to every host
    assert all("--exclude=__pycache__" in r for r in rsyncs if "--delete" in r)
    keys = [line for line in lines if "cluster.key.tmp" in line]
    assert len(keys) == 5 and all(line.endswith("<stdin: 6 bytes>") for line in keys)  # the key only ever on stdin
    starts = [line for line in lines if "tmux new-session -d -s dry-" in line]
    assert len(starts) == 5 and "smolcluster server --algo edp" in starts[0] and "worker 4 pi4 --algo edp" in starts[-1]
    assert not runs.exists(), "a dry run writes no run record"


def test_dry_run_for_a_windows_host_uses_powershell_and_scp(tmp_path):
    topo = topology_with(tmp_path, "mini2", {"ssh": "win", "os": "windows", "python": "python", "workdir": "C:/smolcluster"})
    p = smolcluster("launch", str(topo), "--algo", "edp", "--dry-run", "--run-name", "w")
    assert p.returncode == 0, p.stderr
    win = [line for line in p.stdout.splitlines() if re.search(r"\bwin\b", line)]
    assert win and not any("tmux" in line or line.startswith("rsync") for line in win)
    assert any(line.startswith("scp -r") for line in win)
    scripts = [base64.b64decode(m.group(1)).decode("utf-16-le")
               for line in win for m in [re.search(r"-EncodedCommand (\S+)", line)] if m]
    start = next(s for s in scripts if "Start-Process" in s)
    assert "'-m', 'smolcluster', 'worker', '1', 'mini2'" in start and "pid" in start
    assert any("[Console]::In.ReadToEnd()" in s and "cluster.key" in s for s in scripts)  # the key on stdin here too
    assert any(line.startswith('ssh') and '"python" - "facts" "C:/smolcluster"' in line for line in win)


def test_the_original_config_dir_layout_still_launches(tmp_path):
    p = subprocess.run(["bash", str(REPO / "launch_syncps.sh"), "--config-dir", str(REPO / "configs"), "--dry-run",
                        "--run-name", "orig", "--ssh-user", "admin"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    starts = [line for line in p.stdout.splitlines() if "tmux new-session" in line]
    assert [re.search(r"admin@(\w+)", s).group(1) for s in starts] == ["mini1", "mini2", "mini3", "pi5", "pi4"]
    assert "worker 4 pi4 --algo syncps" in starts[-1]


def test_a_bad_config_dir_is_reported_with_file_and_key(tmp_path):
    (tmp_path / "nn_config.yaml").write_text("batch_size: 32\n")
    (tmp_path / "cluster_config_edp.yaml").write_text("host_ip: {a: 127.0.0.1}\nworkers: [a]\nnum_workers: 2\nserver: s\n")
    p = smolcluster("launch", "--algo", "edp", "--config-dir", str(tmp_path), "--dry-run")
    assert p.returncode == 2
    assert "cluster_config_edp.yaml: key 'num_workers'" in p.stderr and "fix:" in p.stderr


def test_status_of_a_run_never_launched_says_how_to_start_one(tmp_path):
    p = smolcluster("launch", "--status", "--runs-dir", str(tmp_path))
    assert p.returncode == 2 and "no run launched from this controller yet" in p.stderr


@pytest.mark.parametrize("os_name, expected", [
    ("linux", ["ip route replace 10.10.0.0/24 via 192.168.51.2"]),
    ("macos", ["route -n add -net 10.10.0.0/24 192.168.51.2", "ifconfig eth0 | grep -q 'inet 192.168.51.4 '"]),
    ("windows", ["route -p ADD 10.10.0.0 MASK 255.255.255.0 192.168.51.2",
                 'netsh interface ipv4 add address "eth0" 192.168.51.4 255.255.255.0']),
])
def test_netsetup_prints_each_os_commands(tmp_path, os_name, expected):
    topo = topology_with(tmp_path, "pi4", {"ssh": "pi4", "os": os_name, "interfaces": {"pi4-eth": "eth0"}})
    p = smolcluster("topology", "netsetup", str(topo), "--node", "pi4")
    assert p.returncode == 0, p.stderr
    for text in expected:
        assert text in p.stdout, p.stdout


def test_netsetup_for_a_forwarding_mac(tmp_path):
    p = smolcluster("topology", "netsetup", str(HYBRID), "--node", "mini3")
    assert p.returncode == 0
    assert "sysctl -w net.inet.ip.forwarding=1" in p.stdout
    assert "ifconfig bridge0 inet 10.10.0.3 netmask 255.255.255.0 alias" in p.stdout
    assert "route -n add -net 192.168.50.0/24 10.10.0.1" in p.stdout


def test_logging_points_each_node_at_the_controller_as_that_node_sees_it(tmp_path):
    p = smolcluster("launch", str(HYBRID), "--algo", "edp", "--dry-run", "--run-name", "l", "--logging", "--controller", "mini1")
    assert p.returncode == 0, p.stderr
    urls = dict(re.findall(r"mkdir -p runs/l/nodes/(\w+) .*SMOLCLUSTER_LOKI_URL=(\S+?) ", p.stdout))
    assert urls == {"mini1": "http://127.0.0.1:3100", **{n: "http://10.10.0.1:3100" for n in ("mini2", "mini3", "pi5", "pi4")}}


def test_logging_from_a_machine_outside_the_topology_says_what_to_give(tmp_path):
    p = smolcluster("launch", str(HYBRID), "--algo", "edp", "--dry-run", "--run-name", "l", "--logging")
    assert p.returncode == 0, p.stderr
    assert "give --controller NODE or --loki-url" in p.stdout and "SMOLCLUSTER_LOKI_URL" not in p.stdout
