"""`smolcluster bench wire`: a model state over real loopback TCP and back, three ways.

- smolwire: Connection.send / Connection.recv (the wire format, no copies), keyless and keyed (HMAC): the
            state as one flat buffer in a layout both ends agreed on first, as training sends it;
- raw:      the same bytes as one memoryview behind an 8-byte length, received with recv_into (the limit);
- pickle:   pickle.dumps behind a 4-byte length, received by appending 1 MB chunks to a bytes object
            (what the original project did; the only place pickle appears, and only as a baseline).

The echo server runs in a separate process so both ends really cross the kernel's TCP stack.
Throughput counts both directions: 2 x payload bytes / round-trip time (median over iterations).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import pickle  # baseline only: never used on a real network path
import random
import socket
import statistics
import struct
import time
from typing import Any, Callable, Iterator

import torch

from smolcluster.core.net.transport import Connection, Listener, RetryPolicy, TransportConfig, connect
from smolcluster.core.net.wire import DTYPES, Message, MessageKind, TensorSpec
from smolcluster.core.training.flat import FlatLayout

BENCH_KEY = b"smolcluster-bench-key-0123456789"


def mnist_state() -> dict[str, torch.Tensor]:
    """The seed's SimpleNN 784-128-10: 101,770 float32 parameters."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def large_state(layers: int = 24, width: int = 1024) -> dict[str, torch.Tensor]:
    """About 25M float32 parameters (24 x 1024x1024 linear layers with biases = 25,190,400)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.randn(width, width, generator=g)
        state[f"layers.{i}.bias"] = torch.randn(width, generator=g)
    return state


# --------------------------------------------------------------------------- socket helpers


def tuned_socket(sock: socket.socket) -> socket.socket:
    """No Nagle delay and 4 MB buffers, as every variant of the benchmark gets."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    return sock


def _recv_exact(sock: socket.socket, n: int) -> torch.Tensor | None:
    buf = torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if not got:
            return None
        pos += got
    return buf


def raw_send(sock: socket.socket, data: memoryview) -> None:
    """The raw baseline: an 8-byte length, then the bytes."""
    sock.sendall(struct.pack("!Q", data.nbytes))
    sock.sendall(data)


def raw_recv(sock: socket.socket) -> torch.Tensor | None:
    """One raw_send message into a fresh tensor (None when the peer closed)."""
    head = _recv_exact(sock, 8)
    if head is None:
        return None
    (n,) = struct.unpack("!Q", head.numpy().tobytes())
    return _recv_exact(sock, n)


def _pickle_send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack(">I", len(data)) + data)


def _pickle_recv(sock: socket.socket) -> Any:
    raw = sock.recv(4)
    if len(raw) < 4:
        return None
    remaining = struct.unpack(">I", raw)[0]
    data = b""
    while remaining > 0:
        chunk = sock.recv(min(1 << 20, remaining))
        if not chunk:
            return None
        data += chunk  # quadratic, as in the original
        remaining -= len(chunk)
    return pickle.loads(data)


# --------------------------------------------------------------------------- echo server (child process)


def layout_from(description: list) -> FlatLayout:
    """The layout a peer described (FlatLayout.describe()): what the echo side agrees on."""
    return FlatLayout({name: TensorSpec(tuple(shape), DTYPES[dtype]) for name, dtype, shape, _ in description})


def agree(conn: Connection, layout: FlatLayout) -> None:
    """The client's half of the agreement (the training HELLO sends the digest; here the echo side has no
    model, so it is told the whole layout)."""
    conn.agree(layout)
    conn.send(Message(MessageKind.HELLO, {"layout": layout.describe()}))
    conn.recv()


