"""`smolcluster bench train`: the same MNIST training five ways, side by side.

  single-bs32      one process, batch 32 (the quality reference for EDP)
  single-bsN       one process, batch 32 x training ranks (the reference for SyncPS's global batch)
  syncps           parameter server + N worker processes over loopback TCP
  edp              parameter server + N workers, the default config: weights pushed and pulled every 5 steps
  edp-gradients    parameter server + N workers, gradients pushed every step, weights pulled every step
  ddp-gloo         torch.distributed DistributedDataParallel, gloo backend, N processes

Every run is its own process(es), same model, optimizer, epochs and seed; wall time counts training
only (from the first update to the last, no imports, data loading or evaluation), so the figures
compare the training loops and their communication. Every run is evaluated on the test set after
each epoch's worth of samples, so the table shows where each one stands after one epoch as well as
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import yaml

from smolcluster.common.jsonl import JsonlFollower, read_jsonl
from smolcluster.common.wait import wait_until
from smolcluster.core import algorithms
from smolcluster.testbed.sim.processes import ProcessGroup
from smolcluster.common.files import write_atomic


@dataclass
class BenchRun:
    name: str
    processes: int
    batch_size: int  # global batch per optimizer step
    epochs: int
    wall_time_s: float
    samples_per_s: float
    final_test_accuracy: float
    peak_rss_mb: float
    epoch_test_accuracy: list[float]  # after each epoch's worth of samples; the last is the final accuracy


# --------------------------------------------------------------------------- in-process trainers (run as subprocesses)

EPOCH_LINE = "epoch "  # trainers print "epoch K/N: test accuracy A" to stderr; the orchestrator relays them


def _epoch_line(epoch: int, epochs: int, accuracy: float) -> str:
    """"epoch K/N: test accuracy A" for the K-th epoch (1-based)."""
    return f"{EPOCH_LINE}{epoch}/{epochs}: test accuracy {accuracy:.4f}"


def _report_epoch(epoch: int, epochs: int, accuracy: float) -> None:
    print(_epoch_line(epoch + 1, epochs, accuracy), file=sys.stderr, flush=True)


def _train_single(batch_size: int, shards: int, epochs: int, lr: float, seed: int, data_dir: str | None) -> dict:
    """One process. With shards > 1 each step's batch is the union of the shards' batches for that
    step (the same shards and order the workers use), exactly what synchronous PS averages."""
    from smolcluster.core.training.reference import train_reference

    r = train_reference(batch_size=batch_size, shards=shards, epochs=epochs, lr=lr, seed=seed, data_dir=data_dir,
                        on_epoch=lambda epoch, accuracy: _report_epoch(epoch, epochs, accuracy))
    return asdict(r)


def _train_ddp(rank: int, world: int, port: int, batch_size: int, epochs: int, lr: float, seed: int,
               data_dir: str | None) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from smolcluster.core.training.config import ModelConfig
    from smolcluster.core.training.models import build_model
    from smolcluster.core.training.optim import build_optimizer, train_step
    from smolcluster.core.training.tasks import MnistTask
    from smolcluster.core.training.telemetry import peak_rss_mb

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    task = MnistTask(data_dir, world, batch_size, seed)
    loader = task.batches(rank)
    model = DistributedDataParallel(build_model(ModelConfig(), seed=seed))
    opt = build_optimizer("adam", model.parameters(), lr)
    wall, accs = 0.0, []
    for epoch in range(epochs):
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(epoch * task.steps_per_epoch, (epoch + 1) * task.steps_per_epoch):
            train_step(model, opt, *loader.batch_at(step), max_norm=1.0)
        dist.barrier()
        wall += time.perf_counter() - t0
        accs.append(task.evaluate(model.module)[1] if rank == 0 else 0.0)  # the others wait at the next barrier
        if rank == 0:
            _report_epoch(epoch, epochs, accs[-1])
    dist.destroy_process_group()
    return {"wall_time_s": wall, "samples": epochs * task.steps_per_epoch * batch_size * world,
            "final_test_accuracy": accs[-1], "epoch_test_accuracy": accs, "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smolcluster.bench.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen, timeout: float, progress: Callable[[str], None]) -> tuple[str, str]:
    """(stdout, stderr) of a trainer, relaying its epoch lines as they come; killed after `timeout` s."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        err = []
        for line in proc.stderr:  # type: ignore[union-attr]
            if line.startswith(EPOCH_LINE):
                progress(f"      {line.strip()}")
            err.append(line)
        out = proc.stdout.read()  # type: ignore[union-attr]  # one JSON line, printed at the very end
        proc.wait()
    finally:
        watchdog.cancel()
    return out, "".join(err)


