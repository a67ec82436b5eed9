"""Installed the way most users do — a virtualenv, `pip install torch==2.13.0 .` — smolcluster has its
package data and runs both sim backends with that venv's interpreter (not the base one behind it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from compat_helpers import tail

from smolcluster.common.errors import DockerUnavailable

pytestmark = pytest.mark.slow

EDP_STEPS, EDP_FLOOR = 150, 0.90  # as the compose sim tests: EDP passes 0.90 at ~60 server updates


def venv_env(venv: Path, mnist_dir: Path) -> dict[str, str]:
    """What a shell with the venv activated has: its bin first; nothing pointing at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(venv),
                  "SMOLCLUSTER_DATA_DIR": str(mnist_dir)}


def smolcluster(venv: Path, *args: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "smolcluster"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def shipped(venv: Path, *parts: str) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; from smolcluster.resources import resource_path; "
                          "print(resource_path(*sys.argv[1:]))", *parts], capture_output=True, text=True, check=True, cwd="/")
    return Path(out.stdout.strip())


def ran_in(node_dir: Path, venv: Path) -> bool:
    """A node's first log line names the Python environment (sys.prefix) it ran in."""
    return any(f"in {venv}" in (node_dir / log).read_text() for log in ("server.log", "worker.log")
               if (node_dir / log).exists())


def test_a_plain_install_has_its_profiles_and_topologies(project_venv: Path, tmp_path: Path, mnist_dir: Path):
    env = venv_env(project_venv, mnist_dir)
    hybrid = shipped(project_venv, "topologies", "hybrid.yaml")
    assert project_venv in hybrid.parents and hybrid.is_file(), hybrid  # inside the venv, not this checkout
    assert shipped(project_venv, "netem", "profiles.yaml").is_file()
    mine = tmp_path / "my-cluster.yaml"  # a user's own topology, outside any checkout: profiles come from the package
    mine.write_text(hybrid.read_text())
    python = project_venv / "bin" / "python"
    meta = subprocess.run([str(python), "-c", "from importlib.metadata import metadata; print(metadata('smolcluster')['Requires-Python'])"],
                          capture_output=True, text=True, check=True, cwd="/")
    assert meta.stdout.strip() == ">=3.10"  # pip refuses older interpreters, naming both versions
    # the interpreter compose containers run is the venv's own bin/python, not the base one it links to
    inside = subprocess.run([str(python), "-c", "from smolcluster.testbed.sim.image import container_python; print(container_python())"],
                            capture_output=True, text=True, check=True, cwd="/")
    assert inside.stdout.strip() == str(python)
    for topo in (hybrid, mine):
        out = smolcluster(project_venv, "topology", "validate", str(topo), cwd=tmp_path, env=env, timeout=120)
        assert out.returncode == 0 and "OK: 5 nodes, 3 networks" in out.stdout, out.stdout + out.stderr


def test_the_launcher_plans_from_the_venv(project_venv: Path, tmp_path: Path, mnist_dir: Path):
    configs = shipped(project_venv, "configs")
    out = smolcluster(project_venv, "launch", "--algo", "syncps", "--config-dir", str(configs), "--dry-run",
                      "--run-name", "t", cwd=tmp_path, env=venv_env(project_venv, mnist_dir), timeout=120)
    assert out.returncode == 0, out.stderr
    starts = [line for line in out.stdout.splitlines() if line.startswith("ssh ") and "tmux new-session" in line]
    assert len(starts) == 5 and "worker 4 pi4 --algo syncps" in starts[-1]


def test_the_local_backend_runs_from_the_venv(project_venv: Path, tmp_path: Path, mnist_dir: Path):
    env = venv_env(project_venv, mnist_dir)
    run = tmp_path / "run"
    out = smolcluster(project_venv, "sim", str(shipped(project_venv, "topologies", "hybrid.yaml")), "--algo", "edp",
                      "--max-steps", str(EDP_STEPS), "--run-dir", str(run), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_accuracy"] >= EDP_FLOOR and summary["steps"] == EDP_STEPS, summary
    for node in ("mini1", "mini2", "pi4"):
        assert ran_in(run / "nodes" / node, project_venv), tail(run / "nodes" / node / "stdout.log")


@pytest.mark.docker
def test_the_compose_backend_runs_from_the_venv(project_venv: Path, tmp_path: Path, mnist_dir: Path):
    """Run under `flock /tmp/smolcluster-docker.lock` with the other docker tests."""
    from smolcluster.testbed.sim.docker_env import detect_docker

    try:
        detect_docker()
    except DockerUnavailable as e:
        pytest.skip(f"needs Docker: {e}")
    env = venv_env(project_venv, mnist_dir)
    built = smolcluster(project_venv, "image", "build", "--offline", cwd=tmp_path, env=env, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    run = tmp_path / "run"
    out = smolcluster(project_venv, "sim", str(shipped(project_venv, "topologies", "hybrid.yaml")), "--backend", "compose",
                      "--algo", "edp", "--max-steps", str(EDP_STEPS), "--run-dir", str(run), cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "compose" and summary["final_test_accuracy"] >= EDP_FLOOR, summary
    assert str(project_venv / "bin" / "python") in (run / "compose" / "docker-compose.yml").read_text()
    for node in ("mini1", "mini2", "pi4"):  # the containers ran the venv's interpreter, with the venv's packages
        assert ran_in(run / "nodes" / node, project_venv), tail(run / "nodes" / node / "stdout.log")
