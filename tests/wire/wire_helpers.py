"""Shared pieces for wire/transport tests: a live echo server and a frame builder for malformed input."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import socket
from typing import Any

import torch

from smolcluster.core.net.transport import Connection, Listener, TransportConfig, connect
from smolcluster.core.net.wire import MAGIC, PREAMBLE, VERSION, Message, MessageKind, TensorSpec, read_frame

SCHEMA = {"w": TensorSpec((4, 3), torch.float32), "b": TensorSpec((3,), torch.float32)}
KEY = bytes(range(32))
FAST = TransportConfig(connect_timeout=2.0, io_timeout=5.0, handshake_timeout=1.0,
                       heartbeat_interval=0.1, heartbeat_timeout=3.0)


def good_message(i: int = 0) -> Message:
    return Message(MessageKind.ECHO, {"i": i}, {"w": torch.full((4, 3), float(i)), "b": torch.arange(3.0)})


class EchoServer:
    """A real Listener whose handler echoes every message, validating against SCHEMA and rejecting NaN/Inf."""

    def __init__(self, key: bytes | None = None, config: TransportConfig = FAST):
        self.key = key
        self.rejects: "queue.Queue[tuple[str, Exception]]" = queue.Queue()
        self.listener = Listener("127.0.0.1", 0, key=key, on_connection=self._handle, config=config,
                                 on_reject=lambda peer, e: self.rejects.put((peer, e)))
        self.listener.start()
        self.port = self.listener.address[1]

    def _handle(self, conn: Connection) -> None:
        while True:
            conn.send(conn.recv(schema=SCHEMA, reject_nonfinite=True))

    def client(self, key: bytes | None = "same", config: TransportConfig = FAST) -> Connection:  # type: ignore[assignment]
        return connect("127.0.0.1", self.port, key=self.key if key == "same" else key, config=config, retry=None)

    def raw(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return s

    def next_reject(self, timeout: float = 5.0) -> tuple[str, Exception]:
        return self.rejects.get(timeout=timeout)

    def close(self) -> None:
        self.listener.close()


def roundtrip(conn: Connection, i: int = 7) -> None:
    conn.send(good_message(i))
    back = conn.recv(timeout=5)
    assert back.fields == {"i": i}
    assert torch.equal(back.tensors["w"], torch.full((4, 3), float(i)))


def build_frame(header: Any, payload: bytes = b"", *, kind: int = int(MessageKind.ECHO), version: int = VERSION,
                magic: bytes = MAGIC, seq: int = 0, key: bytes | None = None, header_len: int | None = None,
                payload_len: int | None = None, raw_header: bytes | None = None) -> bytes:
    """Any frame, valid or not: every preamble field and the header can be set by hand."""
    hdr = raw_header if raw_header is not None else json.dumps(header).encode()
    flags = 1 if key is not None else 0
    pre = PREAMBLE.pack(magic, version, kind, flags, len(hdr) if header_len is None else header_len,
                        len(payload) if payload_len is None else payload_len, seq)
    body = pre + hdr + payload
    if key is not None:
        body += hmac.new(key, body, hashlib.sha256).digest()
    return body


def entry(name: str, shape: list[int], offset: int = 0, dtype: str = "float32", length: int | None = None) -> dict[str, Any]:
    n = 1
    for d in shape:
        n *= d
    return {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "length": n * 4 if length is None else length}


def read_error(sock: socket.socket, mac_key: bytes | None = None) -> str | None:
    """Read the server's frames until its ERROR frame (returns the error class name) or EOF (None)."""
    sock.settimeout(5)
    while True:
        try:
            msg = read_frame(sock, mac_key=mac_key)
        except Exception:
            return None
        if msg.kind == MessageKind.ERROR:
            return str(msg.fields["error"])
