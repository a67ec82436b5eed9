"""Defects 8 and 9 (frames and memory): a stranger's first frame cannot make the server allocate what its
header does not justify; replies are never a large multiple of what a peer sent; a peer that stops
reading is dropped instead of growing the server's memory. Each against a live server whose honest
worker trains to its floor while the server's memory is sampled."""

from __future__ import annotations

import threading
import time

import pytest

from attack import Background, Process, ask, join, raw_socket, weights_of
from smolcluster.common.errors import SmolclusterError
from smolcluster.core.net.wire import MAGIC, PREAMBLE, VERSION, Message, MessageKind

pytestmark = pytest.mark.slow

FLOOR = 0.85
MODEL_BYTES = 101_770 * 4


class RssPeak:
    """Samples a process's RSS every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.proc, self._stop = Process(pid), threading.Event()
        self.base = self.peak = self.proc.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.rss_mb())
            except Exception:  # noqa: BLE001 - the process ended
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2)
        return self.peak - self.base


def _big_first_frames(port: int, n: int, mb: int) -> list[str]:
    """`n` connections whose first frame declares (and then sends) an `mb` MB payload."""
    payload = bytes(mb << 20)
    header = b'{"fields":{"rank":1,"hostname":"w1","algorithm":"syncps"},"tensors":[{"name":"x","dtype":"uint8",' \
             b'"shape":[' + str(len(payload)).encode() + b'],"offset":0,"length":' + str(len(payload)).encode() + b'}]}'
    pre = PREAMBLE.pack(MAGIC, VERSION, int(MessageKind.HELLO), 0, len(header), len(payload), 0)
    outcomes = []

    def one() -> None:
        s = raw_socket(port)
        s.settimeout(30)
        try:
            s.sendall(pre + header)
            s.sendall(payload)
            outcomes.append("sent")
        except OSError as e:
            outcomes.append(type(e).__name__)  # the server refused the frame and closed
        finally:
            s.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_a_strangers_first_frame_cannot_make_the_server_allocate(local_cluster):
    """Defect 8: the first frame (HELLO) was read with no schema, its buffer (up to 2 GiB + 1 MiB) allocated
    before the header was checked: six connections sending 300 MB each took the server from 323 to 2,123 MB."""
    c = local_cluster("syncps", cluster={"max_steps": 300}, workers=["w1"])
    c.start_server()
    c.start_worker(1, "--slowdown", "2")
    c.wait_for(lambda: any(m["event"] == "update" for m in c.metrics()), 60, "training to start")
    rss = RssPeak(c.procs.procs["server"].pid)
    outcomes = _big_first_frames(c.port, 6, 300)
    grew = rss.stop()
    assert c.wait_server(timeout=180) == 0, c.log("server")
    s = c.summary()
    print(f"\nsix 300 MB first frames: {outcomes}; server RSS grew {grew:.0f} MB; "
          f"connections rejected {s['connections_rejected']}; accuracy {s['final_test_accuracy']:.4f}")
    assert grew < 50, grew
    assert s["final_test_accuracy"] >= FLOOR
    assert "no valid HELLO" in (c.server_dir / "server.log").read_text()


def _flood(port: int, algo: str, seconds: float) -> tuple[int, int]:
    """Rank 2 asks as fast as it can for what would be the whole model: SyncPS, ~100-byte PUSHes without
    tensors for step 0 (long closed); EDP, tiny PULLs with its worker_step racing ahead at the pull
    cadence. Returns the bytes it sent and received."""
    conn, _ = join(port, 2, algo)
    sent0, recv0 = conn.bytes_sent, conn.bytes_received
    deadline, step = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < deadline:
            step += 5
            if algo == "syncps":
                reply = ask(conn, {"step": 0, "base_version": 0, "samples": 32, "loss": 0.5, "worker_step": 1})
            else:
                reply = ask(conn, {"worker_step": min(step, 600)}, kind=MessageKind.PULL)
            if reply.kind == MessageKind.BYE:
                break
    except SmolclusterError:
        pass
    sent, received = conn.bytes_sent - sent0, conn.bytes_received - recv0
    conn.close()
    return sent, received


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_replies_stay_within_a_small_multiple_of_what_a_peer_sent(local_cluster, algo):
    """Defect 9: a 95-byte PUSH for a stale step was answered with the whole model: 1.07 MB sent produced
    4.6 GB of replies (4,286x) and honest training fell from 230 to 73 updates/s. Same for tiny PULLs."""
    c = local_cluster(algo, cluster={"max_steps": 300 if algo == "syncps" else 100}, workers=["w1", "w2"])
    c.start_server()
    c.start_worker(1, "--slowdown", "2")
    c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "update") >= 5, 60, "training to start")
    t0 = time.time()
    sent, received = _flood(c.port, algo, 4.0)
    t1 = time.time()
    assert c.wait_server(timeout=180) == 0, c.log("server")
    s = c.summary()
    during = [m for m in c.metrics() if m["event"] == "update" and t0 <= m["time"] <= t1]
    if algo == "syncps":  # the flooder's rejected pushes end its turn: steps do not wait the deadline for it
        times = sorted(u["step_time_s"] for u in during)
        assert len(during) >= 20 and times[len(times) // 2] < 0.25, (len(during), times[len(times) // 2 :][:5])
    ratio = received / max(1, sent)
    print(f"\n{algo}: the attacker sent {sent / 1e6:.2f} MB and got {received / 1e6:.2f} MB back ({ratio:.1f}x); "
          f"{len(during) / (t1 - t0):.0f} honest updates/s meanwhile; accuracy {s['final_test_accuracy']:.4f}")
    assert sent > 50_000  # thousands of requests
    assert received <= 4 * sent + 3 * MODEL_BYTES, (sent, received)  # the budget: 4x what it sent, plus a WELCOME
    assert s["final_test_accuracy"] >= FLOOR


def _push_without_reading(port: int, stop) -> int:
    """EDP rank 2 pushes full weights asking for weights back, at its pull cadence, and never reads a reply."""
    conn, welcome = join(port, 2, "edp")
    weights, n = weights_of(welcome), 0
    try:
        while not stop.is_set():
            n += 1
            conn.send(Message(MessageKind.PUSH, {"base_version": 0, "worker_step": min(5 * n, 600), "samples": 32,
                                                 "loss": 0.5, "want_weights": True}, tensors=weights), timeout=2)
    except SmolclusterError:
        pass  # dropped by the server
    conn.close()
    return n


def test_a_peer_that_never_reads_is_dropped_with_bounded_memory(local_cluster):
    """Defect 9: a peer that never reads grew the server's memory (337 -> 512 MB) until the 60 s send timeout."""
    c = local_cluster("edp", cluster={"max_steps": 100}, workers=["w1", "w2"])
    c.start_server()
    c.start_worker(1, "--slowdown", "2")
    c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "update") >= 5, 60, "training to start")
    rss = RssPeak(c.procs.procs["server"].pid)
    attack = Background(lambda stop: _push_without_reading(c.port, stop))
    c.wait_for(lambda: any(m["event"] == "leave" and m["host"] == "w2" for m in c.metrics()), 60, "w2 to be dropped")
    pushes = attack.finish()
    grew = rss.stop()
    assert c.wait_server(timeout=180) == 0, c.log("server")
    [leave] = [m for m in c.metrics() if m["event"] == "leave" and m["host"] == "w2"][:1]
    print(f"\na non-reading peer pushed {pushes} times; dropped with '{leave['reason']}'; server RSS grew {grew:.0f} MB")
    assert "not reading" in leave["reason"] or "send failed" in leave["reason"], leave
    assert grew < 60, grew
    assert c.summary()["final_test_accuracy"] >= FLOOR


