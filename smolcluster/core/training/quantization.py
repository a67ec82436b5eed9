"""int8 per-row (asymmetric) quantization for EDP pushes and pulls.

Each row r of a tensor (first dim; 0-d and 1-d tensors are one row) gets a float32 scale s_r and an
integer-valued float32 zero point z_r, with  x ~= (q - z_r) * s_r,  q in [-128, 127].
The row range is [min(row, 0), max(row, 0)] so 0.0 is always exactly representable (q = z_r):
zero weights, padding and ReLU outputs survive a round trip unchanged. Error per element <= s_r / 2.

On the wire a quantized tensor NAME travels as three tensors: NAME (int8, original shape),
NAME::scale and NAME::zero (float32 [rows]); Message.quant[NAME] = {"scheme": "int8_row", "dtype": ...}.
A flat buffer (core/training/flat.py) travels as one QuantizedLayout buffer: the same rule per block of
BLOCK values of the flat buffer.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from smolcluster.common.errors import QuantizationError
from smolcluster.core.net.wire import Schema, TensorSpec

SCHEME = "int8_row"
SCALE_SUFFIX, ZERO_SUFFIX = "::scale", "::zero"
QMIN, QMAX = -128, 127
_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: keeps 1/scale finite


def _rows(shape: tuple[int, ...] | torch.Size) -> int:
    return int(shape[0]) if len(shape) >= 2 else 1


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 same shape, scale float32 [rows], zero_point float32 [rows]). Vectorized over rows."""
    rows = _rows(t.shape)
    if t.numel() == 0:
        return (torch.zeros(t.shape, dtype=torch.int8), torch.ones(rows, dtype=torch.float32),
                torch.zeros(rows, dtype=torch.float32))
    # float64 for the arithmetic: (hi - lo) of large float32 values would overflow in float32
    x = t.detach().reshape(rows, -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise QuantizationError("cannot quantize a tensor with NaN or infinite values")
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1).clamp(min=0.0)
    span = hi - lo
    scale64 = torch.where(span > 0, (span / (QMAX - QMIN)).clamp(min=_TINY), torch.ones_like(span))
    scale = scale64.to(torch.float32)
    # rounding to float32 may shrink the scale a hair; bump it so 255 steps still cover the range
    scale = torch.where(scale.double() < scale64, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.double()
    zero = torch.round(QMIN - lo / s).clamp(QMIN, QMAX)
    q = torch.round(x / s[:, None] + zero[:, None]).clamp(QMIN, QMAX).to(torch.int8)
    return q.reshape(t.shape), scale, zero.to(torch.float32)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """float32 tensor of q's shape: (q - zero_point) * scale, row by row."""
    rows = _rows(q.shape)
    if scale.shape != (rows,) or zero_point.shape != (rows,):
        raise QuantizationError(f"scale/zero_point must have shape [{rows}] for a tensor of shape "
                                f"{list(q.shape)}, got {list(scale.shape)} and {list(zero_point.shape)}")
    if q.numel() == 0:
        return torch.zeros(q.shape, dtype=torch.float32)
    x = (q.reshape(rows, -1).double() - zero_point.double()[:, None]) * scale.double()[:, None]
    # A range reaching float32's max can round just past it; the true value is finite, so clamp.
    f32 = torch.finfo(torch.float32)
    return x.clamp_(f32.min, f32.max).to(torch.float32).reshape(q.shape)


def quantize_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Float tensors -> int8 + NAME::scale + NAME::zero; other tensors pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    quant: dict[str, dict] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        q, scale, zero = quantize_rows(t)
        out[name], out[name + SCALE_SUFFIX], out[name + ZERO_SUFFIX] = q, scale, zero
        quant[name] = {"scheme": SCHEME, "dtype": str(t.dtype).removeprefix("torch.")}
    return out, quant


def dequantize_state(tensors: dict[str, torch.Tensor], quant: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse of quantize_state. Raises QuantizationError on a missing companion, unknown scheme or bad values."""
    companions = {n + SCALE_SUFFIX for n in quant} | {n + ZERO_SUFFIX for n in quant}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in companions:
            continue
        params = quant.get(name)
        if params is None:
            out[name] = t
            continue
        if params.get("scheme") != SCHEME:
            raise QuantizationError(f"tensor {name!r}: unknown quantization scheme {params.get('scheme')!r} (supported: {SCHEME})")
        if t.dtype != torch.int8:
            raise QuantizationError(f"tensor {name!r}: quantized values must be int8, got {t.dtype}")
        try:
            scale, zero = tensors[name + SCALE_SUFFIX], tensors[name + ZERO_SUFFIX]
        except KeyError as e:
            raise QuantizationError(f"tensor {name!r} is quantized but its companion {e.args[0]!r} is missing") from None
        if not bool(torch.isfinite(scale).all() & (scale > 0).all() & torch.isfinite(zero).all()):
            raise QuantizationError(f"tensor {name!r}: scale must be finite and > 0, zero point finite")
        x = dequantize_rows(t, scale, zero)
        dtype = getattr(torch, str(params.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise QuantizationError(f"tensor {name!r}: unknown target dtype {params.get('dtype')!r}")
        out[name] = x.to(dtype)
    missing = [n for n in quant if n not in tensors]
    if missing:
        raise QuantizationError(f"quantization parameters given for absent tensors: {missing}")
    return out


def quantized_schema(schema: Schema) -> Schema:
    """The schema a quantized message must match: int8 values plus float32 [rows] companions."""
    out: Schema = {}
    for name, spec in schema.items():
        if not spec.dtype.is_floating_point:
            out[name] = spec
            continue
        rows = (_rows(spec.shape),)
        out[name] = TensorSpec(spec.shape, torch.int8)
        out[name + SCALE_SUFFIX] = TensorSpec(rows, torch.float32)
        out[name + ZERO_SUFFIX] = TensorSpec(rows, torch.float32)
    return out


# --------------------------------------------------------------------------- flat buffers

BLOCK = 1024  # values per scale and zero point in a quantized flat buffer


class QuantizedLayout:
    """A flat layout's float values as int8, per block of BLOCK values: the int8_row rule applied to the
    flat buffer cut into rows of BLOCK (the last one padded with zeros, which every range holds exactly).

    The buffer is  q int8 [n] | scale float32 [blocks] | zero float32 [blocks]  (4-byte aligned). Its
    digest derives from the float layout's, so two nodes that agreed on the model agreed on this too."""

    def __init__(self, base: Any, block: int = BLOCK):
        if any(not dt.is_floating_point for dt, _, _ in base.segments_at):
            raise QuantizationError("a quantized flat buffer needs a model whose tensors are all floating point")
        self.base, self.block = base, block
        self.numel = sum(n for _, _, n in base.segments_at)
        self.blocks = max(1, -(-self.numel // block))
        self.scale_at = self.numel + -self.numel % 4
        self.zero_at = self.scale_at + 4 * self.blocks
        self.nbytes = self.zero_at + 4 * self.blocks
        self.digest = hashlib.sha256(f"{SCHEME}-block{block}:".encode() + base.digest).digest()[:16]

    def empty(self, device: torch.device | str = "cpu", extra: int = 0) -> torch.Tensor:
        return torch.empty(self.nbytes + extra, dtype=torch.uint8, device=device)

    def _parts(self, qbuf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (qbuf[:self.numel].view(torch.int8), qbuf[self.scale_at:self.zero_at].view(torch.float32),
                qbuf[self.zero_at:self.nbytes].view(torch.float32))

    def quantize(self, buf: torch.Tensor) -> torch.Tensor:
        """The quantized form of a float buffer in the base layout."""
        segments = self.base.segments(buf.cpu())
        x = segments[0] if len(segments) == 1 else torch.cat([s.double() for s in segments])
        padded = torch.zeros(self.blocks * self.block, dtype=x.dtype)
        padded[:self.numel] = x
        q, scale, zero = quantize_rows(padded.view(self.blocks, self.block))
        out = self.empty()
        out[self.numel:self.scale_at] = 0
        values, scales, zeros = self._parts(out)
        values.copy_(q.view(-1)[:self.numel])
        scales.copy_(scale)
        zeros.copy_(zero)
        return out

    def dequantize(self, qbuf: torch.Tensor) -> torch.Tensor:
        """The float buffer (base layout) a quantized one stands for; QuantizationError for bad scales."""
        values, scale, zero = self._parts(qbuf)
        if not bool(torch.isfinite(scale).all() & (scale > 0).all() & torch.isfinite(zero).all()):
            raise QuantizationError("quantized flat buffer: every scale must be finite and > 0, every zero point finite")
        padded = torch.zeros(self.blocks * self.block, dtype=torch.int8)
        padded[:self.numel] = values
        x = dequantize_rows(padded.view(self.blocks, self.block), scale, zero).view(-1)
        out = self.base.empty()
        offset = 0
        for s in self.base.segments(out):
            s.copy_(x[offset:offset + s.numel()])
            offset += s.numel()
        return out

    def views(self, qbuf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named float tensors (dequantized): what a peer that agreed no layout is sent."""
        return self.base.views(self.dequantize(qbuf))

    def all_finite(self, qbuf: torch.Tensor) -> bool:
        _, scale, zero = self._parts(qbuf)
        return bool(torch.isfinite(scale).all() & torch.isfinite(zero).all())
