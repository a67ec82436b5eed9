"""Flat parameter buffers: a model's tensors as views into one contiguous byte buffer.

    FlatLayout(schema)  where each tensor of a schema lives in one buffer: grouped by dtype (one
                        contiguous, 64-byte aligned segment per dtype, in the schema's order within it),
                        with a 16-byte digest of the whole description. Two nodes agree on a layout once
                        per connection (the digest in HELLO, checked by the server); every flat frame
                        after that carries the digest and exactly `nbytes` of payload.
    FlatModel(model)    rebinds the model's parameters (and buffers) as views of one buffer `data` and
                        their gradients as views of another, `grad`: the optimizer, autograd and
                        state_dict() work as before, and averaging, clipping, norms and blends are one
                        operation per dtype segment instead of a loop over parameters.

The math on flat buffers (norms, folds, blends) is here too, so the algorithms say what, not how.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from smolcluster.core.net.wire import DTYPE_NAMES, Schema, TensorSpec, schema_of

SEGMENT_ALIGN = 64  # each dtype's segment starts on a cache line (and on any itemsize)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer
    numel: int


class FlatLayout:
    """Names, dtypes, shapes and byte offsets of a schema's tensors in one buffer, and its digest."""

    def __init__(self, schema: Schema):
        order: dict[torch.dtype, list[str]] = {}
        for name, spec in schema.items():
            if spec.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r} has dtype {spec.dtype}, which has no flat layout")
            order.setdefault(spec.dtype, []).append(name)
        entries: list[Entry] = []
        self.segments_at: list[tuple[torch.dtype, int, int]] = []  # (dtype, byte offset, numel) per segment
        offset = 0
        for dtype, names in order.items():
            offset += -offset % SEGMENT_ALIGN
            start, count = offset, 0
            for name in names:
                spec = schema[name]
                n = math.prod(spec.shape)
                entries.append(Entry(name, dtype, tuple(spec.shape), offset, n))
                offset += n * dtype.itemsize
                count += n
            self.segments_at.append((dtype, start, count))
        index = {name: i for i, name in enumerate(schema)}
        self.entries = tuple(sorted(entries, key=lambda e: index[e.name]))  # the schema's order
        self.nbytes = offset
        self.schema: Schema = {e.name: TensorSpec(e.shape, e.dtype) for e in self.entries}
        text = json.dumps(self.describe(), separators=(",", ":"))
        self.digest = hashlib.sha256(b"smolcluster-flat-v1:" + text.encode()).digest()[:16]

    @classmethod
    def of(cls, state: torch.nn.Module | dict[str, torch.Tensor]) -> "FlatLayout":
        return cls(schema_of(state))

    def describe(self) -> list[list]:
        """[name, dtype, shape, offset] per tensor: what the digest covers, and what an error shows."""
        return [[e.name, DTYPE_NAMES[e.dtype], list(e.shape), e.offset] for e in self.entries]

    def summary(self) -> str:
        params = sum(e.numel for e in self.entries)
        return f"{len(self.entries)} tensors, {params:,} values, layout {self.digest.hex()[:12]}"

    def empty(self, device: torch.device | str = "cpu", extra: int = 0) -> torch.Tensor:
        """An uninitialised buffer for this layout (plus `extra` bytes of slack after it)."""
        return torch.empty(self.nbytes + extra, dtype=torch.uint8, device=device)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view of `buf` (uint8, at least nbytes): writing a view writes the buffer."""
        out = {}
        for e in self.entries:
            t = buf[e.offset:e.offset + e.numel * e.dtype.itemsize].view(e.dtype)
            out[e.name] = t.view(e.shape)
        return out

    def segments(self, buf: torch.Tensor, floating: bool = True) -> list[torch.Tensor]:
        """One 1-D typed view per dtype segment (only the floating ones by default): where the math runs."""
        return [buf[off:off + n * dt.itemsize].view(dt) for dt, off, n in self.segments_at
                if dt.is_floating_point or not floating]

    def pack(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """A new buffer holding `tensors` (which must have every name of the layout, any dtype and device)."""
        buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        with torch.no_grad():
            for name, view in self.views(buf).items():
                view.copy_(tensors[name].reshape(view.shape))
        return buf

    def all_finite(self, buf: torch.Tensor) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in self.segments(buf))

    def mismatch(self, other_digest: str) -> str:
        """What a peer whose layout digest differs is told."""
        return (f"the peer's model layout {other_digest[:12] or '(none)'} differs from this node's model "
                f"({self.summary()}): start every node with the same nn_config / model")


class FlatModel:
    """A model whose parameters live in one buffer per dtype (`data`) and their gradients in another (`grad`).

    The parameters stay the same Parameter objects (the optimizer keeps its references) with their
    storage moved into `data`; `.grad` are views of `grad`, which autograd accumulates into in place,
    so gradients must be zeroed with `zero_grad()` here, never set to None."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layout = FlatLayout.of(model)
        device = next(iter(model.state_dict().values())).device
        self.data = self.layout.empty(device)
        self.grad = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        views, grads = self.layout.views(self.data), self.layout.views(self.grad)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                views[name].copy_(t)
                if name in params:
                    params[name].data = views[name]
                    params[name].grad = grads[name]
                else:  # a buffer: rebind it in its module
                    owner, _, attr = name.rpartition(".")
                    model.get_submodule(owner)._buffers[attr] = views[name]

    def zero_grad(self) -> None:
        self.grad.zero_()

    def weights(self) -> list[torch.Tensor]:
        return self.layout.segments(self.data)

    def grads(self) -> list[torch.Tensor]:
        return self.layout.segments(self.grad)

    def snapshot(self) -> torch.Tensor:
        """A CPU copy of the weights (the wire carries CPU buffers; the model goes on changing)."""
        return self.data.detach().to("cpu", copy=True)

    def load(self, buf: torch.Tensor, alpha: float = 1.0) -> None:
        """Take weights from a buffer of this layout: w = alpha * buf + (1 - alpha) * w, one op per segment."""
        with torch.no_grad():
            if alpha >= 1.0:
                self.data.copy_(buf, non_blocking=False)
                return
            for w, s in zip(self.weights(), self.layout.segments(buf.to(self.data.device))):
                w.lerp_(s.to(w.dtype), alpha)
            for w, s in zip(self.layout.segments(self.data, False), self.layout.segments(buf, False)):
                if not w.is_floating_point():
                    w.copy_(s)


