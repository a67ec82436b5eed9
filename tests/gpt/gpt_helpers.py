"""Shared by the GPT tests: a tiny config, where the checkout and shared/ are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "original").is_dir()), REPO.parent / "shared")
ORIGINAL_README = SHARED / "original" / "README.md"

# Small enough to train in seconds on 2 shared cores; a BPE of 512 tokens keeps the output layer cheap.
TINY = {
    "model": {"model_dim": 64, "num_layers": 2, "num_heads": 2, "ff_dim": 256, "dropout": 0.0, "max_seq_len": 64},
    "training": {"batch_size": 16, "epochs": 1, "max_steps": 100, "learning_rate": 3.0e-3, "eval_interval": 25,
                 "eval_batches": 8, "checkpoint_interval": 0, "device": "cpu"},
    "lr_schedule": {"warmup_iters": 10, "min_lr": 3.0e-4},
    "data": {"tokenizer": "bpe", "bpe_vocab_size": 512},
    "logging": {"wandb": "off"},
}


def deep_merge(base: dict, changes: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in changes.items():
        out[k] = (out.get(k) or {}) | v if isinstance(v, dict) else v
    return out
