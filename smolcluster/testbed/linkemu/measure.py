"""Measure a path like iperf/ping would, with nothing but Python: TCP bulk throughput and TCP RTT.

Runs on both ends of a path (inside containers for the compose backend, or on loopback through
proxies): `serve` on one end, `send` / `rtt` on the other. Each prints one JSON line, so the
caller (the link check, the topology tests) reads results from the command output.

    python -m smolcluster.testbed.linkemu.measure serve --bind 0.0.0.0 --port 5201 [--count 1]
    python -m smolcluster.testbed.linkemu.measure send HOST PORT --seconds 3
    python -m smolcluster.testbed.linkemu.measure rtt HOST PORT --count 20

Throughput is computed by the receiver from its first to its last byte (so connection setup
and the sender's buffering do not count): that is goodput, what TCP gets, which is what the
link profiles' rates mean.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable

CHUNK = 256 * 1024
MODE_BULK = b"B"
MODE_ECHO = b"E"


def handle_connection(conn: socket.socket) -> dict:
    """Serve one measuring connection: echo single bytes (RTT) or sink a bulk upload and report its timing."""
    mode = conn.recv(1)
    if mode == MODE_ECHO:
        # echo single bytes until the peer closes: one round trip per byte
        n = 0
        while True:
            b = conn.recv(1)
            if not b:
                return {"mode": "echo", "echoed": n}
            conn.sendall(b)
            n += 1
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total, first, last = 0, None, None
    while True:
        got = conn.recv_into(view)
        if not got:
            break
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        total += got
    seconds = (last - first) if first is not None and last is not None else 0.0
    mbit = total * 8 / seconds / 1e6 if seconds > 0 else 0.0
    conn.sendall(json.dumps({"bytes": total, "seconds": seconds}).encode())
    return {"mode": "bulk", "bytes": total, "seconds": round(seconds, 4), "mbit": round(mbit, 2)}


class LoopbackServer:
    """A TCP server on 127.0.0.1 running `handler(conn)` for every connection, each in its own thread, until
    close() (which also shuts the open connections down). The link check's echo/sink, the tests' upstreams."""

    def __init__(self, handler: Callable[[socket.socket], Any]):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="loopback-server", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="loopback-server-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:
                pass  # the peer went away mid-way

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


def serve(bind: str, port: int, count: int = 1, timeout: float = 60.0) -> list[dict]:
    """Accept `count` measurement connections one after the other; return their results."""
    results = []
    with socket.create_server((bind, port), reuse_port=False) as srv:
        srv.settimeout(timeout)
        print(json.dumps({"listening": f"{bind}:{port}"}), flush=True)
        for _ in range(count):
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(timeout)
                r = handle_connection(conn)
                r["peer"] = peer[0]
                results.append(r)
                print(json.dumps(r), flush=True)
    return results


def send(host: str, port: int, seconds: float = 3.0, timeout: float = 30.0) -> dict:
    """Send as fast as TCP allows for `seconds`; return the receiver's measurement."""
    payload = memoryview(bytes(CHUNK))
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(MODE_BULK)
        end = time.perf_counter() + seconds
        sent = 0
        while time.perf_counter() < end:
            s.sendall(payload)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            reply += b
    r = json.loads(reply)
    mbit = r["bytes"] * 8 / r["seconds"] / 1e6 if r["seconds"] > 0 else 0.0
    return {"mode": "bulk", "bytes": r["bytes"], "seconds": round(r["seconds"], 4), "mbit": round(mbit, 2)}


def rtt(host: str, port: int, count: int = 20, timeout: float = 10.0) -> dict:
    """Round trips of one byte over one TCP connection (TCP_NODELAY): min / median / max in ms."""
    samples = []
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(MODE_ECHO)
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ConnectionError("echo peer closed during the RTT measurement")
            samples.append((time.perf_counter() - t0) * 1000)
    return {"mode": "rtt", "count": count, "min_ms": round(min(samples), 3),
            "median_ms": round(statistics.median(samples), 3), "max_ms": round(max(samples), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.testbed.linkemu.measure", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=5201)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--timeout", type=float, default=60.0)
    b = sub.add_parser("send")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--seconds", type=float, default=3.0)
    r = sub.add_parser("rtt")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--count", type=int, default=20)
    c = sub.add_parser("connect", help="exit 0 if a TCP connection to HOST PORT opens within --timeout, else 1")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args(argv)
    try:
        if a.cmd == "serve":
            serve(a.bind, a.port, a.count, a.timeout)
        elif a.cmd == "send":
            print(json.dumps(send(a.host, a.port, a.seconds)), flush=True)
        elif a.cmd == "rtt":
            print(json.dumps(rtt(a.host, a.port, a.count)), flush=True)
        else:
            with socket.create_connection((a.host, a.port), timeout=a.timeout):
                print(json.dumps({"connected": True}))
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
