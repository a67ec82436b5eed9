"""Each class of malformed input gets its own typed error, the server logs it and drops only that peer,
and a well-behaved client connected to the same live server keeps being served."""

from __future__ import annotations

import math
import socket
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from smolcluster.core.net import auth
from smolcluster.common import errors
from smolcluster.core.net.wire import VERSION, MessageKind, encode_frame, read_frame

from wire_helpers import KEY, build_frame, entry, good_message, read_error, roundtrip

W = torch.arange(12.0).reshape(4, 3)
W_BYTES = W.numpy().tobytes()
GOOD_TABLE = {"fields": {}, "tensors": [entry("w", [4, 3])]}


def _with(value: float) -> bytes:
    w = W.clone()
    w[1, 2] = value
    return build_frame(GOOD_TABLE, w.numpy().tobytes())


@dataclass
class Case:
    name: str
    error: type[errors.SmolclusterError]
    # Builds the bytes to send; keyed cases get the session keys from a real handshake.
    make: Callable[[auth.SessionKeys | None], bytes]
    keyed: bool = False
    handshake: bool = True


CASES = [
    Case("truncated_preamble", errors.TruncatedFrame, lambda k: build_frame(GOOD_TABLE, W_BYTES)[:11]),
    Case("truncated_payload", errors.TruncatedFrame, lambda k: build_frame(GOOD_TABLE, W_BYTES)[:-5]),
    Case("wrong_magic", errors.BadMagic, lambda k: build_frame(GOOD_TABLE, W_BYTES, magic=b"HTTP")),
    Case("http_request", errors.BadMagic, lambda k: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40)),
    Case("wrong_version", errors.UnsupportedVersion, lambda k: build_frame(GOOD_TABLE, W_BYTES, version=99)),
    Case("oversize_header", errors.FrameTooLarge, lambda k: build_frame(GOOD_TABLE, b"", header_len=2**31)[:28]),
    Case("oversize_payload_4GB", errors.FrameTooLarge, lambda k: build_frame(GOOD_TABLE, b"", payload_len=2**32)[:28 + 60]),
    Case("too_many_tensors", errors.FrameTooLarge,
         lambda k: build_frame({"fields": {}, "tensors": [entry(f"t{i}", [0]) for i in range(5000)]})),
    Case("header_not_json", errors.BadHeader, lambda k: build_frame(None, W_BYTES, raw_header=b"{'w': not json")),
    Case("header_missing_fields", errors.BadHeader, lambda k: build_frame({"tensors": []})),
    Case("unknown_kind", errors.BadHeader, lambda k: build_frame(GOOD_TABLE, W_BYTES, kind=999)),
    Case("table_out_of_range", errors.BadTensorTable,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [4, 3], offset=8)]}, W_BYTES)),
    Case("table_overlapping", errors.BadTensorTable,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [4, 3]), entry("b", [3], offset=8)]}, W_BYTES)),
    Case("table_negative_shape", errors.BadTensorTable,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [-4, -3], length=48)]}, W_BYTES)),
    Case("unknown_dtype", errors.UnknownDtype,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [4, 3], dtype="object")]}, W_BYTES)),
    Case("shape_length_mismatch", errors.ShapeMismatch,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [4, 3], length=40)]}, W_BYTES)),
    Case("schema_wrong_shape", errors.SchemaMismatch,
         lambda k: build_frame({"fields": {}, "tensors": [entry("w", [3, 4])]}, W_BYTES)),
    Case("schema_unknown_name", errors.SchemaMismatch,
         lambda k: build_frame({"fields": {}, "tensors": [entry("evil", [4, 3])]}, W_BYTES)),
    Case("payload_beyond_the_table", errors.BadTensorTable,  # slack bytes would be allocated for nothing
         lambda k: build_frame(GOOD_TABLE, W_BYTES + bytes(8))),
    Case("payload_beyond_the_model", errors.FrameTooLarge,  # refused at the preamble: nothing allocated
         lambda k: build_frame(GOOD_TABLE, b"", payload_len=1 << 20)),
    Case("nan_rejected", errors.NonFiniteTensor, lambda k: _with(math.nan)),
    Case("inf_rejected", errors.NonFiniteTensor, lambda k: _with(-math.inf)),
    Case("bad_mac", errors.BadMac, keyed=True,
         make=lambda k: (lambda f: f[:-40] + bytes([f[-40] ^ 1]) + f[-39:])(
             b"".join(bytes(b) for b in encode_frame(good_message(), seq=0, mac_key=k.send)))),  # type: ignore[union-attr]
    Case("mac_with_wrong_key", errors.BadMac, keyed=True,
         make=lambda k: b"".join(bytes(b) for b in encode_frame(good_message(), seq=0, mac_key=b"x" * 32))),
    Case("replayed_frame", errors.ReplayedFrame, keyed=True,
         make=lambda k: b"".join(bytes(b) for b in encode_frame(good_message(), seq=0, mac_key=k.send)) * 2),  # type: ignore[union-attr]
    Case("missing_key_after_handshake", errors.MissingKey, keyed=True,
         make=lambda k: b"".join(bytes(b) for b in encode_frame(good_message()))),
    Case("missing_key_no_handshake", errors.MissingKey, keyed=True, handshake=False,
         make=lambda k: b"".join(bytes(b) for b in encode_frame(good_message()))),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_rejected_and_others_are_served(case: Case, echo_server) -> None:
    server = echo_server(key=KEY if case.keyed else None)
    good = server.client()
    roundtrip(good, 1)

    bad = server.raw()
    keys = auth.client_handshake(bad, KEY, peer="test") if case.keyed and case.handshake else None
    bad.sendall(case.make(keys))
    bad.shutdown(socket.SHUT_WR)  # so a truncated frame really ends

    # The peer is told why (an ERROR frame naming the error class) and then disconnected.
    assert read_error(bad, keys.recv if keys else None) == case.error.__name__
    try:
        assert bad.recv(1) == b""
    except ConnectionResetError:
        pass  # closed with our unread bytes still queued: also a disconnect
    bad.close()
    # The server's own record: exactly this typed error, naming the peer.
    peer, exc = server.next_reject()
    assert type(exc) is case.error, exc
    assert exc.peer == peer and peer.startswith("127.0.0.1:")
    assert peer in str(exc)
    # Everyone else is still served: the client connected before, and a new one.
    roundtrip(good, 2)
    with server.client() as fresh:
        roundtrip(fresh, 3)
    good.close()
    assert server.rejects.empty()


def test_direct_read_frame_errors_on_a_socketpair() -> None:
    """The same checks without a server: read_frame itself raises the typed error."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(build_frame(GOOD_TABLE, W_BYTES, payload_len=2**40)[:28])
        with pytest.raises(errors.FrameTooLarge, match="limit"):
            read_frame(b)


def test_oversize_payload_is_refused_before_allocation() -> None:
    """A 4 GB length must not be allocated: read_frame fails fast, with no payload bytes sent at all."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!4sBHBIQQ", b"SMCL", VERSION, int(MessageKind.PUSH), 0, 2, 2**32, 0) + b"{}")
        b.settimeout(2)
        with pytest.raises(errors.FrameTooLarge):
            read_frame(b)
