"""Server checkpoints: the full server state in one file, written atomically, nothing unpickled.
(`smolcluster train` writes its single-process state in the same format: checkpoint.smcl and best.smcl.)

The file is one smolcluster wire frame (see wire.py): JSON fields for the scalar state and
optimizer hyper-parameters, tensors for the model and the optimizer's buffers. Writing goes to a
temp file in the same folder, fsync, then rename, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from smolcluster.common.errors import SmolclusterError
from smolcluster.core.net.wire import Message, MessageKind, WireLimits, encode_frame, read_frame

CHECKPOINT_NAME = "checkpoint.smcl"


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


def save_checkpoint(directory: Path, state: ServerState, name: str = CHECKPOINT_NAME) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
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
    buffers = encode_frame(Message(MessageKind.WEIGHTS, fields=fields, tensors=tensors))
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        for b in buffers:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


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
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (start without --resume, or point checkpoint_dir at the old run)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            msg = read_frame(_FileSource(f), limits=WireLimits(max_payload_bytes=size, max_tensors=100_000))
    except SmolclusterError as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    model = {k[len("model."):]: v.clone() for k, v in msg.tensors.items() if k.startswith("model.")}
    opt = {k: v.clone() for k, v in msg.tensors.items() if k.startswith("optim.")}
    fields = msg.fields
    if state_digest(model) != fields.get("model_digest"):
        raise CheckpointError(f"checkpoint {path} is corrupt: model digest does not match")
    return ServerState(
        algorithm=fields["algorithm"],
        version=int(fields["version"]),
        step=int(fields["step"]),
        model=model,
        optimizer=_unflatten_optimizer(opt, fields["optimizer"]),
        worker_progress={str(k): int(v) for k, v in fields.get("worker_progress", {}).items()},
        server_data_step=int(fields.get("server_data_step", 0)),
        counters=fields.get("counters", {}),
    )