def test_a_peer_on_the_flat_path_is_checked_like_any_other(local_cluster):
    """Pushes as one flat buffer (the layout agreed in the HELLO) get the same checks: a HELLO naming another
    layout is refused saying so, a NaN buffer is rejected and counted, a frame in another layout or of
    another size closes that connection before its payload is read; the honest worker trains throughout."""
    from attack import PATIENT, lines
    from smolcluster.common.errors import RemoteError
    from smolcluster.core.net.transport import connect
    from smolcluster.core.net.wire import FLAG_BINARY, FLAG_FLAT, binary_header, encode_frame, send_frame
    from smolcluster.core.training.flat import FlatLayout

    c = local_cluster("syncps", cluster={"max_steps": 200}, workers=["w1", "w2"])
    c.start_server()
    c.start_worker(1)
    conn, welcome = join(c.port, 2, "syncps")  # no layout named: the WELCOME comes by name
    assert welcome.tensors and welcome.flat is None
    layout = FlatLayout.of(welcome.tensors)
    conn.close()

    other = FlatLayout.of({k: v[:1] for k, v in welcome.tensors.items()})
    bad = connect("127.0.0.1", c.port, key=None, config=PATIENT, retry=None)
    bad.send(Message(MessageKind.HELLO, {"rank": 2, "hostname": "w2", "algorithm": "syncps", "layout": other.digest.hex()}))
    with pytest.raises(RemoteError, match="layout"):
        bad.recv(timeout=30)
    bad.close()

    flat = connect("127.0.0.1", c.port, key=None, config=PATIENT, retry=None)
    flat.agree(layout)
    flat.send(Message(MessageKind.HELLO, {"rank": 2, "hostname": "w2", "algorithm": "syncps", "layout": layout.digest.hex()}))
    welcome = flat.recv(timeout=30)
    assert welcome.kind == MessageKind.WELCOME and welcome.flat is not None and not welcome.tensors
    grads = layout.pack({k: v.new_full(v.shape, float("nan")) for k, v in layout.views(welcome.flat).items()})
    step = welcome.fields["step"]
    flat.send(Message(MessageKind.PUSH, {"step": step, "base_version": welcome.fields["version"], "samples": 32,
                                         "loss": 0.5, "worker_step": 1}, flat=grads, layout=layout))
    reply = flat.recv(timeout=30)
    while reply.kind != MessageKind.ACK:
        reply = flat.recv(timeout=30)
    assert reply.fields["status"] == "rejected" and reply.flat is not None  # with the weights, as one buffer
    # another layout's digest, then a payload of the wrong size (refused from the preamble, before any
    # payload byte is read): each closes its connection with that error
    for digest, size, payload, error in ((other.digest, layout.nbytes, bytes(layout.nbytes), "SchemaMismatch"),
                                         (layout.digest, layout.nbytes + 4, b"", "ShapeMismatch")):
        s = raw_socket(c.port)
        send_frame(s, encode_frame(Message(MessageKind.HELLO, {"rank": 2, "hostname": "w2", "algorithm": "syncps",
                                                               "layout": layout.digest.hex()})))
        head = binary_header({"step": 0, "samples": 32, "base_version": 0, "worker_step": 1}, digest)
        pre = PREAMBLE.pack(MAGIC, VERSION, int(MessageKind.PUSH), FLAG_BINARY | FLAG_FLAT, len(head), size, 1)
        s.sendall(pre + head + payload)
        s.settimeout(30)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        s.close()
        assert error.encode() in got, (error, got[-300:])
    flat.close()
    assert c.wait_server(timeout=180) == 0, c.log("server")
    s = c.summary()
    assert s["rejected_reasons"].get("non-finite") == 1, s["rejected_reasons"]
    assert s["final_test_accuracy"] >= FLOOR and s["stop_status"] == "finished", s
    assert "layout" in lines(c.server_dir / "server.log", "SchemaMismatch")[0]