def _result(args: list[str], proc: subprocess.Popen, out: str, err: str) -> dict:
    if proc.returncode != 0:
        raise RuntimeError(f"bench subprocess failed: {' '.join(args)}\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_single(batch_size: int, shards: int, epochs: int, lr: float, seed: int, data_dir: str | None,
               progress: Callable[[str], None] = lambda _: None) -> BenchRun:
    args = ["single", str(batch_size), str(shards), str(epochs), str(lr), str(seed), data_dir or ""]
    proc = _trainer(args)
    r = _result(args, proc, *_collect(proc, 1800, progress))
    return BenchRun(f"single-bs{batch_size * shards}", 1, batch_size * shards, epochs, round(r["wall_time_s"], 2),
                    round(r["samples"] / r["wall_time_s"], 1), r["final_test_accuracy"], round(r["peak_rss_mb"], 1),
                    r["epoch_test_accuracy"])


def run_ddp(world: int, batch_size: int, epochs: int, lr: float, seed: int, data_dir: str | None,
            progress: Callable[[str], None] = lambda _: None) -> BenchRun:
    port = _free_port()
    args = [["ddp", str(rank), str(world), str(port), str(batch_size), str(epochs), str(lr), str(seed), data_dir or ""]
            for rank in range(world)]
    procs = [_trainer(a) for a in args]
    outs: list[tuple[str, str]] = [("", "")] * world

    def read(rank: int) -> None:  # one reader per process, so no pipe fills up while another is read
        outs[rank] = _collect(procs[rank], 1800, progress if rank == 0 else lambda _: None)  # rank 0 evaluates

    readers = [threading.Thread(target=read, args=(rank,)) for rank in range(world)]
    try:
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError("DDP run failed:\n" + "\n".join(err[-1500:] for _, err in outs))
    results = [_result(a, p, *o) for a, p, o in zip(args, procs, outs)]
    wall = max(r["wall_time_s"] for r in results)
    samples = results[0]["samples"]
    return BenchRun("ddp-gloo", world, batch_size * world, epochs, round(wall, 2), round(samples / wall, 1),
                    results[0]["final_test_accuracy"], round(max(r["peak_rss_mb"] for r in results), 1),
                    results[0]["epoch_test_accuracy"])


class _EpochRelay:
    """Relays the server's per-epoch evaluations while it runs. Reads only what metrics.jsonl gained
    since the last call: the file grows by a line per update, and this polls beside the measured run."""

    def __init__(self, metrics: Path, eval_steps: int, epochs: int, progress: Callable[[str], None]):
        self.metrics = JsonlFollower(metrics)
        self.eval_steps, self.epochs, self.progress = eval_steps, epochs, progress
        self.reported = 0

    def poll(self) -> None:
        """Relay the evaluations metrics.jsonl gained since the last call."""
        for e in self.metrics.read_new():
            if e["event"] == "eval" and e["version"] > 0 and e["version"] % self.eval_steps == 0 \
                    and self.reported < self.epochs:
                self.reported += 1
                self.progress(f"      {_epoch_line(self.reported, self.epochs, e['test_accuracy'])}")


