"""Fuzzing: mutated frames must only ever produce typed errors (no crash, no hang), and a live server
hit by them must keep serving a well-behaved client."""

from __future__ import annotations

import collections
import json
import math
import random
import socket
import threading
import time

import pytest
import torch

from smolcluster.common import errors
from smolcluster.common.wait import wait_until
from smolcluster.core.net import auth, messages
from smolcluster.core.net.wire import BINARY, FLAG_BINARY, PREAMBLE, Message, MessageKind, encode_frame, read_frame
from wire_helpers import SCHEMA, good_message, roundtrip

JUNK = [-1, 0, 2**31, 2**64, 1e308, -0.0, "x", "", None, True, [], {}, [[1]], [-1], [2**40, 2**40], "float32",
        "complex64", "a" * 2000, {"scale": [1] * 300}]


def _seeds() -> list[bytes]:
    msgs = [
        good_message(3),
        Message(MessageKind.PUSH, {"step": 1, "base_version": 4}, {"w": torch.randn(4, 3)}, {"w": {"scale": 0.1, "zp": 0}}),
        Message(MessageKind.HEARTBEAT),
        Message(MessageKind.WEIGHTS, {}, {"w": torch.randn(4, 3), "b": torch.randn(3)}),
        Message(MessageKind.ECHO, {}, {"b": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(1.0), "e": torch.zeros(0)}),
        # binary headers (the push/pull path): fixed slots only, and slots plus a JSON tail
        Message(MessageKind.ACK, {"status": "late", "version": 3, "tau": 1, "finished": False, "next_step": 4}),
        Message(MessageKind.PUSH, {"step": 1, "base_version": 4, "samples": 32, "loss": 0.5, "mode": "gradients",
                                   "want_weights": True, "grad_norms": {"w": 0.1}, "reason": "r"}),
    ]
    return [b"".join(bytes(b) for b in encode_frame(m)) for m in msgs]


def _mutate_binary_header(frame: bytes, rng: random.Random) -> bytes:
    """A binary header: a byte of a slot, the presence bits or codes, or a JSON tail of junk fields."""
    magic, ver, kind, flags, hlen, plen, seq = PREAMBLE.unpack_from(frame)
    head = bytearray(frame[PREAMBLE.size : PREAMBLE.size + hlen])
    payload = frame[PREAMBLE.size + hlen :]
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            head[rng.randrange(BINARY.size)] = rng.randrange(256)
    else:
        tail = {rng.choice(["step", "reason", "grad_norms", "samples", "extra"]): rng.choice(JUNK)}
        head = head[:BINARY.size] + (json.dumps(tail) if rng.random() < 0.8 else rng.choice(['[1]', '{"a":', '"x"'])).encode()
    return PREAMBLE.pack(magic, ver, kind, flags, len(head), plen, seq) + bytes(head) + payload


def _mutate_header(frame: bytes, rng: random.Random) -> bytes:
    magic, ver, kind, flags, hlen, plen, seq = PREAMBLE.unpack_from(frame)
    if flags & FLAG_BINARY:
        return _mutate_binary_header(frame, rng)
    header = json.loads(frame[PREAMBLE.size : PREAMBLE.size + hlen])
    payload = frame[PREAMBLE.size + hlen :]
    if header["tensors"] and rng.random() < 0.8:
        e = rng.choice(header["tensors"])
        e[rng.choice(["name", "dtype", "shape", "offset", "length", "quant", "extra"])] = rng.choice(JUNK)
        if rng.random() < 0.3:
            header["tensors"].append(dict(e))
    else:
        header[rng.choice(["fields", "tensors", "junk"])] = rng.choice(JUNK)
    h = json.dumps(header).encode()
    return PREAMBLE.pack(magic, ver, kind, flags, len(h), plen, seq) + h + payload


