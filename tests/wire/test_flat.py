"""Flat buffers end to end: the layout and its digest, a model whose parameters and gradients live in
one buffer each, the binary header of the push/pull path (round trips, every malformed form rejected
with a typed error before any tensor is built, a fuzz run), the layout agreed once per connection, and
an old peer told which wire version it speaks."""

from __future__ import annotations

import random
import socket
import struct
import threading

import pytest
import torch

from smolcluster.common import errors
from smolcluster.core.net.transport import Connection, Listener, TransportConfig, connect
from smolcluster.core.net.wire import (BINARY, FLAG_BINARY, FLAG_FLAT, MAGIC, FlatBuffer, PREAMBLE, VERSION, Message, MessageKind,
                                       TensorSpec, encode_frame, read_frame)
from smolcluster.core.training.flat import FlatLayout, FlatModel, layer_norms, total_norm
from smolcluster.core.training.models import SimpleNN, loss_fn
from smolcluster.core.training.optim import build_optimizer, tensor_norms

FAST = TransportConfig(connect_timeout=2.0, io_timeout=5.0, handshake_timeout=1.0, heartbeat_interval=0.1,
                       heartbeat_timeout=3.0)
KEY = bytes(range(32))
SCHEMA = {"w": TensorSpec((4, 3), torch.float32), "b": TensorSpec((3,), torch.float32),
          "n": TensorSpec((2,), torch.int64)}
LAYOUT = FlatLayout(SCHEMA)


def _buffer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return LAYOUT.pack({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
                        "n": torch.tensor([seed, -seed])})


def _frame(fields: dict, flat: torch.Tensor | None = None, kind: MessageKind = MessageKind.PUSH,
           key: bytes | None = None, layout: FlatLayout = LAYOUT) -> bytes:
    msg = Message(kind, fields, flat=flat, layout=layout if flat is not None else None)
    return b"".join(bytes(b) for b in encode_frame(msg, mac_key=key))


def _send_all(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the reader refused the frame and closed first


def _read(frame: bytes, **kw):
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=_send_all, args=(a, frame), daemon=True).start()
        b.settimeout(5)
        return read_frame(b, **kw)


# --------------------------------------------------------------------------- layout and model


def test_layout_groups_dtypes_and_its_digest_names_names_dtypes_and_shapes():
    assert [e.name for e in LAYOUT.entries] == ["w", "b", "n"]
    floats, ints = LAYOUT.segments_at
    assert floats == (torch.float32, 0, 15) and ints[0] == torch.int64 and ints[1] % 64 == 0
    assert FlatLayout(dict(SCHEMA)).digest == LAYOUT.digest
    for other in ({**SCHEMA, "b": TensorSpec((4,), torch.float32)}, {**SCHEMA, "b": TensorSpec((3,), torch.float64)},
                  {"w": SCHEMA["w"], "c": SCHEMA["b"], "n": SCHEMA["n"]}):
        assert FlatLayout(other).digest != LAYOUT.digest
    buf = _buffer(3)
    views = LAYOUT.views(buf)
    views["b"][1] = 7.0  # a view writes the buffer
    assert LAYOUT.views(buf)["b"][1] == 7.0 and views["n"].tolist() == [3, -3]


def test_model_parameters_and_gradients_are_views_of_two_buffers_and_train_as_before():
    torch.manual_seed(0)
    ref, model = SimpleNN(hidden=16), SimpleNN(hidden=16)
    model.load_state_dict(ref.state_dict())
    opt_ref = build_optimizer("adam", ref.parameters(), 0.01)
    opt = build_optimizer("adam", model.parameters(), 0.01)
    flat = FlatModel(model)
    for p in model.parameters():
        assert flat.data.data_ptr() <= p.data_ptr() < flat.data.data_ptr() + flat.layout.nbytes
    for _ in range(3):
        x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
        opt_ref.zero_grad()
        loss_fn(ref, x, y).backward()
        opt_ref.step()
        flat.zero_grad()
        loss_fn(model, x, y).backward()  # autograd accumulates into the flat gradient buffer
        for p in model.parameters():
            assert flat.grad.data_ptr() <= p.grad.data_ptr() < flat.grad.data_ptr() + flat.layout.nbytes
        norms = layer_norms(flat.layout, flat.grad)
        assert norms == pytest.approx(tensor_norms({n: p.grad for n, p in ref.named_parameters()}))
        assert total_norm(flat.grads()) == pytest.approx(sum(v * v for v in norms.values()) ** 0.5)
        opt.step()
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    snap = flat.snapshot()
    flat.load(torch.zeros_like(snap), alpha=0.25)  # polyak blend, one op: 0.75 * w
    assert torch.allclose(flat.layout.views(flat.data)["fc1.weight"], 0.75 * flat.layout.views(snap)["fc1.weight"])


