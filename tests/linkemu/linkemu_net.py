"""Handlers for the link emulator tests' upstream servers (measure.LoopbackServer), and socket helpers."""

from __future__ import annotations

import socket
import struct


def echo(conn: socket.socket) -> None:
    """Send back everything; half-close when the client does."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def source(conn: socket.socket) -> None:
    """Read an 8-byte big-endian count, send that many bytes, close."""
    n = struct.unpack("!Q", recv_exact(conn, 8))[0]
    block = b"\xab" * (1 << 16)
    while n > 0:
        conn.sendall(block[: min(n, len(block))])
        n -= min(n, len(block))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])
