"""Nodes push their own log and metrics lines to Loki (no agent): a real `smolcluster sim --logging`
run against a receiver that speaks Loki's push API: every node's lines with the contract's labels,
every metrics line, and the fault events as the controller's stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smolcluster.bench.logging import PushSink
from smolcluster.core.training.lokipush import CONTRACT_LABELS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_node_of_a_sim_ships_its_lines_with_the_labels(tmp_path, mnist_dir):
    sink = PushSink()
    try:
        faults = tmp_path / "faults.yaml"
        faults.write_text(yaml.safe_dump({"faults": [{"at_step": 20, "action": "pause", "node": "w1", "duration": 1.0}]}))
        run = tmp_path / "run"
        p = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(REPO / "topologies" / "faults-small.yaml"),
                            "--max-steps", "60", "--run-dir", str(run), "--logging", "--loki-url", sink.url,
                            "--faults", str(faults)],
                           capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        lines = sink.lines()
    finally:
        sink.close()
    streams: dict[tuple, list[tuple[int, str]]] = {}
    for labels, ts, line in lines:
        assert set(labels) == set(CONTRACT_LABELS), labels
        streams.setdefault(tuple(sorted(labels.items())), []).append((int(ts), line))
    for entries in streams.values():  # nanosecond timestamps strictly increasing within a stream
        stamps = [ts for ts, _ in entries]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    by = {}
    for labels, _, line in lines:
        by.setdefault((labels["host"], labels["kind"]), []).append((labels, line))
    summary = json.loads((run / "summary.json").read_text())
    hosts = {"server-rank0-srv", "worker-rank0-w1", "worker-rank1-w2"}
    assert {h for h, _ in by} == hosts | {"controller"}
    fault_lines = [json.loads(line) for _, line in by[("controller", "faults")]]
    assert [f["action"] for f in fault_lines] == ["fired", "healed"] and by[("controller", "faults")][0][0]["job"] == "smolcluster-faults"
    assert f"logging: nodes push to {sink.url}" in p.stdout
    for host in sorted(hosts):
        logs, metrics = by[(host, "log")], by[(host, "metrics")]
        labels = logs[0][0]
        assert labels["algorithm"] == summary["algorithm"] and labels["run"] == run.name
        assert labels["job"] == ("smolcluster-server" if host.startswith("server") else "smolcluster-worker")
        assert all(f"level={lab['level']}" in line for lab, line in logs)  # the file's line, its level as a label
        assert all(json.loads(line)["event"] for _, line in metrics)
        node = {"server-rank0-srv": "srv", "worker-rank0-w1": "w1", "worker-rank1-w2": "w2"}[host]
        on_disk = (run / "nodes" / node / "metrics.jsonl").read_text().splitlines()
        assert [line for _, line in metrics] == on_disk  # every metrics line, nothing lost


def test_a_topology_can_name_its_loki(tmp_path):
    """loki_url passes through a topology's training: section to every node's config, checked like the configs."""
    topo = yaml.safe_load((REPO / "topologies" / "faults-small.yaml").read_text())
    topo["training"] = {**topo.get("training", {}), "loki_url": "http://10.10.0.1:3100"}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "smolcluster", "topology", "validate", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    topo["training"]["loki_url"] = 3100
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "smolcluster", "topology", "validate", str(path)], capture_output=True, text=True)
    assert p.returncode == 2 and "training.loki_url" in p.stderr