# --------------------------------------------------------------------------- the binary header


FIELDS = [
    {"step": 3, "base_version": 2, "samples": 32, "loss": 0.25, "worker_step": 4},
    {"base_version": 9, "worker_step": 40, "samples": 160, "loss": 1.5, "mode": "gradients", "want_weights": True,
     "grad_norms": {"w": 0.5}},
    {"status": "late", "version": 5, "tau": 0, "finished": False, "reason": "its step had closed", "next_step": 6},
    {"step": 1, "next_step": 2, "version": 2, "held_s": 0.003},
]


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("fields", FIELDS)
def test_flat_frames_round_trip_with_their_fields(fields, key):
    buf = _buffer(1)
    msg = _read(_frame(fields, buf, key=key), layout=LAYOUT, mac_key=key)
    assert msg.fields == fields and torch.equal(msg.flat, buf) and not msg.tensors
    assert torch.equal(msg.named()["w"], LAYOUT.views(buf)["w"])
    bare = _read(_frame(fields, None, kind=MessageKind.ACK, key=key), mac_key=key)  # binary, no payload
    assert bare.fields == fields and bare.flat is None


def test_the_push_path_has_no_json_unless_a_field_has_no_slot():
    frame = _frame(FIELDS[0], _buffer())
    header_len = PREAMBLE.unpack_from(frame)[4]
    assert header_len == BINARY.size and b"{" not in frame[PREAMBLE.size:PREAMBLE.size + header_len]
    assert PREAMBLE.unpack_from(frame)[3] == FLAG_BINARY | FLAG_FLAT


def test_a_flat_frame_is_read_into_the_preallocated_buffer():
    ring = FlatBuffer(LAYOUT.nbytes)
    msg = _read(_frame(FIELDS[0], _buffer(2)), layout=LAYOUT, flat_buffer=lambda: ring)
    assert ring.tensor.data_ptr() < msg.flat.data_ptr() < ring.tensor.data_ptr() + ring.tensor.numel()
    assert torch.equal(msg.flat, _buffer(2))


def _preamble(flags: int, header_len: int, payload_len: int, kind: int = int(MessageKind.PUSH), version: int = VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version, kind, flags, header_len, payload_len, 0)


