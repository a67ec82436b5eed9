"""Loki for the nodes of a compose run.

A container has no route to the host's loopback (its default route is dropped on purpose, see
compose.py), so a Loki on 127.0.0.1 — the logging/ stack's default bind — is out of its reach. What
every container does reach is its network's gateway: docker puts that address on the host's end of
the network's bridge. So for each network a node ships from, the host listens on the gateway address
and relays the bytes to the Loki the run ships to; each node gets that gateway as its Loki URL
($SMOLCLUSTER_LOKI_URL in its container). The relay listens only on the project's bridges, never on
the host's other interfaces, and only for the run.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from smolcluster.common.errors import ProxyError, SimError
from smolcluster.core.training.node import LOKI_URL_ENV
from smolcluster.testbed.linkemu.proxy import Proxy
from smolcluster.testbed.topology import Topology


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LokiRelay:
    """Gateway listeners forwarding every node's pushes to `upstream` (an http:// Loki URL on the host)."""

    topology: Topology
    upstream: str
    port: int = field(default_factory=_free_port)

    def __post_init__(self) -> None:
        url = urlsplit(self.upstream)
        if url.scheme != "http" or not url.hostname:
            raise SimError(f"--loki-url {self.upstream}: the compose backend relays a plain http:// Loki to its "
                           "containers; give http://HOST:PORT (an https Loki: run the nodes with --backend local)")
        self._upstream_addr = f"{url.hostname}:{url.port or 80}"
        self._path = url.path.rstrip("/")
        self.gateways = self._gateways()
        self._proxies: list[Proxy] = []

    def _gateways(self) -> dict[str, str]:
        """node -> the gateway it ships through: that of its first network that has one."""
        out = {}
        for node in self.topology.nodes.values():
            gw = next((self.topology.networks[n].gateway for n in node.addresses if self.topology.networks[n].gateway), None)
            if gw is None:
                raise SimError(f"{self.topology.file}: node {node.name} has no network with a gateway to reach Loki "
                               "through (a /31 or /32 network only); give one of its networks a larger subnet")
            out[node.name] = str(gw)
        return out

    def node_env(self) -> dict[str, dict[str, str]]:
        """node -> the environment that points its Loki pushes at its gateway."""
        return {node: {LOKI_URL_ENV: f"http://{gw}:{self.port}{self._path}"} for node, gw in self.gateways.items()}

    def start(self) -> None:
        """Listen on every gateway in use (the networks must exist: their bridges hold the addresses)."""
        for gw in sorted(set(self.gateways.values())):
            proxy = Proxy(f"loki-relay-{gw}", f"{gw}:{self.port}", self._upstream_addr)
            try:
                proxy.start()
            except ProxyError as e:
                raise SimError(f"logging: cannot relay Loki to the containers: {e}") from None
            self._proxies.append(proxy)

    def stop(self) -> None:
        for proxy in self._proxies:
            proxy.stop()
        self._proxies.clear()
