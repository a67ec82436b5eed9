"""Measured effects of each toxic on real TCP traffic through the embedded proxy."""

from __future__ import annotations

import os
import socket
import statistics
import struct
import threading
import time

import pytest
from linkemu_net import echo, port_of, recv_exact, source

from smolcluster.common.wait import wait_until
from smolcluster.testbed.linkemu import ToxiproxyClient


def connect(client: ToxiproxyClient, name: str, clients: list[socket.socket]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(client.get_proxy(name)["listen"])), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clients.append(s)
    return s


def rtt(s: socket.socket, n: int = 5) -> float:
    """Median round-trip time of a 1-byte echo."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(b"r")
        recv_exact(s, 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def download(s: socket.socket, nbytes: int) -> float:
    """Ask the source upstream for nbytes and return the seconds until all arrived."""
    t = time.perf_counter()
    s.sendall(struct.pack("!Q", nbytes))
    got = 0
    while got < nbytes:
        chunk = s.recv(1 << 16)
        assert chunk, f"closed after {got} of {nbytes} bytes"
        got += len(chunk)
    return time.perf_counter() - t


def test_latency_adds_its_delay(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    s = connect(client, "link", clients)
    base = rtt(s)
    client.add_toxic("link", "latency", {"latency": 100})
    assert rtt(s) - base == pytest.approx(0.100, rel=0.10)
    # Both directions add up: 40 ms up + 100 ms down.
    client.add_toxic("link", "latency", {"latency": 40}, stream="upstream")
    assert rtt(s) - base == pytest.approx(0.140, rel=0.10)
    client.reset()
    assert rtt(s) < 0.05


def test_latency_pipelines_instead_of_serialising(client, upstreams, clients) -> None:
    """Ten messages sent back to back all arrive about one latency later, not ten latencies later."""
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "latency", {"latency": 100})
    s = connect(client, "link", clients)
    t = time.perf_counter()
    for _ in range(10):
        s.sendall(b"m" * 1000)
        time.sleep(0.005)
    recv_exact(s, 10_000)
    assert time.perf_counter() - t < 0.100 + 10 * 0.005 + 0.1  # serialised sleeps would take >= 1 s


def test_jitter_keeps_order_and_spreads_delay(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "latency", {"latency": 50, "jitter": 40})
    s = connect(client, "link", clients)
    payload = os.urandom(50_000)
    for i in range(0, len(payload), 1000):
        s.sendall(payload[i : i + 1000])
    assert recv_exact(s, len(payload)) == payload


def test_toxicity_zero_leaves_connections_alone(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "latency", {"latency": 300}, toxicity=0.0)
    assert rtt(connect(client, "link", clients)) < 0.1


def test_bandwidth_caps_throughput(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(source).address)
    client.add_toxic("link", "bandwidth", {"rate": 2000})  # 2 MB/s
    seconds = download(connect(client, "link", clients), 1_000_000)
    assert 1_000_000 / seconds == pytest.approx(2_000_000, rel=0.15)


def test_bandwidth_is_shared_by_all_connections_of_a_link(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(source).address)
    client.add_toxic("link", "bandwidth", {"rate": 2000})
    socks = [connect(client, "link", clients) for _ in range(2)]
    times: list[float] = [0.0, 0.0]
    start = time.perf_counter()

    def run(i: int) -> None:
        times[i] = download(socks[i], 500_000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    wall = time.perf_counter() - start
    assert 1_000_000 / wall == pytest.approx(2_000_000, rel=0.15)  # the sum stays at the link rate
    for seconds in times:  # and each got about half: both finished near the end
        assert seconds == pytest.approx(wall, rel=0.2)


def test_bandwidth_upstream_limits_uploads(client, upstreams, clients) -> None:
    received = []

    def sink(conn: socket.socket) -> None:
        total = 0
        while chunk := conn.recv(1 << 16):
            total += len(chunk)
        received.append(total)
        conn.sendall(b"k")

    client.create_proxy("link", "127.0.0.1:0", upstreams(sink).address)
    client.add_toxic("link", "bandwidth", {"rate": 2000}, stream="upstream")
    s = connect(client, "link", clients)
    t = time.perf_counter()
    s.sendall(b"u" * 1_000_000)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b"k"
    assert 1_000_000 / (time.perf_counter() - t) == pytest.approx(2_000_000, rel=0.15)
    assert received == [1_000_000]
    assert client.get_proxy("link")["stats"]["upstream_bytes"] == 1_000_000


def test_timeout_drops_data_then_cuts_the_connection(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    s = connect(client, "link", clients)
    s.sendall(b"a")
    assert recv_exact(s, 1) == b"a"
    t = time.perf_counter()
    client.add_toxic("link", "timeout", {"timeout": 200})
    s.sendall(b"lost")
    assert s.recv(10) == b""  # nothing arrives; then the proxy closes the connection
    assert time.perf_counter() - t == pytest.approx(0.2, abs=0.1)


def test_timeout_zero_blackholes_until_removed(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "timeout", {"timeout": 0}, stream="upstream")
    s = connect(client, "link", clients)
    s.settimeout(0.3)
    s.sendall(b"lost")
    with pytest.raises(socket.timeout):
        s.recv(10)
    client.remove_toxic("link", "timeout_upstream")
    s.settimeout(5)
    s.sendall(b"back")
    assert recv_exact(s, 4) == b"back"


def test_reset_peer_resets_the_connection(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "reset_peer", {"timeout": 100}, stream="upstream")
    s = connect(client, "link", clients)
    t = time.perf_counter()
    s.sendall(b"data")
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    assert time.perf_counter() - t == pytest.approx(0.1, abs=0.08)


def test_slicer_delivers_every_byte_intact(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "slicer", {"average_size": 100, "size_variation": 50, "delay": 10})
    s = connect(client, "link", clients)
    payload = os.urandom(100_000)
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload


def test_limit_data_closes_after_n_bytes(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    client.add_toxic("link", "limit_data", {"bytes": 1000})
    s = connect(client, "link", clients)
    s.sendall(b"z" * 5000)
    got = b""
    while chunk := s.recv(1 << 16):
        got += chunk
    assert got == b"z" * 1000


def test_slow_close_delays_the_close(client, upstreams, clients) -> None:
    def greet_and_close(conn: socket.socket) -> None:
        conn.sendall(b"hello")

    client.create_proxy("link", "127.0.0.1:0", upstreams(greet_and_close).address)
    s = connect(client, "link", clients)
    assert recv_exact(s, 5) == b"hello"
    t = time.perf_counter()
    assert s.recv(1) == b""
    assert time.perf_counter() - t < 0.1

    client.add_toxic("link", "slow_close", {"delay": 300})
    s = connect(client, "link", clients)
    assert recv_exact(s, 5) == b"hello"  # data is not delayed
    t = time.perf_counter()
    assert s.recv(1) == b""
    assert time.perf_counter() - t == pytest.approx(0.3, abs=0.1)


def test_disabled_proxy_refuses_and_cuts(client, upstreams, clients) -> None:
    listen = client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)["listen"]
    s = connect(client, "link", clients)
    client.disable("link")
    assert s.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_of(listen)), timeout=2).close()
    client.enable("link")
    s = connect(client, "link", clients)
    s.sendall(b"ok")
    assert recv_exact(s, 2) == b"ok"


def test_upstream_down_closes_the_client(client, upstreams, clients) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    client.create_proxy("link", "127.0.0.1:0", dead)
    s = connect(client, "link", clients)
    assert s.recv(1) == b""


def test_stats_count_bytes_per_direction_and_connections(client, upstreams, clients) -> None:
    client.create_proxy("link", "127.0.0.1:0", upstreams(echo).address)
    for _ in range(2):
        s = connect(client, "link", clients)
        s.sendall(b"x" * 1000)
        recv_exact(s, 1000)
        s.close()
    wait_until(lambda: not client.get_proxy("link")["stats"]["connections_active"], 5, interval=0.01)
    assert client.get_proxy("link")["stats"] == {"upstream_bytes": 2000, "downstream_bytes": 2000, "connections_total": 2, "connections_active": 0}
