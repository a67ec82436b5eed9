"""The per-connection layout cache changes speed, never meaning: cached and uncached decoding agree,
and a header that only looks like a cached one is still fully checked."""

from __future__ import annotations

import io

import pytest
import torch

from smolcluster.common.errors import BadHeader, SchemaMismatch
from smolcluster.core.net.wire import PREAMBLE, LayoutCache, Message, MessageKind, TensorSpec, encode_frame, read_frame

SCHEMA = {"w": TensorSpec((4, 3), torch.float32), "b": TensorSpec((3,), torch.float32)}


class Source:
    def __init__(self, data: bytes):
        self.f = io.BytesIO(data)

    def recv_into(self, view, nbytes: int = 0) -> int:
        return self.f.readinto(memoryview(view)[: nbytes or None])


def frame(msg: Message, cache: LayoutCache | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(msg, cache=cache))


def msg(i: int) -> Message:
    return Message(MessageKind.PUSH, {"step": i, "note": "x" * i}, {"w": torch.full((4, 3), float(i)), "b": torch.arange(3.0) + i})


def test_cached_encode_and_decode_agree_with_uncached():
    enc, dec = LayoutCache(), LayoutCache()
    for i in range(5):
        raw = frame(msg(i), enc)
        assert raw == frame(msg(i))  # the cache never changes the bytes on the wire
        a = read_frame(Source(raw), schema=SCHEMA, cache=dec)
        b = read_frame(Source(raw), schema=SCHEMA)
        assert a.fields == b.fields == {"step": i, "note": "x" * i}
        for k in SCHEMA:
            assert torch.equal(a.tensors[k], b.tensors[k])
    assert len(dec.decoded) == 1  # one layout, validated once


def _with_header(raw: bytes, header: bytes) -> bytes:
    magic, version, kind, flags, hlen, plen, seq = PREAMBLE.unpack(raw[: PREAMBLE.size])
    payload = raw[PREAMBLE.size + hlen:]
    return PREAMBLE.pack(magic, version, kind, flags, len(header), plen, seq) + header + payload


def test_header_matching_a_cached_table_is_still_checked():
    dec = LayoutCache()
    good = frame(msg(1))
    read_frame(Source(good), schema=SCHEMA, cache=dec)
    header = good[PREAMBLE.size: PREAMBLE.size + PREAMBLE.unpack(good[: PREAMBLE.size])[4]]
    # same table, trailing junk after the fields object
    with pytest.raises(BadHeader):
        read_frame(Source(_with_header(good, header[:-1] + b',"tensors":[]}')), schema=SCHEMA, cache=dec)
    # fields that are not an object
    prefix = header[: header.index(b'"fields":') + len(b'"fields":')]
    with pytest.raises(BadHeader):
        read_frame(Source(_with_header(good, prefix + b"[1,2]}")), schema=SCHEMA, cache=dec)


def test_cache_does_not_bypass_a_different_schema():
    dec = LayoutCache()
    good = frame(msg(1))
    read_frame(Source(good), schema=SCHEMA, cache=dec)
    other = {"w": TensorSpec((3, 4), torch.float32), "b": TensorSpec((3,), torch.float32)}
    with pytest.raises(SchemaMismatch):
        read_frame(Source(good), schema=other, cache=dec)
