"""Measure a path like iperf/ping would, with nothing but Python: TCP bulk throughput both ways,
TCP RTT, and packet loss both ways (a paced UDP echo probe).

Runs on both ends of a path (inside containers for the compose backend, or on loopback through
proxies): `serve` on one end, `send` / `recv` / `rtt` / `udp` on the other. Each prints one JSON
line, so the caller (the link check, the topology tests) reads results from the command output.

    python -m smolcluster.testbed.linkemu.measure serve --bind 0.0.0.0 --port 5201 [--count 1]
    python -m smolcluster.testbed.linkemu.measure send HOST PORT --seconds 3     # upload
    python -m smolcluster.testbed.linkemu.measure recv HOST PORT --seconds 3     # download
    python -m smolcluster.testbed.linkemu.measure rtt HOST PORT --count 20
    python -m smolcluster.testbed.linkemu.measure udp HOST PORT --count 10000 --pps 4000

Throughput is computed by the receiver from its first to its last byte (so connection setup
and the sender's buffering do not count): that is goodput, what TCP gets, which is what the
link profiles' rates mean. `send` also reports the sender's TCP retransmissions during the
upload (Linux: /proc/net/snmp of its network namespace, so only meaningful where the transfer
is the only traffic there, as in a container during the link check).

Loss: `serve` also echoes UDP datagrams on its port. `udp` sends numbered datagrams, paced well
below the path's rate (so no queue overflows and only the emulated loss drops them), then asks
the server how many arrived: up loss = 1 - arrived/sent, down loss = 1 - echoes/arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

CHUNK = 256 * 1024
MODE_BULK = b"B"
MODE_ECHO = b"E"
MODE_DOWNLOAD = b"D"  # followed by the seconds to send for, a big-endian double
UDP_PROBE = b"P"  # + probe id (8 bytes) + sequence number (4 bytes) + padding: counted and echoed
UDP_REPORT = b"R"  # + probe id: answered with b"C" + JSON {"received": n}
UDP_PAYLOAD = 64
# Probe sockets' receive buffers: a burst arriving while the reader is descheduled (a loaded machine, a
# container's CPU limit) must queue, not overflow — a socket's drops would be counted as the link's loss.
UDP_RCVBUF_BYTES = 8 * 1024 * 1024


def _udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # SO_RCVBUFFORCE passes net.core.rmem_max where allowed (root, NET_ADMIN: the compose containers)
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, UDP_RCVBUF_BYTES)
            break
        except OSError:
            continue
    return s


def handle_connection(conn: socket.socket) -> dict:
    """Serve one measuring connection: echo single bytes (RTT), sink a bulk upload and report its timing,
    or send a download for the requested seconds."""
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
    if mode == MODE_DOWNLOAD:
        return _send_download(conn)
    total, seconds = _receive_timed(conn)
    mbit = total * 8 / seconds / 1e6 if seconds > 0 else 0.0
    conn.sendall(json.dumps({"bytes": total, "seconds": seconds}).encode())
    return {"mode": "bulk", "bytes": total, "seconds": round(seconds, 4), "mbit": round(mbit, 2)}


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = conn.recv(n - len(data))
        if not got:
            raise ConnectionError("peer closed before the request was complete")
        data += got
    return data


def _send_download(conn: socket.socket) -> dict:
    """Send zeros for the requested seconds, then close our side; the peer times what it received."""
    (seconds,) = struct.unpack("!d", _recv_exact(conn, 8))
    payload = memoryview(bytes(CHUNK))
    sent, end = 0, time.perf_counter() + min(max(seconds, 0.0), 60.0)
    while time.perf_counter() < end:
        conn.sendall(payload)
        sent += CHUNK
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the peer's close
    return {"mode": "download", "sent": sent}


def _receive_timed(s: socket.socket) -> tuple[int, float]:
    """(bytes, seconds from the first to the last byte) until the peer closes."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total, first, last = 0, None, None
    while True:
        got = s.recv_into(view)
        if not got:
            break
        last = time.perf_counter()
        first = first if first is not None else last
        total += got
    return total, (last - first) if first is not None and last is not None else 0.0


def tcp_counters() -> dict[str, int] | None:
    """This network namespace's TCP OutSegs and RetransSegs (Linux /proc/net/snmp), else None."""
    try:
        lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Tcp:")]
    except OSError:
        return None
    if len(lines) < 2:
        return None
    values = dict(zip(lines[0][1:], lines[1][1:]))
    try:
        return {"OutSegs": int(values["OutSegs"]), "RetransSegs": int(values["RetransSegs"])}
    except (KeyError, ValueError):
        return None


