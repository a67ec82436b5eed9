"""The LR schedule: linear warmup to learning_rate, cosine to min_lr at the last step; AdamW as GPT-2's."""

from __future__ import annotations

import math

import pytest
import torch

from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.optim import LRSchedule, build_optimizer, optimizer_steps

PEAK, FLOOR, WARMUP, TOTAL = 6e-4, 6e-5, 100, 1000


def test_values_at_warmup_end_and_at_the_end():
    s = LRSchedule(PEAK, FLOOR, WARMUP, TOTAL)
    assert s.lr(0) == pytest.approx(PEAK / (WARMUP + 1))
    assert s.lr(WARMUP - 1) < s.lr(WARMUP) == pytest.approx(PEAK)  # warmup ends at the peak
    assert s.lr((WARMUP + TOTAL) // 2) == pytest.approx((PEAK + FLOOR) / 2)  # half way down the cosine
    assert s.lr(TOTAL) == pytest.approx(FLOOR) and s.lr(TOTAL + 500) == pytest.approx(FLOOR)  # the end: min_lr
    warm = [s.lr(i) for i in range(WARMUP + 1)]
    decay = [s.lr(i) for i in range(WARMUP, TOTAL + 1)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)
    assert min(decay) >= FLOOR - 1e-12


def test_no_warmup_starts_at_the_peak():
    assert LRSchedule(PEAK, FLOOR, 0, TOTAL).lr(0) == pytest.approx(PEAK)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _steps(model, opt, n: int, seen: list[float]) -> None:
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after the schedule's
    for i in range(n):
        torch.manual_seed(100 + optimizer_steps(opt))
        model.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()


def test_an_attached_schedule_sets_each_steps_rate_and_survives_a_checkpoint(tmp_path):
    s = LRSchedule(1e-2, 1e-3, 3, 10)
    model = _model()
    opt = build_optimizer("adamw", model.parameters(), 1e-2, weight_decay=0.1)
    s.attach(opt)
    seen: list[float] = []
    _steps(model, opt, 6, seen)
    assert seen == pytest.approx([s.lr(i) for i in range(6)])
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)  # the base rate is put back after each step

    ckpt.save_checkpoint(tmp_path, ckpt.ServerState("t", 6, 6, model.state_dict(), opt.state_dict()))
    state = ckpt.load_checkpoint(tmp_path)
    model2 = _model()
    opt2 = build_optimizer("adamw", model2.parameters(), 1e-2, weight_decay=0.1)
    s.attach(opt2)
    model2.load_state_dict(state.model)
    opt2.load_state_dict(state.optimizer)
    assert optimizer_steps(opt2) == 6
    rest: list[float] = []
    _steps(model2, opt2, 6, rest)
    assert rest == pytest.approx([s.lr(i) for i in range(6, 12)])  # continues where it was, then stays at min_lr
    assert rest[-1] == pytest.approx(1e-3)


def test_a_callers_one_step_scale_still_applies():
    """EDP scales the rate by 1/(1+tau) for one step around optimizer.step(); the schedule multiplies in."""
    s = LRSchedule(1e-2, 1e-3, 0, 10)
    model = _model()
    opt = build_optimizer("adamw", model.parameters(), 1e-2)
    s.attach(opt)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    model(torch.randn(3, 4)).sum().backward()
    for g in opt.param_groups:
        g["lr"] *= 0.5
    opt.step()
    assert seen == [pytest.approx(0.5 * s.lr(0))]


def test_adamw_decays_matrices_only():
    model = _model()
    opt = build_optimizer("adamw", model.parameters(), 1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert isinstance(opt, torch.optim.AdamW)
    assert math.isclose(opt.param_groups[0]["weight_decay"], 0.1)
