"""Real server and worker processes on loopback, with configs written for the test (the `local_cluster`
fixture in tests/conftest.py), and the one wait-until helper the live tests poll with."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smolcluster.testbed.sim.processes import ProcessGroup

WORKERS = ["w1", "w2", "w3"]


def wait_until(predicate, timeout: float, what: str, detail=lambda: "") -> None:
    """Poll `predicate` (every 0.05 s, on the monotonic clock) until it is true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}\n{detail()}"
        time.sleep(0.05)


def write_configs(config_dir: Path, algo: str, data_dir: Path, nn: dict[str, Any] | None = None,
                  cluster: dict[str, Any] | None = None, workers: list[str] = WORKERS) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    nn_cfg = {"batch_size": 32, "learning_rate": 0.001, "num_epochs": 1, "eval_steps": 100,
              "data_dir": str(data_dir)} | (nn or {})
    cl_cfg = {"host_ip": {w: "127.0.0.1" for w in workers + ["srv"]}, "port": 0, "num_workers": len(workers),
              "workers": workers, "server": "srv", "seed": 42, "worker_update_interval": 1, "timeout": 1.0,
              "min_workers": 1, "push_interval": 5, "idle_timeout": 15.0, "heartbeat_interval": 0.5,
              "heartbeat_timeout": 5.0, "checkpoint_interval": 50, "wandb": "off"} | (cluster or {})
    if algo == "edp" and "worker_update_interval" not in (cluster or {}):
        cl_cfg["worker_update_interval"] = 5  # pull as often as we push
    (config_dir / "nn_config.yaml").write_text(yaml.safe_dump(nn_cfg))
    (config_dir / f"cluster_config_{algo}.yaml").write_text(yaml.safe_dump(cl_cfg))
    return config_dir


@dataclass
class LocalCluster:
    """A server and its workers as processes; everything is killed at teardown."""

    root: Path
    algo: str
    config_dir: Path
    procs: ProcessGroup = field(default_factory=ProcessGroup)
    port: int | None = None

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def start_server(self, *extra: str) -> None:
        (self.server_dir / "server.json").unlink(missing_ok=True)
        self.procs.start("server", ["server", "--algo", self.algo, "--config-dir", str(self.config_dir),
                                    "--run-dir", str(self.server_dir), "--bind", "127.0.0.1", "--port",
                                    str(self.port or 0), *extra], self.server_dir / "stdout.log")
        def listening() -> bool:
            assert self.procs.procs["server"].alive(), self.log("server")
            return (self.server_dir / "server.json").exists()

        wait_until(listening, 60, "the server to listen")
        time.sleep(0.05)
        self.port = json.loads((self.server_dir / "server.json").read_text())["port"]

    def start_worker(self, rank: int, *extra: str) -> None:
        name = WORKERS[rank - 1]
        self.procs.start(name, ["worker", str(rank), name, "--algo", self.algo, "--config-dir", str(self.config_dir),
                                "--run-dir", str(self.root / name), "--connect", f"127.0.0.1:{self.port}", *extra],
                         self.root / name / "stdout.log")

    def wait_server(self, timeout: float) -> int:
        return self.procs.wait("server", timeout)

    def summary(self) -> dict:
        return json.loads((self.server_dir / "summary.json").read_text())

    def metrics(self, node: str = "server") -> list[dict]:
        path = self.root / node / "metrics.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        wait_until(predicate, timeout, what, lambda: self.log("server"))

    def log(self, node: str) -> str:
        p = self.root / node / "stdout.log"
        return p.read_text()[-3000:] if p.exists() else ""
