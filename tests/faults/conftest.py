"""Fixtures for fault injection, reusable by any test that needs a live cluster to break.

`cluster` starts topologies/faults-small.yaml (server srv, workers w1 and w2) on the local backend and
yields a RunningCluster: `.control` is the ClusterControl the fault injector drives, `.toxiproxy`
a toxiproxy-python client pointed at the cluster's proxies, `.nodes` the live node processes and
`.signal(node, sig)` / `.state(node)` for process faults. Parametrize it indirectly to choose the
algorithm or topology:

    @pytest.mark.parametrize("cluster", [{"algo": "syncps"}], indirect=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import psutil
import pytest
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from smolcluster.common.wait import wait_until
from smolcluster.testbed.sim.local import LocalCluster
from smolcluster.testbed.sim.plan import RunOverrides
from smolcluster.resources import resource_path
from smolcluster.testbed.topology import load_topology

SMALL = resource_path("topologies", "faults-small.yaml")


@dataclass
class RunningCluster:
    control: LocalCluster
    toxiproxy: Toxiproxy

    @property
    def run_dir(self) -> Path:
        return self.control.run_dir

    @property
    def nodes(self) -> dict[str, psutil.Process]:
        """Node name -> its live process (psutil, for status and signals)."""
        return {name: psutil.Process(p.pid) for name, p in self.control.procs.procs.items() if p.alive()}

    def signal(self, node: str, sig: int) -> None:
        self.control.procs.signal(node, sig)

    def state(self, node: str) -> str:
        """psutil status: 'running', 'sleeping', 'stopped' (SIGSTOP), 'zombie', or 'gone'."""
        p = self.control.procs.procs.get(node)
        if p is None or not p.alive():
            return "gone"
        return psutil.Process(p.pid).status()

    def wait_version(self, version: int, timeout: float = 60.0) -> int:
        """Block until the server applied `version` model updates."""
        reached = wait_until(lambda: self.control.server_version() >= version, timeout)
        assert reached, f"server stuck at version {self.control.server_version()} (< {version}) after {timeout:.0f} s"
        return self.control.server_version()


@pytest.fixture
def cluster(request, tmp_path, mnist_dir) -> Iterator[RunningCluster]:
    params = getattr(request, "param", None) or {}
    topo = load_topology(params.get("topology", SMALL))
    algo = params.get("algo", "edp")
    env = {"SMOLCLUSTER_DATA_DIR": str(mnist_dir)}
    # Enough steps that the run outlives the test; the fixture stops it.
    control = LocalCluster(topology=topo, run_dir=tmp_path / f"run-{algo}", algorithm=algo,
                           overrides=RunOverrides(algorithm=algo, max_steps=params.get("max_steps", 5000)), env=env, seed=1)
    saved = APIConsumer.host, APIConsumer.port  # toxiproxy-python keeps its API address on a class
    try:
        control.start()
        api = urlparse(control.toxiproxy.api_url)
        tp = Toxiproxy()
        tp.update_api_consumer(api.hostname, api.port)
        yield RunningCluster(control, tp)
    finally:
        APIConsumer.host, APIConsumer.port = saved
        control.stop()
        leftover = [p for p in control.procs.history if p.alive()]
        assert not leftover, f"processes left running: {[p.name for p in leftover]}"
