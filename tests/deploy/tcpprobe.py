"""Tiny TCP tools run inside rehearsal namespaces (`Rehearsal.spawn/exec(node, [python, tcpprobe.py, ...])`).

    sink HOST PORT            listen (PORT 0 = any); print {"port": N} once listening, then one
                              JSON line per connection: {"peer", "bytes", "seconds"} where
                              seconds runs from the first byte received to the sender's EOF
    send HOST PORT NBYTES     connect, send NBYTES, close; exit 0
    connect HOST PORT         connect and close; exit 0, or exit 1 with the error on stderr

Tests build the argv with `command(...)`; `Sink` runs a sink in a node and reads its lines.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def command(*args: object) -> list[str]:
    """argv running this file with the test's Python (inside a namespace via Rehearsal.exec/spawn)."""
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


class Sink:
    """A `sink` running in a rehearsal node; `next()` returns its next JSON line (the first one
    is read at start: `port`). A thread reads stdout, so a wait never blocks past its timeout."""

    def __init__(self, hosts, node: str, host: str):  # hosts: a Rehearsal
        self.proc = hosts.spawn(node, command("sink", host, 0), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name="tcpprobe-sink", daemon=True).start()
        self.port = self.next()["port"]

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = 10.0) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from {self.proc.args} within {timeout:g}s") from None
        if line is None:
            raise EOFError(f"{self.proc.args} exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        return json.loads(line)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def sink(host: str, port: int) -> None:
    srv = socket.create_server((host, port))
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    while True:
        conn, peer = srv.accept()
        with conn:
            total, first = 0, None
            while chunk := conn.recv(1 << 16):
                first = time.monotonic() if first is None else first
                total += len(chunk)
            seconds = time.monotonic() - first if first is not None else 0.0
        print(json.dumps({"peer": peer[0], "bytes": total, "seconds": seconds}), flush=True)


def send(host: str, port: int, nbytes: int) -> None:
    block = b"\x5a" * (1 << 16)
    with socket.create_connection((host, port), timeout=10) as s:
        while nbytes > 0:
            n = min(nbytes, len(block))
            s.sendall(block[:n])
            nbytes -= n


def connect(host: str, port: int) -> int:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        print(f"connect {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    cmd, host, port = argv[1], argv[2], int(argv[3])
    if cmd == "sink":
        sink(host, port)
    elif cmd == "send":
        send(host, port, int(argv[4]))
    elif cmd == "connect":
        return connect(host, port)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
