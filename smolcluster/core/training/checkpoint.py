"""Server checkpoints: the full server state in one file, written atomically, nothing unpickled.
(`smolcluster train` writes its single-process state in the same format: checkpoint.smcl and best.smcl.)

The file is one smolcluster wire frame (see wire.py): JSON fields for the scalar state and
optimizer hyper-parameters, tensors for the model and the optimizer's buffers. The frame's MAC slot
holds an HMAC-SHA256 under a fixed, public label: a digest of every byte of the file (model,
optimizer state, counters, version, step, schedule), checked before anything in it is parsed.
Checkpoints written before the digest covered the whole file (model digest only) still load.

Writing goes to a temp file in the same folder, fsync, then rename, so a crash never leaves a
half-written checkpoint; the one it replaces is kept as checkpoint.prev.smcl (best.prev.smcl, ...: a
hard link, no extra space). A write that fails (a full disk) removes its temp file and leaves both in place. Temp files
of killed writers are removed when a server starts (remove_stale_temp_files).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from smolcluster.common.errors import BadMac, MissingKey, SmolclusterError
from smolcluster.core.net.wire import Message, MessageKind, WireLimits, encode_frame, read_frame

CHECKPOINT_NAME = "checkpoint.smcl"
PREVIOUS_NAME = "checkpoint.prev.smcl"  # previous_name(CHECKPOINT_NAME)
# Public on purpose: this is not authentication, it makes the frame's MAC a SHA-256 digest of the file.
DIGEST_KEY = b"smolcluster/checkpoint/digest/v1"
# A checkpoint is a JSON wire frame, the same in wire versions 1 and 2: files written before version 2 load.
CHECKPOINT_VERSIONS = (1, 2)


class CheckpointError(SmolclusterError):
    """A checkpoint is missing, unreadable or does not match the model."""


@dataclass
class ServerState:
    """Everything needed to resume a server exactly where it stopped."""

    algorithm: str
    version: int  # model updates applied
    step: int  # SyncPS: next step to open; EDP: same as version
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    worker_progress: dict[str, int] = field(default_factory=dict)  # EDP: rank -> local steps done (data position)
    server_data_step: int = 0  # the server's own data position when it trains
    counters: dict[str, Any] = field(default_factory=dict)
    legacy: bool = False  # loaded from a file whose digest covers the model only (written before whole-file digests)


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def state_digest(model_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes: equal digests mean bit-for-bit equal models."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        t = model_state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def previous_name(name: str) -> str:
    """checkpoint.smcl -> checkpoint.prev.smcl: where the one before the latest is kept."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.prev.{suffix}" if dot else f"{name}.prev"


def save_checkpoint(directory: Path, state: ServerState, name: str = CHECKPOINT_NAME) -> Path:
    """Write `state` atomically as `name`; the checkpoint it replaces becomes previous_name(name). Raises
    CheckpointError (never a bare OSError) when it cannot be written; the previous files are then intact."""
    directory = Path(directory)
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in state.model.items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in opt_tensors.items()})
    fields = {
        "algorithm": state.algorithm,
        "version": state.version,
        "step": state.step,
        "optimizer": opt_meta,
        "worker_progress": state.worker_progress,
        "server_data_step": state.server_data_step,
        "counters": state.counters,
        "model_digest": state_digest(state.model),
    }
    buffers = encode_frame(Message(MessageKind.WEIGHTS, fields=fields, tensors=tensors), mac_key=DIGEST_KEY)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for b in buffers:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        _keep_previous(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}") from None
    return final


