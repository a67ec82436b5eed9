"""Fuzzing: mutated frames must only ever produce typed errors (no crash, no hang), and a live server
hit by them must keep serving a well-behaved client."""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time

import pytest
import torch

from smolcluster.common import errors
from smolcluster.common.wait import wait_until
from smolcluster.core.net.wire import PREAMBLE, Message, MessageKind, encode_frame, read_frame
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
    ]
    return [b"".join(bytes(b) for b in encode_frame(m)) for m in msgs]


def _mutate_header(frame: bytes, rng: random.Random) -> bytes:
    magic, ver, kind, flags, hlen, plen, seq = PREAMBLE.unpack_from(frame)
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
