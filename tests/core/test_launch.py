"""The real-hardware launcher: one tmux session per host, ranks as in the cluster config, nothing run on --dry-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from smolcluster.deploy.launch import plan_launch

REPO = Path(__file__).resolve().parents[2]


def test_plan_matches_cluster_config():
    steps = plan_launch("syncps", REPO / "configs", "~/smolcluster", "demo")
    assert [s.host for s in steps] == ["mini1", "mini2", "mini3", "pi5", "pi4"]
    assert "server --algo syncps" in steps[0].command
    for rank, step in enumerate(steps[1:], start=1):
        assert f"worker {rank} {step.host} --algo syncps" in step.command
        assert f"runs/demo/{step.host}" in step.command
    argv = steps[1].ssh_argv("pi")
    assert argv[0] == "ssh" and "pi@mini2" in argv and "tmux new-session -d" in argv[-1]


def test_launch_script_dry_run_prints_ssh_commands_only():
    out = subprocess.run(["bash", str(REPO / "launch_edp.sh"), "--dry-run", "--run-name", "t"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("ssh ")]
    assert len(lines) == 5 and "worker 4 pi4 --algo edp" in lines[-1]


def test_bad_config_is_reported_with_file_and_key(tmp_path):
    (tmp_path / "nn_config.yaml").write_text("batch_size: 32\n")
    (tmp_path / "cluster_config_edp.yaml").write_text("host_ip: {a: 127.0.0.1}\nworkers: [a]\nnum_workers: 2\nserver: s\n")
    out = subprocess.run([sys.executable, "-m", "smolcluster", "launch", "--algo", "edp", "--config-dir", str(tmp_path),
                          "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cluster_config_edp.yaml: key 'num_workers'" in out.stderr and "fix:" in out.stderr
