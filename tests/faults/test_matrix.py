"""The fault-injection suite: every fault x {EDP, SyncPS} as a real short `smolcluster sim` run.

Each run must end by itself within the scenario's bound (no hang), reach the stated accuracy floor,
keep consistent accounting (every push applied, late or rejected with a reason), leave a last
checkpoint that loads at the final version, and list the fault in faults.jsonl and the summary.
The checks live in smolcluster.testbed.faults.matrix so `smolcluster faults matrix` reports the same thing.
~20 runs of ~20-30 s each on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smolcluster.common.errors import ConfigError
from smolcluster.core import algorithms
from smolcluster.resources import resource_path
from smolcluster.testbed.faults.injector import read_fault_log
from smolcluster.testbed.faults.matrix import SCENARIOS, Roles, roles_for, run_scenario, scenario

pytestmark = pytest.mark.slow

IN_MATRIX = [a for a in algorithms.BUILTIN if a.fault_matrix is not None]
CASES = [pytest.param(sc.fault, a.name, id=f"{sc.fault}-{a.name}") for sc in SCENARIOS for a in IN_MATRIX]
FLOOR = {a.name: a.fault_matrix.floor for a in IN_MATRIX}
MAX_STEPS = {a.name: a.fault_matrix.max_steps for a in IN_MATRIX}


@pytest.mark.parametrize("fault, algo", CASES)
def test_fault_run_ends_trains_and_accounts(fault, algo, tmp_path, mnist_dir):
    sc = scenario(fault)
    outcome = run_scenario(sc, algo, tmp_path / f"{fault}-{algo}", env={"SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
    assert outcome.passed, "\n".join(outcome.problems) + f"\nrun dir: {outcome.run_dir}"
    # the headline properties, spelled out (check_run already enforces them)
    assert outcome.wall_s < sc.bound_s
    assert outcome.final_test_accuracy is not None and outcome.final_test_accuracy >= FLOOR[algo]
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS[algo]
    fired = [e for e in read_fault_log(outcome.run_dir) if e["action"] == "fired"]
    assert [e["fault"] for e in fired] == [e["name"] for e in sc.faults(algo)]
    assert [r["fault"] for r in summary["faults"]] == [e["fault"] for e in fired]


def test_matrix_command_prints_json(tmp_path, mnist_dir):
    """`smolcluster faults matrix --json` on one pair: the documented shape, the same checks."""
    out = subprocess.run([sys.executable, "-m", "smolcluster", "faults", "matrix", "--json", "--faults", "connection_reset",
                          "--algos", "edp", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads(out.stdout)["results"]
    assert len(results) == 1
    r = results[0]
    assert {"fault", "algorithm", "passed", "final_test_accuracy", "recovery_s"} <= set(r)
    assert (r["fault"], r["algorithm"], r["passed"]) == ("connection_reset", "edp", True)
    assert r["final_test_accuracy"] >= FLOOR["edp"]
    assert r["recovery_s"] is None or r["recovery_s"] >= 0
    assert "connection_reset x edp: pass" in out.stderr


def test_matrix_command_rejects_unknown_names(tmp_path):
    out = subprocess.run([sys.executable, "-m", "smolcluster", "faults", "matrix", "--faults", "meteor", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown fault scenario 'meteor'" in out.stderr and "kill" in out.stderr


def test_matrix_on_a_topology_with_other_node_names(tmp_path, mnist_dir):
    """faults-small.yaml with its nodes renamed: the scenarios hit the roles the topology gives them."""
    renamed = tmp_path / "renamed.yaml"
    text = resource_path("topologies", "faults-small.yaml").read_text()
    for old, new in (("srv:", "hub:"), ("w1:", "alpha:"), ("w2:", "beta:")):
        text = text.replace(f"  {old}", f"  {new}")
    renamed.write_text(text)
    assert roles_for(renamed) == Roles(server="hub", worker="alpha", link="alpha->hub")
    outcome = run_scenario(scenario("partition"), "edp", tmp_path / "partition-edp", topology=renamed,
                           env={"SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
    assert outcome.passed, "\n".join(outcome.problems) + f"\nrun dir: {outcome.run_dir}"
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    cut, heal = summary["faults"]
    assert (cut["fault"], cut["target"], heal["fault"]) == ("cut-alpha", "alpha->hub", "heal-alpha")
    assert heal["ends"] == [{"fault": "cut-alpha", "after_s": pytest.approx(cut["healed_after_s"], abs=0.01)}]


def test_matrix_needs_two_workers_and_says_so(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("networks: {lan: {subnet: 10.9.0.0/24, profile: ethernet-1g}}\n"
                   "nodes:\n  s: {role: server, device: mac-mini, addresses: {lan: 10.9.0.1}}\n"
                   "  w: {role: worker, device: mac-mini, addresses: {lan: 10.9.0.2}}\n")
    with pytest.raises(ConfigError, match="at least two workers"):
        roles_for(one)
    out = subprocess.run([sys.executable, "-m", "smolcluster", "faults", "matrix", "--topology", str(one), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least two workers" in out.stderr and "one.yaml" in out.stderr


def test_a_worker_still_reconnecting_when_the_server_ended_is_not_a_failure():
    """Killed and restarted on a loaded machine, a worker's new process may come up only after the server
    finished: its reconnect attempts then all follow the server's end, and it could not have joined."""
    from smolcluster.testbed.faults.matrix import _cut_off_at_end

    server = [{"time": 10.0, "event": "update"}, {"time": 10.5, "event": "end"}]
    came_back_late = [{"time": 1.0, "event": "join"}, {"time": 4.0, "event": "step"},
                      {"time": 12.0, "event": "disconnect"}, {"time": 12.5, "event": "disconnect"}]
    cut_off = [{"time": 1.0, "event": "join"}, {"time": 10.4, "event": "disconnect"}, {"time": 11.0, "event": "disconnect"}]
    assert _cut_off_at_end(came_back_late, server) and _cut_off_at_end(cut_off, server)
    assert not _cut_off_at_end(came_back_late[:2], server)  # stopped mid-run without a word: a failure
    assert not _cut_off_at_end(cut_off, server[:1])  # the server never ended
