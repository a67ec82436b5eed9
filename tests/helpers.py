"""What several test folders need to run real nodes: configs written for the test, and a server with its
workers as processes on loopback (start the server, wait until it listens, start the workers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from smolcluster.common.errors import WaitTimeout
from smolcluster.common.jsonl import read_jsonl
from smolcluster.common.wait import wait_until
from smolcluster.testbed.sim.processes import ProcessGroup

WORKERS = ["w1", "w2", "w3"]


def write_configs(config_dir: Path, algo: str, data_dir: Path, nn: dict[str, Any] | None = None,
                  cluster: dict[str, Any] | None = None, workers: list[str] = WORKERS) -> Path:
    """nn_config.yaml and cluster_config_<algo>.yaml for a server "srv" and `workers`, all on 127.0.0.1."""
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
class NodeProcesses:
    """A server and its workers as `smolcluster server|worker` processes, each writing to root/<name>/.
    Stop them with procs.stop_all() (or use procs as a context manager)."""

    root: Path
    algo: str
    config_dir: Path
    server: str = "server"  # the server's process and folder name
    workers: list[str] = field(default_factory=lambda: list(WORKERS))
    procs: ProcessGroup = field(default_factory=ProcessGroup)
    port: int | None = None  # kept across restarts: a restarted server listens where the workers dial

    @property
    def server_dir(self) -> Path:
        return self.root / self.server

    def start_server(self, *extra: str) -> None:
        args = ["server", "--algo", self.algo, "--config-dir", str(self.config_dir), "--run-dir", str(self.server_dir),
                "--bind", "127.0.0.1", "--port", str(self.port or 0), *extra]
        self.port = int(self.procs.start_server(self.server, args, self.server_dir, timeout=60)["port"])

    def start_worker(self, rank: int, *extra: str) -> None:
        name = self.workers[rank - 1]
        self.procs.start(name, ["worker", str(rank), name, "--algo", self.algo, "--config-dir", str(self.config_dir),
                                "--run-dir", str(self.root / name), "--connect", f"127.0.0.1:{self.port}", *extra],
                         self.root / name / "stdout.log")

    def wait_server(self, timeout: float) -> int:
        return self.procs.wait(self.server, timeout)

    def summary(self) -> dict:
        return json.loads((self.server_dir / "summary.json").read_text())

    def metrics(self, node: str | None = None) -> list[dict]:
        """The node's metrics.jsonl so far (the server's by default); a line being written is left out."""
        return read_jsonl(self.root / (node or self.server) / "metrics.jsonl")

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        """Until predicate() holds; a timeout fails the test with the server's output."""
        try:
            wait_until(predicate, timeout, what=what)
        except WaitTimeout as e:
            raise AssertionError(f"{e}\n{self.log(self.server)}") from None

    def log(self, node: str) -> str:
        p = self.root / node / "stdout.log"
        return p.read_text()[-3000:] if p.exists() else ""


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every `log` call of W&B runs under run_dir, read back from their offline `run-*.wandb` files
    (a LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte chunk headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, out = 32768, []
    for path in sorted(Path(run_dir).rglob("run-*.wandb")):
        data, pos, records, partial = path.read_bytes(), 7, [], b""  # 7: the ":W&B" file header
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 1:  # full
                records.append(chunk)
            elif kind == 2:  # first
                partial = chunk
            elif kind == 3:  # middle
                partial += chunk
            else:  # last
                records.append(partial + chunk)
        for raw in records:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out