def run_ps(algo: str, workers: int, batch_size: int, epochs: int, lr: float, seed: int, data_dir: str | None,
           workdir: Path, nn_overrides: dict | None = None, label: str = "",
           progress: Callable[[str], None] = lambda _: None, **cluster_overrides) -> BenchRun:
    """Server + workers as real processes on loopback, configured like the seed's defaults."""
    spec = algorithms.get(algo)
    names = [f"w{i}" for i in range(1, workers + 1)]
    tag = algo + "".join(f"-{k}{v}" for k, v in cluster_overrides.items())
    cfg_dir, run_dir = workdir / f"{tag}-config", workdir / f"{tag}-run"
    cfg_dir.mkdir(parents=True)
    cluster = {"host_ip": {n: "127.0.0.1" for n in names + ["server"]}, "port": 0, "num_workers": workers,
               "workers": names, "server": "server", "seed": seed, "wandb": "off", "checkpoint_interval": 0,
               "min_workers": workers, "timeout": 5.0, "idle_timeout": 60.0,
               "worker_update_interval": spec.config_defaults.get("worker_update_interval", 1),
               "push_interval": 5} | cluster_overrides
    # The server evaluates every `eval_steps` versions: make that one epoch's worth of samples. A synchronous
    # version is one step of every worker; an asynchronous one is one push, carrying push_interval steps.
    from smolcluster.core.training.tasks import MnistTask

    steps_per_epoch = MnistTask(None, workers, batch_size, seed).steps_per_epoch
    per_epoch = steps_per_epoch if spec.synchronous else workers * steps_per_epoch / cluster["push_interval"]
    nn = {"batch_size": batch_size, "learning_rate": lr, "num_epochs": epochs, "eval_steps": max(1, round(per_epoch)),
          "data_dir": data_dir} | (nn_overrides or {})
    write_atomic(cfg_dir / "nn_config.yaml", yaml.safe_dump(nn))
    write_atomic(cfg_dir / f"cluster_config_{algo}.yaml", yaml.safe_dump(cluster))
    with ProcessGroup() as group:
        port = group.start_server("server", ["server", "--algo", algo, "--config-dir", str(cfg_dir), "--run-dir",
                                             str(run_dir / "server"), "--bind", "127.0.0.1", "--port", "0"],
                                  run_dir / "server", timeout=120)["port"]
        for rank, name in enumerate(names, start=1):
            group.start(name, ["worker", str(rank), name, "--algo", algo, "--config-dir", str(cfg_dir), "--run-dir",
                               str(run_dir / name), "--connect", f"127.0.0.1:{port}"], run_dir / name / "stdout.log")
        relay = _EpochRelay(run_dir / "server" / "metrics.jsonl", nn["eval_steps"], epochs, progress)
        if not wait_until(lambda: relay.poll() or not group.procs["server"].alive(), 1800, interval=0.5):
            raise RuntimeError(f"{algo} server did not finish within 30 minutes")
        if group.wait("server", timeout=10) != 0:
            raise RuntimeError(f"{algo} server failed: {(run_dir / 'server' / 'stdout.log').read_text()[-1500:]}")
        relay.poll()
        for name in names:
            group.wait(name, timeout=60)
    server = read_jsonl(run_dir / "server" / "metrics.jsonl")
    updates = [e["time"] for e in server if e["event"] == "update"]
    start = next(e["time"] for e in server if e["event"] == "training_start")
    evals = [e for e in server if e["event"] == "eval" and e["version"] > 0]
    # Evaluations inside the training span paused it: take them out, as the single and DDP runs do.
    wall = max(updates) - start - sum(e.get("seconds", 0.0) for e in evals if e["time"] <= max(updates))
    ends = [e for n in names for e in read_jsonl(run_dir / n / "metrics.jsonl") if e["event"] == "end"]
    samples = sum(e["samples"] for e in ends)
    summary = json.loads((run_dir / "server" / "summary.json").read_text())
    rss = max([e.get("peak_rss_mb", 0) for e in ends] + [e.get("peak_rss_mb", 0) for e in server if e["event"] == "end"])
    global_batch = batch_size * workers if spec.synchronous else batch_size
    epoch_accs = [e["test_accuracy"] for e in evals if e["version"] % nn["eval_steps"] == 0][:epochs - 1]
    return BenchRun(label or algo, workers + 1, global_batch, epochs, round(wall, 2), round(samples / wall, 1),
                    summary["final_test_accuracy"], round(rss, 1), [*epoch_accs, summary["final_test_accuracy"]])


def run_all(workers: int = 3, epochs: int = 5, lr: float = 0.001, seed: int = 42, data_dir: str | None = None,
            progress=print) -> list[BenchRun]:
    data_dir = data_dir or os.environ.get("SMOLCLUSTER_DATA_DIR")
    if data_dir:  # the runs' configs live in a temporary folder: a relative path must not move with them
        data_dir = str(Path(data_dir).resolve())
    from smolcluster.core.training.data import load_mnist

    for split in ("train", "test"):  # a missing dataset is one clear DataError now, not six failed runs
        load_mnist(split, data_dir)
    runs: list[BenchRun] = []
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-") as tmp:
        plan = [
            ("single process, batch 32", lambda: run_single(32, 1, epochs, lr, seed, data_dir, progress)),
            (f"single process, batch {32 * workers} (the workers' shards, unioned)",
             lambda: run_single(32, workers, epochs, lr, seed, data_dir, progress)),
            (f"SyncPS, {workers} workers", lambda: run_ps("syncps", workers, 32, epochs, lr, seed, data_dir, Path(tmp), progress=progress)),
            (f"EDP, {workers} workers, weights every 5 steps",
             lambda: run_ps("edp", workers, 32, epochs, lr, seed, data_dir, Path(tmp), progress=progress)),
            (f"EDP, {workers} workers, gradients every step",
             lambda: run_ps("edp", workers, 32, epochs, lr, seed, data_dir, Path(tmp), label="edp-gradients", progress=progress,
                            push_mode="gradients", push_interval=1, worker_update_interval=1)),
            (f"DDP (gloo), {workers} processes", lambda: run_ddp(workers, 32, epochs, lr, seed, data_dir, progress)),
        ]
        for i, (label, fn) in enumerate(plan, start=1):
            progress(f"[{i}/{len(plan)}] {label} ...")
            runs.append(fn())
            progress(f"      {runs[-1].wall_time_s:.1f} s, {runs[-1].samples_per_s:.0f} samples/s, "
                     f"accuracy {runs[-1].final_test_accuracy:.4f}")
    return runs


