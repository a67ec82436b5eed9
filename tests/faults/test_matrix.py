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

from smolcluster.core import algorithms
from smolcluster.testbed.faults.injector import read_fault_log
from smolcluster.testbed.faults.matrix import SCENARIOS, run_scenario, scenario

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
