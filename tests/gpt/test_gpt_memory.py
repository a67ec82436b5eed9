"""Big logits a chunk at a time: the same loss, gradients and evaluation, a fraction of the memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from smolcluster.core.training import models
from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.models import build_model, gpt_eval_sums, loss_fn

CFG = ModelConfig(type="GPT", vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 300, (4, 16), generator=g), torch.randint(0, 300, (4, 16), generator=g)


def test_chunked_loss_and_gradients_equal_the_whole_batchs(monkeypatch):
    x, y = _batch()
    whole = build_model(CFG, seed=3)
    loss = F.cross_entropy(whole(x).reshape(-1, 300), y.reshape(-1))
    loss.backward()
    monkeypatch.setattr(models, "LOGITS_CHUNK_ELEMENTS", 300 * 10)  # 64 tokens in chunks of 10
    chunked = build_model(CFG, seed=3)
    loss2 = loss_fn(chunked, x, y)
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    total, correct = gpt_eval_sums(chunked, x, y)
    with torch.no_grad():
        logits = whole(x)
    assert total == pytest.approx(float(F.cross_entropy(logits.reshape(-1, 300), y.reshape(-1), reduction="sum")), rel=1e-5)
    assert correct == int((logits.argmax(-1) == y).sum())


PEAK = """
import resource, torch
from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.models import build_model, loss_fn
torch.set_num_threads(1)
m = build_model(ModelConfig(type="GPT", vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=64), seed=0)
x = torch.randint(0, 50257, (32, 128))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss_fn(m, x, x).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "darwin", reason="ru_maxrss units differ; the check is Linux's")
def test_a_gpt2_vocabulary_batch_does_not_hold_the_batchs_logits():
    """32 x 128 tokens over 50,257: the logits alone are 823 MB; a training step must stay far below that."""
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=300, check=True)
    assert float(out.stdout.strip()) < 500, out.stdout
