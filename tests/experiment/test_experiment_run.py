"""`smolcluster experiment` for real: a tiny experiment (2 arms x 2 seeds on hybrid.yaml, 40 steps each)
through the local sim, then the same command again: every run kept, nothing rerun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = """\
name: tiny
topology: hybrid.yaml
max_steps: 40
seeds: [1, 2]
targets: [0.5, 0.8]
reference: false
arms:
  - {name: edp, algo: edp}
  - {name: syncps-auto, algo: syncps, timeout: auto, eval_steps: 10}
"""


def run(args, timeout):
    return subprocess.run([sys.executable, "-m", "smolcluster", "experiment", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_a_tiny_experiment_runs_every_arm_and_seed_and_resumes(tmp_path, mnist_dir):
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY)
    out = tmp_path / "exp"
    first = run([f, "--run-dir", out, "--json"], timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads(first.stdout)
    assert results == json.loads((out / "results.json").read_text())
    assert [(a["name"], a["algo"], a["seeds"]) for a in results["arms"]] == [("edp", "edp", [1, 2]), ("syncps-auto", "syncps", [1, 2])]
    for arm in results["arms"]:
        assert arm["final_accuracy"]["median"] > 0.8  # 40 steps of MNIST
        assert arm["final_accuracy"]["lo"] <= arm["final_accuracy"]["median"] <= arm["final_accuracy"]["hi"]
        assert arm["time_to"]["0.50"]["reached"] == 2 and 0 < arm["time_to"]["0.50"]["median"] <= arm["time_to"]["0.80"]["median"]
        assert arm["samples_per_s"]["median"] > 0 and arm["bytes_per_sample"]["median"] > 0
        for seed, r in arm["runs"].items():
            summary = json.loads((out / "runs" / f"{arm['name']}-seed{seed}" / "summary.json").read_text())
            assert summary["config"]["seed"] == int(seed) and summary["steps"] == 40
    # the adaptive deadline, live: the warm-up waits up to timeout_max (10 s), then it follows the arrivals
    auto = results["arms"][1]
    assert auto["deadline_s"]["median"] < 1.0
    server = out / "runs" / "syncps-auto-seed1" / "nodes" / "mini1" / "metrics.jsonl"
    updates = [json.loads(line) for line in server.read_text().splitlines() if '"update"' in line]
    assert all("deadline_s" in u and "arrival_s" in u for u in updates)
    assert updates[0]["deadline_s"] == 10.0 and max(u["deadline_s"] for u in updates[10:]) < 1.0
    assert "syncps-auto: deadline median" in (out / "report.txt").read_text()
    assert (out / "accuracy.png").exists() and (out / "time_to_target.png").exists()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    again = run([f, "--run-dir", out], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, kept") == 4 and "smolcluster sim:" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "report.txt").read_text() in again.stdout
