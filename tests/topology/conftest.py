"""Fixtures for the compose-backend topology tests: a Docker engine, the offline image, a running hybrid.yaml.

Every test here is marked `docker` and skips with the reason when there is no engine or no compose
(`.ci/docker-setup.sh` installs and starts both). Projects are always torn down, and the teardown is
checked: no container and no network of the project may be left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from smolcluster.testbed.sim.compose import ComposeProject, down, leftovers, offline_image_spec, render_compose, up
from smolcluster.testbed.sim.docker_env import DockerEnv, DockerUnavailable, detect_docker
from smolcluster.testbed.sim.image import build_offline_image
from smolcluster.testbed.topology import Topology, load_topology

REPO_ROOT = Path(__file__).resolve().parents[2]
HYBRID = REPO_ROOT / "topologies" / "hybrid.yaml"
SLEEP = ["sleep", "infinity"]  # containers that only hold their network setup


@pytest.fixture(scope="session")
def docker_env() -> DockerEnv:
    try:
        return detect_docker()
    except DockerUnavailable as e:
        pytest.skip(f"compose backend tests need Docker: {e}")


@pytest.fixture(scope="session")
def offline_image(docker_env: DockerEnv) -> str:
    return build_offline_image(docker_env)


@pytest.fixture(scope="session")
def hybrid() -> Topology:
    return load_topology(HYBRID)


def bring_up(env: DockerEnv, cp: ComposeProject) -> Iterator[ComposeProject]:
    """Up for the duration of a fixture; down afterwards and check nothing is left."""
    try:
        up(env, cp)
        yield cp
    finally:
        down(env, cp)
        containers, networks = leftovers(env, cp.project)
        assert not containers and not networks, f"teardown left containers {containers} and networks {networks}"


@pytest.fixture(scope="module")
def hybrid_up(docker_env: DockerEnv, offline_image: str, hybrid: Topology, tmp_path_factory) -> Iterator[ComposeProject]:
    """hybrid.yaml up with every node sleeping (network only), plus the embedded Toxiproxy service."""
    cp = render_compose(hybrid, tmp_path_factory.mktemp("hybrid-net"), offline_image_spec(offline_image),
                        commands={n: SLEEP for n in hybrid.nodes})
    yield from bring_up(docker_env, cp)
