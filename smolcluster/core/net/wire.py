"""Wire format: one frame per message. Nothing is ever unpickled.

The frame:

    frame  = preamble | header | payload [| mac (32 bytes)]
    preamble: magic, version, kind (MessageKind), flags, header length, payload length, sequence number

Two kinds of header (wire version 2):
- binary (flag BINARY): fixed fields (step, version, base_version, samples, worker_step, next_step, tau,
  loss, held_s, want_weights, finished, status, mode, which of them are present) and the 16-byte
  digest of the flat layout, then, only when a message has fields none of those slots hold (a reason,
  grad_norms), a small JSON object of them. The push/pull path (PUSH, PULL, ACK, WEIGHTS, STEP_DONE)
  uses it; with flag FLAT its payload is one flat buffer in the layout both ends agreed on once per
  connection (see core/training/flat.py): exactly `layout.nbytes` bytes, no tensor table.
- JSON: {"tensors": TABLE, "fields": FIELDS}, for control messages and named tensors (a peer that
  agreed no layout, quantized tensors, tests and benchmarks).

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
import functools
import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from smolcluster.common.errors import (
    BadHeader,
    BadMac,
    BadMagic,
    BadTensorTable,
    ConnectionClosed,
    FrameTooLarge,
    MissingKey,
    NonFiniteTensor,
    ReplayedFrame,
    SchemaMismatch,
    ShapeMismatch,
    TruncatedFrame,
    UnknownDtype,
    UnsupportedVersion,
)


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
    flat: torch.Tensor | None = None  # one uint8 buffer in `layout` (instead of named tensors)
    layout: Any = None  # a FlatLayout (core/training/flat.py): digest, nbytes, views(buf), all_finite(buf)

    def named(self) -> dict[str, torch.Tensor]:
        """The tensors by name: views of the flat buffer, or the named tensors."""
        return self.layout.views(self.flat) if self.flat is not None else self.tensors


@dataclass(frozen=True)
class WireLimits:
    max_header_bytes: int = 1 << 20
    max_payload_bytes: int = 1 << 31
    max_tensors: int = 4096


def schema_of(state: torch.nn.Module | dict[str, torch.Tensor]) -> Schema:
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in state.items()}


# --------------------------------------------------------------------------- frame layout

MAGIC = b"SMCL"
VERSION = 2
# magic, version u8, kind u16, flags u8, header_len u32, payload_len u64, seq u64 (network byte order)
PREAMBLE = struct.Struct("!4sBHBIQQ")
FLAG_MAC = 0x01
FLAG_BINARY = 0x02  # the header is BINARY (+ a JSON object of the fields no slot holds)
FLAG_FLAT = 0x04  # the payload is the agreed flat layout (needs BINARY)
KNOWN_FLAGS = FLAG_MAC | FLAG_BINARY | FLAG_FLAT
# present bits u16, bool bits u8, status code u8, mode code u8, pad, layout digest 16s, 7 x u64, 2 x f64
BINARY = struct.Struct("!HBBBx16s7Q2d")
INT_SLOTS = ("step", "version", "base_version", "samples", "worker_step", "next_step", "tau")
FLOAT_SLOTS = ("loss", "held_s")
BOOL_SLOTS = ("want_weights", "finished")
CHOICE_SLOTS = {"status": ("applied", "late", "rejected"), "mode": ("weights", "gradients")}
_SLOT_BITS = {name: 1 << i for i, name in enumerate((*INT_SLOTS, *FLOAT_SLOTS, *BOOL_SLOTS, *CHOICE_SLOTS))}
_ALL_SLOT_BITS = sum(_SLOT_BITS.values())
_BOOL_BITS = {name: _SLOT_BITS[name] >> 9 for name in BOOL_SLOTS}  # where each bool sits in the bool byte
# The slots in the order they are read back, with their bits made once (the push/pull path reads one per frame).
_INT_READ = tuple((_SLOT_BITS[name], name, i) for i, name in enumerate(INT_SLOTS))
_FLOAT_READ = tuple((_SLOT_BITS[name], name, len(INT_SLOTS) + i) for i, name in enumerate(FLOAT_SLOTS))
_INT_INDEX = {name: i for i, name in enumerate(INT_SLOTS)}
_FLOAT_INDEX = {name: i for i, name in enumerate(FLOAT_SLOTS)}
_CHOICE_CODES = {name: {v: i for i, v in enumerate(values)} for name, values in CHOICE_SLOTS.items()}
_KINDS = {int(k): k for k in MessageKind}  # MessageKind(n) goes through enum's slow __call__
BINARY_KINDS = frozenset({3, 4, 5, 6, 7})  # PUSH, ACK, PULL, WEIGHTS, STEP_DONE: the push/pull path
FLAT_LEAD = 128  # where a flat payload starts in a receive buffer: the binary header fits before it
NO_DIGEST = bytes(16)
MAC_BYTES = 32
# Tensor offsets are aligned so every tensor can be a view of the receive buffer (largest itemsize is 8).
ALIGN = 8
_PADDING = bytes(ALIGN)
RECV_ALIGN = 64  # where the payload starts in a receive buffer (local only; the format needs ALIGN)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Bounds on names and quantization params, so one header entry cannot be made arbitrarily expensive.
MAX_NAME_CHARS = 512
MAX_NDIM = 32
MAX_QUANT_KEYS = 16
MAX_QUANT_KEY_CHARS = 64
MAX_QUANT_LIST = 256
MAX_QUANT_STR = 256


def _is_json_scalar(v: Any) -> bool:
    if isinstance(v, str):
        return len(v) <= MAX_QUANT_STR
    return v is None or isinstance(v, (bool, int, float))


def _check_quant(name: str, q: Any) -> str | None:
    """Return a problem description if `q` is not a small dict of str -> JSON scalar / short list of scalars."""
    if not isinstance(q, dict):
        return f"quant params of tensor '{name}' must be a JSON object, got {type(q).__name__}"
    if len(q) > MAX_QUANT_KEYS:
        return f"quant params of tensor '{name}' have {len(q)} keys (max {MAX_QUANT_KEYS})"
    for k, v in q.items():
        if not isinstance(k, str) or len(k) > MAX_QUANT_KEY_CHARS:
            return f"quant params of tensor '{name}' have a bad key {k!r}"
        if isinstance(v, list):
            if len(v) > MAX_QUANT_LIST or not all(_is_json_scalar(x) for x in v):
                return f"quant param '{k}' of tensor '{name}' must be a list of at most {MAX_QUANT_LIST} scalars"
        elif not _is_json_scalar(v):
            return f"quant param '{k}' of tensor '{name}' must be a JSON scalar or a short list, got {type(v).__name__}"
    return None


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a memoryview, without copying when it is already a contiguous CPU tensor."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; same bytes
    return memoryview(t.numpy())


# --------------------------------------------------------------------------- encode


class LayoutCache:
    """Per-connection memo of tensor tables. A model's table (names, dtypes, shapes, offsets) is the same
    in frame after frame, so the sender reuses its JSON and the receiver, when a header starts with a
    table it already validated byte for byte, skips parsing and re-validating it. Bounded; one per
    connection and direction, never shared."""

    def __init__(self, size: int = 8):
        self.size = size
        self.encoded: dict[tuple, tuple[bytes, list[int], int]] = {}  # layout -> (header prefix, pads, payload)
        self.decoded: list[tuple[bytes, int, Any, list, dict]] = []  # (prefix, payload_len, schema, specs, quant)

    def remember_encoded(self, key: tuple, value: tuple[bytes, list[int], int]) -> None:
        if len(self.encoded) >= self.size:
            self.encoded.pop(next(iter(self.encoded)))
        self.encoded[key] = value

    def remember_decoded(self, entry: tuple[bytes, int, Any, list, dict]) -> None:
        self.decoded.insert(0, entry)
        del self.decoded[self.size:]


def _header(prefix: bytes, fields: dict[str, Any]) -> bytes:
    try:
        return prefix + json.dumps(fields, separators=(",", ":")).encode() + b"}"
    except (TypeError, ValueError) as e:
        raise BadHeader(f"message fields are not JSON-serialisable: {e}") from None


def table_prefix(table: list[dict[str, Any]]) -> bytes:
    """Header = {"tensors": TABLE, "fields": FIELDS}; the table comes first so it can be cached."""
    return b'{"tensors":' + json.dumps(table, separators=(",", ":")).encode() + b',"fields":'


def frame_mac(mac_key: bytes, buffers: list[memoryview | bytes]) -> bytes:
    """HMAC-SHA256 over a frame's bytes (preamble, header, payload): the 32 bytes that end the frame."""
    mac = hmac.new(mac_key, buffers[0], hashlib.sha256)
    for b in buffers[1:]:
        mac.update(b)
    return mac.digest()


