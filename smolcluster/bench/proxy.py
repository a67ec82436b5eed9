"""Throughput of the embedded proxy on loopback: direct, through the proxy, and with toxics.

`smolcluster bench proxy` prints the table. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from smolcluster.testbed.linkemu.api import ToxiproxyServer


def _sink() -> tuple[socket.socket, list[threading.Thread]]:
    """A server that reads until EOF and answers one byte."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            while conn.recv_into(buf):
                pass
            conn.sendall(b"k")
        except OSError:
            pass
        finally:
            conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    t = threading.Thread(target=accept, daemon=True)
    threads.append(t)
    t.start()
    return lsock, threads


def _upload(port: int, total: int) -> float:
    """Send `total` bytes, wait for the sink's answer; MB/s (1 MB = 1e6 bytes)."""
    block = b"\x00" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        return sent / (time.perf_counter() - start) / 1e6


def run_proxy_bench(megabytes: int = 200) -> list[dict[str, Any]]:
    total = megabytes << 20
    lsock, threads = _sink()
    upstream_port = lsock.getsockname()[1]
    rows = [{"path": "direct (no proxy)", "MB/s": _upload(upstream_port, total)}]
    cases: list[tuple[str, dict[str, Any] | None]] = [
        ("proxy, no toxics", None),
        ("proxy, latency 0 ms (queued path)", {"type": "latency", "stream": "upstream", "attributes": {"latency": 0}}),
        ("proxy, latency 20 ms", {"type": "latency", "stream": "upstream", "attributes": {"latency": 20}}),
        ("proxy, bandwidth 50 MB/s", {"type": "bandwidth", "stream": "upstream", "attributes": {"rate": 50_000}}),
    ]
    try:
        with ToxiproxyServer(api_port=0) as srv:
            for i, (label, toxic) in enumerate(cases):
                proxy = srv.create_proxy(f"bench{i}", "127.0.0.1:0", f"127.0.0.1:{upstream_port}")
                if toxic:
                    srv.add_toxic(proxy.name, toxic)
                size = total if not toxic or toxic["type"] != "bandwidth" else min(total, 100 << 20)
                rows.append({"path": label, "MB/s": _upload(int(proxy.listen.rsplit(":", 1)[1]), size)})
    finally:
        lsock.close()
        for t in threads:
            t.join(5)
    return rows
