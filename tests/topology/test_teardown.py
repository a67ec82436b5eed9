"""Teardown leaves no container and no network behind, also when bring-up or the run fails."""

from __future__ import annotations

import pytest

from smolcluster.common.errors import DockerCommandFailed
from smolcluster.testbed.sim.compose import leftovers, offline_image_spec, render_compose, running

SLEEP = ["sleep", "infinity"]

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_teardown_after_an_error_in_the_run(docker_env, offline_image, hybrid, tmp_path):
    cp = render_compose(hybrid, tmp_path, offline_image_spec(offline_image), commands={n: SLEEP for n in hybrid.nodes},
                        toxiproxy="none")
    with pytest.raises(RuntimeError, match="boom"):
        with running(docker_env, cp):
            assert leftovers(docker_env, cp.project)[0], "the project should be running inside the with block"
            raise RuntimeError("boom")
    assert leftovers(docker_env, cp.project) == ([], [])


def test_teardown_after_a_failed_bring_up(docker_env, offline_image, hybrid, tmp_path):
    """A second copy of hybrid.yaml cannot come up next to the first (same subnets): its partial
    project is removed, and the first one is untouched until its own teardown."""
    spec = offline_image_spec(offline_image)
    first = render_compose(hybrid, tmp_path / "a", spec, commands={n: SLEEP for n in hybrid.nodes}, toxiproxy="none")
    second = render_compose(hybrid, tmp_path / "b", spec, commands={n: SLEEP for n in hybrid.nodes}, toxiproxy="none")
    with running(docker_env, first):
        with pytest.raises(DockerCommandFailed):
            with running(docker_env, second):
                pass
        assert leftovers(docker_env, second.project) == ([], [])
        assert len(leftovers(docker_env, first.project)[0]) == len(hybrid.nodes)
    assert leftovers(docker_env, first.project) == ([], [])


def test_setup_failure_inside_a_container_is_reported_and_cleaned_up(docker_env, offline_image, hybrid, tmp_path):
    """A node whose routes cannot be installed fails its setup; the error names it, nothing is left."""
    cp = render_compose(hybrid, tmp_path, offline_image_spec(offline_image), commands={n: SLEEP for n in hybrid.nodes},
                        toxiproxy="none")
    script = cp.compose_dir / "entrypoints" / "pi4.sh"
    # a route via an address no neighbour has: the kernel refuses it (as it would a typo in a topology)
    script.write_text(script.read_text().replace("via 192.168.51.2", "via 192.168.99.9"))
    with pytest.raises(DockerCommandFailed, match="pi4"):
        with running(docker_env, cp):
            pass
    assert leftovers(docker_env, cp.project) == ([], [])
