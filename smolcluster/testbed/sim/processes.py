"""A group of node processes that never outlives its owner.

Every node runs as `python -m smolcluster ...` in its own session (so a signal reaches only it and its
children). Leaving the `with` block — normally, on an error or on Ctrl-C — terminates and then kills
everything that is still running. Signals (kill, pause, resume) are how process faults are injected.
A server is started with start_server(), which returns once it listens (its server.json names it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smolcluster.common.errors import SimError
from smolcluster.common.wait import wait_until

SERVER_START_TIMEOUT_S = 90.0


@dataclass
class NodeProcess:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()


class ProcessGroup:
    def __init__(self, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, NodeProcess] = {}
        self.history: list[NodeProcess] = []  # every process ever started, restarts included

    def start(self, name: str, args: list[str], log_path: Path) -> NodeProcess:
        """Start `python -m smolcluster *args`; stdout and stderr go to log_path (appended)."""
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "smolcluster", *args]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=(os.name != "nt"))
        proc = NodeProcess(name, argv, log_path, popen)
        self.procs[name] = proc
        self.history.append(proc)
        return proc

    def start_server(self, name: str, args: list[str], node_dir: Path,
                     timeout: float = SERVER_START_TIMEOUT_S) -> dict:
        """Start `python -m smolcluster server *args` (whose --run-dir is `node_dir`) and wait until it listens.
        Returns its server.json: {"host", "port", "pid"}. SimError, with its output, if it exits first."""
        server_json = Path(node_dir) / "server.json"
        server_json.unlink(missing_ok=True)
        proc = self.start(name, args, Path(node_dir) / "stdout.log")

        def listening() -> dict | None:
            try:
                info = json.loads(server_json.read_text())
            except (FileNotFoundError, ValueError):  # not there yet, or caught half-written
                info = None
            if isinstance(info, dict) and info.get("pid") == proc.pid:
                return info
            if not proc.alive():
                raise SimError(f"the server ({name}) exited with code {proc.returncode} before listening:\n"
                               f"{tail_text(proc.log_path)}")
            return None

        info = wait_until(listening, timeout)
        if not info:
            raise SimError(f"the server ({name}) did not start listening within {timeout:.0f} s; see {proc.log_path}")
        return info

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.alive():
            if os.name == "nt":  # no process groups or SIGSTOP on Windows
                proc.popen.kill() if sig != signal.SIGTERM else proc.popen.terminate()
            else:
                os.killpg(proc.pid, sig)

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].popen.wait(timeout=timeout)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGCONT (paused nodes cannot exit), SIGTERM, wait, then SIGKILL whatever is left."""
        live = [p for p in self.history if p.alive()]
        for p in live:
            for sig in ([signal.SIGCONT] if os.name != "nt" else []) + [signal.SIGTERM]:
                try:
                    os.killpg(p.pid, sig) if os.name != "nt" else p.popen.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL) if os.name != "nt" else p.popen.kill()
                except ProcessLookupError:
                    pass
                p.popen.wait(timeout=5)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def tail_text(path: Path, chars: int = 2000) -> str:
    """The end of a node's log, for an error message."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no output)"


def last_error_line(log: Path) -> str:
    """The node's own `error: ...` line (what the CLI prints for a SmolclusterError), if it wrote one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), "")
