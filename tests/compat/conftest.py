"""Fixtures for the compatibility tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compat_helpers import REPO

from smolcluster.testbed.sim.processes import ProcessGroup


@pytest.fixture
def procs():
    """A process group whose nodes are all stopped at the end of the test."""
    with ProcessGroup() as group:
        yield group


@pytest.fixture(scope="session")
def project_venv(tmp_path_factory) -> Path:
    """A real virtualenv with the project installed the way users do (`pip install torch==2.13.0 .`, not
    editable, no system site-packages), built once per test session from a copy of this checkout (so the
    build leaves nothing in the checkout)."""
    root = tmp_path_factory.mktemp("project-venv")
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "wandb"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", str(src)],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    shutil.rmtree(src)  # the venv must not need the source tree
    return venv
