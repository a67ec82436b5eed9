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

from smolcluster.common.jsonl import read_jsonl
from smolcluster.common.text import table
from smolcluster.resources import resource_path

TOLERANCE = 0.15
FIDELITY_TOPOLOGIES = ("hybrid.yaml", "home-wifi.yaml")
SCALE_TOPOLOGIES = ("rack-64.yaml", "rack-256.yaml")


def sim(topology: str, backend: str, algo: Optional[str], run_dir: Path, timeout: float = 1800,
        reuse: bool = False) -> dict[str, Any]:
    """One `smolcluster sim` run (with `reuse`, a finished one already in run_dir): its summary.json, plus
    virtual.json's costs, the run's own wall time and the run dir."""
    cmd = [sys.executable, "-m", "smolcluster", "sim", str(resource_path("topologies", topology)), "--backend", backend,
           "--run-dir", str(run_dir)] + (["--algo", algo] if algo else [])
    wall = None
    if not (reuse and (run_dir / "summary.json").exists()):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    costs = json.loads((run_dir / "virtual.json").read_text()) if (run_dir / "virtual.json").exists() else None
    if wall is None:  # reused: the run's own record of its wall time (a virtual summary's times are virtual)
        wall = costs["wall_s"] if costs else s.get("sim_wall_time_s")
    return s | {"process_wall_s": wall, "run_dir": str(run_dir), "costs": costs}


def from_training_start(run_dir: Path, mark: float = 0.9) -> tuple[Optional[float], Optional[float]]:
    """(seconds from the server's first update to the first evaluation >= mark, updates per second from the first
    update to the end): the run without its start-up (local workers spend seconds importing torch before joining)."""
    lines = read_jsonl(next(p for p in (Path(run_dir) / "nodes").iterdir() if (p / "summary.json").exists()) / "metrics.jsonl")
    t0 = next((m["time"] for m in lines if m.get("event") == "training_start"), None)
    end = next((m for m in reversed(lines) if m.get("event") == "end"), None)
    if t0 is None or end is None:
        return None, None
    t90 = next((m["time"] - t0 for m in lines if m.get("event") == "eval" and m.get("test_accuracy", 0) >= mark), None)
    return t90, end["version"] / (end["time"] - t0) if end["time"] > t0 else None


def measures(s: dict[str, Any]) -> dict[str, Optional[float]]:
    """What fidelity compares: time to 90 %, server updates per (run) second (both also from the first update on),
    mean staleness per worker."""
    t90_trained, ups_trained = from_training_start(Path(s["run_dir"]))
    out: dict[str, Optional[float]] = {"time_to_90_s": s.get("time_to_90_s"),
                                       "updates_per_s": s["steps"] / s["wall_time_s"] if s.get("wall_time_s") else None,
                                       "time_to_90_after_first_update_s": t90_trained,
                                       "updates_per_s_after_first_update": ups_trained}
    for w in s.get("per_worker", []):
        out[f"staleness {w['hostname']}"] = w.get("mean_staleness")
    return out


def terms(run_dir: Path) -> dict[str, dict[str, Optional[float]]]:
    """Per worker, from its metrics: compute ms per local step, communication ms per exchange with the server,
    and when it first joined (s after the server's start): the model terms fidelity depends on."""
    server = next(p for p in (run_dir / "nodes").iterdir() if (p / "summary.json").exists())
    start = next((m["time"] for m in read_jsonl(server / "metrics.jsonl") if m.get("event") == "start"), None)
    out = {}
    for node in sorted(p for p in (run_dir / "nodes").iterdir() if p != server):
        lines = read_jsonl(node / "metrics.jsonl")
        steps = [m for m in lines if m.get("event") == "step"]
        joins = [m["time"] for m in lines if m.get("event") == "join"]
        local_steps = (steps[-1]["step"] + 1) if steps else 0
        out[node.name] = {
            "compute_ms_per_step": 1000 * sum(m["compute_s"] for m in steps) / local_steps if local_steps else None,
            "comm_ms_per_exchange": 1000 * sum(m["comm_s"] + m["wait_s"] for m in steps) / len(steps) if steps else None,
            "join_s": joins[0] - start if joins and start is not None else None}
    return out


def terms_rows(out: Path, algos: list[str], local_runs: int, topologies: tuple[str, ...] = FIDELITY_TOPOLOGIES) -> list[dict[str, Any]]:
    """The model terms of the fidelity runs kept under `out`: virtual vs the median of the local runs."""
    rows = []
    for topo in topologies:
        for algo in algos:
            name = f"{Path(topo).stem}-{algo}"
            if not (out / f"{name}-virtual").exists():
                continue
            v = terms(out / f"{name}-virtual")
            ls = [terms(out / f"{name}-local{i + 1}") for i in range(local_runs) if (out / f"{name}-local{i + 1}").exists()]
            for node, vt in v.items():
                for key, value in vt.items():
                    values = [t[node][key] for t in ls if t.get(node, {}).get(key) is not None]
                    rows.append({"topology": Path(topo).stem, "algorithm": algo, "node": node, "term": key, "virtual": value,
                                 "local_median": statistics.median(values) if values else None})
    return rows


def format_terms(rows: list[dict[str, Any]]) -> str:
    return table(["topology", "algorithm", "node", "term", "virtual", "local (median)", "local/virtual"],
                 [[r["topology"], r["algorithm"], r["node"], r["term"], _num(r["virtual"]), _num(r["local_median"]),
                   _num(r["local_median"] / r["virtual"], "{:.2f}") if r["virtual"] and r["local_median"] is not None else "-"]
                  for r in rows], right=(4, 5, 6))


def within(virtual: Optional[float], local: Optional[float]) -> tuple[str, bool]:
    if virtual is None or local is None:
        return "n/a", virtual is None and local is None
    if local == 0:
        return ("0" if virtual == 0 else "inf"), abs(virtual) < 0.05  # staleness ~0 (SyncPS): absolute
    ratio = virtual / local
    return f"{ratio:.2f}", abs(ratio - 1.0) <= TOLERANCE


def fidelity(out: Path, algos: list[str], local_runs: int, topologies: tuple[str, ...] = FIDELITY_TOPOLOGIES,
             progress: Callable[[str], None] = print, reuse: bool = False) -> list[dict[str, Any]]:
    rows = []
    for topo in topologies:
        for algo in algos:
            name = f"{Path(topo).stem}-{algo}"
            progress(f"{name}: virtual")
            v = sim(topo, "virtual", algo, out / f"{name}-virtual", reuse=reuse)
            locals_ = []
            for i in range(local_runs):
                progress(f"{name}: local {i + 1}/{local_runs}")
                locals_.append(sim(topo, "local", algo, out / f"{name}-local{i + 1}", reuse=reuse))
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


def scale(out: Path, topologies: tuple[str, ...] = SCALE_TOPOLOGIES, progress: Callable[[str], None] = print,
          reuse: bool = False) -> list[dict[str, Any]]:
    rows = []
    for topo in topologies:
        progress(f"{topo}: virtual")
        s = sim(topo, "virtual", None, out / f"{Path(topo).stem}-virtual", reuse=reuse)
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
