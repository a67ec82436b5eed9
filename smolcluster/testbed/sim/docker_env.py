"""Find the Docker engine and a compose implementation, and run their commands with timeouts.

The compose backend supports both `docker compose` (v2, Docker Desktop, newer engines) and
`docker-compose` (v1, e.g. Debian's 1.29 package). Whichever is present is used; when the CLI,
the engine or compose is missing the user gets a DockerUnavailable that says what to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from smolcluster.common.errors import DockerCommandFailed, DockerUnavailable

INSTALL_HINT = (
    "install Docker (Debian/Ubuntu as root: `apt-get install -y docker.io docker-compose`, "
    "or Docker Desktop) and start the engine (`dockerd &` as root, or `.ci/docker-setup.sh` "
    "which does both); or run the default local backend: `smolcluster sim FILE` without --backend compose"
)


@dataclass(frozen=True)
class DockerEnv:
    """The docker CLI plus the compose command line to use (["docker", "compose"] or ["docker-compose"])."""

    docker: str
    compose: tuple[str, ...]
    compose_version: str  # e.g. "2.27.0" or "1.29.2"
    engine_version: str

    def run(self, args: Sequence[str], timeout: float = 120.0, check: bool = True,
            input: str | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS`; raise DockerCommandFailed (with its output) on failure or timeout."""
        return run_command([self.docker, *args], timeout=timeout, check=check, input=input, cwd=cwd)

    def compose_run(self, project: str, compose_file: str | Path, args: Sequence[str],
                    timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `<compose> -p PROJECT -f FILE ARGS` from the compose file's folder."""
        compose_file = Path(compose_file)
        cmd = [*self.compose, "-p", project, "-f", str(compose_file), *args]
        return run_command(cmd, timeout=timeout, check=check, cwd=compose_file.parent)


def run_command(cmd: Sequence[str], timeout: float = 120.0, check: bool = True,
                input: str | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output captured, a timeout, and a typed error a user can read."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input,
                              cwd=cwd, env=_quiet_env())
    except subprocess.TimeoutExpired as e:
        out = _text(e.stdout) + _text(e.stderr)
        raise DockerCommandFailed(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s. Output:\n{out[-2000:]}") from None
    except FileNotFoundError:
        raise DockerUnavailable(f"`{cmd[0]}` is not installed: {INSTALL_HINT}") from None
    if check and proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise DockerCommandFailed(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{out[-3000:]}")
    return proc


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _quiet_env() -> dict[str, str]:
    # compose v1 prints colour codes and "what's next" hints; neither belongs in error messages.
    env = dict(os.environ)
    env.setdefault("COMPOSE_INTERACTIVE_NO_CLI", "1")
    env.setdefault("DOCKER_CLI_HINTS", "false")
    env.setdefault("NO_COLOR", "1")
    return env


def detect_docker(timeout: float = 20.0) -> DockerEnv:
    """Find the docker CLI, check the engine answers, pick compose v2 or v1. Raises DockerUnavailable."""
    docker = shutil.which("docker")
    if docker is None:
        raise DockerUnavailable(f"no `docker` command found on PATH: {INSTALL_HINT}")
    try:
        info = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=timeout, env=_quiet_env())
    except subprocess.TimeoutExpired:
        raise DockerUnavailable(f"the Docker engine did not answer within {timeout:.0f}s: {INSTALL_HINT}") from None
    engine = info.stdout.strip()
    if info.returncode != 0 or not engine:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        raise DockerUnavailable(f"the docker CLI is installed but no Docker engine is running ({reason}): {INSTALL_HINT}")

    compose, version = _find_compose(docker, timeout)
    return DockerEnv(docker=docker, compose=compose, compose_version=version, engine_version=engine)


def _find_compose(docker: str, timeout: float) -> tuple[tuple[str, ...], str]:
    # Prefer v2 (the maintained one); fall back to the v1 python tool.
    candidates: list[tuple[str, ...]] = [(docker, "compose")]
    v1 = shutil.which("docker-compose")
    if v1 is not None:
        candidates.append((v1,))
    for cmd in candidates:
        try:
            proc = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True,
                                  timeout=timeout, env=_quiet_env())
        except (subprocess.TimeoutExpired, FileNotFoundError):
            continue
        version = proc.stdout.strip().lstrip("v")
        if proc.returncode == 0 and version and version[0].isdigit():
            return cmd, version
    raise DockerUnavailable(f"the Docker engine runs but neither `docker compose` (v2) nor `docker-compose` (v1) "
                            f"is installed: {INSTALL_HINT}")