BAD = [
    ("no layout agreed", lambda: _frame(FIELDS[0], _buffer()), {}, errors.SchemaMismatch, "no layout was agreed"),
    ("another layout", lambda: _frame(FIELDS[0], torch.zeros(LAYOUT.nbytes, dtype=torch.uint8),
                                      layout=FlatLayout({"w": TensorSpec((LAYOUT.nbytes // 4,), torch.float32)})),
     {"layout": LAYOUT}, errors.SchemaMismatch, "this connection agreed"),
    # only the preamble is sent: the length is refused before the payload is read
    ("wrong length", lambda: _preamble(FLAG_BINARY | FLAG_FLAT, BINARY.size, LAYOUT.nbytes + 8), {"layout": LAYOUT},
     errors.ShapeMismatch, "agreed layout has"),
    ("huge length", lambda: _preamble(FLAG_BINARY | FLAG_FLAT, BINARY.size, 2**40), {"layout": LAYOUT},
     errors.FrameTooLarge, "limit"),
    ("flat, not binary", lambda: _preamble(FLAG_FLAT, 2, LAYOUT.nbytes), {"layout": LAYOUT}, errors.BadHeader, "not binary"),
    ("short binary header", lambda: _preamble(FLAG_BINARY, 10, 0) + bytes(10), {}, errors.BadHeader, "needs"),
    ("binary with a payload", lambda: _preamble(FLAG_BINARY, BINARY.size, 12) + bytes(BINARY.size + 12), {},
     errors.BadTensorTable, "no flat buffer"),
    ("unknown bits", lambda: _preamble(FLAG_BINARY, BINARY.size, 0) + b"\xff\xff" + bytes(BINARY.size - 2), {},
     errors.BadHeader, "unknown field bits"),
    ("unknown status", lambda: _preamble(FLAG_BINARY, BINARY.size, 0) + _with_status_code(9), {}, errors.BadHeader,
     "unknown status code"),
    ("field twice", lambda: _frame({"step": 1, "tail": 1}, None, kind=MessageKind.ACK).replace(b'"tail"', b'"step"'), {},
     errors.BadHeader, "given twice"),
    ("bad json tail", lambda: _frame({"step": 1, "tail": 1}, None, kind=MessageKind.ACK).replace(b'{"tail":1}', b'[1,2,3,44]'),
     {}, errors.BadHeader, "must be an object"),
    ("old peer", lambda: _preamble(0, 2, 0, version=1) + b"{}", {}, errors.UnsupportedVersion, "wire version 1, this is 2"),
]


def _with_status_code(code: int) -> bytes:
    present = 1 << 11  # the status slot
    return BINARY.pack(present, 0, code, 0, bytes(16), *([0] * 7), 0.0, 0.0)


@pytest.mark.parametrize("name,frame,kw,error,match", BAD, ids=[b[0] for b in BAD])
def test_malformed_binary_frames_are_typed_errors_before_any_tensor(name, frame, kw, error, match):
    with pytest.raises(error, match=match):
        _read(frame(), **kw)


def test_flat_frame_with_a_bad_mac_is_refused():
    frame = bytearray(_frame(FIELDS[0], _buffer(), key=KEY))
    frame[PREAMBLE.size + BINARY.size + 100] ^= 1
    with pytest.raises(errors.BadMac):
        _read(bytes(frame), layout=LAYOUT, mac_key=KEY)


def test_non_finite_flat_buffers_are_refused_when_asked():
    buf = _buffer()
    LAYOUT.views(buf)["b"][0] = float("nan")
    with pytest.raises(errors.NonFiniteTensor):
        _read(_frame(FIELDS[0], buf), layout=LAYOUT, reject_nonfinite=True)


def test_fuzz_binary_frames_only_raise_typed_errors():
    """3,000 mutated binary frames (flat and bare, keyed and not): a typed error or a message, never a crash."""
    rng = random.Random(17)
    seeds = [_frame(f, _buffer(i), key=k) for i, f in enumerate(FIELDS) for k in (None, KEY)]
    seeds += [_frame(f, None, kind=MessageKind.STEP_DONE) for f in FIELDS]
    outcomes: set[str] = set()
    for _ in range(3000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            region = rng.choice([(0, PREAMBLE.size), (PREAMBLE.size, PREAMBLE.size + BINARY.size), (0, len(b))])
            i = rng.randrange(*region)
            if rng.random() < 0.2:
                del b[i:]
                break
            b[i] ^= 1 << rng.randrange(8)
        keyed = bool(b[7] & 1) if len(b) > 8 else False
        try:
            msg = _read(bytes(b), layout=LAYOUT, mac_key=KEY if keyed else None)
            outcomes.add("ok")
            assert msg.flat is None or msg.flat.numel() == LAYOUT.nbytes
        except errors.SmolclusterError as e:
            outcomes.add(type(e).__name__)
    assert len(outcomes) >= 6, outcomes


# --------------------------------------------------------------------------- agreed per connection


@pytest.mark.parametrize("key", [None, KEY])
def test_connections_use_flat_frames_only_once_both_ends_agreed(key):
    """An agreed connection sends one buffer each way (preallocated on receive); one that agreed nothing gets
    the same message by name, so peers without a layout still work."""
    seen: list[Message] = []

    def handle(conn: Connection) -> None:
        first = conn.recv()
        if first.fields.get("agree"):
            conn.agree(LAYOUT)
        conn.send(Message(MessageKind.ACK, {"status": "applied", "version": 1}))
        while True:
            msg = conn.recv()
            seen.append(msg)
            conn.send(Message(MessageKind.WEIGHTS, {"version": 2}, flat=_buffer(5), layout=LAYOUT))

    with Listener("127.0.0.1", 0, key=key, on_connection=handle, config=FAST) as lst:
        for agree in (True, False):
            with connect("127.0.0.1", lst.address[1], key=key, config=FAST, retry=None) as c:
                if agree:
                    c.agree(LAYOUT)
                c.send(Message(MessageKind.HELLO, {"agree": agree}))
                assert c.recv(timeout=5).fields == {"status": "applied", "version": 1}
                c.send(Message(MessageKind.PUSH, {"step": 0, "samples": 8}, flat=_buffer(4), layout=LAYOUT))
                back = c.recv(timeout=5)
                assert torch.equal(back.named()["w"], LAYOUT.views(_buffer(5))["w"])
                assert (back.flat is not None) == agree and (not back.tensors) == agree
                assert (seen[-1].flat is not None) == agree
                assert torch.equal(seen[-1].named()["b"], LAYOUT.views(_buffer(4))["b"])


def test_an_old_peer_is_told_the_wire_versions():
    """A version 1 frame gets UnsupportedVersion naming both versions (the old peer, in turn, reads our
    version 2 ERROR frame as 'peer speaks wire version 2')."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!4sBHBIQQ", MAGIC, 1, int(MessageKind.HELLO), 0, 2, 0, 0) + b"{}")
        with pytest.raises(errors.UnsupportedVersion, match="peer speaks wire version 1, this is 2"):
            read_frame(b)


# --------------------------------------------------------------------------- quantized flat buffers


def test_quantized_flat_buffers_keep_the_int8_error_bound_and_exact_zeros():
    from smolcluster.core.training.quantization import BLOCK, QuantizedLayout
    from smolcluster.common.errors import QuantizationError

    model = SimpleNN()
    flat = FlatModel(model)
    flat.layout.views(flat.data)["fc2.bias"].zero_()
    q = QuantizedLayout(flat.layout)
    assert q.digest != flat.layout.digest and q.nbytes < 0.26 * flat.layout.nbytes
    qbuf = q.quantize(flat.data)
    back = q.dequantize(qbuf)
    x, y = flat.weights()[0], flat.layout.segments(back)[0]
    _, scale, _ = q._parts(qbuf)
    per_value = scale.repeat_interleave(BLOCK)[:x.numel()]
    assert bool(((x - y).abs() <= per_value / 2 + 1e-7).all())
    assert bool((flat.layout.views(back)["fc2.bias"] == 0).all())
    scale[3] = -1.0
    with pytest.raises(QuantizationError, match="scale"):
        q.dequantize(qbuf)


def test_a_connection_agrees_on_the_model_and_its_quantized_form():
    from smolcluster.core.training.quantization import QuantizedLayout

    q = QuantizedLayout(FlatLayout({"w": TensorSpec((4, 3), torch.float32), "b": TensorSpec((3,), torch.float32)}))
    buf = q.base.pack({"w": torch.randn(4, 3), "b": torch.zeros(3)})
    for msg in (Message(MessageKind.WEIGHTS, {"version": 1}, flat=q.quantize(buf), layout=q),
                Message(MessageKind.PUSH, {"step": 1}, flat=buf, layout=q.base)):
        got = _read(b"".join(bytes(b) for b in encode_frame(msg)), layout=(q.base, q))
        assert got.layout is msg.layout and torch.equal(got.flat, msg.flat)


def test_norms_are_finite_exactly_when_the_values_are():
    from smolcluster.core.training.flat import norm

    big = torch.full((1000,), 3e37)  # finite, but its float32 sum of squares overflows
    assert norm(big) == pytest.approx(3e37 * 1000 ** 0.5) and total_norm([big, torch.ones(4)]) < float("inf")
    for bad in (float("nan"), float("inf")):
        assert not total_norm([torch.tensor([1.0, bad])]) < float("inf")