# --------------------------------------------------------------------------- math on flat buffers


def norm(t: torch.Tensor) -> float:
    """L2 norm, finite exactly when every element is: in float32 (3x faster than float64 here), and again
    in float64 when that overflowed, since finite float32 values can overflow a float32 sum of squares."""
    if not t.numel():
        return 0.0
    n = float(torch.linalg.vector_norm(t)) if t.dtype in (torch.float32, torch.float64) else math.inf
    return n if math.isfinite(n) else float(torch.linalg.vector_norm(t, dtype=torch.float64))


def total_norm(segments: list[torch.Tensor]) -> float:
    """L2 norm over all segments (see norm)."""
    return math.sqrt(sum(norm(s) ** 2 for s in segments))


def layer_norms(layout: FlatLayout, buf: torch.Tensor) -> dict[str, float]:
    """Per-tensor L2 norms of a flat buffer (float tensors only), for per-layer gradient tracking."""
    return {name: norm(t) for name, t in layout.views(buf).items() if t.is_floating_point()}


def fold_(acc: list[torch.Tensor], segments: list[torch.Tensor], weight: float) -> None:
    """acc += weight * segments, one op per segment (a weighted sum built as pushes arrive)."""
    for a, s in zip(acc, segments):
        a.add_(s.to(a.device, a.dtype), alpha=weight)


def scale_(segments: list[torch.Tensor], factor: float) -> None:
    for s in segments:
        s.mul_(factor)
