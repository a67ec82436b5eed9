"""What the cluster trains on: a task gives each training rank its batches and evaluates the model.

- MnistTask: SimpleNN on MNIST; disjoint seeded shards of the 60k training images, evaluation on
  the official 10k test set (loaded only where evaluation happens, i.e. on the server).
- TextTask: GPT on token ids; shard k reads its own contiguous slice of the training tokens,
  evaluation is next-token loss and accuracy on held-out text: the tail of a byte-level text file, or
  WikiText-2's validation split (test when there is no train split) in the tokenizer of gpt_config.yaml.

Every rank computes the same steps_per_epoch, so SyncPS workers and the server agree on the run's
length without talking about it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from smolcluster.common.errors import ConfigError
from smolcluster.core.training.config import GPTConfig, NNConfig
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
    eval_batches: int | None = 20  # batches of eval_batch_size windows per evaluation (None: the whole split)
    eval_batch_size: int = 32
    about: dict[str, Any] = field(default_factory=dict)  # the data and tokenizer (wikitext-2), for logs and summaries

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def steps_per_epoch(self) -> int:
        """One epoch: each shard's tokens seen about once."""
        tokens_per_shard = len(self.text.train) // self.num_shards
        return max(1, tokens_per_shard // (self.batch_size * self.text.block_size))

    def batches(self, shard: int) -> _TextShard:
        return _TextShard(self.text, shard, self.num_shards, self.batch_size, self.seed)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        return self.text.evaluate(model, batch_size=self.eval_batch_size, max_batches=self.eval_batches)


def wikitext_data(gpt: GPTConfig, log: logging.Logger | None = None) -> tuple[TextData, dict[str, Any]]:
    """WikiText-2 in the GPT config's tokenizer: token ids for training and evaluation, and what they are."""
    from smolcluster.core.training.tokenizer import load_tokenizer
    from smolcluster.core.training.wikitext import load_wikitext

    wiki = load_wikitext(gpt.data_dir())
    corpus = f"wikitext-2 {wiki.train_split} ({wiki.folder})"
    writable = wiki.folder if wiki.folder.is_dir() and _writable(wiki.folder) else None
    tok = load_tokenizer(gpt.data.tokenizer, train_text=wiki.train_text, corpus=corpus, bpe_vocab_size=gpt.data.bpe_vocab_size,
                         data_dir=writable, log=log)
    train, val = tok.encode(wiki.train_text), tok.encode(wiki.eval_text)
    about = {"data": wiki.info() | {"train_tokens": len(train), "eval_tokens": len(val)}, "tokenizer": tok.info.as_dict()}
    if log:
        log.info(f"wikitext-2: {wiki.note()}; tokenizer {tok.info.name} ({tok.info.vocab_size} tokens, {tok.info.source}); "
                 f"{len(train):,} training tokens, {len(val):,} evaluation tokens")
    return TextData.from_tokens(train, val, gpt.model.max_seq_len, tok.vocab_size), about


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def build_task(nn: NNConfig, *, data_dir: Path | None, text_file: Path | None, num_shards: int, seed: int,
               gpt: GPTConfig | None = None, log: logging.Logger | None = None) -> Task:
    if nn.dataset == "wikitext-2":
        if gpt is None:
            raise ConfigError(None, "dataset", "wikitext-2 comes with a GPT config", "set gpt_config: gpt_config.yaml in nn_config.yaml")
        text, about = wikitext_data(gpt, log)
        return TextTask(text, num_shards, nn.batch_size, seed, eval_batches=gpt.training.eval_batches,
                        eval_batch_size=nn.batch_size, about=about)
    if nn.dataset == "text":
        return TextTask(TextData.load(text_file, nn.model.block_size), num_shards, nn.batch_size, seed)
    return MnistTask(data_dir, num_shards, nn.batch_size, seed)
