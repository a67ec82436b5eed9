"""What one node (server or worker) carries around: its config, identity, outputs and factories."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.config import RunConfig, training_ranks
from smolcluster.data import ImageSet, ShardLoader, load_mnist, resolve_data_dir, shard_indices

MNIST_TRAIN_SIZE = 60_000
from smolcluster.models import build_model
from smolcluster.telemetry import MetricsWriter, WandbRun
from smolcluster.transport import TransportConfig


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

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.nn.model, seed=self.cfg.cluster.seed)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        lr = self.cfg.nn.learning_rate
        if self.cfg.nn.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=lr)

    def data_dir(self) -> Path | None:
        raw = self.cfg.nn.data_dir
        if raw and not Path(raw).is_absolute():
            raw = str((self.cfg.config_dir / raw).resolve())
        return resolve_data_dir(raw)

    def load_test_set(self) -> ImageSet:
        return load_mnist("test", self.data_dir())

    def shard_loader(self, rank: int) -> ShardLoader:
        """This rank's disjoint, seeded slice of the training set."""
        ranks = training_ranks(self.cfg.cluster)
        train = load_mnist("train", self.data_dir())
        idx = shard_indices(len(train.labels), len(ranks), ranks.index(rank), self.cfg.cluster.seed)
        # keep only this shard's images: a node holds 1/n of MNIST, not all of it
        shard = ImageSet(images=train.images[idx].clone(), labels=train.labels[idx].clone())
        del train
        return ShardLoader(shard, torch.arange(len(idx)), self.cfg.nn.batch_size, seed=self.cfg.cluster.seed + rank)

    def shard_steps_per_epoch(self) -> int:
        """Steps per epoch, the same on every rank (shards are equal up to the remainder we drop)."""
        shards = len(training_ranks(self.cfg.cluster))
        return (MNIST_TRAIN_SIZE // shards) // self.cfg.nn.batch_size

    def stretch(self, compute_seconds: float) -> None:
        """Sleep so that compute takes `slowdown` times as long, as on a slower device."""
        if self.slowdown > 1.0 and compute_seconds > 0:
            time.sleep(compute_seconds * (self.slowdown - 1.0))
