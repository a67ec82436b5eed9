"""`smolcluster train`: the GPT of gpt_config.yaml trained in one process, as the original's train.py.

One loop, nanoGPT style: a batch of windows of the training split (batch_at(step): the data position is
the step), AdamW with weight decay on the matrices, gradient clipping, a linear warmup then cosine decay
to min_lr (core/training/optim.py LRSchedule), validation loss and perplexity every eval_interval steps.

What a run leaves in RUN_DIR:
- config.yaml     the config as run (auto batch size and epochs filled in; `--config` takes it back)
- train.log       logfmt lines (Loki labels job=smolcluster-train)
- metrics.jsonl   start / step / eval / checkpoint / best / end events
- checkpoints/    checkpoint.smcl every checkpoint_interval steps and at the end; best.smcl whenever the
                  validation loss improves. Both in the server's checkpoint format (one wire frame,
                  written atomically, nothing unpickled); --resume continues from checkpoint.smcl with
                  the step, the data position and the LR schedule where they were.
- summary.json    initial / best / final validation loss and perplexity, steps, tokens/s, the tokenizer
                  and the splits (offline: trained on valid, evaluated on test)
- wandb/          the W&B run (project logging.project_name; offline without an API key, never prompting)
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.common.files import write_atomic
from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.config import GPTConfig
from smolcluster.core.training.device import Accelerators, pick_device, torch_info
from smolcluster.core.training.models import build_model, loss_fn
from smolcluster.core.training.optim import LRSchedule, build_optimizer, clip_grads_, optimizer_steps
from smolcluster.core.training.tasks import TextTask, wikitext_data
from smolcluster.core.training.telemetry import MetricsWriter, Progress, WandbRun, peak_rss_mb, setup_logging

ALGORITHM = "gpt-train"  # what the checkpoints say they are
BEST_NAME = "best.smcl"
CONFIG_NAME = "config.yaml"


def default_run_dir(now: float | None = None) -> Path:
    return Path("runs") / f"gpt-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


class GPTTrainer:
    """The state of one run; train() runs it to the end (or to Ctrl-C, which still checkpoints)."""

    def __init__(self, gpt: GPTConfig, run_dir: Path, *, resume: bool = False, progress_out: Any = None,
                 available: Accelerators | None = None):
        self.gpt, self.run_dir, self.resume = gpt, Path(run_dir), resume
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = gpt.training
        labels = {"job": "smolcluster-train", "component": "train", "host": socket.gethostname(), "rank": 0,
                  "algorithm": "single", "run": self.run_dir.resolve().name}
        self.log = setup_logging(self.run_dir / "train.log", labels=labels, stderr=False)
        self.device = pick_device(t.device, available, file=gpt.file, key="training.device")
        text, self.about = wikitext_data(gpt, self.log)
        self.batch_size = gpt.batch_size()
        self.task = TextTask(text, 1, self.batch_size, t.seed, eval_batches=t.eval_batches,
                             eval_batch_size=self.batch_size, about=self.about)
        self.batches = self.task.batches(0)
        self.model_cfg = gpt.model_config(vocab_size=text.vocab_size)
        self.model = build_model(self.model_cfg, seed=t.seed).to(self.device)
        self.optimizer = build_optimizer("adamw", self.model.parameters(), t.learning_rate, weight_decay=t.weight_decay)
        self.steps_per_epoch = self.task.steps_per_epoch
        self.total_steps = t.max_steps or gpt.epochs() * self.steps_per_epoch
        self.schedule = LRSchedule(t.learning_rate, gpt.lr_schedule.min_lr, gpt.lr_schedule.warmup_iters, self.total_steps)
        self.schedule.attach(self.optimizer)
        self.step = 0
        self.initial_val: float | None = None
        self.best_val, self.best_step = math.inf, -1
        self.last_val: float | None = None
        self.tokens = 0
        self.train_seconds = 0.0
        self.progress_out = progress_out
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
        if resume:
            self._load()
        write_atomic(self.run_dir / CONFIG_NAME, self._config_text())
        self.wandb = WandbRun(mode=gpt.logging.wandb, algorithm="GPT", role="train", hostname=socket.gethostname(), rank=0,
                              lr=t.learning_rate, batch_size=self.batch_size, config=gpt.resolved() | self.about,
                              run_dir=self.run_dir, logger=self.log, project=gpt.logging.project_name)

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> ckpt.ServerState:
        counters = {"initial_val_loss": self.initial_val, "best_val_loss": self.best_val if self.best_step >= 0 else None,
                    "best_step": self.best_step, "last_val_loss": self.last_val, "tokens": self.tokens,
                    "train_seconds": self.train_seconds, "model": self._model_id()}
        return ckpt.ServerState(algorithm=ALGORITHM, version=self.step, step=self.step, model=self.model.state_dict(),
                                optimizer=self.optimizer.state_dict(), server_data_step=self.step, counters=counters)

    def _model_id(self) -> dict:
        return {"model": self.gpt.resolved()["model"], "vocab_size": self.model_cfg.vocab_size,
                "tokenizer": self.about["tokenizer"]["name"]}

    def save(self, name: str = ckpt.CHECKPOINT_NAME) -> Path:
        path = ckpt.save_checkpoint(self.ckpt_dir, self._state(), name=name)
        self.metrics.write("best" if name == BEST_NAME else "checkpoint", step=self.step, path=str(path),
                           val_loss=self.last_val)
        return path

    def _load(self) -> None:
        state = ckpt.load_checkpoint(self.ckpt_dir)
        if state.algorithm != ALGORITHM:
            raise ckpt.CheckpointError(f"{self.ckpt_dir} holds a {state.algorithm} checkpoint, not one of smolcluster train")
        c = state.counters
        if c.get("model") != self._model_id():
            raise ConfigError(self.gpt.file, "model", f"differs from the checkpoint's ({c.get('model')})",
                              "resume with the run's own config (RUN_DIR/config.yaml) or start a new run dir")
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.step = state.step
        self.initial_val = c.get("initial_val_loss")
        self.best_val = c["best_val_loss"] if c.get("best_val_loss") is not None else math.inf
        self.best_step, self.last_val = int(c.get("best_step", -1)), c.get("last_val_loss")
        self.tokens, self.train_seconds = int(c.get("tokens", 0)), float(c.get("train_seconds", 0.0))
        if optimizer_steps(self.optimizer) != self.step:
            raise ckpt.CheckpointError(f"{self.ckpt_dir}: the optimizer made {optimizer_steps(self.optimizer)} updates "
                                       f"but the checkpoint is at step {self.step}")
        self.log.info(f"resumed from {self.ckpt_dir} at step {self.step} of {self.total_steps}")
        self.metrics.write("resume", step=self.step, lr=self.schedule.lr(self.step))

    def _config_text(self) -> str:
        tok = self.about["tokenizer"]
        header = (f"# the config smolcluster train ran (auto values filled in); tokenizer {tok['name']} "
                  f"({tok['vocab_size']} tokens, from {tok['source']})\n# {self.about['data']['note']}\n")
        return header + yaml.safe_dump(self.gpt.resolved(), sort_keys=False)

    # ------------------------------------------------------------------ training

    def evaluate(self) -> float:
        loss, _ = self.task.evaluate(self.model)
        return loss

    def run_eval(self, progress: Progress) -> float:
        loss = self.evaluate()
        self.last_val = loss
        improved = loss < self.best_val
        if self.initial_val is None:
            self.initial_val = loss
        split = self.about["data"]["eval_split"]
        self.metrics.write("eval", step=self.step, val_loss=loss, val_perplexity=perplexity(loss), split=split, improved=improved)
        self.wandb.log({"val/loss": loss, "val/perplexity": perplexity(loss)}, step=self.step)
        line = f"step {self.step}: {split} loss {loss:.4f}, perplexity {perplexity(loss):.1f}" + (" (best)" if improved else "")
        self.log.info(line)
        progress.note(line)
        if improved:
            self.best_val, self.best_step = loss, self.step
            if self.step > 0:
                self.save(BEST_NAME)
        return loss

    def train(self) -> dict:
        t, data = self.gpt.training, self.about["data"]
        tok = self.about["tokenizer"]
        params = sum(p.numel() for p in self.model.parameters())
        intro = (f"GPT {params / 1e6:.2f}M parameters on {self.device}; {data['note']}; tokenizer {tok['name']} "
                 f"({tok['vocab_size']} tokens); batch {self.batch_size} x {self.model_cfg.block_size} tokens, "
                 f"{self.steps_per_epoch} steps an epoch, {self.total_steps} steps")
        self.log.info(intro)
        self.metrics.write("start", step=self.step, total_steps=self.total_steps, parameters=params, device=str(self.device),
                           tokenizer=tok, data=data, config=self.gpt.resolved())
        progress = Progress(self.total_steps, out=self.progress_out, label=f"train on {data['train_split']} ")
        progress.note(intro)
        stop_reason = "finished"
        tokens_per_step = self.batch_size * self.model_cfg.block_size
        last_loss = float("nan")
        started = time.time()
        try:
            if self.initial_val is None:
                self.run_eval(progress)
            self.model.train()
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                torch.manual_seed(t.seed + self.step)  # dropout: the same masks on a resumed run
                x, y = self.batches.batch_at(self.step)
                self.model.zero_grad(set_to_none=True)
                loss = loss_fn(self.model, x, y)
                loss.backward()
                clip_grads_(self.model, t.grad_clip_norm or 0.0)
                lr = self.schedule.lr(self.step)
                self.optimizer.step()
                self.step += 1
                self.tokens += tokens_per_step
                last_loss = float(loss.detach())
                self.train_seconds += time.perf_counter() - t0
                tps = self.tokens / max(self.train_seconds, 1e-9)
                self.metrics.write("step", step=self.step, loss=last_loss, lr=lr, epoch=(self.step - 1) // self.steps_per_epoch)
                if self.step % 10 == 0 or self.step == self.total_steps:
                    self.wandb.log({"train/loss": last_loss, "lr": lr, "perf/tokens_per_s": tps}, step=self.step)
                progress.update(self.step, f"loss {last_loss:.3f} lr {lr:.2e} {tps:,.0f} tok/s")
                if self.step % t.eval_interval == 0 or self.step == self.total_steps:
                    self.run_eval(progress)
                if t.checkpoint_interval and self.step % t.checkpoint_interval == 0 and self.step < self.total_steps:
                    self.save()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            self.log.warning(f"interrupted at step {self.step}: writing a checkpoint and the summary")
            progress.note(f"interrupted at step {self.step}: checkpoint written, continue with --resume")
        finally:
            progress.close()
        self.save()
        return self.finish(stop_reason, last_loss, time.time() - started)

    def finish(self, stop_reason: str, last_loss: float, wall: float) -> dict:
        data, tok = self.about["data"], self.about["tokenizer"]
        summary = {
            "stop_reason": stop_reason,
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": self.step / self.steps_per_epoch,
            "batch_size": self.batch_size,
            "seq_len": self.model_cfg.block_size,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / max(self.train_seconds, 1e-9), 1),
            "train_seconds": round(self.train_seconds, 3),
            "wall_time_s": round(wall, 3),
            "initial_val_loss": self.initial_val,
            "initial_val_perplexity": perplexity(self.initial_val) if self.initial_val is not None else None,
            "best_val_loss": self.best_val if self.best_step >= 0 else None,
            "best_val_perplexity": perplexity(self.best_val) if self.best_step >= 0 else None,
            "best_step": self.best_step,
            "final_val_loss": self.last_val,
            "final_val_perplexity": perplexity(self.last_val) if self.last_val is not None else None,
            "final_train_loss": last_loss if math.isfinite(last_loss) else None,
            "eval_split": data["eval_split"],
            "train_split": data["train_split"],
            "data": data,
            "tokenizer": tok,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "torch": torch_info(),
            "wandb": {"mode": self.wandb.mode, "project": self.gpt.logging.project_name},
            "config": self.gpt.resolved(),
        }
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
        self.metrics.write("end", **{k: summary[k] for k in ("steps", "tokens_per_s", "best_val_loss", "final_val_loss", "peak_rss_mb")})
        self.log.info(f"done: {self.step} steps, best {data['eval_split']} perplexity {summary['best_val_perplexity']}, "
                      f"{summary['tokens_per_s']} tokens/s; {data['note']}")
        return summary

    def close(self) -> None:
        self.wandb.finish()
        self.metrics.close()


def train_gpt(gpt: GPTConfig, run_dir: Path, *, resume: bool = False, progress_out: Any = None,
              available: Accelerators | None = None) -> dict:
    trainer = GPTTrainer(gpt, run_dir, resume=resume, progress_out=progress_out, available=available)
    try:
        return trainer.train()
    finally:
        trainer.close()