def _keep_previous(final: Path) -> None:
    """Hard-link the current checkpoint as the previous one (atomically replacing the older previous)."""
    if not final.exists():
        return
    previous = final.with_name(previous_name(final.name))
    link = final.with_name(f".{previous.name}.{os.getpid()}.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(final, link)
        os.replace(link, previous)
    except OSError:  # no hard links on this file system: keep only the newest
        link.unlink(missing_ok=True)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Temp files left by writers that were killed mid-write (another pid's, or ours from before a restart)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(".*.smcl.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSource:
    """Gives a file the recv_into() that read_frame expects from a socket."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        if nbytes:
            view = view[:nbytes]
        return self._f.readinto(view) or 0

    def recv(self, n: int) -> bytes:
        return self._f.read(n)


def load_checkpoint(directory: Path, name: str = CHECKPOINT_NAME) -> ServerState:
    """The checkpoint `name` in `directory`. A damaged one is a CheckpointError naming the file and saying
    whether the previous checkpoint is intact (and how to resume from it)."""
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (start without --resume, or point checkpoint_dir at the old run)")
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_previous_hint(path)}") from None


def _previous_hint(path: Path) -> str:
    prev = path.with_name(previous_name(path.name))
    if not prev.exists():
        return "there is no previous checkpoint to fall back on (start without --resume)"
    try:
        older = read_checkpoint(prev)
    except CheckpointError as e:
        return f"the previous checkpoint is damaged too ({e})"
    return (f"the previous checkpoint {prev} (version {older.version}) is intact: to resume from it, "
            f"replace the damaged one with it (mv {prev} {path}) and start with --resume again")


def read_checkpoint(path: Path) -> ServerState:
    """One checkpoint file, verified (digest, structure, finite values) before anything is returned."""
    path = Path(path)
    size = path.stat().st_size
    limits = WireLimits(max_payload_bytes=size, max_tensors=100_000)
    legacy = False
    try:
        with open(path, "rb") as f:
            try:
                msg = read_frame(_FileSource(f), limits=limits, mac_key=DIGEST_KEY, versions=CHECKPOINT_VERSIONS)
            except MissingKey:  # no digest flag: written before whole-file digests
                f.seek(0)
                msg = read_frame(_FileSource(f), limits=limits, versions=CHECKPOINT_VERSIONS)
                legacy = True
            extra = len(f.read(1 << 20))
    except BadMac:
        raise CheckpointError(f"checkpoint {path} is corrupt: its digest does not match its contents "
                              "(the file was altered or damaged)") from None
    except (SmolclusterError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {e}") from None
    if extra:
        raise CheckpointError(f"checkpoint {path} is corrupt: it has bytes after its end")
    try:
        state = _state_from(msg, legacy)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from None
    problem = _implausible(state)
    if legacy and state_digest(state.model) != msg.fields.get("model_digest"):
        problem = "model digest does not match"
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
    return state


def _state_from(msg: Message, legacy: bool) -> ServerState:
    model = {k[len("model."):]: v.clone() for k, v in msg.tensors.items() if k.startswith("model.")}
    opt = {k: v.clone() for k, v in msg.tensors.items() if k.startswith("optim.")}
    fields = msg.fields
    counters = fields.get("counters", {})
    if not isinstance(counters, dict):
        raise TypeError("counters must be an object")
    return ServerState(
        algorithm=str(fields["algorithm"]),
        version=_count(fields["version"], "version"),
        step=_count(fields["step"], "step"),
        model=model,
        optimizer=_unflatten_optimizer(opt, fields["optimizer"]),
        worker_progress={str(k): _count(v, "worker_progress") for k, v in fields.get("worker_progress", {}).items()},
        server_data_step=_count(fields.get("server_data_step", 0), "server_data_step"),
        counters=counters,
        legacy=legacy,
    )


def _count(v: Any, name: str) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"'{name}' must be a non-negative integer, got {v!r}")
    return v


def _implausible(state: ServerState) -> str:
    """What no server can have written: non-finite weights or optimizer state, a negative second moment."""
    for name, t in state.model.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"model tensor '{name}' has NaN or Inf values"
    for idx, entry in state.optimizer["state"].items():
        for key, t in entry.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    return f"optimizer state {idx}.{key} has NaN or Inf values"
                if key in ("exp_avg_sq", "max_exp_avg_sq") and bool((t < 0).any()):
                    return f"optimizer state {idx}.{key} has negative values (a second moment cannot be negative)"
            elif isinstance(t, float) and not math.isfinite(t):
                return f"optimizer state {idx}.{key} is {t}"
    return ""