def _finish_frame(msg: Message, header: bytes, buffers: list, payload_len: int, seq: int,
                  mac_key: bytes | None, limits: WireLimits, defer_mac: bool, flags: int = 0) -> list[memoryview | bytes]:
    if len(header) > limits.max_header_bytes:
        raise FrameTooLarge(f"header is {len(header)} bytes, the limit is {limits.max_header_bytes}")
    if payload_len > limits.max_payload_bytes:
        raise FrameTooLarge(f"payload is {payload_len} bytes, the limit is {limits.max_payload_bytes}")
    flags |= FLAG_MAC if mac_key is not None else 0
    head = PREAMBLE.pack(MAGIC, VERSION, int(msg.kind), flags, len(header), payload_len, seq) + header
    out: list[memoryview | bytes] = [head, *buffers]
    if mac_key is not None and not defer_mac:
        out.append(frame_mac(mac_key, out))
    return out


class FlatBuffer:
    """A preallocated receive buffer for flat frames of up to `nbytes` (header before, MAC after), with its
    memoryview made once: reading a flat frame allocates nothing."""

    def __init__(self, nbytes: int):
        self.tensor = torch.empty(FLAT_LEAD + nbytes + MAC_BYTES, dtype=torch.uint8)
        self.view = memoryview(self.tensor.numpy())
        self._payloads: dict[int, torch.Tensor] = {}  # payload length -> its view (slicing a tensor costs ~1 us)

    def payload(self, nbytes: int) -> torch.Tensor:
        """The payload of a flat frame of `nbytes` in this buffer, as a tensor view (the same view each time)."""
        view = self._payloads.get(nbytes)
        if view is None:
            view = self._payloads[nbytes] = self.tensor[FLAT_LEAD:FLAT_LEAD + nbytes]
        return view


