"""The virtual backend's compute reference: this machine's training step, per sample.

`smolcluster sim FILE --backend virtual --calibrate` times the topology's model (forward, backward and
an optimizer step on one thread, as a sim node runs it) and writes the figure into the reference
device's `ms_per_sample` in the profiles file, so later virtual runs charge what a local run's node of
speed 1.0 would take here. A device without a figure of its own costs the reference x its slowdown.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from smolcluster.common.errors import ConfigError, SimError
from smolcluster.common.files import write_atomic
from smolcluster.core.training.config import RunConfig
from smolcluster.core.training.models import build_model, loss_fn
from smolcluster.core.training.optim import build_optimizer
from smolcluster.testbed.profiles import default_profiles_path, load_device_profiles

REFERENCE_DEVICE = "mac-mini"  # speed 1.0: what the local backend runs at this machine's own speed


def reference_ms_per_sample(path: Optional[Path] = None) -> float:
    path = path or default_profiles_path()
    device = load_device_profiles(path).get(REFERENCE_DEVICE)
    if device is None or device.ms_per_sample is None:
        raise ConfigError(path, f"devices.{REFERENCE_DEVICE}.ms_per_sample", "missing: the virtual backend's compute reference",
                          "run `smolcluster sim FILE --backend virtual --calibrate` once to measure it here")
    return device.ms_per_sample


def measure_ms_per_sample(cfg: RunConfig, steps: int = 100, repeats: int = 5) -> float:
    """Median over `repeats` of `steps` training steps of cfg's model at its batch size, per sample."""
    if cfg.gpt is not None or cfg.nn.model.type != "SimpleNN":
        raise SimError("--calibrate measures the MNIST model (SimpleNN); the virtual backend trains only that")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every sim node
    try:
        model = build_model(cfg.nn.model, seed=cfg.cluster.seed)
        optimizer = build_optimizer(cfg.nn.optimizer, model.parameters(), cfg.nn.learning_rate, weight_decay=cfg.nn.weight_decay)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(cfg.nn.batch_size, cfg.nn.model.input_dim, generator=g)
        y = torch.randint(0, cfg.nn.model.out, (cfg.nn.batch_size,), generator=g)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            optimizer.step()

        for _ in range(20):  # warm up (first calls allocate, the optimizer builds its state)
            step()
        per_sample = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            per_sample.append((time.perf_counter() - t0) * 1000.0 / (steps * cfg.nn.batch_size))
        return statistics.median(per_sample)
    finally:
        torch.set_num_threads(threads)


def write_reference(ms: float, path: Optional[Path] = None) -> Path:
    """Set devices.<reference>.ms_per_sample in the profiles file, keeping its comments and layout."""
    path = path or default_profiles_path()
    lines = path.read_text().splitlines(keepends=True)
    in_devices = in_ref = False
    value = f"{ms:.4g}"
    for i, line in enumerate(lines):
        if re.match(r"^\S", line):
            in_devices, in_ref = line.startswith("devices:"), False
        elif in_devices and re.match(r"^  \S", line):
            if in_ref:  # the reference entry had no ms_per_sample: add it at its end
                lines.insert(i, f"    ms_per_sample: {value}\n")
                break
            in_ref = line.strip() == f"{REFERENCE_DEVICE}:"
        elif in_ref and line.strip().startswith("ms_per_sample:"):
            lines[i] = f"    ms_per_sample: {value}\n"
            break
    else:
        if not in_ref:
            raise ConfigError(path, f"devices.{REFERENCE_DEVICE}", "not found", f"add a {REFERENCE_DEVICE} device profile")
        lines.append(f"    ms_per_sample: {value}\n")
    write_atomic(path, "".join(lines))
    return path
