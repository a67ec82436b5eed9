"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder with the official MNIST IDX files: $SMOLCLUSTER_DATA_DIR, else <repo>/../shared/data/mnist."""
    env = os.environ.get("SMOLCLUSTER_DATA_DIR")
    path = Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data" / "mnist").resolve()
    if not any(path.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"MNIST IDX files not found in {path}; set SMOLCLUSTER_DATA_DIR to a folder with them")
    return path


@pytest.fixture(scope="session")
def smolcluster_data_dir(mnist_dir: Path) -> Path:
    """The `cluster` fixture (smolcluster's pytest plugin) reads MNIST from here; skips without it."""
    return mnist_dir


def pytest_configure(config) -> None:
    # The plugin is registered by the installed package's pytest11 entry point; a checkout installed before
    # the entry point existed (an old `pip install -e .`) gets it here instead.
    from smolcluster.testbed.faults import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "smolcluster")


@pytest.fixture
def local_cluster(tmp_path, mnist_dir):
    """make(algo, nn=..., cluster=..., workers=...) -> NodeProcesses (three workers unless told); all stopped at
    teardown. Used by the training, hardening and fuzz tests."""
    from helpers import WORKERS, NodeProcesses, write_configs

    clusters: list = []

    def make(algo: str, nn: dict | None = None, cluster: dict | None = None, workers: list[str] | None = None):
        workers = list(workers or WORKERS)
        cfg = write_configs(tmp_path / f"config-{algo}", algo, mnist_dir, nn, cluster, workers)
        c = NodeProcesses(tmp_path / f"run-{algo}", algo, cfg, workers=workers)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.procs.stop_all()
