"""smolcluster's pytest plugin as a user meets it: a project of their own (one test file and a topology,
outside this repository) run with `python -m pytest`, finding the `cluster` fixture through the
installed package's pytest11 entry point, with no conftest and no import of the fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from smolcluster.resources import resource_path

pytestmark = pytest.mark.slow

USER_TESTS = '''
import signal
from pathlib import Path

import pytest
from smolcluster.common.wait import wait_until

TOPOLOGY = Path(__file__).parent / "cluster.yaml"


@pytest.mark.smolcluster(topology=TOPOLOGY, algo="syncps", training={"learning_rate": 0.01})
def test_training_goes_on_while_a_worker_is_paused(cluster):
    v = cluster.wait_version(3)
    cluster.signal("w1", signal.SIGSTOP)
    assert wait_until(lambda: cluster.state("w1") == "stopped", 5)
    cluster.wait_version(v + 5)  # w2 carries the run: SyncPS closes steps at the deadline
    cluster.signal("w1", signal.SIGCONT)
    assert "learning_rate: 0.01" in (cluster.run_dir / "config" / "nn_config.yaml").read_text()


@pytest.mark.smolcluster(topology=TOPOLOGY)
def test_a_partition_cuts_the_proxy_and_heals(cluster):
    cluster.wait_version(2)
    injector = cluster.inject([{"at": 0, "link": "w2->srv", "action": "partition", "duration": 1.5}])
    assert wait_until(lambda: not cluster.toxiproxy.get_proxy("w2->srv").enabled, 5)
    cluster.wait_version(cluster.control.server_version() + 5)  # w1 goes on meanwhile
    assert wait_until(injector.done, 10)
    assert cluster.api.proxies()["w2->srv"]["enabled"]
    assert set(cluster.nodes) == {"srv", "w1", "w2"}


def test_a_stuck_server_fails_with_its_version(cluster):
    cluster.wait_version(10**9, timeout=1)
'''


def test_a_users_project_gets_the_cluster_fixture_from_the_installed_package(tmp_path, mnist_dir):
    project = tmp_path / "my-project"
    project.mkdir()
    shutil.copy(resource_path("topologies", "faults-small.yaml"), project / "cluster.yaml")
    (project / "test_my_cluster.py").write_text(USER_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"SMOLCLUSTER_DATA_DIR": str(mnist_dir)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert "1 failed, 2 passed" in out, out  # the stuck one fails, with the fixture's message
    assert "test_a_stuck_server_fails_with_its_version" in out and "server stuck at version" in out, out
    assert not list(project.glob("conftest.py"))  # nothing but the user's own test file and topology
