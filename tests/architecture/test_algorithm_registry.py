"""The algorithm registry is the one place that says what an algorithm is: a third one, kept in this
folder (localsgd_algorithm.py) and named in $SMOLCLUSTER_ALGORITHMS, validates, starts and trains
through `smolcluster sim` without a line of smolcluster changed for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.common.jsonl import read_jsonl
from smolcluster.core import algorithms
from smolcluster.core.algorithms import edp, syncps
from smolcluster.core.training.config import load_run_config
from smolcluster.core.training.telemetry import wandb_run_name
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.topology import load_topology

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SMALL = REPO / "topologies" / "faults-small.yaml"
PLUGIN = {"PYTHONPATH": str(HERE), algorithms.PLUGINS_ENV: "localsgd_algorithm"}


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv(algorithms.PLUGINS_ENV, "localsgd_algorithm")


def test_the_builtins():
    assert algorithms.names() == ("edp", "syncps", "ddp")
    assert algorithms.get("edp").server_class() is edp.Server and algorithms.get("syncps").worker_class() is syncps.Worker
    assert [algorithms.display_name(n) for n in ("edp", "syncps", "ddp", "other")] == ["EDP", "SyncPS", "DDP", "other"]
    assert algorithms.in_fault_matrix() == ("edp", "syncps")  # a DDP group stops when a rank dies
    for a in algorithms.BUILTIN:  # the class a node starts speaks the name its workers' HELLO carries
        assert a.server_class().algorithm == a.worker_class().algorithm == a.name


def test_an_unknown_algorithm_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown algorithm 'meteor'.*use edp or syncps"):
        load_run_config(tmp_path, "meteor")


def test_a_third_algorithm_needs_no_change_in_smolcluster():
    sources = [p for p in (REPO / "smolcluster").rglob("*.py") if "localsgd" in p.read_text().lower()]
    assert sources == []


def test_a_third_algorithm_validates_and_gets_its_defaults(plugin, tmp_path):
    assert algorithms.names() == ("edp", "syncps", "ddp", "localsgd")
    topo_file = tmp_path / "small.yaml"
    topo_file.write_text(SMALL.read_text().replace("algorithm: edp", "algorithm: localsgd"))
    topo = load_topology(topo_file)
    assert topo.training.algorithm == "localsgd"
    cfg = write_run_configs(topo, tmp_path / "config", RunOverrides(), server_address=lambda w: "127.0.0.1", port=0)
    assert (cfg.cluster.algorithm, cfg.cluster.push_interval, cfg.cluster.worker_update_interval) == ("localsgd", 10, 10)
    assert (tmp_path / "config" / "cluster_config_localsgd.yaml").exists()
    assert wandb_run_name("localsgd", "worker", "w1", 1, 0.001, 32) == "LocalSGD-worker-w1_rank1_lr0.001_bs32"


def test_a_broken_plugin_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(algorithms.PLUGINS_ENV, "no_such_module_here")
    with pytest.raises(ConfigError, match=r"\$SMOLCLUSTER_ALGORITHMS: key 'no_such_module_here'"):
        algorithms.names()


@pytest.mark.slow
def test_a_third_algorithm_trains_through_smolcluster_sim(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, **PLUGIN, "SMOLCLUSTER_DATA_DIR": str(mnist_dir)}
    r = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(SMALL), "--algo", "localsgd", "--max-steps", "60",
                        "--run-dir", str(run_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["algorithm"] == "localsgd" and s["steps"] == 60 and s["stop_reason"] == "max_steps 60 reached"
    assert s["final_test_accuracy"] >= 0.85
    assert s["pushes_rejected"] == 0 and s["connections_rejected"] == 0  # the workers' HELLO matched the server
    cluster = yaml.safe_load((run_dir / "config" / "cluster_config_localsgd.yaml").read_text())
    assert cluster["push_interval"] == 10  # the registry entry's defaults reached the nodes
    pushed = [e["step"] for e in read_jsonl(run_dir / "nodes" / "w1" / "metrics.jsonl") if e["event"] == "step" and e.get("status") == "applied"]
    assert pushed and all(step % 10 == 0 for step in pushed)  # ten local steps between exchanges
