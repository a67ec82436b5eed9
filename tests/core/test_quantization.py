"""int8 per-row quantization: error bound, exact zero, state round trip, typed errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from smolcluster.common.errors import QuantizationError
from smolcluster.core.training.quantization import (dequantize_rows, dequantize_state, quantize_rows, quantize_state,
                                      quantized_schema)
from smolcluster.core.net.wire import TensorSpec, schema_of

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)  # full float32 range, subnormals too
shapes = st.one_of(st.just(()), st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 8), st.integers(1, 20)),
                   st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)))


def _check_bound(x: torch.Tensor) -> None:
    q, scale, zero = quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    rows = x.shape[0] if x.dim() >= 2 else 1
    assert scale.shape == zero.shape == (rows,) and scale.dtype == zero.dtype == torch.float32
    assert bool((scale > 0).all()) and torch.equal(zero, zero.round())  # integer zero point
    back = dequantize_rows(q, scale, zero)
    assert back.dtype == torch.float32
    err = (back.double() - x.double()).reshape(rows, -1).abs()
    s = scale.double()[:, None]
    # <= scale/2, plus the float32 rounding of the result itself (relative 2^-24)
    assert bool((err <= s / 2 + x.double().abs().reshape(rows, -1) * 2**-23 + 1e-45).all()), (err - s / 2).max()
    zeros = x.reshape(rows, -1) == 0
    assert bool((back.reshape(rows, -1)[zeros] == 0).all())  # zero is exact


@settings(max_examples=300, deadline=None)
@given(shapes.flatmap(lambda sh: arrays("float32", sh, elements=finite)))
@example(np.array([3.4028235e38, -1.8889468e22], dtype=np.float32))  # once dequantized to inf
def test_roundtrip_error_at_most_half_scale(a) -> None:
    _check_bound(torch.from_numpy(a.copy()))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.floats(-1e6, 1e6, width=32), st.floats(1e-30, 1e6))
def test_zero_exact_in_all_positive_or_negative_rows(rows, cols, offset, spread) -> None:
    x = offset + spread * torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    x[:, 0] = 0.0
    _check_bound(x.float())


def test_constant_and_zero_rows_are_safe() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [-2.0, -2.0, -2.0], [1e-42, 1e-42, 0.0]])
    q, scale, zero = quantize_rows(x)
    assert bool(torch.isfinite(scale).all() & (scale > 0).all())
    back = dequantize_rows(q, scale, zero)
    assert torch.equal(back[0], x[0])
    assert torch.allclose(back[1:3], x[1:3], rtol=0, atol=float(scale[1:3].max()) / 2)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_rows(torch.tensor([1.0, float("nan")]))


def test_vectorized_not_a_python_loop_over_rows() -> None:
    """A 100k-row tensor quantizes in far less time than a per-row Python loop would need."""
    x = torch.randn(100_000, 4)
    t = time.perf_counter()
    q, scale, zero = quantize_rows(x)
    elapsed = time.perf_counter() - t
    assert scale.shape == (100_000,)
    assert elapsed < 2.0, f"{elapsed:.2f}s for 100k rows: looks like a loop over rows"


def test_state_round_trip_and_schema() -> None:
    from smolcluster.core.training.config import ModelConfig
    from smolcluster.core.training.models import build_model

    model = build_model(ModelConfig(), seed=0)
    state = {**model.state_dict(), "step_count": torch.tensor([3], dtype=torch.int64)}
    qstate, quant = quantize_state(state)
    assert quant["fc1.weight"] == {"scheme": "int8_row", "dtype": "float32"}
    assert "step_count" not in quant and torch.equal(qstate["step_count"], state["step_count"])
    assert qstate["fc1.weight"].dtype == torch.int8 and qstate["fc1.weight::scale"].shape == (128,)
    assert qstate["fc1.bias::zero"].shape == (1,)
    # the quantized tensors match the quantized schema exactly
    assert schema_of(qstate) == quantized_schema(schema_of(state))
    assert quantized_schema(schema_of(state))["step_count"] == TensorSpec((1,), torch.int64)
    back = dequantize_state(qstate, quant)
    assert set(back) == set(state)
    for name, t in model.state_dict().items():
        assert back[name].dtype == t.dtype
        tol = float(qstate[name + "::scale"].max()) / 2 * (1 + 1e-5)
        assert float((back[name] - t).abs().max()) <= tol
    # quantized push is ~4x smaller
    raw = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    small = sum(t.numel() * t.element_size() for n, t in qstate.items() if n != "step_count")
    assert small < raw / 3.5


def test_dequantize_state_typed_errors() -> None:
    qstate, quant = quantize_state({"w": torch.randn(3, 4)})
    with pytest.raises(QuantizationError, match="'w::scale' is missing"):
        dequantize_state({k: v for k, v in qstate.items() if k != "w::scale"}, quant)
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'fp4'"):
        dequantize_state(qstate, {"w": {"scheme": "fp4", "dtype": "float32"}})
    with pytest.raises(QuantizationError, match=r"shape \[3\]"):
        dequantize_state({**qstate, "w::zero": torch.zeros(2)}, quant)
    with pytest.raises(QuantizationError, match="scale must be finite"):
        dequantize_state({**qstate, "w::scale": torch.tensor([1.0, 0.0, 1.0])}, quant)
    with pytest.raises(QuantizationError, match="must be int8"):
        dequantize_state({**qstate, "w": qstate["w"].float()}, quant)
