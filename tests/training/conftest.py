"""Real server and worker processes on loopback, with configs written for the test."""

from __future__ import annotations

import pytest
from helpers import NodeProcesses, write_configs


@pytest.fixture
def local_cluster(tmp_path, mnist_dir):
    """make(algo, nn=..., cluster=...) -> NodeProcesses with three workers; all stopped at teardown."""
    clusters: list[NodeProcesses] = []

    def make(algo: str, nn: dict | None = None, cluster: dict | None = None) -> NodeProcesses:
        cfg = write_configs(tmp_path / f"config-{algo}", algo, mnist_dir, nn, cluster)
        c = NodeProcesses(tmp_path / f"run-{algo}", algo, cfg)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.procs.stop_all()