def binary_header(fields: dict[str, Any], digest: bytes = NO_DIGEST) -> bytes:
    """The fixed binary header: each field a slot can hold goes in its slot; the rest (a reason,
    grad_norms, a value of the wrong type, which the receiver's typed check then rejects) follow as JSON."""
    ints = [0] * len(INT_SLOTS)
    floats = [0.0] * len(FLOAT_SLOTS)
    present = bools = 0
    codes = {"status": 0, "mode": 0}
    rest: dict[str, Any] = {}
    for name, v in fields.items():
        kind = type(v)
        if kind is int and name in _INT_INDEX and 0 <= v < 1 << 64:
            ints[_INT_INDEX[name]] = v
        elif (kind is float or kind is int) and name in _FLOAT_INDEX:
            floats[_FLOAT_INDEX[name]] = float(v)
        elif kind is bool and name in _BOOL_BITS:
            bools |= _BOOL_BITS[name] if v else 0
        elif kind is str and name in _CHOICE_CODES and v in _CHOICE_CODES[name]:
            codes[name] = _CHOICE_CODES[name][v]
        else:
            rest[name] = v
            continue
        present |= _SLOT_BITS[name]
    head = BINARY.pack(present, bools, codes["status"], codes["mode"], digest, *ints, *floats)
    if not rest:
        return head
    try:
        return head + json.dumps(rest, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise BadHeader(f"message fields are not JSON-serialisable: {e}") from None


@functools.lru_cache(maxsize=64)
def _numbers_present(present: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The int and float slots a header's present bits name, and where their values are (a frame on the
    push/pull path sets the same few bits frame after frame)."""
    read = [(name, i) for bit, name, i in (*_INT_READ, *_FLOAT_READ) if present & bit]
    return tuple(name for name, _ in read), tuple(i for _, i in read)


def parse_binary_header(raw: bytes | bytearray | memoryview, peer: str | None) -> tuple[dict[str, Any], bytes]:
    """(fields, layout digest) of a binary header; BadHeader for unknown bits or codes."""
    present, bools, status, mode, digest, *values = BINARY.unpack_from(raw)
    if present & ~_ALL_SLOT_BITS or bools & ~(_BOOL_BITS["finished"] | _BOOL_BITS["want_weights"]):
        raise BadHeader(f"binary header has unknown field bits {present:#06x}/{bools:#04x}", peer=peer)
    names, at = _numbers_present(present)
    fields: dict[str, Any] = dict(zip(names, [values[i] for i in at]))
    for name, bit in _BOOL_BITS.items():
        if present & _SLOT_BITS[name]:
            fields[name] = bool(bools & bit)
    for name, code in (("status", status), ("mode", mode)):
        if present & _SLOT_BITS[name]:
            if code >= len(CHOICE_SLOTS[name]):
                raise BadHeader(f"binary header has an unknown {name} code {code}", peer=peer)
            fields[name] = CHOICE_SLOTS[name][code]
    if len(raw) > BINARY.size:
        try:
            rest = json.loads(bytes(raw[BINARY.size:]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BadHeader(f"the JSON after the binary header is not valid UTF-8 JSON ({e})", peer=peer) from None
        if not isinstance(rest, dict):
            raise BadHeader("the JSON after the binary header must be an object of fields", peer=peer)
        twice = set(rest) & set(fields)
        if twice:
            raise BadHeader(f"field(s) {sorted(twice)[:3]} given twice (binary slot and JSON)", peer=peer)
        fields.update(rest)
    return fields, bytes(digest)


def encode_frame(
    msg: Message, *, seq: int = 0, mac_key: bytes | None = None, limits: WireLimits = WireLimits(),
    cache: LayoutCache | None = None, defer_mac: bool = False,
) -> list[memoryview | bytes]:
    """Encode `msg` as buffers for `send_frame`. Tensor data is referenced, not copied.

    A message with a flat buffer becomes a binary FLAT frame; one of the push/pull kinds without tensors
    a binary frame; anything else a JSON frame with a tensor table. With a key the frame ends with its
    MAC; `defer_mac` leaves it off, for a sender that sends the frame first and `frame_mac(key, buffers)`
    after it, so the peer receives while this side hashes."""
    if msg.flat is not None or (not msg.tensors and int(msg.kind) in BINARY_KINDS):
        if msg.flat is not None:
            data = _tensor_bytes(msg.flat)
            if msg.layout is None or data.nbytes != msg.layout.nbytes:
                raise BadTensorTable("a flat buffer must come with its layout and be exactly layout.nbytes long")
            header, buffers, flags = binary_header(msg.fields, msg.layout.digest), [data], FLAG_BINARY | FLAG_FLAT
        else:
            header, buffers, flags = binary_header(msg.fields), [], FLAG_BINARY
        return _finish_frame(msg, header, buffers, sum(len(b) for b in buffers), seq, mac_key, limits, defer_mac, flags)
    key = None
    if cache is not None and not msg.quant:
        key = tuple((name, t.dtype, t.shape) for name, t in msg.tensors.items())
        hit = cache.encoded.get(key)
        if hit is not None:
            prefix, pads, payload_len = hit
            buffers: list[memoryview | bytes] = []
            for pad, t in zip(pads, msg.tensors.values()):
                if pad:
                    buffers.append(_PADDING[:pad])
                data = _tensor_bytes(t)
                if data.nbytes:
                    buffers.append(data)
            return _finish_frame(msg, _header(prefix, msg.fields), buffers, payload_len, seq, mac_key, limits, defer_mac)
    table: list[dict[str, Any]] = []
    pads: list[int] = []
    buffers: list[memoryview | bytes] = []
    offset = 0
    if len(msg.tensors) > limits.max_tensors:
        raise FrameTooLarge(f"message has {len(msg.tensors)} tensors, the limit is {limits.max_tensors}")
    unknown_quant = set(msg.quant) - set(msg.tensors)
    if unknown_quant:
        raise BadTensorTable(f"quant params given for tensors not in the message: {sorted(unknown_quant)}")
    for name, t in msg.tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise BadTensorTable(f"tensor name {name!r} must be a non-empty string of at most {MAX_NAME_CHARS} chars")
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise UnknownDtype(f"tensor '{name}' has dtype {t.dtype}, which the wire format does not carry "
                               f"(allowed: {', '.join(DTYPES)})")
        data = _tensor_bytes(t)
        pad = -offset % ALIGN
        pads.append(pad)
        if pad:
            buffers.append(_PADDING[:pad])
            offset += pad
        entry: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "length": data.nbytes}
        if name in msg.quant:
            problem = _check_quant(name, msg.quant[name])
            if problem:
                raise BadTensorTable(problem)
            entry["quant"] = msg.quant[name]
        table.append(entry)
        if data.nbytes:
            buffers.append(data)
        offset += data.nbytes
    if offset > limits.max_payload_bytes:
        raise FrameTooLarge(f"payload is {offset} bytes, the limit is {limits.max_payload_bytes}")
    prefix = table_prefix(table)
    if key is not None:
        cache.remember_encoded(key, (prefix, pads, offset))
    return _finish_frame(msg, _header(prefix, msg.fields), buffers, offset, seq, mac_key, limits, defer_mac)


def byte_views(buffers: list[memoryview | bytes]) -> list[memoryview | bytes]:
    """A frame's non-empty buffers as bytes or byte memoryviews, so len() of each is its size in bytes."""
    return [b if type(b) is bytes else memoryview(b).cast("B") for b in buffers if len(b)]


def unsent(views: list[memoryview | bytes], sent: int) -> list[memoryview | bytes]:
    """What of `views` (byte_views) is left after a send took its first `sent` bytes."""
    for i, v in enumerate(views):
        if sent < len(v):
            return [memoryview(v)[sent:], *views[i + 1:]]
        sent -= len(v)
    return []


def send_frame(sock: Any, buffers: list[memoryview | bytes]) -> int:
    """Send all buffers; scatter-gather with sendmsg where it exists (not on Windows). Returns bytes sent."""
    views = byte_views(buffers)
    total = sum(len(v) for v in views)
    if not hasattr(sock, "sendmsg"):
        for v in views:
            sock.sendall(v)
        return total
    while views:
        # IOV_MAX is 1024 on Linux and macOS; stay below it.
        views = unsent(views, sock.sendmsg(views[:512]))
    return total


# --------------------------------------------------------------------------- decode


def _recv_exactly(sock: Any, view: memoryview, what: str, peer: str | None, frame_start: bool = False,
                  pos: int = 0, at_least: int | None = None) -> int:
    """Fill view[pos:] (or, with `at_least`, stop once that many bytes are in; more may arrive in the same
    call). Returns the fill position."""
    size = view.nbytes
    want = size if at_least is None else at_least
    while pos < want:
        try:
            n = sock.recv_into(view[pos:])
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            raise ConnectionClosed(f"connection reset while reading the {what} ({e})", peer=peer) from None
        if n == 0:
            if frame_start and pos == 0:
                raise ConnectionClosed("peer closed the connection", peer=peer)
            raise TruncatedFrame(f"connection closed after {pos} of {size} bytes of the {what}", peer=peer)
        pos += n
    return pos


def _parse_header(raw: bytes | bytearray, payload_len: int, limits: WireLimits, schema: Schema | None,
                  peer: str | None) -> tuple[dict[str, Any], list[tuple[str, torch.dtype, tuple[int, ...], int, int]], dict[str, dict[str, Any]]]:
    """Validate the JSON header and tensor table against the limits, the payload length and the schema."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadHeader(f"header is not valid UTF-8 JSON ({e})", peer=peer) from None
    if not isinstance(header, dict) or not isinstance(header.get("fields"), dict) or not isinstance(header.get("tensors"), list):
        raise BadHeader("header must be a JSON object with 'fields' (object) and 'tensors' (list)", peer=peer)
    entries = header["tensors"]
    if len(entries) > limits.max_tensors:
        raise FrameTooLarge(f"{len(entries)} tensors declared, the limit is {limits.max_tensors}", peer=peer)
    specs = []
    quant: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for i, e in enumerate(entries):
        if type(e) is not dict:
            raise BadTensorTable(f"tensor table entry {i} is not an object", peer=peer)
        name = e.get("name")
        dname = e.get("dtype")
        shape = e.get("shape")
        off = e.get("offset")
        length = e.get("length")
        if type(name) is not str or not name or len(name) > MAX_NAME_CHARS:
            raise BadTensorTable(f"tensor table entry {i} has a bad name {str(name)[:80]!r}", peer=peer)
        if name in names:
            raise BadTensorTable(f"tensor '{name}' appears twice in the tensor table", peer=peer)
        names.add(name)
        dtype = DTYPES.get(dname) if type(dname) is str else None
        if dtype is None:
            raise UnknownDtype(f"tensor '{name}' has dtype {str(dname)[:40]!r}; allowed: {', '.join(DTYPES)}", peer=peer)
        if type(shape) is not list or len(shape) > MAX_NDIM:
            raise BadTensorTable(f"tensor '{name}' shape must be a list of at most {MAX_NDIM} non-negative ints", peer=peer)
        for d in shape:
            if type(d) is not int or d < 0:
                raise BadTensorTable(f"tensor '{name}' shape must be a list of at most {MAX_NDIM} non-negative ints", peer=peer)
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            raise BadTensorTable(f"tensor '{name}' needs non-negative integer offset and length", peer=peer)
        itemsize = dtype.itemsize
        if math.prod(shape) * itemsize != length:
            raise ShapeMismatch(f"tensor '{name}' has shape {shape} of {dname} = {math.prod(shape) * itemsize} bytes, "
                                f"but its length is {length}", peer=peer)
        if off + length > payload_len:
            raise BadTensorTable(f"tensor '{name}' spans bytes {off}..{off + length}, beyond the {payload_len}-byte payload", peer=peer)
        if off % itemsize:
            raise BadTensorTable(f"tensor '{name}' offset {off} is not aligned to its {itemsize}-byte items", peer=peer)
        if "quant" in e:
            problem = _check_quant(name, e["quant"])
            if problem:
                raise BadTensorTable(problem, peer=peer)
            quant[name] = e["quant"]
        if schema is not None:
            spec = schema.get(name)
            if spec is None:
                raise SchemaMismatch(f"unexpected tensor '{name}' (not in the model)", peer=peer)
            if tuple(shape) != tuple(spec.shape) or dtype != spec.dtype:
                raise SchemaMismatch(f"tensor '{name}' is {dname}{list(shape)}, the model expects "
                                     f"{DTYPE_NAMES.get(spec.dtype, spec.dtype)}{list(spec.shape)}", peer=peer)
        specs.append((name, dtype, tuple(shape), off, length))
    spans = sorted((off, off + length, name) for name, _, _, off, length in specs if length)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise BadTensorTable(f"tensors '{a}' and '{b}' overlap in the payload", peer=peer)
    # The table accounts for every payload byte (encode_frame ends the payload with the last tensor), so
    # a declared payload length cannot make the receiver allocate more than the tensors need.
    end = max((off + length for _, _, _, off, length in specs), default=0)
    if payload_len != end:
        raise BadTensorTable(f"payload is {payload_len} bytes but the tensor table ends at byte {end}", peer=peer)
    return header["fields"], specs, quant


def _parse_header_cached(raw: bytes, payload_len: int, limits: WireLimits, schema: Schema | None,
                         peer: str | None, cache: LayoutCache | None):
    """_parse_header, skipping the table when it is byte for byte one this connection already validated."""
    if cache is None:
        return _parse_header(raw, payload_len, limits, schema, peer)
    for prefix, plen, known_schema, specs, quant in cache.decoded:
        if plen == payload_len and known_schema is schema and raw.startswith(prefix) and raw.endswith(b"}"):
            try:
                fields = json.loads(bytes(raw[len(prefix):-1]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise BadHeader(f"header is not valid UTF-8 JSON ({e})", peer=peer) from None
            if not isinstance(fields, dict):
                raise BadHeader("header 'fields' must be a JSON object", peer=peer)
            return fields, specs, quant
    fields, specs, quant = _parse_header(raw, payload_len, limits, schema, peer)
    table = [{"name": n, "dtype": DTYPE_NAMES[d], "shape": list(sh), "offset": o, "length": ln}
             | ({"quant": quant[n]} if n in quant else {}) for n, d, sh, o, ln in specs]
    prefix = table_prefix(table)
    if raw.startswith(prefix):  # the sender wrote the canonical form: safe to recognise next time
        cache.remember_decoded((prefix, payload_len, schema, specs, quant))
    return fields, specs, quant


def max_payload_for(schema: Schema) -> int:
    """The largest payload a frame matching `schema` can have: every tensor, each after its alignment padding."""
    return sum(math.prod(spec.shape) * spec.dtype.itemsize + ALIGN for spec in schema.values())


def read_frame(
    sock: Any,
    *,
    limits: WireLimits = WireLimits(),
    schema: Schema | None = None,
    reject_nonfinite: bool = False,
    mac_key: bytes | None = None,
    expected_seq: int | None = None,
    peer: str | None = None,
    cache: LayoutCache | None = None,
    layout: Any = None,
    flat_buffer: Any = None,
    versions: tuple[int, ...] = (VERSION,),
) -> Message:
    """Read one frame from `sock` (anything with recv_into) and return the Message.

    Order matters: every length is checked before its buffer is allocated, and with a key the MAC is
    verified before the header is trusted or any tensor is built. Tensors are views of one receive buffer.
    `layout` is the flat layout agreed on this connection, or a tuple of them (None: flat frames are
    refused); `flat_buffer()` gives the preallocated FlatBuffer a flat frame is read into.
    `versions` are the wire versions accepted (a checkpoint file may be a version 1 frame: its JSON
    frames are the same in version 2).
    """
    pre = bytearray(PREAMBLE.size)
    _recv_exactly(sock, memoryview(pre), "preamble", peer, frame_start=True)
    magic, version, kind_raw, flags, header_len, payload_len, seq = PREAMBLE.unpack(pre)
    if magic != MAGIC:
        raise BadMagic(f"expected magic {MAGIC!r}, got {bytes(magic)!r} (not a smolcluster peer, or the stream is out of sync)", peer=peer)
    if version not in versions:
        raise UnsupportedVersion(f"peer speaks wire version {version}, this is {VERSION}: "
                                 "run the same smolcluster version everywhere", peer=peer)
    kind = _KINDS.get(kind_raw)
    if kind is None:
        raise BadHeader(f"unknown message kind {kind_raw}", peer=peer)
    if flags & ~KNOWN_FLAGS:
        raise BadHeader(f"unknown flag bits {flags:#04x}", peer=peer)
    if header_len > limits.max_header_bytes:
        raise FrameTooLarge(f"{kind.name} frame declares a header of {header_len} bytes, the limit is {limits.max_header_bytes}", peer=peer)
    if payload_len > limits.max_payload_bytes:
        raise FrameTooLarge(f"{kind.name} frame declares a payload of {payload_len} bytes, the limit is {limits.max_payload_bytes}", peer=peer)
    binary, flat = bool(flags & FLAG_BINARY), bool(flags & FLAG_FLAT)
    agreed = () if layout is None else tuple(layout) if isinstance(layout, (tuple, list)) else (layout,)
    if binary and header_len < BINARY.size:
        raise BadHeader(f"{kind.name} frame has a binary header of {header_len} bytes, it needs {BINARY.size}", peer=peer)
    if flat:
        if not binary:
            raise BadHeader(f"{kind.name} frame is flat but its header is not binary", peer=peer)
        if not agreed:
            raise SchemaMismatch(f"{kind.name} frame carries a flat buffer, but no layout was agreed on this "
                                 "connection (the HELLO names the model's layout)", peer=peer)
        if all(payload_len != a.nbytes for a in agreed):
            raise ShapeMismatch(f"{kind.name} frame carries a flat buffer of {payload_len} bytes, the agreed layout "
                                f"has {' or '.join(str(a.nbytes) for a in agreed)}", peer=peer)
    elif binary and payload_len:
        raise BadTensorTable(f"{kind.name} frame with a binary header declares {payload_len} payload bytes but no "
                             "flat buffer (binary frames carry tensors only as the agreed flat layout)", peer=peer)
    elif schema is not None and payload_len > max_payload_for(schema):
        raise FrameTooLarge(f"{kind.name} frame declares a payload of {payload_len} bytes, more than the model's "
                            f"{max_payload_for(schema)}", peer=peer)
    has_mac = bool(flags & FLAG_MAC)
    if mac_key is not None and not has_mac:
        raise MissingKey(f"peer sent an unauthenticated {kind.name} frame, but this node requires the cluster key "
                         "(set the same SMOLCLUSTER_CLUSTER_KEY or key file on every node)", peer=peer)
    if mac_key is None and has_mac:
        raise MissingKey(f"peer sent an authenticated {kind.name} frame, but this node has no cluster key "
                         "(set the same SMOLCLUSTER_CLUSTER_KEY or key file on every node)", peer=peer)
    if flat and header_len <= FLAT_LEAD:
        return _read_flat(sock, pre, kind, header_len, payload_len, seq, mac_key, expected_seq, peer, agreed,
                          flat_buffer, reject_nonfinite)

    # torch.empty does not zero-fill: recv_into writes every byte once. Payloads start on a cache line
    # (torch allocations are 64-byte aligned): the tensor views need 8, and the kernel's copy into an
    # aligned destination measured a few us faster per 0.4 MB frame (bench wire --breakdown).
    parsed = None
    if not has_mac:
        # Unauthenticated: the header is read and validated (tensor table, schema, exact payload length)
        # before the payload's buffer exists, so a peer cannot make us allocate what its header does not justify.
        header_buf = bytearray(header_len)
        _recv_exactly(sock, memoryview(header_buf), "header", peer)
        header_raw = bytes(header_buf)
        parsed = _parse_any_header(header_raw, binary, payload_len, limits, schema, peer, cache, agreed if flat else ())
        payload = torch.empty(payload_len, dtype=torch.uint8)
        payload_view = memoryview(payload.numpy())
        _recv_exactly(sock, payload_view, "payload", peer)
    else:
        # Authenticated: header, payload and MAC land in one buffer (lengths checked against the limits and
        # the schema above), so a frame usually takes one read after the preamble; the header starts at
        # `lead` so the payload starts on a cache line. Header and payload are hashed as they arrive (the
        # sender sends the MAC after them and hashes in the meantime), then the MAC is checked, before
        # the header is parsed or any tensor is built.
        lead = -header_len % RECV_ALIGN
        payload = torch.empty(lead + header_len + payload_len + MAC_BYTES, dtype=torch.uint8)
        body = memoryview(payload.numpy())[lead:]
        _recv_signed(sock, body, pre, header_len + payload_len, mac_key, kind, seq, peer)
        header_raw = bytes(body[:header_len])
        payload_view = body[header_len:header_len + payload_len]
        payload = payload[lead + header_len:lead + header_len + payload_len]
    if expected_seq is not None and seq != expected_seq:
        raise ReplayedFrame(f"{kind.name} frame has sequence number {seq}, expected {expected_seq} (replayed or reordered)", peer=peer)
    if parsed is None:
        parsed = _parse_any_header(header_raw, binary, payload_len, limits, schema, peer, cache, agreed if flat else ())
    fields, specs, quant, matched = parsed
    if flat:
        return _flat_message(kind, fields, payload, matched, reject_nonfinite, peer)

    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, off, length in specs:
        if length:
            t = torch.frombuffer(payload_view, dtype=dtype, count=length // dtype.itemsize, offset=off)
            if len(shape) != 1:
                t = t.view(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        if reject_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise NonFiniteTensor(f"tensor '{name}' contains NaN or Inf; it was not applied", peer=peer)
        tensors[name] = t
    return Message(kind=kind, fields=fields, tensors=tensors, quant=quant)


def _recv_signed(sock: Any, body: memoryview, pre: bytes | bytearray, signed: int, mac_key: bytes, kind: MessageKind,
                 seq: int, peer: str | None) -> None:
    """Fill `body` (the signed bytes, then the MAC), hashing as the bytes arrive; BadMac unless it verifies."""
    pos = 0
    mac = hmac.new(mac_key, pre, hashlib.sha256)
    while pos < signed:
        end = _recv_exactly(sock, body, "frame", peer, pos=pos, at_least=pos + 1)
        mac.update(body[pos:min(end, signed)])
        pos = end
    _recv_exactly(sock, body, "frame", peer, pos=pos)
    if not hmac.compare_digest(mac.digest(), bytes(body[signed:signed + MAC_BYTES])):
        raise BadMac(f"{kind.name} frame (seq {seq}) does not verify: altered in transit or signed with another key", peer=peer)


def _parse_any_header(raw: bytes, binary: bool, payload_len: int, limits: WireLimits, schema: Schema | None,
                      peer: str | None, cache: LayoutCache | None, agreed: tuple):
    """(fields, tensor specs, quant params, the agreed layout a flat frame is in)."""
    if not binary:
        return (*_parse_header_cached(raw, payload_len, limits, schema, peer, cache), None)
    fields, digest = parse_binary_header(raw, peer)
    return fields, [], {}, _agreed_layout(digest, payload_len, agreed, peer) if agreed else None


def _agreed_layout(digest: bytes, payload_len: int, agreed: tuple, peer: str | None) -> Any:
    """The agreed layout a flat frame names (by digest, with its exact length); SchemaMismatch for any other."""
    for a in agreed:
        if a.digest == digest and a.nbytes == payload_len:
            return a
    raise SchemaMismatch(f"flat frame is for layout {digest.hex()[:12]}, this connection agreed on "
                         f"{', '.join(a.digest.hex()[:12] for a in agreed)}", peer=peer)


def _flat_message(kind: MessageKind, fields: dict[str, Any], payload: torch.Tensor, layout: Any,
                  reject_nonfinite: bool, peer: str | None) -> Message:
    if reject_nonfinite and not layout.all_finite(payload):
        raise NonFiniteTensor(f"the {kind.name} frame's flat buffer contains NaN or Inf; it was not applied", peer=peer)
    return Message(kind=kind, fields=fields, flat=payload, layout=layout)


def _read_flat(sock: Any, pre: bytearray, kind: MessageKind, header_len: int, payload_len: int, seq: int,
               mac_key: bytes | None, expected_seq: int | None, peer: str | None, agreed: tuple, flat_buffer: Any,
               reject_nonfinite: bool) -> Message:
    """A flat frame (its payload length already checked to be exactly the layout's): header and payload are
    read together into a preallocated buffer, the header ending where the payload's cache line starts, so
    there is no allocation per frame and one read loop after the preamble. The header (and with a key the
    MAC) is checked before the buffer is handed out as a tensor."""
    buf = flat_buffer() if flat_buffer is not None else FlatBuffer(payload_len)
    start = FLAT_LEAD - header_len
    body = buf.view[start:FLAT_LEAD + payload_len + (MAC_BYTES if mac_key is not None else 0)]
    if mac_key is not None:
        _recv_signed(sock, body, pre, header_len + payload_len, mac_key, kind, seq, peer)
    else:
        _recv_exactly(sock, body, "frame", peer)
    if expected_seq is not None and seq != expected_seq:
        raise ReplayedFrame(f"{kind.name} frame has sequence number {seq}, expected {expected_seq} (replayed or reordered)", peer=peer)
    fields, digest = parse_binary_header(body[:header_len], peer)
    return _flat_message(kind, fields, buf.payload(payload_len), _agreed_layout(digest, payload_len, agreed, peer),
                         reject_nonfinite, peer)