class UdpEcho:
    """Counts and echoes the link check's UDP probe datagrams on a port, in a thread, until close()."""

    def __init__(self, bind: str, port: int):
        self.sock = _udp_socket()
        self.sock.bind((bind, port))
        self.sock.settimeout(0.2)
        self.received: dict[bytes, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                if data[:1] == UDP_PROBE and len(data) >= 13:
                    self.received[data[1:9]] = self.received.get(data[1:9], 0) + 1
                    self.sock.sendto(data, peer)
                elif data[:1] == UDP_REPORT and len(data) == 9:
                    self.sock.sendto(b"C" + json.dumps({"received": self.received.get(data[1:9], 0)}).encode(), peer)
            except OSError:
                pass  # e.g. no route back right now: the probe counts it as lost

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


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
    """Accept `count` measurement connections one after the other (and echo UDP probes on the same
    port meanwhile); return their results."""
    results = []
    udp = UdpEcho(bind, port)
    try:
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
    finally:
        udp.close()
    return results


def send(host: str, port: int, seconds: float = 3.0, timeout: float = 30.0) -> dict:
    """Send as fast as TCP allows for `seconds`; return the receiver's measurement (and the sender's
    TCP retransmissions meanwhile, where the kernel counts them: `retrans_pct` of the segments sent)."""
    payload = memoryview(bytes(CHUNK))
    before = tcp_counters()
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
    out = {"mode": "bulk", "bytes": r["bytes"], "seconds": round(r["seconds"], 4), "mbit": round(mbit, 2)}
    after = tcp_counters()
    if before is not None and after is not None and after["OutSegs"] > before["OutSegs"]:
        out["retrans_segs"] = after["RetransSegs"] - before["RetransSegs"]
        out["out_segs"] = after["OutSegs"] - before["OutSegs"]
        out["retrans_pct"] = round(100.0 * out["retrans_segs"] / out["out_segs"], 3)
    return out


def recv(host: str, port: int, seconds: float = 3.0, timeout: float = 30.0) -> dict:
    """Have the server send as fast as TCP allows for `seconds`; measure what arrives here (download)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(MODE_DOWNLOAD + struct.pack("!d", seconds))
        total, elapsed = _receive_timed(s)
    mbit = total * 8 / elapsed / 1e6 if elapsed > 0 else 0.0
    return {"mode": "download", "bytes": total, "seconds": round(elapsed, 4), "mbit": round(mbit, 2)}


def udp_probe(host: str, port: int, count: int = 10000, pps: float = 4000.0, wait_s: float = 1.0,
              timeout: float = 10.0) -> dict:
    """Send `count` numbered UDP datagrams at `pps` (bursts every 10 ms), count the echoes, then ask the
    server how many arrived. Loss up = 1 - arrived/sent; loss down = 1 - echoes/arrived (percent)."""
    probe_id = os.urandom(8)
    pad = bytes(max(0, UDP_PAYLOAD - 13))
    echoed = 0
    with _udp_socket() as s:
        s.connect((host, port))
        s.setblocking(False)

        def drain(until: float) -> None:
            nonlocal echoed
            while True:
                left = until - time.perf_counter()
                if left <= 0 or not select.select([s], [], [], left)[0]:
                    return
                try:
                    data = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                if data[:9] == UDP_PROBE + probe_id:
                    echoed += 1

        per_burst = max(1, round(pps / 100))
        t0 = time.perf_counter()
        sent = 0
        while sent < count:
            for _ in range(min(per_burst, count - sent)):
                try:
                    s.send(UDP_PROBE + probe_id + struct.pack("!I", sent) + pad)
                except (BlockingIOError, ConnectionRefusedError):
                    pass  # a full socket buffer or an ICMP error: the datagram counts as lost
                sent += 1
            drain(t0 + sent / pps)
        drain(time.perf_counter() + wait_s)  # the last echoes are still on their way
        received = None
        deadline = time.perf_counter() + timeout
        while received is None and time.perf_counter() < deadline:
            try:
                s.send(UDP_REPORT + probe_id)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            end = time.perf_counter() + 0.3
            while received is None and (left := end - time.perf_counter()) > 0 and select.select([s], [], [], left)[0]:
                try:
                    data = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                if data[:1] == b"C":
                    received = int(json.loads(data[1:])["received"])
    if received is None:
        raise ConnectionError(f"no UDP echo server answered at {host}:{port}")
    return {"mode": "udp", "sent": sent, "server_received": received, "echoed": echoed,
            "up_loss_pct": round(100.0 * (1 - received / sent), 4) if sent else None,
            "down_loss_pct": round(100.0 * (1 - echoed / received), 4) if received else None}


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
    for name in ("send", "recv"):
        b = sub.add_parser(name)
        b.add_argument("host")
        b.add_argument("port", type=int)
        b.add_argument("--seconds", type=float, default=3.0)
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--count", type=int, default=10000)
    u.add_argument("--pps", type=float, default=4000.0)
    u.add_argument("--wait", type=float, default=1.0)
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
        elif a.cmd == "recv":
            print(json.dumps(recv(a.host, a.port, a.seconds)), flush=True)
        elif a.cmd == "udp":
            print(json.dumps(udp_probe(a.host, a.port, a.count, a.pps, a.wait)), flush=True)
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
