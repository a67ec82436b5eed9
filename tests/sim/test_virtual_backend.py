"""`smolcluster sim --backend virtual` end to end, through the CLI: the run dir and summary every backend
leaves, bit-identical reruns for every registry algorithm, faults in virtual time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smolcluster.common.jsonl import read_jsonl
from smolcluster.core import algorithms

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLOOR = {"edp": 0.90, "syncps": 0.92}  # one epoch of MNIST, as on the local backend
# Every file a rerun must reproduce byte for byte (logs carry wall-clock stamps; virtual.json is the run's cost).
COMPARED = ("summary.json", "faults.jsonl", "nodes/{node}/metrics.jsonl", "nodes/{server}/summary.json")


def run_virtual(run_dir: Path, data_dir: Path, *args: str, topology: str = "topologies/hybrid.yaml") -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "smolcluster", "sim", topology, "--backend", "virtual",
                        "--run-dir", str(run_dir), *args], cwd=REPO, env={**os.environ, "SMOLCLUSTER_DATA_DIR": str(data_dir)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def files_of(run_dir: Path) -> dict[str, bytes]:
    s = json.loads((run_dir / "summary.json").read_text())
    server = next(n["node"] for n in s["nodes"] if n["role"] == "server")
    out = {}
    for pattern in COMPARED:
        for node in [n["node"] for n in s["nodes"]] if "{node}" in pattern else [None]:
            rel = pattern.format(node=node, server=server)
            if (run_dir / rel).exists():
                out[rel] = (run_dir / rel).read_bytes()
    return out


def twice(tmp_path: Path, data_dir: Path, *args: str) -> tuple[dict[str, bytes], dict[str, bytes], str]:
    """Two runs into the same run dir path (the summary names its checkpoint by path), the first moved aside."""
    run_dir = tmp_path / "run"
    first_out = run_virtual(run_dir, data_dir, *args).stdout
    first = files_of(run_dir)
    shutil.move(run_dir, tmp_path / "first")
    run_virtual(run_dir, data_dir, *args)
    return first, files_of(run_dir), first_out


# every registry algorithm the virtual backend schedules (collective ones, DDP, run real process groups)
@pytest.mark.parametrize("algo", [a.name for a in algorithms.algorithms() if not a.collective])
def test_virtual_reruns_are_bit_identical_and_train(tmp_path, mnist_dir, algo):
    first, second, out = twice(tmp_path, mnist_dir, "--algo", algo)
    assert set(first) == set(second) and len(first) >= 7  # summary, the server's, 5 metrics files
    for rel in first:
        assert first[rel] == second[rel], f"{rel} differs between two runs with the same seed"

    s = json.loads(first["summary.json"])
    assert s["backend"] == "virtual" and s["algorithm"] == algo and s["stop_reason"] == "finished"
    assert len(s["model_sha256"]) == 64
    assert s["final_test_accuracy"] >= FLOOR.get(algo, 0.9), s["final_test_accuracy"]
    assert s["time_to_90_s"] is not None and 0 < s["time_to_90_s"] < s["wall_time_s"]
    nodes = {n["node"]: n for n in s["nodes"]}
    assert set(nodes) == {"mini1", "mini2", "mini3", "pi5", "pi4"}
    # compute is modelled per device: the Pi 4 is the slowest worker, the Macs the fastest
    assert nodes["pi4"]["samples_per_s"] < nodes["pi5"]["samples_per_s"] <= nodes["mini2"]["samples_per_s"]
    links = {l["name"]: l for l in s["links"]}
    assert links["mini3->mini1"]["bytes_up"] > links["pi4->mini3"]["bytes_up"] > 0  # the shared hop carries both
    assert f"final test accuracy {s['final_test_accuracy']:.4f}" in out and "wall s per simulated s" in out
    costs = json.loads((tmp_path / "first" / "virtual.json").read_text())
    assert costs["virtual_s"] == pytest.approx(s["sim_wall_time_s"], abs=0.01) and costs["wall_s"] > 0


def test_virtual_faults_fire_in_virtual_time_and_reruns_match(tmp_path, mnist_dir):
    faults = tmp_path / "faults.yaml"
    faults.write_text("faults:\n"
                      "  - {at: 2.0, node: pi4, action: kill, duration: 1.5}\n"
                      "  - {at_step: 150, action: server_crash, duration: 1}\n"
                      "  - {at: 4.0, link: pi5->mini1, action: latency_spike, latency_ms: 200, duration: 2}\n"
                      "  - {at: 7.0, link: mini2->mini1, action: partition, duration: 1}\n")
    first, second, _ = twice(tmp_path, mnist_dir, "--algo", "edp", "--faults", str(faults))
    for rel in first:
        assert first[rel] == second[rel], f"{rel} differs between two runs with the same fault schedule"
    events = [json.loads(l) for l in first["faults.jsonl"].decode().splitlines()]
    fired = {e["fault"]: e for e in events if e["action"] == "fired"}
    healed = {e["fault"] for e in events if e["action"] == "healed"}
    assert set(fired) == healed == {"f0-kill-pi4", "f1-server_crash-mini1", "f2-latency_spike-pi5->mini1",
                                    "f3-partition-mini2->mini1"}
    assert fired["f0-kill-pi4"]["elapsed"] == pytest.approx(2.0, abs=0.11)  # the injector's poll, in virtual time
    assert fired["f1-server_crash-mini1"]["version"] >= 150
    s = json.loads(first["summary.json"])
    assert s["stop_reason"] == "finished" and s["final_test_accuracy"] >= 0.9
    server_metrics = read_jsonl(tmp_path / "first" / "nodes" / "mini1" / "metrics.jsonl")
    assert any(m["event"] == "resume" for m in server_metrics)  # back from its checkpoint
    pi4_joins = [m for m in read_jsonl(tmp_path / "first" / "nodes" / "pi4" / "metrics.jsonl") if m["event"] == "join"]
    assert len(pi4_joins) >= 2  # joined again after the server came back, and when restarted after its kill


def test_a_stalled_edp_worker_is_not_an_outlier_when_it_comes_back(tmp_path, mnist_dir):
    """A worker starved for 8 s (a paused process; on a loaded machine, the scheduler) comes back with weights
    that differ from the server's by everyone's progress since: robust aggregation judges the move the push
    makes after its staleness damping, so the honest straggler is applied, not rejected as an outlier."""
    topology = tmp_path / "small.yaml"
    text = (REPO / "topologies" / "faults-small.yaml").read_text()
    topology.write_text(text.replace("  algorithm: edp\n", "  algorithm: edp\n  use_quantization: true\n", 1))
    faults = tmp_path / "faults.yaml"
    faults.write_text("faults:\n  - {at: 3, node: w1, action: pause, duration: 8}\n")
    run_virtual(tmp_path / "run", mnist_dir, "--algo", "edp", "--faults", str(faults), topology=str(topology))
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["robust_aggregation"]["enabled"]
    assert s["pushes_rejected"] == 0, s["rejected_reasons"]
    assert max(m.get("staleness", 0) for m in read_jsonl(tmp_path / "run" / "nodes" / "srv" / "metrics.jsonl")
               if m["event"] == "update" and m.get("source") == 1) >= 20  # it did come back far behind
    assert s["final_test_accuracy"] >= 0.9
