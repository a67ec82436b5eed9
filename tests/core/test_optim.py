"""Optimizer and step bookkeeping: the fused optimizer makes the same update, the one-pass norms catch
every NaN/Inf without flagging huge finite values, and clipping matches torch's clip_grad_norm_."""

from __future__ import annotations

import copy

import pytest
import torch

from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.models import build_model
from smolcluster.core.training.optim import all_finite, build_optimizer, clip_, clip_grads_, tensor_norms


def _grads(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(128, 784, generator=g), "b": torch.randn(128, generator=g), "empty": torch.empty(0)}


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizer_makes_the_reference_update(name: str) -> None:
    a = build_model(ModelConfig(), seed=1)
    b = copy.deepcopy(a)
    fused = build_optimizer(name, a.parameters(), 1e-3)
    ref = torch.optim.Adam(b.parameters(), lr=1e-3) if name == "adam" else torch.optim.SGD(b.parameters(), lr=1e-3, momentum=0.9)
    for step in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = torch.randn(pa.shape, generator=torch.Generator().manual_seed(step))
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_norms_flag_any_non_finite_element(bad: float) -> None:
    grads = _grads()
    assert all_finite(tensor_norms(grads))
    grads["w"][17, 300] = bad
    assert not all_finite(tensor_norms(grads))


def test_huge_finite_values_are_not_mistaken_for_inf() -> None:
    grads = _grads()
    grads["w"][:2] = 3e38  # squares overflow float32, not the float64 accumulator
    norms = tensor_norms(grads)
    assert all_finite(norms) and norms["w"] > 1e40


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
def test_clipping_matches_torch(max_norm: float) -> None:
    a = build_model(ModelConfig(), seed=2)
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn(pa.shape, generator=torch.Generator().manual_seed(pa.numel()))
        pb.grad = pa.grad.clone()
    norms = clip_grads_(a, max_norm)
    total = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    assert set(norms) == {n for n, _ in a.named_parameters()}
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert abs(clip_([], norms, max_norm) - float(total)) < 1e-3


def test_no_clipping_when_max_norm_is_zero() -> None:
    grads = _grads()
    before = {k: v.clone() for k, v in grads.items()}
    clip_(grads.values(), tensor_norms(grads), 0.0)
    assert all(torch.equal(grads[k], before[k]) for k in grads)
