"""`smolcluster experiment`: the file's schema, the bootstrap, resume and results.json (fast: the runs are
small run directories written by a stand-in for the sim; tests/experiment/test_experiment_run.py runs
the real thing)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolcluster.common.errors import ConfigError
from smolcluster.resources import resource_path
from smolcluster.testbed.experiment.results import RESULTS, report_text
from smolcluster.testbed.experiment.runner import run_experiment
from smolcluster.testbed.experiment.spec import load_experiment
from smolcluster.testbed.experiment.stats import bootstrap_median, interval, time_to_interval

TINY = """\
name: tiny
topology: hybrid.yaml
max_steps: 40
seeds: [1, 2, 3]
targets: [0.9, 0.5]
reference: false
arms:
  - {name: edp, algo: edp}
  - {name: syncps-auto, algo: syncps, timeout: auto}
"""


def write(tmp_path: Path, text: str = TINY) -> Path:
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    return f


# --------------------------------------------------------------------------- stats


def test_bootstrap_median_and_interval():
    assert bootstrap_median([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    m, lo, hi = bootstrap_median([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0])
    assert m == 5.5 and 1.0 <= lo < m < hi < 100.0  # the median and its interval ignore the outlier
    assert bootstrap_median([1.0, 5.0, 9.0]) == bootstrap_median([1.0, 5.0, 9.0])  # seeded: the same runs, the same interval
    assert bootstrap_median([]) == (None, None, None)
    assert interval([0.5]) == {"median": 0.5, "lo": 0.5, "hi": 0.5}


def test_time_to_target_counts_unreached_seeds_as_never():
    two_of_three = time_to_interval([10.0, 12.0, None])
    assert two_of_three["median"] == 12.0 and two_of_three["reached"] == 2 and two_of_three["hi"] is None
    one_of_three = time_to_interval([None, 10.0, None])
    assert one_of_three["median"] is None and one_of_three["reached"] == 1
    assert time_to_interval([None, None]) == {"median": None, "lo": None, "hi": None, "reached": 0}


# --------------------------------------------------------------------------- the file


def test_the_bundled_stragglers_experiment_loads():
    exp = load_experiment(resource_path("experiments", "stragglers.yaml"))
    assert [(a.name, a.algo) for a in exp.arms] == [("edp", "edp"), ("syncps-fixed", "syncps"),
                                                    ("syncps-auto", "syncps"), ("ddp", "ddp")]
    auto = next(a for a in exp.arms if a.name == "syncps-auto")
    assert auto.topology.training.timeout == "auto" and auto.topology.training.min_workers == 2  # hybrid.yaml's
    assert exp.topology.name == "hybrid" and exp.reference and len(exp.seeds) >= 3
    assert exp.targets == (0.90, 0.95)


@pytest.mark.parametrize("edit, key, words", [
    (("reference: false", "reference: false\nsedes: [1]"), "sedes", "did you mean 'seeds'"),
    (("seeds: [1, 2, 3]", "seeds: []"), "seeds", "non-empty list"),
    (("seeds: [1, 2, 3]", "seeds: [1, 1]"), "seeds", "each seed once"),
    (("seeds: [1, 2, 3]", "seeds: [1, -2]"), "seeds[1]", "at least 0"),
    (("targets: [0.9, 0.5]", "targets: [95]"), "targets[0]", "at most 1"),
    (("algo: edp}", "algo: epd}"), "arms[0].algo", "edp or syncps or ddp"),
    (("name: syncps-auto", "name: edp"), "arms[1].name", "its own name"),
    (("name: syncps-auto", "name: 'a b'"), "arms[1].name", "letters, digits"),
    (("timeout: auto", "timeout: soon"), "arms[1].timeout", "auto"),
    (("timeout: auto", "timeout: auto, min_wrokers: 2"), "arms[1].min_wrokers", "did you mean 'min_workers'"),
    (("timeout: auto", "timeout: auto, seed: 3"), "arms[1].seed", "seeds list"),
    (("topology: hybrid.yaml", "topology: nowhere.yaml"), "topology", "relative to the experiment file"),
    (("reference: false", "reference: false\nfaults: nowhere.yaml"), "faults", "fault schedule file"),
    (("reference: false", "reference: false\nbackend: docker"), "backend", "local, compose, virtual"),
])
def test_bad_files_name_the_file_the_key_and_the_fix(tmp_path, edit, key, words):
    f = write(tmp_path, TINY.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_experiment(f)
    assert e.value.key == key and str(f) in str(e.value) and words in str(e.value)


def test_a_missing_topology_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_experiment(write(tmp_path, TINY.replace("topology: hybrid.yaml\n", "")))
    assert e.value.key == "topology" and "missing" in str(e.value)


# --------------------------------------------------------------------------- runs, resume, results


class StandIn:
    """Writes what a finished sim run leaves (metrics, summary.json) with numbers from the arm and seed;
    Ctrl-C after `stop_after` runs."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.stop_after = stop_after

    def __call__(self, arm_file: Path, seed: int, run_dir: Path) -> int:
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            run_dir.mkdir(parents=True)
            (run_dir / "half-done").write_text("")
            return 130
        arm = arm_file.stem
        self.calls.append((arm, seed))
        slow = 2.0 if arm == "syncps-auto" else 1.0
        t0 = 1_000_000.0
        accs = [(0.0, 0.1), (10 * slow + seed, 0.6), (20 * slow + seed, 0.8 + seed / 100)]
        (run_dir / "nodes" / "mini1").mkdir(parents=True)
        (run_dir / "nodes" / "mini2").mkdir(parents=True)
        lines = [{"time": t0, "event": "start"}] + [{"time": t0 + t, "event": "eval", "test_accuracy": a} for t, a in accs]
        (run_dir / "nodes" / "mini1" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run_dir / "nodes" / "mini2" / "metrics.jsonl").write_text(json.dumps({"time": t0 + 21, "event": "end", "samples": 6400}) + "\n")
        summary = {"algorithm": "edp", "wall_time_s": 32.0, "final_test_accuracy": accs[-1][1], "pushes_late": seed,
                   "pushes_rejected": 0, "evals": [{"t": t, "test_accuracy": a} for t, a in accs],
                   "nodes": [{"node": "mini2", "role": "worker", "bytes_in": 64000, "bytes_out": 64000}]}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0


