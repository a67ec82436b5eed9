"""Wire format: one frame per message. No pickle, ever.

CONTRACT (the rest of the code is written against this; the implementation fills it in):

    frame  = preamble | header (JSON, UTF-8) | payload (raw tensor bytes) [| mac (32 bytes)]
    preamble: magic, version, kind (MessageKind), flags, header length, payload length, sequence number

Public API:
    MessageKind            IntEnum of message kinds
    Message                kind + JSON fields + named tensors + per-tensor quantization params
    TensorSpec             expected shape and dtype of one tensor; a Schema is dict[str, TensorSpec]
    WireLimits             hard limits checked before any allocation
    schema_of(state)       Schema of a module or state dict
    encode_frame(msg, ...) -> list of buffers ready for sendmsg (no copies of tensor data)
    read_frame(sock, ...)  -> Message (recv_into a preallocated buffer, torch.frombuffer)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class MessageKind(enum.IntEnum):
    HELLO = 1  # worker -> server: rank, hostname, algorithm
    WELCOME = 2  # server -> worker: version, step, current weights
    PUSH = 3  # worker -> server: gradients or weights, tagged with step / base_version
    ACK = 4  # server -> worker: push outcome (applied | late | rejected), version; may carry weights
    PULL = 5  # worker -> server: asks for current weights
    WEIGHTS = 6  # server -> worker: current weights and version
    STEP_DONE = 7  # server -> worker (SyncPS): step closed, next step, maybe weights
    BYE = 8  # either way: clean leave, with a reason
    ERROR = 9  # either way: a typed error the peer should show, then the connection closes
    HEARTBEAT = 10  # either way: liveness; never surfaced by Connection.recv
    AUTH_CHALLENGE = 11
    AUTH_RESPONSE = 12
    AUTH_OK = 13
    ECHO = 14  # benchmarks and link checks


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


Schema = dict[str, TensorSpec]


@dataclass
class Message:
    kind: MessageKind
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class WireLimits:
    max_header_bytes: int = 1 << 20
    max_payload_bytes: int = 1 << 31
    max_tensors: int = 4096


def schema_of(state: torch.nn.Module | dict[str, torch.Tensor]) -> Schema:
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in state.items()}
