"""What one node (server or worker) carries around: its config, identity, outputs and factories."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from smolcluster.core.training.clock import WallClock
from smolcluster.core.training.config import RunConfig, training_ranks
from smolcluster.core.training.data import resolve_data_dir
from smolcluster.core.training.tasks import Batches, Task, build_task
from smolcluster.core.training.models import build_model
from smolcluster.core.training.optim import LRSchedule, build_optimizer
from smolcluster.core.training.telemetry import MetricsWriter, WandbRun, peak_rss_mb
from smolcluster.core.net.transport import TransportConfig


@dataclass
class NodeContext:
    cfg: RunConfig
    role: str  # server | worker
    rank: int
    hostname: str
    run_dir: Path
    log: logging.Logger
    metrics: MetricsWriter
    wandb: WandbRun
    key: bytes | None
    transport: TransportConfig
    slowdown: float = 1.0  # >1 stretches compute (a Pi is slower than a Mac)
    device: torch.device = torch.device("cpu")  # where the model computes; tensors on the wire stay on the CPU
    torch: dict = field(default_factory=dict)  # which torch build runs and the process's RSS once imported (torch_info)
    shipper: Any = None  # a LokiPusher when the node ships its lines to Loki
    clock: Any = field(default_factory=WallClock)  # real time; the virtual sim backend passes simulated time

    def close(self) -> None:
        """At the end of the node: W&B, the metrics file, then what is left to ship (bounded wait)."""
        self.wandb.finish()
        self.metrics.close()
        if self.shipper is not None:
            self.shipper.close(timeout=3.0)
            st = self.shipper.stats()
            level = logging.WARNING if st["dropped_lines"] else logging.INFO
            self.log.log(level, f"Loki: {st['sent_lines']} lines shipped, {st['dropped_lines']} dropped")

    def build_model(self) -> torch.nn.Module:
        model_cfg = self.cfg.nn.model
        if self.cfg.gpt is not None:  # the tokenizer decides the vocabulary
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.task.vocab_size)
        return build_model(model_cfg, seed=self.cfg.cluster.seed).to(self.device)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        nn = self.cfg.nn
        optimizer = build_optimizer(nn.optimizer, model.parameters(), nn.learning_rate, weight_decay=nn.weight_decay)
        if self.cfg.gpt is not None:
            schedule = self.cfg.gpt.lr_schedule
            LRSchedule(nn.learning_rate, schedule.min_lr, schedule.warmup_iters, self.schedule_steps()).attach(optimizer)
        return optimizer

    def schedule_steps(self) -> int:
        """How many updates this node's optimizer makes in the run: the LR schedule reaches min_lr there.
        SyncPS: one per step on the server and on every worker. EDP: a worker steps once per local step,
        the server once per gradient push (weights pushes are folded in without its optimizer) and once
        per step of its own; max_steps counts server updates, i.e. pushes from every training rank."""
        cl = self.cfg.cluster
        local = self.cfg.nn.num_epochs * self.steps_per_epoch()
        if cl.algorithm != "edp":
            return max(1, min(local, cl.max_steps) if cl.max_steps else local)
        ranks = len(training_ranks(cl))
        if cl.max_steps:
            local = min(local, -(-cl.max_steps * cl.push_interval // ranks))
        if self.role == "worker":
            return max(1, local)
        pushes = cl.num_workers * -(-local // cl.push_interval) if cl.push_mode == "gradients" else 0
        steps = pushes + (local if cl.server_trains else 0)
        return max(1, steps)

    def data_dir(self) -> Path | None:
        return resolve_data_dir(self._relative(self.cfg.nn.data_dir))

    def _relative(self, raw: str | None) -> str | None:
        """Config paths are relative to the config dir."""
        if raw and not Path(raw).expanduser().is_absolute():
            return str((self.cfg.config_dir / raw).resolve())
        return str(Path(raw).expanduser()) if raw else None

    @cached_property
    def task(self) -> Task:
        """Batches per training rank and evaluation (MNIST, or text for GPT)."""
        text_file = self._relative(self.cfg.nn.text_file)
        return build_task(self.cfg.nn, data_dir=self.data_dir(), text_file=Path(text_file) if text_file else None,
                          num_shards=len(training_ranks(self.cfg.cluster)), seed=self.cfg.cluster.seed, gpt=self.cfg.gpt,
                          log=self.log)

    def batches(self, rank: int) -> Batches:
        """This rank's disjoint, seeded slice of the training data."""
        return self.task.batches(training_ranks(self.cfg.cluster).index(rank))

    def steps_per_epoch(self) -> int:
        """The same on every rank (shards are equal up to the remainder we drop)."""
        return self.task.steps_per_epoch

    def stretch(self, compute_seconds: float, samples: int = 0) -> None:
        """Sleep so that compute (`samples` forward/backward passes) takes `slowdown` times as long, as on a
        slower device. The virtual backend's context charges a modelled duration for `samples` instead."""
        if self.slowdown > 1.0 and compute_seconds > 0:
            self.clock.sleep(compute_seconds * (self.slowdown - 1.0))

    def peak_rss_mb(self) -> float | None:
        """This node's peak memory for its `end` line (the virtual backend's nodes share one process: None)."""
        return peak_rss_mb()
