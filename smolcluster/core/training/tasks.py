"""What the cluster trains on: a task gives each training rank its batches and evaluates the model.

- MnistTask: SimpleNN on MNIST; disjoint seeded shards of the 60k training images, evaluation on
  the official 10k test set (loaded only where evaluation happens, i.e. on the server).
- TextTask: GPT on byte-level text; shard k reads its own contiguous slice of the training text,
  evaluation is next-byte loss and accuracy on the held-out tail.

Every rank computes the same steps_per_epoch, so SyncPS workers and the server agree on the run's
length without talking about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from smolcluster.core.training.config import NNConfig
from smolcluster.core.training.data import ImageSet, ShardLoader, TextData, evaluate, load_mnist, shard_indices

MNIST_TRAIN_SIZE = 60_000


class Batches(Protocol):
    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class Task(Protocol):
    steps_per_epoch: int

    def batches(self, shard: int) -> Batches: ...

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]: ...


@dataclass
class MnistTask:
    data_dir: Path | None
    num_shards: int
    batch_size: int
    seed: int
    _test: ImageSet | None = field(default=None, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return (MNIST_TRAIN_SIZE // self.num_shards) // self.batch_size

    def batches(self, shard: int) -> ShardLoader:
        train = load_mnist("train", self.data_dir)
        idx = shard_indices(len(train.labels), self.num_shards, shard, self.seed)
        # keep only this shard's images: a node holds 1/n of MNIST, not all of it (indexing copies)
        part = ImageSet(images=train.images[idx], labels=train.labels[idx])
        del train
        return ShardLoader(part, torch.arange(len(idx)), self.batch_size, seed=self.seed + shard + 1)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        if self._test is None:
            self._test = load_mnist("test", self.data_dir)
        return evaluate(model, self._test)


@dataclass
class _TextShard:
    text: TextData
    shard: int
    num_shards: int
    batch_size: int
    seed: int

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.get_batch(step, self.batch_size, self.seed, shard=self.shard, num_shards=self.num_shards)


@dataclass
class TextTask:
    text: TextData
    num_shards: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """One epoch: each shard's tokens seen about once."""
        tokens_per_shard = len(self.text.train) // self.num_shards
        return max(1, tokens_per_shard // (self.batch_size * self.text.block_size))

    def batches(self, shard: int) -> _TextShard:
        return _TextShard(self.text, shard, self.num_shards, self.batch_size, self.seed)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        return self.text.evaluate(model)


def build_task(nn: NNConfig, *, data_dir: Path | None, text_file: Path | None, num_shards: int, seed: int) -> Task:
    if nn.dataset == "text":
        return TextTask(TextData.load(text_file, nn.model.block_size), num_shards, nn.batch_size, seed)
    return MnistTask(data_dir, num_shards, nn.batch_size, seed)
