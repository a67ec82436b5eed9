"""What `smolcluster sim` was asked to do, as every backend reads it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from smolcluster.core import algorithms
from smolcluster.testbed.sim.plan import RunOverrides
from smolcluster.testbed.topology import Topology


@dataclass(frozen=True)
class SimOptions:
    file: Path
    algo: Optional[str] = None
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    seed: Optional[int] = None
    run_dir: Optional[Path] = None
    backend: str = "local"
    toxiproxy: Optional[str] = None
    check: bool = False
    as_json: bool = False
    wandb: bool = False
    progress_interval: float = 5.0  # seconds between progress lines when stdout is not a terminal
    faults: Optional[Path] = None  # fault schedule file, added to the topology's own `faults:`
    render_only: bool = False  # compose: write the project and print how to run it by hand
    logging: bool = False  # ship every node's lines to Loki (the logging/ stack, or loki_url)
    loki_url: Optional[str] = None  # an existing Loki instead of starting the stack
    gpt_config: Optional[Path] = None  # train this gpt_config.yaml's GPT instead of the topology's model
    calibrate: bool = False  # virtual: measure this machine's training step into the reference device profile


def default_run_dir(topo: Topology, algo: str, now: Optional[float] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path("runs") / f"{topo.name}-{algo}-{stamp}"


def overrides_for(topo: Topology, opts: SimOptions, algo: str, loki_url: Optional[str] = None) -> RunOverrides:
    extra: dict[str, Any] = {"loki_url": loki_url} if loki_url else {}
    if "eval_steps" not in topo.training.extra:
        extra["eval_steps"] = algorithms.get(algo).sim_eval_steps
    if opts.wandb:
        extra["wandb"] = "auto"  # online with a key, else offline; never prompts
    return RunOverrides(algorithm=algo, epochs=opts.epochs, max_steps=opts.max_steps, seed=opts.seed, extra=extra,
                        gpt_config=opts.gpt_config)
