"""Real TCP test servers and socket helpers for the link emulator tests."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable


class Upstream:
    """A real TCP server on 127.0.0.1 running `handler(conn)` per connection in a thread."""

    def __init__(self, handler: Callable[[socket.socket], None]):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, name="test-upstream", daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="test-upstream-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._accept.join(5)
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


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
