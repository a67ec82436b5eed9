"""What the hardening tests attack a live server with: a hostile (or buggy) peer speaking the real protocol
over real TCP, and what they measure about the server process (memory, descriptors, log lines)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from smolcluster.core.net import auth
from smolcluster.core.net.transport import Connection, TransportConfig, connect
from smolcluster.core.net.wire import Message, MessageKind, encode_frame, send_frame

PATIENT = TransportConfig(heartbeat_timeout=30.0, io_timeout=30.0)


def join(port: int, rank: int, algo: str, *, key: bytes | None = None, hostname: str | None = None) -> tuple[Connection, Message]:
    """Join as worker `rank` (hostname w<rank>): returns the connection and the WELCOME."""
    conn = connect("127.0.0.1", port, key=key, config=PATIENT, retry=None)
    conn.send(Message(MessageKind.HELLO, {"rank": rank, "hostname": hostname or f"w{rank}", "algorithm": algo}))
    welcome = conn.recv(timeout=30)
    assert welcome.kind == MessageKind.WELCOME, welcome
    return conn, welcome


def zeros_like(welcome: Message) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in welcome.tensors.items()}


def weights_of(welcome: Message) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in welcome.tensors.items()}


def ask(conn: Connection, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
        quant: dict[str, dict] | None = None, kind: MessageKind = MessageKind.PUSH) -> Message:
    """Send one message and return the server's reply."""
    conn.send(Message(kind, fields, tensors=tensors or {}, quant=quant or {}))
    return conn.recv(timeout=30)


def raw_frame(kind: MessageKind, fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(Message(kind, fields, tensors=tensors or {})))


def raw_socket(port: int, source: str | None = None) -> socket.socket:
    """A plain TCP connection, optionally from another loopback address (127.0.0.2 is not 127.0.0.1)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source:
        s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def keyed_handshake(sock: socket.socket, key: bytes) -> auth.SessionKeys:
    sock.setblocking(True)
    sock.settimeout(10)
    return auth.client_handshake(sock, key)


def send_raw(sock: socket.socket, kind: MessageKind, fields: dict[str, Any]) -> None:
    send_frame(sock, encode_frame(Message(kind, fields)))


class Process:
    """The server process as the operating system sees it."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def fds(self) -> int:
        return self.proc.num_fds()

    def threads(self) -> int:
        return self.proc.num_threads()


class Background:
    """Runs `attack(stop)` in a thread until it returns or stop is set; re-raises what it raised."""

    def __init__(self, attack: Callable[[threading.Event], Any]):
        self.stop = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(attack,), daemon=True)
        self._thread.start()

    def _run(self, attack: Callable[[threading.Event], Any]) -> None:
        try:
            self.result = attack(self.stop)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self, timeout: float = 60) -> Any:
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the attack did not stop"
        if self.error is not None:
            raise self.error
        return self.result


def lines(path: Path, needle: str) -> list[str]:
    return [l for l in path.read_text(errors="replace").splitlines() if needle in l] if path.exists() else []


def events(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    return [e for e in (json.loads(l) for l in path.read_text().splitlines() if l.strip()) if e["event"] == event]


class Relay:
    """A TCP relay between workers and the server (the man in the middle): connection number i can have
    its server-to-worker bytes tampered with (`tamper(i, offset, chunk)` edits the chunk in place), and
    the first connections can be answered by the relay itself (`answer_first(sock)`), like a spoofer."""

    def __init__(self, server_port: int, *, tamper: Callable[[int, int, bytearray], None] | None = None,
                 answer_first: Callable[[socket.socket], None] | None = None, spoofed: int = 1):
        self.server_port, self.tamper, self.answer_first, self.spoofed = server_port, tamper, answer_first, spoofed
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            i, self.connections = self.connections, self.connections + 1
            self._socks.append(client)
            if self.answer_first is not None and i < self.spoofed:
                threading.Thread(target=self._spoof, args=(client,), daemon=True).start()
                continue
            server = socket.create_connection(("127.0.0.1", self.server_port))
            self._socks.append(server)
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, i), daemon=True).start()

    def _spoof(self, client: socket.socket) -> None:
        try:
            self.answer_first(client)
        finally:
            client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None) -> None:
        offset = 0
        try:
            while chunk := src.recv(1 << 16):
                data = bytearray(chunk)
                if index is not None and self.tamper is not None:
                    self.tamper(index, offset, data)
                offset += len(chunk)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for s in self._socks:
            s.close()
