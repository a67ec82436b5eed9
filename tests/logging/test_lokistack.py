"""lokistack: the Grafana admin password (generated once, kept 0600, reused, never on a command
line), finding compose, and up() failing with one typed, one-line reason where it can't run."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from smolcluster.testbed import logstack as lokistack
from smolcluster.testbed.logstack import LoggingUnavailable, compose_argv, compose_env, ensure_admin_password


@pytest.fixture(autouse=True)
def no_password_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("SMOLCLUSTER_GRAFANA_PASSWORD_FILE", raising=False)


def test_password_is_generated_once_stored_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "grafana-admin-password"
    password, is_new, stored_in = ensure_admin_password(path)
    assert is_new and stored_in == path and len(password) >= 24
    assert path.read_text().strip() == password
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, is_new_again, _ = ensure_admin_password(path)
    assert (again, is_new_again) == (password, False)  # printed once: the caller only shows a new one


def test_a_loosened_password_file_is_tightened_and_an_empty_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("kept\n")
    path.chmod(0o644)
    assert ensure_admin_password(path)[:2] == ("kept", False)
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("  \n")
    password, is_new, _ = ensure_admin_password(path)
    assert is_new and password and path.read_text().strip() == password


def test_the_environment_wins_and_nothing_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_ADMIN_PASSWORD", "from-env")
    assert ensure_admin_password(tmp_path / "pw") == ("from-env", False, None)
    assert not (tmp_path / "pw").exists()


def test_password_file_location_can_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLCLUSTER_GRAFANA_PASSWORD_FILE", str(tmp_path / "elsewhere"))
    assert lokistack.default_password_file() == tmp_path / "elsewhere"
    monkeypatch.delenv("SMOLCLUSTER_GRAFANA_PASSWORD_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert lokistack.default_password_file() == tmp_path / "xdg" / "smolcluster" / "grafana-admin-password"


def test_the_password_goes_to_compose_in_the_environment_not_the_command_line(tmp_path: Path) -> None:
    argv = compose_argv(("docker", "compose"), tmp_path / "docker-compose.yml", "up", "-d", agent=False)
    env = compose_env("s3cret-value", runs_dir=tmp_path)
    assert not any("s3cret-value" in a for a in argv)
    assert argv[:5] == ["docker", "compose", "-p", "smolcluster-logging", "-f"] and argv[-2:] == ["up", "-d"]
    assert env["GRAFANA_ADMIN_PASSWORD"] == "s3cret-value" and env["SMOLCLUSTER_RUNS_DIR"] == str(tmp_path)
    assert "--profile" in compose_argv(("docker-compose",), tmp_path / "f.yml", "down")  # down reaches Alloy too


def test_compose_command_is_v2_or_v1() -> None:
    try:
        cmd = lokistack.compose_command()
    except LoggingUnavailable as e:
        pytest.skip(f"no Docker here: {e.reason}")
    assert cmd[-1] in ("compose", "docker-compose") or cmd[-1].endswith("docker-compose")
    assert subprocess.run([*cmd, "version"], capture_output=True).returncode == 0


def test_unavailable_reason_is_one_line() -> None:
    e = LoggingUnavailable("first\n  second\tthird")
    assert e.reason == "first second third" and "\n" not in str(e)


@pytest.mark.docker
def test_up_without_a_registry_raises_unavailable_with_a_one_line_reason(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        lokistack.docker()
    except LoggingUnavailable as e:
        pytest.skip(f"no Docker engine here: {e.reason}")
    images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                            capture_output=True, text=True).stdout.split()
    if "grafana/loki:3.7.8" in images:
        pytest.skip("the stack's images are present: up() would really start it")
    monkeypatch.setenv("SMOLCLUSTER_GRAFANA_PASSWORD_FILE", str(tmp_path / "pw"))
    (tmp_path / "pw").write_text("kept-from-an-earlier-up\n")
    (tmp_path / "pw").chmod(0o600)
    volumes_before = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                                     "label=com.docker.compose.project=smolcluster-logging"],
                                    capture_output=True, text=True).stdout.split()
    with pytest.raises(LoggingUnavailable) as caught:
        lokistack.up(tmp_path / "runs", loki_port=3199, grafana_port=3099, up_timeout_s=300)
    reason = caught.value.reason
    assert reason and "\n" not in reason and len(reason) < 400
    assert "pull" in reason
    assert (tmp_path / "pw").read_text().strip() == "kept-from-an-earlier-up"  # an existing password stays
    assert "kept-from-an-earlier-up" not in reason
    assert lokistack.status().services == {}  # nothing left running or half-made
    (tmp_path / "pw").unlink()
    with pytest.raises(LoggingUnavailable):
        lokistack.up(tmp_path / "runs", loki_port=3199, grafana_port=3099, up_timeout_s=300)
    assert not (tmp_path / "pw").exists(), "a new password that was never shown is not kept"
    leftover = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                               "label=com.docker.compose.project=smolcluster-logging"],
                              capture_output=True, text=True).stdout.split()
    assert leftover == volumes_before