def _echo_smolwire(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg.kind == MessageKind.HELLO:
            conn.agree(layout_from(msg.fields["layout"]))
        conn.send(msg)


def _serve(ready: Any, stop: Any) -> None:
    config = TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0)
    listeners = [Listener("127.0.0.1", 0, key=k, on_connection=_echo_smolwire, config=config) for k in (None, BENCH_KEY)]
    for lst in listeners:
        lst.start()
    plain = []
    for mode in ("raw", "pickle"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        plain.append((mode, s))

    def loop(mode: str, s: socket.socket) -> None:
        c, _ = s.accept()
        tuned_socket(c)
        with c:
            while True:
                if mode == "raw":
                    data = raw_recv(c)
                    if data is None:
                        return
                    raw_send(c, memoryview(data.numpy()))
                else:
                    obj = _pickle_recv(c)
                    if obj is None:
                        return
                    _pickle_send(c, obj)

    import threading

    threads = [threading.Thread(target=loop, args=p, daemon=True) for p in plain]
    for t in threads:
        t.start()
    ready.send({"smolwire": listeners[0].address[1], "smolwire_keyed": listeners[1].address[1],
                **{mode: s.getsockname()[1] for mode, s in plain}})
    stop.recv()
    for lst in listeners:
        lst.close()


# --------------------------------------------------------------------------- measurement


def interleaved_medians(fns: dict[str, Callable[[], None]], rounds: int, min_seconds: float,
                 max_rounds: dict[str, int]) -> dict[str, float]:
    """Median seconds per call for each function, run interleaved so machine noise hits all of them alike.

    Each round runs the modes in a fresh random order (seeded, so reruns match): in a fixed order one
    mode would always run right after the same neighbour (the smolwire echo right after pickle, whose
    megabytes of garbage leave the caches cold), and that position alone moves a median. One warm-up
    call each; then at least `rounds` rounds and `min_seconds` of wall time. A mode in `max_rounds` (the slow
    pickle baseline) stops after that many rounds.
    """
    times: dict[str, list[float]] = {m: [] for m in fns}
    for fn in fns.values():
        fn()
    modes, order = list(fns), random.Random(0)
    start = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        order.shuffle(modes)
        for mode in modes:
            fn = fns[mode]
            if len(times[mode]) >= max_rounds.get(mode, 1 << 30):
                continue
            t0 = time.perf_counter()
            fn()
            times[mode].append(time.perf_counter() - t0)
        done += 1
    return {m: statistics.median(t) for m, t in times.items()}


@contextlib.contextmanager
def echo_process(serve: Callable[[Any, Any], None]) -> Iterator[Any]:
    """Run `serve(ready, stop)` in a child process; yields what it sends on `ready` (its ports) and
    stops it on exit. A separate process, so both ends of a round trip really cross the kernel."""
    ctx = mp.get_context("spawn")  # portable (no fork on Windows/macOS default) and no inherited threads
    ready_parent, ready_child = ctx.Pipe()
    stop_parent, stop_child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(ready_child, stop_child), daemon=True)
    proc.start()
    try:
        yield ready_parent.recv()
    finally:
        stop_parent.send(True)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def run(min_seconds: float = 3.0, include_large: bool = True) -> dict[str, Any]:
    with echo_process(_serve) as ports:
        config = TransportConfig(heartbeat_timeout=600.0, io_timeout=600.0)
        cases = [("mnist-784-128-10", mnist_state())]
        if include_large:
            cases.append(("25M-float32", large_state()))
        conns = {
            "smolwire": connect("127.0.0.1", ports["smolwire"], key=None, config=config, retry=RetryPolicy(deadline=30)),
            "smolwire_keyed": connect("127.0.0.1", ports["smolwire_keyed"], key=BENCH_KEY, config=config, retry=RetryPolicy(deadline=30)),
        }
        raw = tuned_socket(socket.create_connection(("127.0.0.1", ports["raw"])))
        pick = tuned_socket(socket.create_connection(("127.0.0.1", ports["pickle"])))
        results = []
        try:
            for name, state in cases:
                params = sum(t.numel() for t in state.values())
                layout = FlatLayout.of(state)
                for conn in conns.values():
                    agree(conn, layout)
                buffer = layout.pack(state)
                msg = Message(MessageKind.ECHO, {"version": 1}, flat=buffer, layout=layout)
                flat_view = memoryview(buffer.numpy())
                payload = flat_view.nbytes
                def smol(conn: Connection) -> Callable[[], None]:
                    def fn() -> None:
                        conn.send(msg)
                        back = conn.recv()
                        assert back.flat is not None and back.flat.numel() == payload
                    return fn

                def rawfn() -> None:
                    raw_send(raw, flat_view)
                    assert raw_recv(raw).numel() == payload  # type: ignore[union-attr]

                def picklefn() -> None:
                    _pickle_send(pick, state)
                    assert _pickle_recv(pick).keys() == state.keys()

                fns = {mode: smol(conn) for mode, conn in conns.items()}
                fns.update(raw=rawfn, pickle=picklefn)
                # The large pickle round trip takes seconds (quadratic receive): a few samples are enough.
                small = payload < (8 << 20)
                rates = interleaved_medians(fns, rounds=200 if small else 7, min_seconds=min_seconds,
                                     max_rounds={} if small else {"pickle": 3})
                gbps = {m: 2 * payload * 8 / t / 1e9 for m, t in rates.items()}
                results.append({
                    "name": name,
                    "params": params,
                    "payload_bytes": payload,
                    "smolwire_gbps": round(gbps["smolwire"], 3),
                    "smolwire_keyed_gbps": round(gbps["smolwire_keyed"], 3),
                    "raw_gbps": round(gbps["raw"], 3),
                    "pickle_gbps": round(gbps["pickle"], 3),
                    "smolwire_vs_raw": round(gbps["smolwire"] / gbps["raw"], 3),
                    "smolwire_vs_pickle": round(gbps["smolwire"] / gbps["pickle"], 3),
                    "round_trip_ms": {m: round(t * 1e3, 3) for m, t in rates.items()},
                })
        finally:
            for c in conns.values():
                c.close()
            raw.close()
            pick.close()
    return {"cases": results}


def format_table(result: dict[str, Any]) -> str:
    head = f"{'case':<18} {'params':>11} {'payload MB':>10} {'smolwire':>9} {'keyed':>9} {'raw':>9} {'pickle':>9} {'vs raw':>7} {'vs pickle':>9}"
    lines = [head, "-" * len(head)]
    for c in result["cases"]:
        lines.append(f"{c['name']:<18} {c['params']:>11,} {c['payload_bytes'] / 1e6:>10.2f} {c['smolwire_gbps']:>9.2f} "
                     f"{c['smolwire_keyed_gbps']:>9.2f} {c['raw_gbps']:>9.2f} {c['pickle_gbps']:>9.2f} "
                     f"{c['smolwire_vs_raw']:>6.2f}x {c['smolwire_vs_pickle']:>8.2f}x")
    lines.append("throughput in Gbit/s over loopback TCP, both directions (2 x payload / median round trip); "
                 "keyed = smolwire with cluster key (HMAC-SHA256 on every frame)")
    return "\n".join(lines)


def main(as_json: bool = False) -> None:
    result = run()
    print(json.dumps(result) if as_json else format_table(result))