def mutate(frame: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    b = bytearray(frame)
    if op == 0:  # bit flips anywhere, biased to the preamble
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(b), PREAMBLE.size)) if rng.random() < 0.5 else rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # overwrite a preamble field with a boundary value
        i = rng.choice([4, 5, 6, 8, 9, 12, 20])
        b[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x01"])
    elif op == 2:  # truncate
        del b[rng.randrange(len(b)) :]
    elif op == 3:  # insert junk
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif op == 4:  # duplicate a slice
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 100)]
    elif op == 5:
        return _mutate_header(frame, rng)
    else:  # random bytes in the header / payload region
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _mutants(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    seeds = _seeds()
    return [mutate(rng.choice(seeds), rng) for _ in range(n)]


def test_fuzz_read_frame_only_raises_typed_errors() -> None:
    """10,000 mutated frames through read_frame on a socketpair: typed error or valid message, never a hang."""
    counts: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    for i, frame in enumerate(_mutants(10_000, seed=1)):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(frame)
            a.shutdown(socket.SHUT_WR)
            b.settimeout(2.0)  # a hang would surface as socket.timeout, which counts as a crash
            try:
                read_frame(b, schema=SCHEMA if i % 2 else None, reject_nonfinite=True)
                counts["ok"] += 1
            except errors.SmolclusterError as e:
                counts[type(e).__name__] += 1
            except Exception as e:  # noqa: BLE001 - exactly what we are looking for
                crashes.append(f"{type(e).__name__}: {e} on {frame[:80]!r}")
    print("\nfuzz read_frame:", dict(counts.most_common()))
    assert not crashes, crashes[:5]
    assert sum(counts.values()) == 10_000
    assert len(counts) >= 8  # the mutations reach many different checks


def _fuzz_live_server(echo_server, n: int, seed: int) -> collections.Counter[str]:
    server = echo_server()
    good = server.client()
    roundtrip(good, 1)
    counts: collections.Counter[str] = collections.Counter()
    hangs = 0
    for i, frame in enumerate(_mutants(n, seed)):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # until the server drops us: a hang shows up as socket.timeout
                pass
        except socket.timeout:
            hangs += 1
        except OSError:
            pass  # reset: the server rejected and closed
        finally:
            s.close()
        if i % 500 == 0:
            roundtrip(good, i)  # the well-behaved client is served throughout
    roundtrip(good, 2)
    deadline = time.monotonic() + 10
    rejected = 0
    while time.monotonic() < deadline and (rejected < n // 2 or not server.rejects.empty()):
        try:
            _, exc = server.next_reject(timeout=1.0)
        except Exception:
            break
        counts[type(exc).__name__] += 1
        rejected += 1
    crashes = [k for k in counts if not hasattr(errors, k)]
    print(f"\nfuzz live server ({n} connections):", dict(counts.most_common()), "hangs:", hangs)
    assert hangs == 0
    assert not crashes
    assert rejected >= n // 2
    good.close()
    return counts


def test_fuzz_live_server_quick(echo_server) -> None:
    _fuzz_live_server(echo_server, 1000, seed=2)


@pytest.mark.slow
def test_fuzz_live_server_10k(echo_server) -> None:
    _fuzz_live_server(echo_server, 10_000, seed=3)


def test_no_threads_left_behind(echo_server) -> None:
    before = threading.active_count()
    server = echo_server()
    with server.client() as c:
        roundtrip(c)
    server.close()
    assert wait_until(lambda: threading.active_count() <= before, 5, interval=0.02), threading.enumerate()


# --------------------------------------------------------------------------- message fields and a live training server

FIELD_JUNK = ["x", "", None, True, False, [], {}, -1, 0, 1, 2**63, 10**30, 1e308, -1e308, math.nan, math.inf,
              -math.inf, 0.5, -0.0, [[1]], {"a": 1}, "a" * 2000, [1] * 300, {"fc1.weight": math.nan}, {"nope": 1.0}]
BASE_FIELDS = {
    MessageKind.PUSH: {"base_version": 0, "worker_step": 5, "samples": 32, "loss": 0.5, "mode": "weights", "want_weights": False},
    MessageKind.PULL: {"worker_step": 5},
    MessageKind.BYE: {"finished": False, "steps": 5, "samples_per_s": 1.0, "reason": "fuzz"},
    MessageKind.HELLO: {"rank": 2, "hostname": "w2", "algorithm": "edp"},
}


def fuzz_fields(base: dict, rng: random.Random) -> dict:
    """string / NaN / Inf / 0 / huge / wrong-type / missing values in one to three fields."""
    fields = dict(base)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(base) + ["grad_norms", "step", "extra"])
        if rng.random() < 0.15:
            fields.pop(key, None)
        else:
            fields[key] = rng.choice(FIELD_JUNK)
    return fields


def test_fuzz_message_fields_only_raise_bad_field() -> None:
    """20,000 mutated field sets through messages.parse: a typed message or BadField, nothing else."""
    rng = random.Random(5)
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(20_000):
        kind = rng.choice(list(messages.TYPES))
        try:
            typed = messages.parse(kind, fuzz_fields(BASE_FIELDS.get(kind, {"version": 1, "status": "late", "step": 1}), rng))
        except errors.BadField as e:
            outcomes[e.reason] += 1
            continue
        outcomes["ok"] += 1
        for name, value in vars(typed).items():  # what parses is what the algorithms expect
            assert not isinstance(value, float) or math.isfinite(value), (kind, name, value)
            assert not isinstance(value, int) or isinstance(value, bool) or 0 <= value <= messages.MAX_COUNT, (name, value)
    assert outcomes["ok"] > 100 and len(outcomes) >= 15, outcomes


def _until_closed(sock: socket.socket) -> None:
    """Half-close and read until the server closes (a hang raises socket.timeout, which is not caught)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except socket.timeout:
        raise
    except OSError:
        pass  # reset, or already closed by the server: closed either way


class FuzzSession:
    """A worker connection spoken by hand (frames built, and broken, here; replies read with read_frame)."""

    def __init__(self, port: int, rank: int, key: bytes | None, source: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(10)  # a hang surfaces as socket.timeout
        self.sock.connect(("127.0.0.1", port))
        self.keys = auth.client_handshake(self.sock, key) if key else None
        self.send_seq = self.recv_seq = 0
        self.rank = rank

    def frame(self, msg: Message) -> bytes:
        data = b"".join(bytes(b) for b in encode_frame(msg, seq=self.send_seq, mac_key=self.keys.send if self.keys else None))
        self.send_seq += 1
        return data

    def join(self) -> Message:
        self.sock.sendall(self.frame(Message(MessageKind.HELLO, {"rank": self.rank, "hostname": f"w{self.rank}", "algorithm": "edp"})))
        return self.recv()

    def recv(self) -> Message:
        while True:
            msg = read_frame(self.sock, mac_key=self.keys.recv if self.keys else None,
                             expected_seq=self.recv_seq if self.keys else None)
            self.recv_seq += 1
            if msg.kind != MessageKind.HEARTBEAT:
                return msg

    def drain_to_eof(self) -> None:
        _until_closed(self.sock)

    def close(self) -> None:
        self.sock.close()


def _tensors(weights: dict[str, torch.Tensor], rng: random.Random) -> tuple[dict, dict]:
    """Full weights, none, some, full with int8 quant params on float tensors, or wrong dtypes."""
    r = rng.random()
    if r < 0.35:
        return {k: v.clone() for k, v in weights.items()}, {}
    if r < 0.6:
        return {}, {}
    if r < 0.75:
        names = list(weights)
        return {k: weights[k] for k in rng.sample(names, rng.randint(1, len(names) - 1))}, {}
    if r < 0.95:
        return dict(weights), {rng.choice(list(weights)): {"scheme": "int8_row", "dtype": "float32"}}
    return {k: v.double() for k, v in weights.items()}, {}


def _fuzz_training_server(port: int, n: int, key: bytes | None, seed: int) -> collections.Counter[str]:
    """`n` fuzzed frames at a live EDP server as ranks 2 and 3: field mutations in a session (each answered,
    then a PULL probe must be answered), broken frames (the server must close), fuzzed first frames from
    strangers, duplicate HELLOs and BYE-and-hold. Counts frames by class; hangs and unexpected errors raise."""
    rng = random.Random(seed)
    stranger = "127.0.0.2" if key else "127.0.0.1"  # keyed: failed handshakes are throttled per address
    count: collections.Counter[str] = collections.Counter()
    held: list[FuzzSession] = []
    session, weights = None, {}
    while sum(count.values()) < n:
        r = rng.random()
        if r < 0.15:  # a stranger's first frame: a broken HELLO, or one with fuzzed fields
            hello = b"".join(bytes(b) for b in encode_frame(Message(MessageKind.HELLO, fuzz_fields(BASE_FIELDS[MessageKind.HELLO], rng))))
            count["first-frame"] += 1
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(stranger, 0))
            except socket.timeout:
                raise
            except OSError:
                continue  # refused at accept (throttled): that is the answer
            try:
                s.sendall(mutate(hello, rng) if rng.random() < 0.5 else hello)
                _until_closed(s)
            except socket.timeout:
                raise
            except OSError:
                pass  # the server reset the connection before we finished
            finally:
                s.close()
            continue
        if r < 0.17:  # two HELLOs for rank 3 in quick succession, the first half-closed
            first, second = FuzzSession(port, 3, key), FuzzSession(port, 3, key)
            for s in (first, second):
                s.sock.sendall(s.frame(Message(MessageKind.HELLO, {"rank": 3, "hostname": "w3", "algorithm": "edp"})))
            first.sock.shutdown(socket.SHUT_WR)
            first.close()
            second.close()
            count["duplicate-hello"] += 2
            continue
        if r < 0.18 and len(held) < 40:  # join, BYE, and hold the socket open
            s = FuzzSession(port, 3, key)
            s.join()
            s.sock.sendall(s.frame(Message(MessageKind.BYE, {"finished": False, "reason": "holding"})))
            held.append(s)
            count["bye-and-hold"] += 1
            continue
        if session is None:
            session = FuzzSession(port, 2, key)
            welcome = session.join()
            assert welcome.kind == MessageKind.WELCOME, welcome
            weights = {k: v.clone() for k, v in welcome.tensors.items()}
        kind = rng.choices([MessageKind.PUSH, MessageKind.PULL, MessageKind.BYE, MessageKind.HELLO, MessageKind.ECHO],
                           [75, 12, 4, 5, 4])[0]
        fields = fuzz_fields(BASE_FIELDS.get(kind, {}), rng)
        if kind == MessageKind.BYE:
            fields["finished"] = False  # a finished BYE from every rank would end the run early
        tensors, quant = _tensors(weights, rng) if kind == MessageKind.PUSH else ({}, {})
        data = session.frame(Message(kind, fields, tensors=tensors, quant=quant))
        if rng.random() < 0.08:  # broken on the wire: the server must drop this connection, not hang
            try:
                session.sock.sendall(mutate(data, rng))
            except socket.timeout:
                raise
            except OSError:
                pass
            session.drain_to_eof()
            session.close()
            session = None
            count["broken-frame"] += 1
            continue
        count[f"fields-{kind.name}"] += 1
        try:
            session.sock.sendall(data + session.frame(Message(MessageKind.PULL, {"worker_step": 0})))
            while session.recv().kind != MessageKind.WEIGHTS:  # the probe's answer comes after the frame's
                pass
        except socket.timeout:
            raise  # neither an answer nor a close: a hang
        except (errors.SmolclusterError, OSError):
            session.close()  # a BYE, or a frame the wire rejects (wrong dtype): the server closed this session
            session = None
    for s in held + ([session] if session else []):
        s.close()
    return count


def _finish_fuzz_ranks(port: int, key: bytes | None) -> None:
    """Ranks 2 and 3 leave cleanly, finished: the run ends when the honest worker is done."""
    for rank in (2, 3):
        s = FuzzSession(port, rank, key)
        assert s.join().kind == MessageKind.WELCOME
        s.sock.sendall(s.frame(Message(MessageKind.BYE, {"finished": True, "reason": "done"})))
        s.drain_to_eof()
        s.close()


def _live_run(local_cluster, name: str, frames: int, key_file: str | None, seed: int):
    import psutil
    from smolcluster.core.net.auth import load_cluster_key

    c = local_cluster("edp", cluster={"cluster_key_file": key_file} if key_file else {})
    c.root = c.root.parent / name
    c.start_server()
    proc = psutil.Process(c.procs.procs["server"].pid)
    c.start_worker(1)
    key = load_cluster_key(key_file) if key_file else None
    peak = [proc.memory_info().rss]
    counts = _fuzz_training_server(c.port, frames, key, seed) if frames else collections.Counter()
    peak.append(proc.memory_info().rss)
    _finish_fuzz_ranks(c.port, key)
    assert c.wait_server(timeout=300) == 0, c.log("server")
    assert c.procs.wait("w1", timeout=60) == 0, c.log("w1")
    return c, counts, max(peak) / 2**20


def _check_fuzzed_run(c, counts, baseline_acc: float) -> dict:
    s = c.summary()
    log = (c.server_dir / "server.log").read_text()
    assert s["stop_status"] == "finished" and s["handler_errors"] == 0, s  # 0 crashes
    assert "Traceback" not in log
    assert abs(s["final_test_accuracy"] - baseline_acc) <= 0.01, (s["final_test_accuracy"], baseline_acc)
    return s


@pytest.mark.slow
def test_fuzz_live_training_server_quick(local_cluster, tmp_path) -> None:
    """2,000 fuzzed frames at a live EDP server while an honest worker trains: 0 crashes, 0 hangs."""
    base, _, _ = _live_run(local_cluster, "baseline", 0, None, seed=0)
    baseline = base.summary()["final_test_accuracy"]
    c, counts, _ = _live_run(local_cluster, "keyless", 2_000, None, seed=11)
    s = _check_fuzzed_run(c, counts, baseline)
    print(f"\nfuzz live training server: {dict(counts)}; rejected {s['rejected_reasons']}; accuracy "
          f"{s['final_test_accuracy']:.4f} (unattacked {baseline:.4f})")


@pytest.mark.slow
def test_fuzz_live_training_server_20k(local_cluster, tmp_path) -> None:
    """>= 20,000 fuzzed frames (half keyless, half keyed, as a key holder and as strangers) at live EDP servers:
    0 crashes, 0 hangs, bounded RSS, and the honest worker's accuracy within 1 point of an unattacked run."""
    from smolcluster.core.net.auth import write_key_file

    key_file = tmp_path / "cluster.key"
    write_key_file(key_file)
    base, _, base_rss = _live_run(local_cluster, "baseline", 0, None, seed=0)
    baseline = base.summary()["final_test_accuracy"]
    total = 0
    for name, kf, seed in (("keyless", None, 21), ("keyed", str(key_file), 22)):
        c, counts, rss = _live_run(local_cluster, name, 10_000, kf, seed)
        s = _check_fuzzed_run(c, counts, baseline)
        total += sum(counts.values())
        print(f"\n{name}: {sum(counts.values())} frames {dict(counts)}\n  rejected {s['rejected_reasons']}\n  "
              f"messages rejected {s['messages_rejected']}; server RSS {rss:.0f} MB (unattacked {base_rss:.0f} MB); "
              f"accuracy {s['final_test_accuracy']:.4f} (unattacked {baseline:.4f})")
        assert rss <= base_rss + 150, (rss, base_rss)
    assert total >= 20_000
