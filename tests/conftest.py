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


@pytest.fixture
def local_cluster(tmp_path, mnist_dir):
    """make(algo, nn=None, cluster=None, workers=None) -> LocalCluster; every process is stopped at teardown."""
    from localcluster import WORKERS, LocalCluster, write_configs

    clusters = []

    def make(algo: str, nn: dict | None = None, cluster: dict | None = None, workers: list[str] | None = None):
        cfg = write_configs(tmp_path / f"config-{algo}", algo, mnist_dir, nn, cluster, workers or WORKERS)
        c = LocalCluster(tmp_path / f"run-{algo}", algo, cfg)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.procs.stop_all()
