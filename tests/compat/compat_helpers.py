"""Helpers for the compatibility tests: real server and worker processes started from a config dir."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from smolcluster.testbed.sim.processes import ProcessGroup

REPO = Path(__file__).resolve().parents[2]
ORIGINAL_CONFIGS = Path(__file__).resolve().parent / "original_configs"
# shared/ sits beside the checkout (CI) or further up (a worktree); the first one found wins
ORIGINAL_README = next((p / "shared" / "original" / "README.md" for p in REPO.parents
                        if (p / "shared" / "original" / "README.md").exists()), REPO.parent / "shared" / "original" / "README.md")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} not written)"


def run_cluster(procs: ProcessGroup, root: Path, algo: str, config_dir: Path, server: str, workers: list[str],
                timeout: float = 300) -> dict:
    """Start the server (on a free loopback port) and every worker with --connect; wait for the summary."""
    server_dir = root / server
    procs.start(server, ["server", "--algo", algo, "--config-dir", str(config_dir), "--run-dir", str(server_dir),
                         "--bind", "127.0.0.1", "--port", "0"], server_dir / "stdout.log")
    wait_until(lambda: (server_dir / "server.json").exists() or not procs.procs[server].alive(), 60, "server.json")
    assert procs.procs[server].alive(), tail(server_dir / "stdout.log")
    port = json.loads((server_dir / "server.json").read_text())["port"]
    for rank, name in enumerate(workers, start=1):
        procs.start(name, ["worker", str(rank), name, "--algo", algo, "--config-dir", str(config_dir),
                           "--run-dir", str(root / name), "--connect", f"127.0.0.1:{port}"], root / name / "stdout.log")
    code = procs.wait(server, timeout)
    assert code == 0, tail(server_dir / "stdout.log")
    for name in workers:
        assert procs.wait(name, 60) == 0, tail(root / name / "stdout.log")
    return json.loads((server_dir / "summary.json").read_text())
