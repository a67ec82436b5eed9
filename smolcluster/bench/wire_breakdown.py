"""`smolcluster bench wire --breakdown`: where a smolwire round trip spends its time beyond raw TCP.

The same state goes over loopback and back four ways, each adding one layer of the real format on
both ends (the echo runs in a child process, so every variant crosses the kernel twice):

  raw         one buffer behind an 8-byte length, received with recv_into (bench wire's baseline)
  flat frame  + the 28-byte preamble and the 94-byte binary header, one sendmsg; header and payload
              received together into a preallocated buffer (the format, without its checks)
  wire.py     encode_frame / send_frame / read_frame on a blocking socket (every check, the agreed layout)
  Connection  the full transport: deadlines on every wait (kernel socket timeouts, or poll), locks, byte counts

Runs are interleaved (bench.wire.interleaved_medians: a fresh seeded order each round) so machine noise hits all of them alike.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Callable

import torch

from smolcluster.bench.wire import agree, echo_process, interleaved_medians, layout_from, mnist_state, raw_recv, raw_send, tuned_socket
from smolcluster.core.net.transport import Connection, Listener, RetryPolicy, TransportConfig, connect
from smolcluster.core.net.wire import (

    FLAG_BINARY,
    FLAG_FLAT,
    FLAT_LEAD,
    MAGIC,
    PREAMBLE,
    VERSION,
    Message,
    FlatBuffer,
    MessageKind,
    binary_header,
    encode_frame,
    parse_binary_header,
    read_frame,
    send_frame,
)
from smolcluster.core.training.flat import FlatLayout

VARIANTS = ("raw", "flat frame", "wire.py", "Connection")


def _fill(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < view.nbytes:
        got = sock.recv_into(view[pos:])
        if not got:
            raise EOFError("peer closed")
        pos += got


def _flat_send(sock: socket.socket, data: memoryview, header: bytes) -> None:
    pre = PREAMBLE.pack(MAGIC, VERSION, int(MessageKind.ECHO), FLAG_BINARY | FLAG_FLAT, len(header), data.nbytes, 0)
    sock.sendmsg([pre + header, data])


def _flat_recv(sock: socket.socket, buf: torch.Tensor, view: memoryview) -> tuple[dict, torch.Tensor]:
    pre = bytearray(PREAMBLE.size)
    _fill(sock, memoryview(pre))
    header_len, payload_len = PREAMBLE.unpack(pre)[4:6]
    body = view[FLAT_LEAD - header_len:FLAT_LEAD + payload_len]
    _fill(sock, body)
    fields, _ = parse_binary_header(body[:header_len], None)
    return fields, buf[FLAT_LEAD:FLAT_LEAD + payload_len]


def _echo(conn: socket.socket, variant: str, layout: FlatLayout) -> None:
    ring = FlatBuffer(layout.nbytes)
    buf, view = ring.tensor, ring.view
    with conn:
        try:
            while True:
                if variant == "raw":
                    data = raw_recv(conn)
                    if data is None:
                        return
                    raw_send(conn, memoryview(data.numpy()))
                elif variant == "flat frame":
                    fields, flat = _flat_recv(conn, buf, view)
                    _flat_send(conn, memoryview(flat.numpy()), binary_header(fields, layout.digest))
                else:
                    send_frame(conn, encode_frame(read_frame(conn, layout=layout, flat_buffer=lambda: ring)))
        except Exception:  # the client closing ends the echo, whatever it was in the middle of
            return


def _serve(ready: Any, stop: Any) -> None:
    layout = FlatLayout.of(mnist_state())
    config = TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0)

    def echo_connection(conn: Connection) -> None:
        while True:
            msg = conn.recv()
            if msg.kind == MessageKind.HELLO:
                conn.agree(layout_from(msg.fields["layout"]))
            conn.send(msg)

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
            threading.Thread(target=_echo, args=(conn, variant, layout), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    ready.send({"plain": plain.getsockname()[1], "connection": listener.address[1]})
    stop.recv()
    plain.close()
    listener.close()


def run(min_seconds: float = 3.0) -> list[dict[str, Any]]:
    state = mnist_state()
    layout = FlatLayout.of(state)
    flat = layout.pack(state)
    flat_view = memoryview(flat.numpy())
    msg = Message(MessageKind.ECHO, {"version": 1}, flat=flat, layout=layout)
    header = binary_header(msg.fields, layout.digest)
    ring = FlatBuffer(layout.nbytes)
    buf, view = ring.tensor, ring.view
    with echo_process(_serve) as ports, contextlib.ExitStack() as closing:
        socks: dict[str, socket.socket] = {}
        for i, variant in enumerate(VARIANTS[:-1]):
            socks[variant] = closing.enter_context(tuned_socket(socket.create_connection(("127.0.0.1", ports["plain"]))))
            socks[variant].sendall(bytes([i]))  # tells the echo which variant this connection speaks
        conn = connect("127.0.0.1", ports["connection"], key=None, retry=RetryPolicy(deadline=30),
                       config=TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0))
        closing.callback(conn.close)
        agree(conn, layout)
        fns: dict[str, Callable[[], Any]] = {
            "raw": lambda: (raw_send(socks["raw"], flat_view), raw_recv(socks["raw"])),
            "flat frame": lambda: (_flat_send(socks["flat frame"], flat_view, header), _flat_recv(socks["flat frame"], buf, view)),
            "wire.py": lambda: (send_frame(socks["wire.py"], encode_frame(msg)),
                                read_frame(socks["wire.py"], layout=layout, flat_buffer=lambda: ring)),
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
    lines.append("the MNIST state (101,770 float32, one flat buffer) over loopback and back; each row adds one layer "
                 "on both ends (median of interleaved round trips)")
    return "\n".join(lines)
