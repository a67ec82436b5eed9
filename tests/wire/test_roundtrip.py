"""Property tests: any message the wire format accepts comes back identical, over a real socket."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolcluster.common import errors
from smolcluster.core.net.wire import (DTYPES, Message, MessageKind, TensorSpec, encode_frame, frame_mac, read_frame, schema_of,
                             send_frame)

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.floats(allow_nan=False), st.text(max_size=20))
quant_params = st.dictionaries(st.text(min_size=1, max_size=10), st.one_of(scalars, st.lists(scalars, max_size=5)), max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(shapes)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g, dtype=dtype)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    ts = draw(st.dictionaries(names, tensors(), max_size=6))
    quant = {n: draw(quant_params) for n in ts if draw(st.booleans())}
    fields = draw(st.dictionaries(st.text(max_size=10), scalars, max_size=5))
    return Message(draw(st.sampled_from(list(MessageKind))), fields, ts, quant)


def _exchange(msg: Message, key: bytes | None, seq: int) -> Message:
    a, b = socket.socketpair()
    with a, b:
        # A sender thread: frames can be larger than the socketpair buffer.
        t = threading.Thread(target=send_frame, args=(a, encode_frame(msg, seq=seq, mac_key=key)))
        t.start()
        got = read_frame(b, mac_key=key, expected_seq=seq, schema=schema_of(msg.tensors) if msg.tensors else None)
        t.join()
        return got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages(), key=st.sampled_from([None, b"k" * 32]), seq=st.integers(0, 2**64 - 1))
def test_roundtrip_is_identical(msg: Message, key: bytes | None, seq: int) -> None:
    got = _exchange(msg, key, seq)
    assert got.kind == msg.kind
    assert got.fields == msg.fields
    assert got.quant == msg.quant
    assert list(got.tensors) == list(msg.tensors)
    for name, t in msg.tensors.items():
        r = got.tensors[name]
        assert r.dtype == t.dtype and r.shape == t.shape
        assert torch.equal(r, t)


def test_non_contiguous_and_grad_tensors_are_sent_by_value() -> None:
    w = torch.randn(5, 3, requires_grad=True)
    msg = Message(MessageKind.PUSH, {}, {"t": torch.randn(3, 5).t(), "w": w, "s": torch.tensor(3.5)})
    got = _exchange(msg, None, 0)
    assert torch.equal(got.tensors["t"], msg.tensors["t"])
    assert torch.equal(got.tensors["w"], w.detach())
    assert got.tensors["s"].shape == () and got.tensors["s"].item() == 3.5


def test_received_tensors_are_writable_views_that_outlive_the_frame() -> None:
    got = _exchange(Message(MessageKind.WEIGHTS, {}, {"a": torch.ones(1000), "b": torch.zeros(10)}), None, 0)
    a = got.tensors["a"]
    del got
    a += 1  # no copy needed before training code uses it in place
    assert torch.equal(a, torch.full((1000,), 2.0))


@pytest.mark.parametrize("bad", [{"q": object()}, {"q": [[1, 2]]}, {"q" * 100: 1}, {str(i): i for i in range(40)}, [1, 2]])
def test_quant_params_must_be_small_json(bad: object) -> None:
    with pytest.raises(errors.BadTensorTable):
        encode_frame(Message(MessageKind.PUSH, {}, {"w": torch.ones(2)}, {"w": bad}))  # type: ignore[dict-item]


def test_unsupported_dtype_and_limits_are_refused_when_sending() -> None:
    with pytest.raises(errors.UnknownDtype, match="complex64"):
        encode_frame(Message(MessageKind.PUSH, {}, {"w": torch.ones(2, dtype=torch.complex64)}))
    from smolcluster.core.net.wire import WireLimits

    with pytest.raises(errors.FrameTooLarge):
        encode_frame(Message(MessageKind.PUSH, {}, {"w": torch.ones(100)}), limits=WireLimits(max_payload_bytes=100))


def test_schema_is_a_subset_check_with_exact_shape_and_dtype() -> None:
    schema = {"w": TensorSpec((2,), torch.float32), "b": TensorSpec((1,), torch.float32)}
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, encode_frame(Message(MessageKind.PUSH, {}, {"w": torch.ones(2)})))
        assert set(read_frame(b, schema=schema).tensors) == {"w"}  # subset is fine
        send_frame(a, encode_frame(Message(MessageKind.PUSH, {}, {"w": torch.ones(2, dtype=torch.float64)})))
        with pytest.raises(errors.SchemaMismatch, match="float64"):
            read_frame(b, schema=schema)


def _trickle(sock: socket.socket, data: bytes, mac: bytes) -> None:
    """The frame in small uneven pieces, then the MAC on its own after a pause, as Connection sends it."""
    pos, sizes, i = 0, [1, 7, 28, 100, 4096, 3], 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        sock.sendall(data[pos:pos + n])
        pos, i = pos + n, i + 1
    threading.Event().wait(0.05)
    sock.sendall(mac)


@pytest.mark.parametrize("flip", [None, "header", "payload", "mac"])
def test_mac_is_checked_over_a_frame_that_arrives_in_pieces(flip: str | None) -> None:
    """The receiver hashes the frame as it arrives and checks the MAC that follows it; one altered byte
    anywhere is a BadMac, and nothing is parsed or built from an unverified frame."""
    key = b"k" * 32
    msg = Message(MessageKind.PUSH, {"step": 3}, {"w": torch.randn(64, 33), "b": torch.arange(5)})
    buffers = encode_frame(msg, seq=7, mac_key=key, defer_mac=True)
    data = bytearray(b"".join(bytes(b) for b in buffers))
    mac = bytearray(frame_mac(key, buffers))
    assert bytes(data) + bytes(mac) == b"".join(bytes(b) for b in encode_frame(msg, seq=7, mac_key=key))
    if flip == "header":
        data[40] ^= 1
    elif flip == "payload":
        data[-5] ^= 1
    elif flip == "mac":
        mac[0] ^= 1
    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=_trickle, args=(a, bytes(data), bytes(mac)))
        t.start()
        try:
            if flip is None:
                got = read_frame(b, mac_key=key, expected_seq=7)
                assert got.fields == {"step": 3} and torch.equal(got.tensors["w"], msg.tensors["w"])
            else:
                with pytest.raises(errors.BadMac):
                    read_frame(b, mac_key=key, expected_seq=7)
        finally:
            t.join()
