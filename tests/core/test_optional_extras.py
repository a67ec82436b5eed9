"""wandb and matplotlib are optional extras: a node (a Raspberry Pi, say) trains without either, and
nothing imports them unless asked to. "Not installed" is real to Python here: a sitecustomize on
PYTHONPATH blocks both imports in every process the test starts, nodes included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = "import sys\nsys.modules['wandb'] = None\nsys.modules['matplotlib'] = None\n"


@pytest.fixture
def without_extras(tmp_path) -> dict[str, str]:
    """An environment whose Python processes cannot import wandb or matplotlib."""
    site = tmp_path / "no-extras"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_nothing_imports_wandb_or_matplotlib_unless_asked():
    code = ("import sys, smolcluster.cli, smolcluster.core.training.node, smolcluster.core.algorithms.edp, "
            "smolcluster.core.algorithms.syncps, smolcluster.testbed.sim.run, smolcluster.testbed.report\n"
            "print(json.dumps(sorted(m for m in ('wandb', 'matplotlib') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_wandb_missing_means_off_for_auto_and_one_warning_otherwise(tmp_path, without_extras):
    child = ("import json, logging, sys\n"
             "from smolcluster.core.training.telemetry import WandbRun\n"
             "logging.basicConfig(level=logging.WARNING)\n"
             "runs = [WandbRun(mode=m, algorithm='edp', role='worker', hostname='pi5', rank=1, lr=0.001, batch_size=32,\n"
             "                 config={}, run_dir=sys.argv[1]) for m in ('auto', 'offline')]\n"
             "for r in runs: r.log({'loss': 1.0}, step=1); r.finish()\n"
             "print(json.dumps([r.active for r in runs]))")
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "run")], env=without_extras, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [False, False]
    warnings = [l for l in out.stderr.splitlines() if "wandb" in l.lower()]
    assert len(warnings) == 1 and "mode 'offline' but wandb is not installed" in warnings[0]
    assert "pip install 'smolcluster[wandb]'" in warnings[0]
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.slow
def test_a_sim_runs_without_the_extras_and_says_the_plots_were_skipped(tmp_path, without_extras, mnist_dir):
    run_dir = tmp_path / "run"
    env = {**without_extras, "SMOLCLUSTER_DATA_DIR": str(mnist_dir)}
    r = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(REPO / "topologies" / "faults-small.yaml"),
                        "--max-steps", "40", "--wandb", "--run-dir", str(run_dir)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "plots: skipped (matplotlib is not installed: pip install 'smolcluster[plots]')" in r.stdout
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 40 and s["final_test_accuracy"] > 0.5
    assert not list(run_dir.glob("*.png")) and not list(run_dir.glob("nodes/*/wandb"))
    rep = subprocess.run([sys.executable, "-m", "smolcluster", "report", str(run_dir)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "final test accuracy" in rep.stdout and "plots: skipped" in rep.stdout
