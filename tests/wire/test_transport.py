"""Transport behaviour over real loopback TCP: retry, deadlines, heartbeats, keys, slow peers."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time

import pytest

from smolcluster.common import errors
from smolcluster.core.net.auth import load_cluster_key, write_key_file
from smolcluster.core.net.transport import Listener, RetryPolicy, TransportConfig, connect
from smolcluster.core.net.wire import Message, MessageKind
from wire_helpers import FAST, KEY, EchoServer, roundtrip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retry_with_backoff_reaches_a_server_started_late() -> None:
    port = _free_port()
    delays: list[float] = []
    result: dict = {}

    def dial() -> None:
        result["conn"] = connect("127.0.0.1", port, key=None, config=FAST,
                                 retry=RetryPolicy(initial_delay=0.05, multiplier=2.0, jitter=0.0, deadline=10.0),
                                 on_retry=lambda attempt, delay, exc: delays.append(delay))

    t = threading.Thread(target=dial)
    t.start()
    time.sleep(0.6)
    lst_server = _EchoOnPort(port)
    try:
        t.join(timeout=10)
        conn = result["conn"]
        roundtrip(conn)
        conn.close()
    finally:
        lst_server.close()
    assert len(delays) >= 3
    assert delays[:3] == pytest.approx([0.05, 0.1, 0.2])  # exponential


class _EchoOnPort(EchoServer):
    def __init__(self, port: int):
        import queue

        self.key = None
        self.rejects = queue.Queue()
        self.listener = Listener("127.0.0.1", port, key=None, on_connection=self._handle, config=FAST)
        self.listener.start()
        self.port = port


def test_deadline_exceeded_gives_connect_failed_naming_the_address() -> None:
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(errors.ConnectFailed, match=f"127.0.0.1:{port}"):
        connect("127.0.0.1", port, key=None, config=FAST, retry=RetryPolicy(initial_delay=0.05, deadline=0.5))
    assert time.monotonic() - t0 < 2.0


def test_backoff_is_capped_and_jittered() -> None:
    import random

    p = RetryPolicy(initial_delay=0.2, max_delay=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    d = [p.delay(a, rng) for a in range(1, 10)]
    assert all(0.1 <= x <= 1.5 for x in d)
    assert max(d[5:]) <= 1.5 and len(set(d)) > 1


def test_silent_peer_raises_peer_timeout_within_heartbeat_timeout() -> None:
    release = threading.Event()
    lst = Listener("127.0.0.1", 0, key=None, on_connection=lambda c: release.wait(10), config=FAST)
    lst.start()
    try:
        cfg = TransportConfig(heartbeat_timeout=0.5, handshake_timeout=1.0)
        with connect("127.0.0.1", lst.address[1], key=None, config=cfg, retry=None) as conn:
            t0 = time.monotonic()
            with pytest.raises(errors.PeerTimeout, match="heartbeat"):
                conn.recv()
            assert 0.4 <= time.monotonic() - t0 < 2.0
            assert conn.closed
    finally:
        release.set()
        lst.close()


def test_heartbeats_keep_a_quiet_peer_alive_and_recv_timeout_keeps_the_connection() -> None:
    def slow(conn):
        conn.start_heartbeats()
        time.sleep(1.2)
        conn.send(Message(MessageKind.ACK, {"late": True}))
        conn.recv()

    cfg = TransportConfig(heartbeat_interval=0.1, heartbeat_timeout=0.5)
    lst = Listener("127.0.0.1", 0, key=KEY, on_connection=slow, config=cfg)
    lst.start()
    try:
        with connect("127.0.0.1", lst.address[1], key=KEY, config=cfg, retry=None) as conn:
            with pytest.raises(errors.RecvTimeout):
                conn.recv(timeout=0.3)  # only heartbeats so far
            assert not conn.closed
            msg = conn.recv(timeout=5)  # 1.2 s of silence apart from heartbeats: no PeerTimeout
            assert msg.fields == {"late": True}
    finally:
        lst.close()


def test_silent_client_does_not_block_accept_for_others(echo_server) -> None:
    server = echo_server(key=KEY)
    silent = socket.create_connection(("127.0.0.1", server.port))  # never speaks
    try:
        t0 = time.monotonic()
        with server.client() as conn:
            roundtrip(conn)
        assert time.monotonic() - t0 < FAST.handshake_timeout
        peer, exc = server.next_reject()  # the silent one is dropped after handshake_timeout
        assert isinstance(exc, errors.AuthFailed) and "handshake_timeout" in str(exc)
    finally:
        silent.close()


@pytest.mark.parametrize("server_key,client_key,error", [
    (None, KEY, errors.MissingKey),
    (KEY, None, errors.MissingKey),
    (KEY, b"another key of 32 bytes........", errors.AuthFailed),
])
def test_key_mismatch_fails_fast_with_a_typed_error(echo_server, server_key, client_key, error) -> None:
    server = echo_server(key=server_key)
    t0 = time.monotonic()
    with pytest.raises(error, match="key"):
        conn = server.client(key=client_key)
        conn.send(Message(MessageKind.HELLO, {"rank": 1}))
        conn.recv(timeout=5)
    assert time.monotonic() - t0 < 2.0
    peer, exc = server.next_reject()
    assert isinstance(exc, errors.AuthError)


def test_keyless_listener_on_all_interfaces_warns_once(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="smolcluster.core.net.transport")
    lst = Listener("0.0.0.0", 0, key=None, on_connection=lambda c: None, config=FAST)
    lst.start()
    lst.close()
    warnings = [r for r in caplog.records if "WITHOUT a cluster key" in r.getMessage()]
    assert len(warnings) == 1


def test_close_is_idempotent_and_later_use_is_a_typed_error(echo_server) -> None:
    server = echo_server()
    conn = server.client()
    conn.close("done")
    conn.close()
    with pytest.raises(errors.ConnectionClosed, match="done"):
        conn.send(Message(MessageKind.BYE))
    assert conn.bytes_sent == 0


def test_byte_counters_and_concurrent_send_recv(echo_server) -> None:
    server = echo_server(key=KEY)
    with server.client() as conn:
        conn.start_heartbeats()
        n = 50
        t = threading.Thread(target=lambda: [conn.send(Message(MessageKind.ECHO, {"i": i})) for i in range(n)])
        t.start()
        got = [conn.recv(timeout=5).fields["i"] for _ in range(n)]
        t.join()
        assert got == list(range(n))
        assert conn.bytes_sent > 0 and conn.bytes_received > 0


def test_key_file_and_env(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SMOLCLUSTER_CLUSTER_KEY", raising=False)
    path = tmp_path / "cluster.key"
    write_key_file(path)
    if os.name != "nt":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_cluster_key(path)
    assert key is not None and len(key) == 32
    with pytest.raises(errors.ConfigError, match="--force"):
        write_key_file(path)
    write_key_file(path, force=True)
    assert load_cluster_key(path) != key
    assert load_cluster_key(None) is None
    with pytest.raises(errors.ConfigError, match="keygen"):
        load_cluster_key(tmp_path / "missing.key")
    monkeypatch.setenv("SMOLCLUSTER_CLUSTER_KEY", "00ff" * 8)
    assert load_cluster_key(path) == bytes.fromhex("00ff" * 8)
    monkeypatch.setenv("SMOLCLUSTER_CLUSTER_KEY", "correct horse battery staple")
    assert load_cluster_key() == b"correct horse battery staple"
