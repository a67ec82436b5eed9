"""`smolcluster experiment FILE`: every arm x seed as a `smolcluster sim` run, resumable.

The experiment directory:

    experiment.yaml           the file as it was started (a resume checks it is the same experiment)
    arms/<arm>.yaml           the topology each arm runs (the experiment's, with the arm's training keys)
    runs/<arm>-seed<S>/       one sim run directory each (summary.json, metrics, plots), plus
        experiment-run.json   written once the run ended: its exit code; 0 = finished, kept on resume
    reference/<kind>-seed<S>.json   the single-process references (kind single or union)
    results.json, report.txt, accuracy.png, time_to_target.png

A run without experiment-run.json (interrupted, or the machine died) is removed and run again; a run
that ended with an error is run again too. Ctrl-C stops after cleaning up the current run, writes the
results of the runs so far and says how to resume.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, TextIO

import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.common.files import write_atomic
from smolcluster.testbed.experiment.layout import REFERENCE_KINDS, RUN_MARKER, reference_file, run_dir_of, run_finished
from smolcluster.testbed.experiment.results import write_results
from smolcluster.testbed.experiment.spec import Arm, Experiment, arm_topology_yaml

def prepare(exp: Experiment, root: Path) -> None:
    """Create the directory, or check that it holds this experiment (then its finished runs are kept).
    The file may have gained seeds or arms since (those runs are added); anything else is another experiment."""
    root.mkdir(parents=True, exist_ok=True)
    stored = root / "experiment.yaml"
    if stored.exists() and not extends(yaml.safe_load(stored.read_text()) or {}, exp.raw):
        raise ConfigError(exp.file, "<file>", f"{root} holds a different experiment (see its experiment.yaml); "
                                              "a directory can only gain seeds or arms",
                          "use another --run-dir, or restore the file the directory was started with")
    write_atomic(stored, yaml.safe_dump(exp.raw, sort_keys=False))
    (root / "arms").mkdir(exist_ok=True)
    for arm in exp.arms:
        write_atomic(arm_file(root, arm), yaml.safe_dump(arm_topology_yaml(exp, arm), sort_keys=False))


def extends(before: dict, now: dict) -> bool:
    """Whether experiment file `now` is `before` with more seeds or arms (or the same)."""
    rest = (lambda raw: {k: v for k, v in raw.items() if k not in ("seeds", "arms")})
    return (rest(before) == rest(now) and set(before.get("seeds") or []) <= set(now.get("seeds") or [])
            and all(a in (now.get("arms") or []) for a in before.get("arms") or []))


def arm_file(root: Path, arm: Arm) -> Path:
    return root / "arms" / f"{arm.name}.yaml"


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _eta(durations: list[float], left: int) -> str:
    if not durations or not left:
        return ""
    s = sum(durations) / len(durations) * left
    return f", ~{s / 60:.0f} min left" if s >= 60 else f", ~{s:.0f} s left"


def run_references(exp: Experiment, root: Path, out: TextIO) -> None:
    """The single-process references per seed (skipped when already there)."""
    from smolcluster.core.training.reference import train_reference

    t = exp.arms[0].topology.training
    epochs = max(a.topology.training.epochs for a in exp.arms)
    shards = len(exp.topology.workers)
    for seed in exp.seeds:
        for kind in REFERENCE_KINDS:
            path = reference_file(root, kind, seed)
            if path.exists():
                continue
            print(f"experiment {exp.name}: reference {kind} (1 process, {'1 shard' if kind == 'single' else f'{shards} shards unioned'}), "
                  f"seed {seed}, {epochs} epochs", file=out, flush=True)
            r = train_reference(batch_size=t.batch_size, shards=1 if kind == "single" else shards, epochs=epochs,
                                lr=t.learning_rate, seed=seed, data_dir=None)
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, json.dumps({"kind": kind, "seed": seed, "batch_size": t.batch_size, **asdict(r)}, indent=2))


def run_experiment(exp: Experiment, root: Path, out: TextIO = sys.stdout,
                   run_one: Optional[Callable[[Path, int, Path], int]] = None) -> int:
    """Run what is not finished yet; write results.json and the report. Returns 0, or 130 when interrupted.
    `run_one(arm_file, seed, run_dir)` runs one sim (default: `smolcluster sim` in this process)."""
    prepare(exp, root)
    run_one = run_one or _sim_runner(exp, out)
    runs = exp.runs()
    durations: list[float] = []
    try:
        if exp.reference:
            run_references(exp, root, out)
        for i, (arm, seed) in enumerate(runs):
            d = run_dir_of(root, arm.name, seed)
            head = f"experiment {exp.name}: run {i + 1}/{len(runs)} {_bar(i, len(runs))} {arm.name} seed {seed}"
            if run_finished(d):
                print(f"{head}: finished before, kept", file=out, flush=True)
                continue
            if d.exists():
                shutil.rmtree(d)  # an interrupted or failed run starts over
            print(head + _eta(durations, len(runs) - i), file=out, flush=True)
            t0 = time.monotonic()
            code = run_one(arm_file(root, arm), seed, d)
            if code == 130:
                raise KeyboardInterrupt
            durations.append(time.monotonic() - t0)
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / RUN_MARKER, json.dumps({"arm": arm.name, "seed": seed, "exit_code": code,
                                                     "seconds": round(durations[-1], 1)}))
            if code != 0:
                print(f"experiment {exp.name}: {arm.name} seed {seed} failed (exit {code}); see {d}", file=out, flush=True)
    except KeyboardInterrupt:
        done = sum(run_finished(run_dir_of(root, a.name, s)) for a, s in runs)
        write_results(exp, root)
        print(f"\nexperiment {exp.name}: interrupted with {done} of {len(runs)} runs finished; "
              f"resume with: smolcluster experiment {exp.file} --run-dir {root}", file=out, flush=True)
        return 130
    write_results(exp, root)
    return 0


def _sim_runner(exp: Experiment, out: TextIO) -> Callable[[Path, int, Path], int]:
    def run(topology_file: Path, seed: int, run_dir: Path) -> int:
        from smolcluster.testbed.sim.options import SimOptions
        from smolcluster.testbed.sim.run import run_sim

        opts = SimOptions(file=topology_file, seed=seed, run_dir=run_dir, backend=exp.backend, faults=exp.faults)
        return run_sim(opts, out=out)
    return run