def test_interrupted_then_resumed_keeps_finished_runs_and_writes_results(tmp_path):
    exp = load_experiment(write(tmp_path))
    root = tmp_path / "out"
    first = StandIn(stop_after=4)
    assert run_experiment(exp, root, out=open(tmp_path / "log1", "w"), run_one=first) == 130
    assert "resume with: smolcluster experiment" in (tmp_path / "log1").read_text()
    partial = json.loads((root / RESULTS).read_text())
    assert [len(a["seeds"]) for a in partial["arms"]] == [2, 2]  # seed-major: both arms' first seeds

    second = StandIn()
    assert run_experiment(exp, root, out=open(tmp_path / "log2", "w"), run_one=second) == 0
    assert second.calls == [("edp", 3), ("syncps-auto", 3)]  # the four finished ones skipped
    assert not (root / "runs" / "edp-seed3" / "half-done").exists()  # the interrupted run started over
    assert (tmp_path / "log2").read_text().count("finished before, kept") == 4

    results = json.loads((root / RESULTS).read_text())
    edp, auto = results["arms"]
    assert (edp["name"], edp["algo"], edp["seeds"]) == ("edp", "edp", [1, 2, 3])
    assert edp["final_accuracy"]["median"] == 0.82 and edp["final_accuracy"]["lo"] <= 0.82 <= edp["final_accuracy"]["hi"]
    assert edp["time_to"]["0.50"] == {"median": 12.0, "lo": pytest.approx(11.0), "hi": pytest.approx(13.0), "reached": 3}
    assert edp["time_to"]["0.90"]["reached"] == 0 and edp["time_to"]["0.90"]["median"] is None
    assert auto["time_to"]["0.50"]["median"] == 22.0  # twice as slow in the stand-in
    assert edp["samples_per_s"]["median"] == 200.0 and edp["bytes_per_sample"]["median"] == 20.0
    assert edp["late"]["median"] == 2
    assert results["targets"] == [0.5, 0.9]
    report = (root / "report.txt").read_text()
    assert report == report_text(results) and "not reached (0/3)" in report and "12.0 [11.0, 13.0] (3/3)" in report

    third = StandIn()  # nothing left: results rewritten, nothing run
    assert run_experiment(exp, root, out=open(tmp_path / "log3", "w"), run_one=third) == 0 and third.calls == []


