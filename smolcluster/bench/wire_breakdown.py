"""`smolcluster bench wire --breakdown`: where a smolwire round trip spends its time beyond raw TCP.

The same state goes over loopback and back five ways, each adding one layer of the real format on
both ends (the echo runs in a child process, so every variant crosses the kernel twice):

  raw         one buffer behind an 8-byte length, received with recv_into (bench wire's baseline)
  tensors     + one sendmsg of per-tensor memoryviews, one torch.frombuffer view per tensor on receive
  framed      + the 28-byte preamble and the JSON header (table cached, fields encoded per frame)
  wire.py     encode_frame / send_frame / read_frame on a blocking socket (all validation, layout cache)
  Connection  the full transport: deadlines on every wait, non-blocking socket, locks, byte counts

Runs are interleaved round-robin so machine noise hits all of them alike.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from typing import Any, Callable

import torch

from smolcluster.bench.wire import echo_process, interleaved_medians, mnist_state, raw_recv, raw_send, tuned_socket
from smolcluster.core.net.transport import Connection, Listener, RetryPolicy, TransportConfig, connect
from smolcluster.core.net.wire import (
    MAGIC,
    PREAMBLE,
    RECV_ALIGN,
    VERSION,
    LayoutCache,
    Message,
    MessageKind,
    encode_frame,
    read_frame,
    send_frame,
    table_prefix,
)

VARIANTS = ("raw", "tensors", "framed", "wire.py", "Connection")
_Spec = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, offset, length


def _layout(state: dict[str, torch.Tensor]) -> tuple[list[_Spec], bytes]:
    """Each tensor's place in the payload (float32 states: no padding needed) and the header's table prefix."""
    specs, offset = [], 0
    for name, t in state.items():
        specs.append((name, t.dtype, tuple(t.shape), offset, t.numel() * t.element_size()))
        offset += t.numel() * t.element_size()
    table = [{"name": n, "dtype": "float32", "shape": list(s), "offset": o, "length": ln} for n, _, s, o, ln in specs]
    return specs, table_prefix(table)


def _fill(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < view.nbytes:
        got = sock.recv_into(view[pos:])
        if not got:
            raise EOFError("peer closed")
        pos += got


def _views(payload: memoryview, specs: list[_Spec]) -> dict[str, torch.Tensor]:
    out = {}
    for name, dtype, shape, off, length in specs:
        t = torch.frombuffer(payload, dtype=dtype, count=length // dtype.itemsize, offset=off)
        out[name] = t.view(shape) if len(shape) != 1 else t
    return out


def _tensors_send(sock: socket.socket, tensors: dict[str, torch.Tensor]) -> None:
    views = [memoryview(t.numpy()) for t in tensors.values()]
    sock.sendmsg([struct.pack("!Q", sum(v.nbytes for v in views)), *views])


def _tensors_recv(sock: socket.socket, specs: list[_Spec]) -> dict[str, torch.Tensor]:
    buf = raw_recv(sock)  # the same 8-byte length and recv_into loop as the raw baseline
    if buf is None:
        raise EOFError("peer closed")
    return _views(memoryview(buf.numpy()), specs)


def _framed_send(sock: socket.socket, tensors: dict[str, torch.Tensor], prefix: bytes, fields: dict) -> None:
    views = [memoryview(t.numpy()) for t in tensors.values()]
    header = prefix + json.dumps(fields, separators=(",", ":")).encode() + b"}"
    pre = PREAMBLE.pack(MAGIC, VERSION, int(MessageKind.ECHO), 0, len(header), sum(v.nbytes for v in views), 0)
    sock.sendmsg([pre + header, *views])


def _framed_recv(sock: socket.socket, specs: list[_Spec], prefix: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    pre = bytearray(PREAMBLE.size)
    _fill(sock, memoryview(pre))
    header_len, payload_len = PREAMBLE.unpack(pre)[4:6]
    lead = -header_len % RECV_ALIGN  # where read_frame puts the payload too
    buf = torch.empty(lead + header_len + payload_len, dtype=torch.uint8)
    body = memoryview(buf.numpy())[lead:]
    _fill(sock, body)
    raw = bytes(body[:header_len])
    if not raw.startswith(prefix):
        raise ValueError("unexpected tensor table")
    return json.loads(raw[len(prefix):-1]), _views(body[header_len:], specs)


def _echo(conn: socket.socket, variant: str, specs: list[_Spec], prefix: bytes) -> None:
    send_cache, recv_cache = LayoutCache(), LayoutCache()
    with conn:
        try:
            while True:
                if variant == "raw":
                    data = raw_recv(conn)
                    if data is None:
                        return
                    raw_send(conn, memoryview(data.numpy()))
                elif variant == "tensors":
                    _tensors_send(conn, _tensors_recv(conn, specs))
                elif variant == "framed":
                    fields, tensors = _framed_recv(conn, specs, prefix)
                    _framed_send(conn, tensors, prefix, fields)
                else:
                    send_frame(conn, encode_frame(read_frame(conn, cache=recv_cache), cache=send_cache))
        except Exception:  # the client closing ends the echo, whatever it was in the middle of
            return


def _serve(ready: Any, stop: Any) -> None:
    specs, prefix = _layout(mnist_state())
    config = TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0)

    def echo_connection(conn: Connection) -> None:
        while True:
            conn.send(conn.recv())

    listener = Listener("127.0.0.1", 0, key=None, on_connection=echo_connection, config=config)
    listener.start()
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(8)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = plain.accept()
            except OSError:
                return
            tuned_socket(conn)
            variant = VARIANTS[conn.recv(1)[0]]
            threading.Thread(target=_echo, args=(conn, variant, specs, prefix), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    ready.send({"plain": plain.getsockname()[1], "connection": listener.address[1]})
    stop.recv()
    plain.close()
    listener.close()


def run(min_seconds: float = 3.0) -> list[dict[str, Any]]:
    state = mnist_state()
    specs, prefix = _layout(state)
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    flat_view = memoryview(flat.view(torch.uint8).numpy())
    msg = Message(MessageKind.ECHO, {"version": 1}, state)
    send_cache, recv_cache = LayoutCache(), LayoutCache()
    with echo_process(_serve) as ports, contextlib.ExitStack() as closing:
        socks: dict[str, socket.socket] = {}
        for i, variant in enumerate(VARIANTS[:-1]):
            socks[variant] = closing.enter_context(tuned_socket(socket.create_connection(("127.0.0.1", ports["plain"]))))
            socks[variant].sendall(bytes([i]))  # tells the echo which variant this connection speaks
        conn = connect("127.0.0.1", ports["connection"], key=None, retry=RetryPolicy(deadline=30),
                       config=TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0))
        closing.callback(conn.close)
        fns: dict[str, Callable[[], Any]] = {
            "raw": lambda: (raw_send(socks["raw"], flat_view), raw_recv(socks["raw"])),
            "tensors": lambda: (_tensors_send(socks["tensors"], state), _tensors_recv(socks["tensors"], specs)),
            "framed": lambda: (_framed_send(socks["framed"], state, prefix, msg.fields),
                               _framed_recv(socks["framed"], specs, prefix)),
            "wire.py": lambda: (send_frame(socks["wire.py"], encode_frame(msg, cache=send_cache)),
                                read_frame(socks["wire.py"], cache=recv_cache)),
            "Connection": lambda: (conn.send(msg), conn.recv()),
        }
        times = interleaved_medians(fns, rounds=200, min_seconds=min_seconds, max_rounds={})
    payload = flat_view.nbytes
    rows, previous = [], None
    for variant in VARIANTS:
        t = times[variant]
        rows.append({"variant": variant, "round_trip_us": round(t * 1e6, 1), "gbps": round(2 * payload * 8 / t / 1e9, 2),
                     "vs_raw": round(times["raw"] / t, 3),
                     "added_us": None if previous is None else round((t - previous) * 1e6, 1)})
        previous = t
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'variant':<12}{'round trip us':>15}{'Gbit/s':>9}{'vs raw':>8}{'added us':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        added = "" if r["added_us"] is None else f"{r['added_us']:+.1f}"
        lines.append(f"{r['variant']:<12}{r['round_trip_us']:>15.1f}{r['gbps']:>9.2f}{r['vs_raw']:>7.2f}x{added:>10}")
    lines.append("the MNIST state (101,770 float32, 4 tensors) over loopback and back; each row adds one layer "
                 "on both ends (median of interleaved round trips)")
    return "\n".join(lines)
