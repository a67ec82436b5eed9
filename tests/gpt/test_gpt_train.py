"""`smolcluster train`: a short offline run learns, best.smcl only on improvement, --resume continues."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.config import load_gpt_config
from smolcluster.core.training.train_gpt import BEST_NAME, train_gpt


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolcluster", "train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.slow
def test_a_short_offline_run_learns_and_says_what_it_trained_on(tiny_config, tmp_path):
    config = tiny_config({"training": {"max_steps": 120, "eval_interval": 40, "checkpoint_interval": 50},
                          "logging": {"wandb": "offline", "project_name": "gpt-test-project"}})
    run = tmp_path / "run"
    out = run_cli("--config", str(config), "--run-dir", str(run), "--override", "training.learning_rate=4e-3",
                  "model.dropout=0.05", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    # a uniform guess over 512 tokens is perplexity 512; 120 steps of 1,024 tokens get well below it
    assert s["initial_val_perplexity"] > 300, s
    assert s["best_val_perplexity"] < 0.4 * s["initial_val_perplexity"], s
    assert s["best_val_loss"] == pytest.approx(math.log(s["best_val_perplexity"]))
    assert s["steps"] == 120 and s["tokens"] == 120 * 16 * 64 and s["tokens_per_s"] > 0
    assert (s["train_split"], s["eval_split"]) == ("valid", "test")
    assert s["tokenizer"]["name"] == "bpe-512" and s["tokenizer"]["vocab_size"] == 512
    assert s["config"]["training"]["learning_rate"] == 4e-3  # the override
    assert s["wandb"] == {"mode": "offline", "project": "gpt-test-project"}
    assert list((run / "wandb").glob("offline-run-*"))
    # every output says the offline split: progress (stderr), log, summary, config.yaml
    note = "training on valid, evaluating on test"
    assert note in out.stderr and note in s["data"]["note"] and note in (run / "train.log").read_text()
    assert note in (run / "config.yaml").read_text() and "bpe-512" in (run / "config.yaml").read_text()
    assert "test loss" in out.stderr and "perplexity" in out.stderr and "120/120" in out.stderr
    assert [e["step"] for e in events(run, "eval")] == [0, 40, 80, 120]
    assert [e["step"] for e in events(run, "checkpoint")] == [50, 100, 120]
    assert load_gpt_config(run / "config.yaml").batch_size() == 16  # the run's config loads back


class CtrlCAt:
    """A progress stream that raises KeyboardInterrupt when the bar reaches `step`: Ctrl-C at that step."""

    def __init__(self, step: int, total: int):
        self.mark, self.text = f" {step}/{total} ", io.StringIO()

    def write(self, s: str) -> None:
        self.text.write(s)
        if self.mark in s:
            raise KeyboardInterrupt

    def flush(self) -> None:
        pass


@pytest.mark.slow
def test_resume_continues_step_data_position_and_schedule(tiny_config, tmp_path):
    changes = {"model": {"dropout": 0.1}, "training": {"max_steps": 40, "eval_interval": 20, "eval_batches": 2,
                                                       "checkpoint_interval": 10},
               "lr_schedule": {"warmup_iters": 8}}
    gpt = load_gpt_config(tiny_config(changes))
    whole = train_gpt(gpt, tmp_path / "whole", progress_out=io.StringIO())

    stopped = train_gpt(gpt, tmp_path / "stopped", progress_out=CtrlCAt(26, 40))
    assert stopped["stop_reason"] == "interrupted" and stopped["steps"] == 26
    state = ckpt.load_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert state.step == 26 and state.server_data_step == 26

    out = run_cli("--run-dir", str(tmp_path / "stopped"), "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert resumed["steps"] == 40 and resumed["stop_reason"] == "finished"
    lr_whole = {e["step"]: e["lr"] for e in events(tmp_path / "whole", "step")}
    lr_resumed = {e["step"]: e["lr"] for e in events(tmp_path / "stopped", "step")}
    assert lr_resumed == pytest.approx(lr_whole)  # steps 27..40 at the rates the uninterrupted run used
    loss_whole = {e["step"]: e["loss"] for e in events(tmp_path / "whole", "step")}
    loss_resumed = {e["step"]: e["loss"] for e in events(tmp_path / "stopped", "step")}
    assert loss_resumed[27] == pytest.approx(loss_whole[27], rel=1e-4)  # the same batch, weights and dropout masks
    assert resumed["final_val_loss"] == pytest.approx(whole["final_val_loss"], rel=1e-3)
    assert resumed["initial_val_loss"] == whole["initial_val_loss"]  # carried over, not re-measured


@pytest.mark.slow
def test_resume_refuses_a_different_model_and_a_second_config(tiny_config, tmp_path):
    gpt = load_gpt_config(tiny_config({"training": {"max_steps": 4, "eval_interval": 2, "eval_batches": 1}}))
    train_gpt(gpt, tmp_path / "run", progress_out=io.StringIO())
    out = run_cli("--run-dir", str(tmp_path / "run"), "--resume", "--override", "model.num_layers=3", cwd=tmp_path)
    assert out.returncode == 2 and "differs from the checkpoint" in out.stderr and "model" in out.stderr, out.stderr
    out = run_cli("--run-dir", str(tmp_path / "run"), "--resume", "--config", str(tmp_path / "gpt.yaml"), cwd=tmp_path)
    assert out.returncode == 2 and "keeps its own config" in out.stderr, out.stderr


@pytest.mark.slow
def test_best_checkpoint_is_written_only_when_validation_improves(tiny_config, tmp_path):
    # a learning rate far too high makes validation loss go up and down: some evals improve, some do not
    gpt = load_gpt_config(tiny_config({"training": {"max_steps": 24, "eval_interval": 2, "eval_batches": 1,
                                                    "learning_rate": 0.05, "grad_clip_norm": None},
                                       "lr_schedule": {"warmup_iters": 0, "min_lr": 0.05}}))
    run = tmp_path / "run"
    summary = train_gpt(gpt, run, progress_out=io.StringIO())
    evals = events(run, "eval")
    best_so_far, improved_at = math.inf, []
    for e in evals:
        if e["val_loss"] < best_so_far:
            best_so_far = e["val_loss"]
            if e["step"] > 0:
                improved_at.append(e["step"])
        assert e["improved"] == (e["step"] in improved_at or e["step"] == 0)
    assert len(improved_at) < len(evals) - 1, "every eval improved: the test would not show anything"
    assert [e["step"] for e in events(run, "best")] == improved_at
    best = ckpt.load_checkpoint(run / "checkpoints", name=BEST_NAME)
    assert best.step == improved_at[-1] == summary["best_step"]
    assert best.counters["best_val_loss"] == pytest.approx(best_so_far) == pytest.approx(summary["best_val_loss"])


def test_the_device_setting_applies(tiny_config, tmp_path):
    from smolcluster.common.errors import ConfigError
    from smolcluster.core.training.device import Accelerators
    from smolcluster.core.training.train_gpt import GPTTrainer

    path = tiny_config({"training": {"device": "cuda"}})
    with pytest.raises(ConfigError) as e:
        GPTTrainer(load_gpt_config(path), tmp_path / "run", available=Accelerators(mps=False, cuda=False))
    msg = str(e.value)
    assert str(path) in msg and "'training.device'" in msg and "sees no CUDA GPU" in msg and "training.device: cpu" in msg
    trainer = GPTTrainer(load_gpt_config(tiny_config({"training": {"device": "auto"}})), tmp_path / "run2",
                         available=Accelerators(mps=False, cuda=False))
    try:
        assert trainer.device.type == "cpu" and next(trainer.model.parameters()).device.type == "cpu"
    finally:
        trainer.close()
