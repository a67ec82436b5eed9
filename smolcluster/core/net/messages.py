"""The fields of every message kind, typed and range-checked before an algorithm sees them.

One frozen dataclass per kind; `parse(kind, fields)` returns it or raises BadField naming the kind, the
field and the problem (its `reason`, e.g. "bad-field:samples", is what the server counts). The checks
here depend on the message alone: types, finite numbers, non-negative counts, short strings, known
choices. Checks against the receiver's state (a base_version beyond the server's version, more samples
than the sender can have computed) are `check_push` and `check_pull`, plain functions of values.

No sockets and no clocks: the same code validates a frame read off TCP and a message delivered by a
simulated network. Extra fields are ignored (a newer peer may send more); missing ones take the default
or, when a field has none, are a BadField.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields as dataclass_fields
from typing import Any, Callable, Collection, Mapping

from smolcluster.common.errors import BadField
from smolcluster.core.net.wire import MessageKind

MAX_COUNT = 2**53  # steps, versions, samples: beyond this a JSON number is no longer an exact integer
MAX_TEXT = 1000  # reasons and error messages
MAX_NAME = 255  # hostnames, algorithm names
MAX_LAYERS = 4096  # entries in grad_norms (the wire's tensor limit)

Check = Callable[[str, str, Any], Any]


def _int(lo: int = 0, hi: int = MAX_COUNT) -> Check:
    def check(kind: str, name: str, v: Any) -> int:
        if type(v) is not int:  # bool is an int subclass, and 3.0 is not a step count
            raise BadField(kind, name, f"must be an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise BadField(kind, name, f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def _float(lo: float = 0.0, hi: float = math.inf) -> Check:
    def check(kind: str, name: str, v: Any) -> float:
        if type(v) not in (int, float):
            raise BadField(kind, name, f"must be a number, got {_show(v)}")
        v = float(v)
        if not math.isfinite(v):
            raise BadField(kind, name, f"must be a finite number, got {v}")
        if not lo <= v <= hi:
            raise BadField(kind, name, f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def _bool(kind: str, name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise BadField(kind, name, f"must be true or false, got {_show(v)}")
    return v


def _str(max_chars: int = MAX_TEXT, choices: tuple[str, ...] = (), nonempty: bool = False) -> Check:
    def check(kind: str, name: str, v: Any) -> str:
        if type(v) is not str:
            raise BadField(kind, name, f"must be a string, got {_show(v)}")
        if len(v) > max_chars or (nonempty and not v):
            raise BadField(kind, name, f"must be a string of 1 to {max_chars} characters, got {len(v)}")
        if choices and v not in choices:
            raise BadField(kind, name, f"must be one of {', '.join(choices)}, got {_show(v)}")
        return v
    return check


def _optional(inner: Check) -> Check:
    def check(kind: str, name: str, v: Any) -> Any:
        return None if v is None else inner(kind, name, v)
    return check


def _norms(kind: str, name: str, v: Any) -> dict[str, float]:
    if type(v) is not dict or len(v) > MAX_LAYERS:
        raise BadField(kind, name, f"must be an object of at most {MAX_LAYERS} layer names -> norms, got {_show(v)}")
    out: dict[str, float] = {}
    for layer, norm in v.items():
        if len(layer) > 512:
            raise BadField(kind, name, f"has a layer name of {len(layer)} characters")
        if type(norm) not in (int, float) or not math.isfinite(norm) or norm < 0:
            # the reason stays "bad-field:grad_norms": counters must not be keyed by what a peer names
            raise BadField(kind, name, f"layer {layer[:64]!r} has {_show(norm)}, not a finite number >= 0")
        out[layer] = float(norm)
    return out


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _spec(check: Check, default: Any = MISSING) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"check": check})
    return field(default=default, metadata={"check": check})


# --------------------------------------------------------------------------- worker -> server


@dataclass(frozen=True)
class Hello:
    rank: int = _spec(_int(0, 1 << 16))
    hostname: str = _spec(_str(MAX_NAME, nonempty=True))
    algorithm: str = _spec(_str(MAX_NAME))
    layout: str = _spec(_str(64), "")  # hex digest of the sender's flat layout: flat frames from then on


@dataclass(frozen=True)
class Push:
    """Gradients or weights. SyncPS sends `step` (the step they are for); EDP sends `mode` and `want_weights`."""

    base_version: int = _spec(_int())  # the server version the sender last took weights from
    worker_step: int = _spec(_int())  # local steps the sender has done (its data position)
    samples: int = _spec(_int(1))  # samples behind this push: weights the SyncPS average
    loss: float | None = _spec(_optional(_float(-math.inf)), None)
    step: int | None = _spec(_optional(_int()), None)
    mode: str = _spec(_str(16, ("weights", "gradients")), "weights")
    want_weights: bool = _spec(_bool, False)
    grad_norms: dict[str, float] = _spec(_norms, {})  # the sender's per-layer norms (EDP weights mode)


@dataclass(frozen=True)
class Pull:
    worker_step: int = _spec(_int(), 0)


@dataclass(frozen=True)
class Bye:
    """Either way. From a worker: finished, steps, samples_per_s. From the server: status says how the run ended."""

    reason: str = _spec(_str(), "")
    finished: bool = _spec(_bool, False)
    steps: int | None = _spec(_optional(_int()), None)
    samples_per_s: float | None = _spec(_optional(_float()), None)
    status: str = _spec(_str(16, ("finished", "stopped", "error")), "finished")


# --------------------------------------------------------------------------- server -> worker


@dataclass(frozen=True)
class Welcome:
    version: int = _spec(_int())
    step: int = _spec(_int(), 0)
    worker_step: int = _spec(_int(), 0)


@dataclass(frozen=True)
class Ack:
    status: str = _spec(_str(16, ("applied", "late", "rejected")))
    version: int = _spec(_int())
    tau: int | None = _spec(_optional(_int()), None)
    finished: bool = _spec(_bool, False)
    reason: str = _spec(_str(), "")
    next_step: int | None = _spec(_optional(_int()), None)


@dataclass(frozen=True)
class Weights:
    version: int = _spec(_int())
    step: int = _spec(_int(), 0)


@dataclass(frozen=True)
class StepDone:
    step: int = _spec(_int())
    next_step: int = _spec(_int())
    version: int = _spec(_int())
    held_s: float = _spec(_float(), 0.0)


@dataclass(frozen=True)
class Error:
    error: str = _spec(_str(), "Error")
    message: str = _spec(_str(), "")


TYPES: dict[MessageKind, type] = {
    MessageKind.HELLO: Hello, MessageKind.PUSH: Push, MessageKind.PULL: Pull, MessageKind.BYE: Bye,
    MessageKind.WELCOME: Welcome, MessageKind.ACK: Ack, MessageKind.WEIGHTS: Weights,
    MessageKind.STEP_DONE: StepDone, MessageKind.ERROR: Error,
}


def parse(kind: MessageKind, values: Mapping[str, Any]) -> Any:
    """The typed message for `kind`, or BadField. Never any other exception, whatever `values` holds."""
    cls = TYPES.get(kind)
    if cls is None:
        raise BadField(kind.name, "kind", f"{kind.name} carries no fields this node reads")
    if not isinstance(values, Mapping):
        raise BadField(kind.name, "fields", f"must be an object, got {_show(values)}")
    out: dict[str, Any] = {}
    for f in dataclass_fields(cls):
        if f.name in values:
            out[f.name] = f.metadata["check"](kind.name, f.name, values[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise BadField(kind.name, f.name, "is missing")
    return cls(**out)


# --------------------------------------------------------------------------- checks against the receiver's state


def check_push(push: Push, *, version: int, max_samples: int, max_worker_step: int, layers: Collection[str]) -> None:
    """A push the server can take: based on a version it has published, no more samples than the sender
    can have computed since its last push, a data position within the run, norms of layers the model has."""
    if push.base_version > version:
        raise BadField("PUSH", "base_version", f"is {push.base_version}, ahead of the server's version {version}")
    if push.samples > max_samples:
        raise BadField("PUSH", "samples", f"is {push.samples}, more than one push can carry ({max_samples})")
    if push.worker_step > max_worker_step:
        raise BadField("PUSH", "worker_step", f"is {push.worker_step}, beyond the run's {max_worker_step} steps")
    unknown = set(push.grad_norms) - set(layers)
    if unknown:
        raise BadField("PUSH", "grad_norms", f"names layers the model does not have: {sorted(unknown)[:3]}")


def check_pull(pull: Pull, *, max_worker_step: int) -> None:
    if pull.worker_step > max_worker_step:
        raise BadField("PULL", "worker_step", f"is {pull.worker_step}, beyond the run's {max_worker_step} steps")