def targets(runs: list[BenchRun]) -> list[tuple[str, bool, str]]:
    by = {r.name: r for r in runs}
    single32 = by["single-bs32"]
    single_n = next(r for r in runs if r.name.startswith("single-bs") and r is not single32)
    sync, ddp = by["syncps"], by["ddp-gloo"]
    edps = [r for r in runs if r.name.startswith("edp")]
    pp = 100.0
    out = [("SyncPS accuracy within 0.5 pt of single, same global batch",
            abs(sync.final_test_accuracy - single_n.final_test_accuracy) * pp <= 0.5,
            f"{(sync.final_test_accuracy - single_n.final_test_accuracy) * pp:+.2f} pt")]
    for edp in edps:
        out += [(f"{edp.name} accuracy within 1 pt of single batch 32",
                 abs(edp.final_test_accuracy - single32.final_test_accuracy) * pp <= 1.0,
                 f"{(edp.final_test_accuracy - single32.final_test_accuracy) * pp:+.2f} pt"),
                (f"{edp.name} samples/s >= DDP", edp.samples_per_s >= ddp.samples_per_s,
                 f"{edp.samples_per_s / ddp.samples_per_s:.2f}x DDP"),
                (f"{edp.name} samples/s >= single batch 32", edp.samples_per_s >= single32.samples_per_s,
                 f"{edp.samples_per_s / single32.samples_per_s:.2f}x single")]
    peak = max(r.peak_rss_mb for r in [sync, *edps])
    return out + [
        ("SyncPS samples/s >= 2x DDP", sync.samples_per_s >= 2 * ddp.samples_per_s,
         f"{sync.samples_per_s / ddp.samples_per_s:.2f}x DDP"),
        ("peak RSS of SyncPS/EDP processes <= 400 MB", peak <= 400, f"{peak:.0f} MB"),
    ]


def format_table(runs: list[BenchRun]) -> str:
    ddp = next(r for r in runs if r.name == "ddp-gloo")
    head = (f"{'run':<16}{'procs':>6}{'batch':>7}{'epochs':>7}{'wall s':>9}{'samples/s':>11}{'vs DDP':>8}"
            f"{'acc ep1':>9}{'accuracy':>10}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(f"{r.name:<16}{r.processes:>6}{r.batch_size:>7}{r.epochs:>7}{r.wall_time_s:>9.1f}"
                     f"{r.samples_per_s:>11.0f}{r.samples_per_s / ddp.samples_per_s:>7.2f}x"
                     f"{r.epoch_test_accuracy[0]:>9.4f}{r.final_test_accuracy:>10.4f}{r.peak_rss_mb:>9.0f}")
    lines.append("acc ep1 = test accuracy after one epoch's worth of samples; accuracy = at the end")
    from smolcluster.core.training.device import measure_import_rss_mb, torch_info

    t = torch_info(measure_import_rss_mb())
    lines.append(f"torch {t['version']} ({t['build']}): {t['import_rss_mb']:.0f} MB peak RSS for `import torch` alone")
    lines.append("")
    for label, ok, detail in targets(runs):
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}")
    return "\n".join(lines)


def to_json(runs: list[BenchRun]) -> str:
    from smolcluster.core.training.device import measure_import_rss_mb, torch_info

    return json.dumps({"runs": [asdict(r) for r in runs], "torch": torch_info(measure_import_rss_mb()),
                       "targets": [{"target": t, "passed": ok, "detail": d} for t, ok, d in targets(runs)]})


def _main(argv: list[str]) -> None:
    """Subprocess entry point for the single-process and DDP runs; prints one JSON line."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("single")
    for a, t in (("batch", int), ("shards", int), ("epochs", int), ("lr", float), ("seed", int), ("data", str)):
        s.add_argument(a, type=t)
    d = sub.add_parser("ddp")
    for a, t in (("rank", int), ("world", int), ("port", int), ("batch", int), ("epochs", int), ("lr", float),
                 ("seed", int), ("data", str)):
        d.add_argument(a, type=t)
    a = p.parse_args(argv)
    if a.role == "single":
        out = _train_single(a.batch, a.shards, a.epochs, a.lr, a.seed, a.data or None)
    else:
        out = _train_ddp(a.rank, a.world, a.port, a.batch, a.epochs, a.lr, a.seed, a.data or None)
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
