"""Fixtures for the link emulator: a started ToxiproxyServer, real upstream TCP servers, clients."""

from __future__ import annotations

import socket
import threading
from typing import Callable, Iterator

import pytest
from smolcluster.testbed.linkemu import ToxiproxyClient, ToxiproxyServer
from smolcluster.testbed.linkemu.measure import LoopbackServer as Upstream


@pytest.fixture
def upstreams() -> Iterator[Callable[[Callable[[socket.socket], None]], Upstream]]:
    made: list[Upstream] = []

    def make(handler: Callable[[socket.socket], None]) -> Upstream:
        made.append(Upstream(handler))
        return made[-1]

    yield make
    for u in made:
        u.close()


@pytest.fixture
def server() -> Iterator[ToxiproxyServer]:
    srv = ToxiproxyServer(api_port=0, seed=1)
    srv.start()
    yield srv
    srv.stop()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("linkemu")]
    assert not leftover, f"threads left after stop: {leftover}"


@pytest.fixture
def client(server: ToxiproxyServer) -> ToxiproxyClient:
    return ToxiproxyClient(server.api_url)


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Client sockets closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()
