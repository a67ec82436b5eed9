"""Where things are in an experiment directory (runner.py writes them, results.py reads them)."""

from __future__ import annotations

import json
from pathlib import Path

RUN_MARKER = "experiment-run.json"
REFERENCE_KINDS = ("single", "union")  # shards 1 (EDP's samples, one batch a step) / every worker's batch unioned


def run_dir_of(root: Path, arm: str, seed: int) -> Path:
    return root / "runs" / f"{arm}-seed{seed}"


def reference_file(root: Path, kind: str, seed: int) -> Path:
    return root / "reference" / f"{kind}-seed{seed}.json"


def run_finished(d: Path) -> bool:
    marker = d / RUN_MARKER
    try:
        return json.loads(marker.read_text()).get("exit_code") == 0
    except (OSError, ValueError, AttributeError):
        return False
