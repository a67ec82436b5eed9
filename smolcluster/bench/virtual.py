"""`smolcluster bench virtual`: the virtual backend against the local one, and at scale.

Fidelity: for each topology x algorithm, one virtual run and N local runs (the median of them is the
reference) of `smolcluster sim`, compared on time to 90 % accuracy, server updates per second and mean
staleness per worker; a cell passes within +-15 %. Scale: rack-64 and rack-256 on the virtual backend,
wall seconds per simulated second, peak memory, final accuracy. Every run is the CLI in a subprocess,
its run dir kept under --out.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from smolcluster.common.text import table
from smolcluster.resources import resource_path

TOLERANCE = 0.15
FIDELITY_TOPOLOGIES = ("hybrid.yaml", "home-wifi.yaml")
SCALE_TOPOLOGIES = ("rack-64.yaml", "rack-256.yaml")


def sim(topology: str, backend: str, algo: Optional[str], run_dir: Path, timeout: float = 1800) -> dict[str, Any]:
    """One `smolcluster sim` run; its summary.json (plus virtual.json's costs and the run's own wall time)."""
    cmd = [sys.executable, "-m", "smolcluster", "sim", str(resource_path("topologies", topology)), "--backend", backend,
           "--run-dir", str(run_dir)] + (["--algo", algo] if algo else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    costs = run_dir / "virtual.json"
    return s | {"process_wall_s": wall, "costs": json.loads(costs.read_text()) if costs.exists() else None}


def measures(s: dict[str, Any]) -> dict[str, Optional[float]]:
    """What fidelity compares: time to 90 %, server updates per (run) second, mean staleness per worker."""
    out: dict[str, Optional[float]] = {"time_to_90_s": s.get("time_to_90_s"),
                                       "updates_per_s": s["steps"] / s["wall_time_s"] if s.get("wall_time_s") else None}
    for w in s.get("per_worker", []):
        out[f"staleness {w['hostname']}"] = w.get("mean_staleness")
    return out


def within(virtual: Optional[float], local: Optional[float]) -> tuple[str, bool]:
    if virtual is None or local is None:
        return "n/a", virtual is None and local is None
    if local == 0:
        return ("0" if virtual == 0 else "inf"), abs(virtual) < 0.05  # staleness ~0 (SyncPS): absolute
    ratio = virtual / local
    return f"{ratio:.2f}", abs(ratio - 1.0) <= TOLERANCE


def fidelity(out: Path, algos: list[str], local_runs: int, topologies: tuple[str, ...] = FIDELITY_TOPOLOGIES,
             progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = []
    for topo in topologies:
        for algo in algos:
            name = f"{Path(topo).stem}-{algo}"
            progress(f"{name}: virtual")
            v = sim(topo, "virtual", algo, out / f"{name}-virtual")
            locals_ = []
            for i in range(local_runs):
                progress(f"{name}: local {i + 1}/{local_runs}")
                locals_.append(sim(topo, "local", algo, out / f"{name}-local{i + 1}"))
            vm, lms = measures(v), [measures(s) for s in locals_]
            for key in vm:
                values = [m.get(key) for m in lms if m.get(key) is not None]
                local = statistics.median(values) if values else None
                ratio, ok = within(vm[key], local)
                rows.append({"topology": Path(topo).stem, "algorithm": algo, "measure": key, "virtual": vm[key],
                             "local_median": local, "local_runs": [m.get(key) for m in lms], "ratio": ratio, "ok": ok,
                             "virtual_wall_s": v["process_wall_s"], "local_wall_s": statistics.median(s["process_wall_s"] for s in locals_),
                             "virtual_accuracy": v["final_test_accuracy"],
                             "local_accuracy": statistics.median(s["final_test_accuracy"] for s in locals_)})
    return rows


def scale(out: Path, topologies: tuple[str, ...] = SCALE_TOPOLOGIES, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = []
    for topo in topologies:
        progress(f"{topo}: virtual")
        s = sim(topo, "virtual", None, out / f"{Path(topo).stem}-virtual")
        c = s["costs"]
        rows.append({"topology": Path(topo).stem, "workers": s["workers"], "algorithm": s["algorithm"],
                     "virtual_s": c["virtual_s"], "wall_s": c["wall_s"], "process_wall_s": round(s["process_wall_s"], 1),
                     "wall_s_per_virtual_s": c["wall_s_per_virtual_s"], "peak_rss_mb": c["peak_rss_mb"],
                     "final_test_accuracy": s["final_test_accuracy"]})
    return rows


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def format_fidelity(rows: list[dict[str, Any]]) -> str:
    return table(["topology", "algorithm", "measure", "virtual", "local (median)", "local runs", "virtual/local", "±15 %"],
                 [[r["topology"], r["algorithm"], r["measure"], _num(r["virtual"]), _num(r["local_median"]),
                   " ".join(_num(x) for x in r["local_runs"]), r["ratio"], "ok" if r["ok"] else "OFF"] for r in rows],
                 right=(3, 4, 6))


def format_scale(rows: list[dict[str, Any]]) -> str:
    return table(["topology", "workers", "algorithm", "simulated s", "wall s", "wall s / simulated s", "peak MB", "accuracy"],
                 [[r["topology"], str(r["workers"]), r["algorithm"], _num(r["virtual_s"]), _num(r["process_wall_s"], "{:.1f}"),
                   _num(r["wall_s_per_virtual_s"]), _num(r["peak_rss_mb"], "{:.0f}"), _num(r["final_test_accuracy"], "{:.4f}")]
                  for r in rows], right=(1, 3, 4, 5, 6, 7))
