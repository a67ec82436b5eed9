"""Fixtures for the compatibility tests."""

from __future__ import annotations

import pytest

from smolcluster.testbed.sim.processes import ProcessGroup


@pytest.fixture
def procs():
    """A process group whose nodes are all stopped at the end of the test."""
    with ProcessGroup() as group:
        yield group
