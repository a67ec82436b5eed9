"""The transport's two ways of waiting keep the same deadlines: kernel timeouts per direction (a blocking
socket, SO_RCVTIMEO / SO_SNDTIMEO: Linux and macOS) and the poll() fallback (non-blocking, elsewhere).
Each case runs both ways over real loopback TCP."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import torch

from smolcluster.common import errors
from smolcluster.common.wait import wait_until
from smolcluster.core.net import transport
from smolcluster.core.net.transport import TransportConfig, connect
from smolcluster.core.net.wire import Message, MessageKind, encode_frame, send_frame


@pytest.fixture(params=["kernel timeouts", "poll"])
def wait_mode(request, monkeypatch) -> str:
    if request.param == "poll":
        monkeypatch.setattr(transport, "_kernel_timeouts", lambda sock: False)
    return request.param


@pytest.fixture
def raw_server():
    """A plain TCP server: the test drives the accepted socket byte by byte (a keyless Connection
    speaks frames straight away, no handshake)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    accepted: list[socket.socket] = []

    def accept() -> socket.socket:
        conn, _ = lst.accept()
        accepted.append(conn)
        return conn

    yield lst.getsockname()[1], accept
    for s in accepted:
        s.close()
    lst.close()


def _held_elsewhere(lock) -> bool:
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def _connect(port: int, **config) -> transport.Connection:
    return connect("127.0.0.1", port, key=None, config=TransportConfig(**config), retry=None)


def test_the_fast_path_is_used_where_the_kernel_has_timeouts(raw_server, wait_mode) -> None:
    port, accept = raw_server
    with _connect(port) as conn:
        accept()
        expected = wait_mode == "kernel timeouts" and sys.platform.startswith("linux")
        if expected or wait_mode == "poll":
            assert conn._stream.kernel_timeouts == expected
            assert conn._sock.getblocking() == expected


def test_silence_is_a_peer_timeout_and_a_recv_timeout_keeps_the_connection(raw_server, wait_mode) -> None:
    port, accept = raw_server
    with _connect(port, heartbeat_timeout=0.6) as conn:
        peer = accept()
        t0 = time.monotonic()
        with pytest.raises(errors.RecvTimeout):
            conn.recv(timeout=0.2)
        assert 0.15 <= time.monotonic() - t0 < 0.5 and not conn.closed
        send_frame(peer, encode_frame(Message(MessageKind.ACK, {"status": "applied", "version": 3})))
        assert conn.recv(timeout=5).fields["version"] == 3
        t0 = time.monotonic()
        with pytest.raises(errors.PeerTimeout, match="not even a heartbeat"):
            conn.recv()
        assert 0.5 <= time.monotonic() - t0 < 2.0 and conn.closed


def test_a_peer_stalling_mid_frame_is_a_peer_timeout(raw_server, wait_mode) -> None:
    port, accept = raw_server
    with _connect(port, heartbeat_timeout=0.5) as conn:
        peer = accept()
        frame = b"".join(bytes(b) for b in encode_frame(Message(MessageKind.ACK, {"status": "applied", "version": 1})))
        peer.sendall(frame[:10])  # part of the preamble, then nothing
        t0 = time.monotonic()
        with pytest.raises(errors.PeerTimeout, match="middle of a frame"):
            conn.recv(timeout=30)
        assert 0.4 <= time.monotonic() - t0 < 2.0 and conn.closed


def test_a_peer_that_stops_reading_fails_the_send_at_its_timeout(raw_server, wait_mode) -> None:
    port, accept = raw_server
    with _connect(port) as conn:
        accept()  # never reads
        big = Message(MessageKind.WEIGHTS, {"version": 1}, tensors={"w": torch.zeros(16 << 20, dtype=torch.uint8)})
        t0 = time.monotonic()
        with pytest.raises(errors.PeerTimeout, match="stopped reading"):
            for _ in range(8):  # more than any kernel's buffers hold
                conn.send(big, timeout=0.5)
        assert time.monotonic() - t0 < 3.0 and conn.closed


def test_close_from_another_thread_wakes_a_blocked_recv(raw_server, wait_mode) -> None:
    port, accept = raw_server
    conn = _connect(port, heartbeat_timeout=30.0)
    accept()
    outcome: list[BaseException] = []

    def reader() -> None:
        try:
            conn.recv()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    t = threading.Thread(target=reader)
    t.start()
    wait_until(lambda: _held_elsewhere(conn._recv_lock), 5, interval=0.01, what="the reader in recv")
    time.sleep(0.1)  # from inside recv to its wait (nothing to poll for: it is a syscall)
    t0 = time.monotonic()
    conn.close("test")
    t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - t0 < 2.5
    assert len(outcome) == 1 and isinstance(outcome[0], errors.ConnectionClosed)
