"""Models: shapes, parameter count, deterministic init, and that they actually learn."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.data import ShardLoader, TextData, evaluate, load_mnist, shard_indices
from smolcluster.core.training.models import GPT, SimpleNN, build_model, loss_fn


def test_simplenn_shape_and_param_count() -> None:
    m = SimpleNN(784, 128, 10, "relu")
    assert sum(p.numel() for p in m.parameters()) == 101_770
    x = torch.randn(5, 784)
    assert torch.equal(m(x), m(x.view(5, 1, 28, 28)))
    for act in ("gelu", "tanh"):
        assert SimpleNN(activation=act)(x).shape == (5, 10)


def test_build_model_deterministic_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(), seed=7)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    b = build_model(ModelConfig(), seed=7)
    c = build_model(ModelConfig(), seed=8)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["fc1.weight"], c.state_dict()["fc1.weight"])
    g1 = build_model(ModelConfig(type="GPT"), seed=1)
    g2 = build_model(ModelConfig(type="GPT"), seed=1)
    assert isinstance(g1, GPT) and all(torch.equal(g1.state_dict()[k], g2.state_dict()[k]) for k in g1.state_dict())


def test_simplenn_learns_mnist_on_a_shard(mnist_dir: Path) -> None:
    """One process, a third of the training set, ~1 epoch of that shard: > 90% on the official test set."""
    torch.manual_seed(0)
    train, test = load_mnist("train", mnist_dir, download=False), load_mnist("test", mnist_dir, download=False)
    model = build_model(ModelConfig(), seed=0)
    loader = ShardLoader(train, shard_indices(len(train), 3, 0, seed=42), batch_size=32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    for step in range(600):
        x, y = loader.batch_at(step)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    loss, acc = evaluate(model, test)
    assert acc > 0.90, f"test accuracy {acc:.3f} after 600 steps ({time.perf_counter() - t:.1f}s)"
    assert loss < 0.4


def test_gpt_text_few_steps_reduce_loss() -> None:
    cfg = ModelConfig(type="GPT", block_size=32, n_layer=2, n_head=2, n_embd=64)
    model = build_model(cfg, seed=0)
    data = TextData.load(None, block_size=cfg.block_size)
    x, y = data.get_batch(0, 4, seed=0)
    assert model(x).shape == (4, 32, 256)
    loss0, acc0 = data.evaluate(model, batch_size=16, max_batches=4)
    assert 5.0 < loss0 < 6.0  # ~ln(256) at init
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        x, y = data.get_batch(step, 16, seed=0)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    loss1, acc1 = data.evaluate(model, batch_size=16, max_batches=4)
    assert loss1 < loss0 - 1.5 and acc1 > acc0 + 0.1, (loss0, loss1, acc0, acc1)
    out = model.generate(TextData.encode("def ")[None], 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 14)
