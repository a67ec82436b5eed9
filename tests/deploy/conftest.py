"""Fixtures for the deployment rehearsal: topology nodes as network namespaces with real sshds.

Every test here is marked `ssh`. They need root (network namespaces), iproute2, OpenSSH
(server and client), tmux and rsync; without them they skip with the reason.
`.ci/deploy-setup.sh` installs what is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from rehearsal import SSHD, Rehearsal

REPO_ROOT = Path(__file__).resolve().parents[2]
HYBRID = REPO_ROOT / "topologies" / "hybrid.yaml"
TOOLS = ("ip", "tc", "ssh", "ssh-keygen", "tmux", "rsync")


def missing_requirements() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root (network namespaces)"]
    missing += [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    return missing


@pytest.fixture(scope="session")
def rehearsal_requirements() -> None:
    missing = missing_requirements()
    if missing:
        pytest.skip(f"the deployment rehearsal needs {', '.join(missing)} (.ci/deploy-setup.sh installs the tools)")


@pytest.fixture(scope="session")
def hybrid_path() -> Path:
    return HYBRID


@pytest.fixture(scope="module")
def hybrid_hosts(rehearsal_requirements: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    """topologies/hybrid.yaml as five hosts with sshd, routes and management access, torn down after the module."""
    with Rehearsal(HYBRID, tmp_path_factory.mktemp("hybrid-hosts")) as r:
        yield r
