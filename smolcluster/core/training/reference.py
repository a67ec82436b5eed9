"""Single-process MNIST training on the cluster's own shards: the quality reference for distributed runs.

With shards = 1 it is plain training over the whole training set at the workers' batch size (EDP's
reference: every sample once per epoch, one small batch per step). With shards = N each step's batch is
the union of the N shards' batches for that step, in the shards' own order: exactly the global batch a
synchronous step of N workers (SyncPS, DDP) averages. Same model, initialisation, optimizer, clipping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.models import build_model
from smolcluster.core.training.optim import build_optimizer, train_step
from smolcluster.core.training.tasks import MnistTask
from smolcluster.core.training.telemetry import peak_rss_mb


@dataclass(frozen=True)
class ReferenceResult:
    wall_time_s: float  # training only (evaluations excluded)
    samples: int
    final_test_accuracy: float
    epoch_test_accuracy: list[float] = field(default_factory=list)  # after each epoch; the last is the final one
    peak_rss_mb: float = 0.0


def train_reference(*, batch_size: int, shards: int, epochs: int, lr: float, seed: int, data_dir: str | Path | None,
                    model: ModelConfig = ModelConfig(), optimizer: str = "adam", max_norm: float | None = 1.0,
                    on_epoch: Callable[[int, float], None] = lambda epoch, accuracy: None) -> ReferenceResult:
    """Train in this process (one thread); `on_epoch(epoch, accuracy)` after each epoch (0-based)."""
    torch.set_num_threads(1)
    task = MnistTask(Path(data_dir) if data_dir else None, shards, batch_size, seed)
    loaders = [task.batches(i) for i in range(shards)]
    net = build_model(model, seed=seed)
    opt = build_optimizer(optimizer, net.parameters(), lr)
    wall, accs = 0.0, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for step in range(epoch * task.steps_per_epoch, (epoch + 1) * task.steps_per_epoch):
            batches = [loader.batch_at(step) for loader in loaders]
            train_step(net, opt, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), max_norm)
        wall += time.perf_counter() - t0
        accs.append(task.evaluate(net)[1])
        on_epoch(epoch, accs[-1])
    return ReferenceResult(wall_time_s=wall, samples=epochs * task.steps_per_epoch * batch_size * shards,
                           final_test_accuracy=accs[-1], epoch_test_accuracy=accs, peak_rss_mb=peak_rss_mb())
