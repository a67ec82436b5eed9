from __future__ import annotations

from typing import Any, Iterator

import pytest

from wire_helpers import FAST, EchoServer
from smolcluster.core.net.transport import TransportConfig


@pytest.fixture
def echo_server() -> Iterator[Any]:
    servers: list[EchoServer] = []

    def make(key: bytes | None = None, config: TransportConfig = FAST) -> EchoServer:
        servers.append(EchoServer(key, config))
        return servers[-1]

    yield make
    for s in servers:
        s.close()
