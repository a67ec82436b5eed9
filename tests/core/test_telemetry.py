"""metrics.jsonl, logfmt log lines with Loki labels, and W&B that never prompts or crashes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smolcluster.core.training.telemetry import MetricsWriter, WandbRun, node_labels, parse_logfmt, setup_logging, wandb_run_name


def test_metrics_jsonl_lines_parse(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as m:
        m.write("eval", step=3, loss=torch.tensor(0.5), acc=0.91, per_layer={"fc1": 1.0}, bad=float("nan"))
        m.write("push", worker=1, bytes=1234, path=tmp_path)
        assert len(path.read_text().splitlines()) == 2  # line-buffered: visible before close
    m.write("after_close", x=1)  # ignored, no crash
    with MetricsWriter(path) as m2:  # appends
        m2.write("resume")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in rows] == ["eval", "push", "resume"]
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in rows)
    assert rows[0]["loss"] == 0.5 and rows[0]["per_layer"] == {"fc1": 1.0} and rows[0]["bad"] is None
    assert rows[1]["path"] == str(tmp_path)


LABELS = node_labels(role="server", rank=0, hostname="mini1", algorithm="edp", run="r1")
LINE = re.compile(r'^ts=\S+Z level=(\w+) job=smolcluster-server component=server host=server-rank0-mini1 rank=0 '
                  r'algorithm=edp run=r1 msg="([^"\\]|\\.)*"')


def test_log_lines_carry_labels_and_do_not_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "server.log"
    setup_logging(log, labels=LABELS)
    logger = setup_logging(log, labels=LABELS, stderr=False)
    logger.info("step closed", extra={"kv": {"step": 3, "workers": "mini2 mini3"}})
    logger.debug("hidden at INFO")
    try:
        raise ValueError('bad "frame"\nsecond line')
    except ValueError:
        logger.exception("dropped connection")
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines  # one handler only after two calls; the traceback stays on one line
    assert all(LINE.match(line) for line in lines), lines
    assert 'level=INFO' in lines[0] and 'step=3 workers="mini2 mini3"' in lines[0]
    assert 'level=ERROR' in lines[1] and 'exc="Traceback' in lines[1] and '\\"frame\\"' in lines[1]
    parsed = parse_logfmt(lines[1])
    assert parsed["msg"] == "dropped connection" and 'bad "frame"\nsecond line' in parsed["exc"]
    assert capsys.readouterr().err == ""  # second call turned stderr off
    assert logging.getLogger().handlers == [] or all(not getattr(h, "_smolcluster", False) for h in logging.getLogger().handlers)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def test_labels_follow_the_original_projects_naming() -> None:
    # mini2 is smolcluster's rank 1 and the original's worker 0
    assert node_labels(role="worker", rank=1, hostname="mini2", algorithm="syncps", run="x") == {
        "job": "smolcluster-worker", "component": "worker", "host": "worker-rank0-mini2", "rank": 0,
        "algorithm": "syncps", "run": "x"}
    assert node_labels(role="server", rank=0, hostname="mini1", algorithm="edp", run="x")["host"] == "server-rank0-mini1"


def test_wandb_name_and_off_mode_is_free(tmp_path: Path) -> None:
    assert wandb_run_name("edp", "worker", "mini2", 1, 0.001, 32) == "EDP-worker-mini2_rank1_lr0.001_bs32"
    assert wandb_run_name("syncps", "server", "mini1", 0, 0.01, 64) == "SyncPS-server-mini1_rank0_lr0.01_bs64"
    run = WandbRun(mode="off", algorithm="edp", role="server", hostname="mini1", rank=0, lr=0.001,
                   batch_size=32, config={}, run_dir=tmp_path)
    assert not run.active
    run.log({"loss": 1.0}, step=1)
    run.finish()
    assert not (tmp_path / "wandb").exists()


def test_wandb_bad_mode_degrades_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="smolcluster.wandb"):
        run = WandbRun(mode="sometimes", algorithm="edp", role="server", hostname="h", rank=0, lr=0.1,
                       batch_size=8, config={}, run_dir=tmp_path)
        run.log({"x": 1})
        run.finish()
    assert not run.active and len(caplog.records) == 1 and "unknown wandb mode" in caplog.text


WANDB_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from smolcluster.core.training.telemetry import WandbRun
    run_dir = Path(sys.argv[1])
    mode = sys.argv[2]
    run = WandbRun(mode=mode, algorithm="syncps", role="worker", hostname="pi5", rank=2, lr=0.001,
                   batch_size=32, config={"lr": 0.001}, run_dir=run_dir)
    for step in range(5):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
    run.finish()
    run.log({"loss": 0.0}, step=9)  # safe after finish
    print(json.dumps({"name": run.name, "mode": run.mode, "files": str(run.files_dir)}))
""")


@pytest.mark.parametrize("mode", ["auto", "online"])
def test_wandb_offline_without_key_never_prompts(tmp_path: Path, mode: str) -> None:
    """No key, no WANDB_MODE, no netrc, stdin closed: 'auto' (and 'online') log offline under run_dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no ~/.config/wandb settings
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", WANDB_CHILD, str(run_dir), mode], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "SyncPS-worker-pi5_rank2_lr0.001_bs32" and out["mode"] == "offline"
    files = Path(out["files"])
    assert files.parent == run_dir / "wandb" and files.name.startswith("offline-run-")
    logs = list(files.glob("run-*.wandb"))  # the offline log `wandb sync` uploads later
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    assert "Enter your choice" not in proc.stdout + proc.stderr  # W&B's login prompt


@pytest.mark.slow
def test_every_worker_logs_throughput_and_step_time_to_wandb(tmp_path: Path, mnist_dir: Path) -> None:
    """A sim run with --wandb (offline, no key): each worker's W&B history has its samples/s and step time."""
    pytest.importorskip("wandb")
    from helpers import wandb_history

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(SMOLCLUSTER_DATA_DIR=str(mnist_dir), WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path / "home"))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(Path(__file__).resolve().parents[2] / "topologies" / "faults-small.yaml"),
                           "--max-steps", "40", "--run-dir", str(run), "--wandb"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for worker in ("w1", "w2"):
        history = [h for h in wandb_history(run / "nodes" / worker) if "perf/samples_per_s" in h]
        assert history, f"{worker}: no throughput in its W&B run"
        assert all(h["perf/samples_per_s"] > 0 and h["perf/step_time_s"] > 0 for h in history), history[:3]
        assert all(k in history[-1] for k in ("train/loss", "perf/compute_s", "perf/comm_s", "perf/wait_s"))
