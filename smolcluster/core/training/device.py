"""Which device a node computes on: `device: auto|cpu|mps|cuda` in nn_config.yaml.

auto picks MPS on Apple silicon when this torch build has it, else CUDA where a GPU is present, else
the CPU (as the original project's device.py did). Tensors on the wire are always CPU tensors: a node
moves what it receives to its device and what it sends back to the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.common.errors import ConfigError


@dataclass(frozen=True)
class Accelerators:
    """What this machine's torch can use; `probe()` asks torch, tests pass their own."""

    mps: bool
    cuda: bool

    @staticmethod
    def probe() -> "Accelerators":
        mps = getattr(torch.backends, "mps", None)
        return Accelerators(mps=bool(mps is not None and mps.is_available()), cuda=torch.cuda.is_available())


def torch_build() -> str:
    """e.g. '2.13.0+cpu (cpu)' or '2.14.1 (cuda 12.8)': which torch build runs, for summaries and benchmarks."""
    cuda = getattr(torch.version, "cuda", None)
    return f"{torch.__version__} ({'cuda ' + cuda if cuda else 'cpu'})"


def pick_device(wanted: str, available: Accelerators | None = None, file: str | Path | None = None,
                key: str = "device") -> torch.device:
    """The device for `device: wanted` (the config's `key`); asking for an accelerator this machine lacks is a ConfigError."""
    have = available if available is not None else Accelerators.probe()
    if wanted == "auto":
        return torch.device("mps" if have.mps else "cuda" if have.cuda else "cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if wanted in ("mps", "cuda") and getattr(have, wanted):
        return torch.device(wanted)
    if wanted in ("mps", "cuda"):
        what = "Apple-silicon GPU (MPS)" if wanted == "mps" else "CUDA GPU"
        raise ConfigError(file, key, f"{wanted} asked for, but this torch ({torch_build()}) sees no {what}",
                          f"use {key}: auto (the best this machine has) or {key}: cpu")
    raise ConfigError(file, key, f"unknown device {wanted!r}", "use auto, cpu, mps or cuda")


def torch_info(import_rss_mb: float | None = None) -> dict:
    """Which torch build ran (version, cpu or cuda) and a process's memory once it is imported, for
    summaries and benchmarks: a CUDA build on a CPU-only machine costs ~2x the memory per node."""
    cuda = getattr(torch.version, "cuda", None)
    return {"version": torch.__version__, "build": f"cuda {cuda}" if cuda else "cpu",
            "import_rss_mb": round(import_rss_mb, 1) if import_rss_mb is not None else None}


def measure_import_rss_mb(python: str | None = None) -> float:
    """Peak RSS of a fresh `python -c 'import torch'` (what every node pays before it does anything)."""
    import subprocess
    import sys

    code = ("import resource, sys, torch; r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "print(r / 2**20 if sys.platform == 'darwin' else r / 1024)")
    out = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout.strip())