def test_each_arm_is_compared_with_the_reference_on_its_samples(tmp_path):
    exp = load_experiment(write(tmp_path))
    root = tmp_path / "out"
    (root / "reference").mkdir(parents=True)
    for seed in exp.seeds:  # what run_references leaves: EDP's samples (one shard) and a synchronous step's (union)
        (root / "reference" / f"single-seed{seed}.json").write_text(json.dumps({"final_test_accuracy": 0.78 + seed / 100}))
        (root / "reference" / f"union-seed{seed}.json").write_text(json.dumps({"final_test_accuracy": 0.81 + seed / 100}))
    run_experiment(exp, root, out=open(tmp_path / "log", "w"), run_one=StandIn())
    edp, auto = json.loads((root / RESULTS).read_text())["arms"]
    assert edp["vs_reference_pt"] == {"reference": "single", "median": pytest.approx(2.0), "lo": pytest.approx(2.0), "hi": pytest.approx(2.0)}
    assert auto["vs_reference_pt"]["reference"] == "union" and auto["vs_reference_pt"]["median"] == pytest.approx(-1.0)
    assert "+2.00 [+2.00, +2.00] s" in (root / "report.txt").read_text()


def test_a_directory_grows_by_seeds_and_arms_but_refuses_another_experiment(tmp_path):
    root = tmp_path / "out"
    run_experiment(load_experiment(write(tmp_path)), root, out=open(tmp_path / "log", "w"), run_one=StandIn())
    more = StandIn()
    grown = TINY.replace("seeds: [1, 2, 3]", "seeds: [1, 2, 3, 4]").replace("arms:\n", "arms:\n  - {name: ddp, algo: ddp}\n")
    assert run_experiment(load_experiment(write(tmp_path, grown)), root, out=open(tmp_path / "log", "w"), run_one=more) == 0
    assert sorted(more.calls) == [("ddp", 1), ("ddp", 2), ("ddp", 3), ("ddp", 4), ("edp", 4), ("syncps-auto", 4)]
    for edit in (("seeds: [1, 2, 3, 4]", "seeds: [1, 2]"), ("timeout: auto", "timeout: 2.0"), ("max_steps: 40", "max_steps: 50")):
        with pytest.raises(ConfigError) as e:
            run_experiment(load_experiment(write(tmp_path, grown.replace(*edit))), root,
                           out=open(tmp_path / "log", "w"), run_one=StandIn())
        assert "holds a different experiment" in str(e.value) and "another --run-dir" in str(e.value)


def test_experiment_show_reprints_the_report(tmp_path):
    root = tmp_path / "out"
    run_experiment(load_experiment(write(tmp_path)), root, out=open(tmp_path / "log", "w"), run_one=StandIn())
    shown = subprocess.run([sys.executable, "-m", "smolcluster", "experiment", "show", str(root)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout == (root / "report.txt").read_text()
    as_json = subprocess.run([sys.executable, "-m", "smolcluster", "experiment", "show", str(root), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout) == json.loads((root / RESULTS).read_text())
    missing = subprocess.run([sys.executable, "-m", "smolcluster", "experiment", "show", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no results.json" in missing.stderr
