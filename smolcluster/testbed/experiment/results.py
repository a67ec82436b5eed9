"""An experiment directory's numbers: results.json, the report table and the plots.

Per arm, over its finished seeds: time to each target (median, 95 % bootstrap interval, seeds that got
there), final test accuracy, samples/s (every worker's trained samples per second of the server's wall
time), bytes moved per sample (every worker's own traffic, in and out), late and rejected pushes, and
against the single-process reference on the same samples (EDP: one shard; SyncPS, DDP: every worker's
batch unioned) the final accuracy's difference in points. Times are seconds from the server's start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from smolcluster.common.files import write_atomic
from smolcluster.common.text import format_bytes, table
from smolcluster.core import algorithms
from smolcluster.testbed.experiment.layout import REFERENCE_KINDS, reference_file, run_dir_of, run_finished
from smolcluster.testbed.experiment.spec import Experiment
from smolcluster.testbed.experiment.stats import interval, time_to_interval

RESULTS = "results.json"
REPORT = "report.txt"


def run_numbers(run_dir: Path, targets: tuple[float, ...]) -> dict[str, Any]:
    """One finished run's numbers, as results.json lists them under an arm's `runs`."""
    from smolcluster.testbed.report.load import load_run

    run = load_run(run_dir)
    s = run.summary
    workers = [n for n in s.nodes if n.role == "worker"]
    samples = sum(int(e.get("samples") or 0) for w in run.workers for e in run.node_events(w, "end"))
    moved = sum((n.bytes_in or 0) + (n.bytes_out or 0) for n in workers)
    wall = run.wall_time()
    out: dict[str, Any] = {
        "run_dir": str(run_dir.name), "final_accuracy": run.final_accuracy(), "wall_time_s": round(wall, 3),
        "time_to": {f"{t:.2f}": _round(run.time_to_accuracy(t)) for t in targets},
        "samples": samples, "samples_per_s": round(samples / wall, 1) if wall > 0 else None,
        "bytes_per_sample": round(moved / samples, 1) if samples else None,
        "late": run.count("pushes_late", "late"), "rejected": run.count("pushes_rejected", "reject"),
        "curve": [[e.t, e.test_accuracy] for e in s.evals if e.t is not None and e.test_accuracy is not None],
    }
    if s.deadline:
        out["deadline"] = s.deadline
    if s.ddp_links:
        out["ddp_links"] = s.ddp_links
    return out


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 3)


def reference_numbers(exp: Experiment, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in REFERENCE_KINDS:
        per_seed = {}
        for seed in exp.seeds:
            path = reference_file(root, kind, seed)
            if path.exists():
                per_seed[seed] = json.loads(path.read_text())["final_test_accuracy"]
        if per_seed:
            out[kind] = {"seeds": sorted(per_seed), "final_accuracy": interval(list(per_seed.values())),
                         "per_seed": {str(k): v for k, v in per_seed.items()}}
    return out


def collect(exp: Experiment, root: Path) -> dict[str, Any]:
    """results.json's content from what the directory holds now (finished runs only)."""
    refs = reference_numbers(exp, root)
    arms = []
    for arm in exp.arms:
        runs = {seed: run_numbers(run_dir_of(root, arm.name, seed), exp.targets) for seed in exp.seeds
                if run_finished(run_dir_of(root, arm.name, seed))}
        rs = list(runs.values())
        entry: dict[str, Any] = {
            "name": arm.name, "algo": arm.algo, "seeds": sorted(runs),
            "overrides": {k: v for k, v in arm.overrides.items() if k != "algorithm"},
            "final_accuracy": interval([r["final_accuracy"] for r in rs if r["final_accuracy"] is not None]),
            "time_to": {f"{t:.2f}": time_to_interval([r["time_to"][f"{t:.2f}"] for r in rs]) for t in exp.targets},
            "samples_per_s": interval([r["samples_per_s"] for r in rs if r["samples_per_s"] is not None]),
            "bytes_per_sample": interval([r["bytes_per_sample"] for r in rs if r["bytes_per_sample"] is not None]),
            "late": interval([r["late"] for r in rs]), "rejected": interval([r["rejected"] for r in rs]),
        }
        kind = "union" if algorithms.get(arm.algo).synchronous else "single"
        ref = refs.get(kind, {}).get("per_seed", {})
        diffs = [100 * (r["final_accuracy"] - ref[str(seed)]) for seed, r in runs.items()
                 if str(seed) in ref and r["final_accuracy"] is not None]
        if diffs:
            entry["vs_reference_pt"] = {"reference": kind, **interval(diffs)}
        deadlines = [r["deadline"].get("median_s", r["deadline"].get("seconds")) for r in rs if r.get("deadline")]
        if deadlines:
            entry["deadline_s"] = interval([d for d in deadlines if d is not None])
        links = {r["ddp_links"]["mode"] for r in rs if r.get("ddp_links")}
        if links:
            entry["ddp_links"] = sorted(links)
        entry["runs"] = {str(seed): r for seed, r in runs.items()}
        arms.append(entry)
    return {"experiment": exp.name, "file": str(exp.file), "topology": str(exp.topology_file), "backend": exp.backend,
            "seeds": list(exp.seeds), "targets": list(exp.targets), "times": "seconds from the server's start",
            "reference": refs, "arms": arms}


def write_results(exp: Experiment, root: Path) -> dict[str, Any]:
    results = collect(exp, root)
    write_atomic(root / RESULTS, json.dumps(results, indent=2))
    write_atomic(root / REPORT, report_text(results))
    write_plots(results, root)
    return results


def _iv(d: Optional[dict], spec: str = ".1f", unit: str = "") -> str:
    if not d or d.get("median") is None:
        return "-"
    lo, hi = d.get("lo"), d.get("hi")
    bound = (lambda v: "inf" if v is None else format(v, spec))
    return f"{d['median']:{spec}}{unit} [{bound(lo)}, {bound(hi)}]"


def _time_to(d: dict, seeds: int) -> str:
    if d["reached"] == 0:
        return f"not reached (0/{seeds})"
    return f"{_iv(d)} ({d['reached']}/{seeds})" if d.get("median") is not None else f"- ({d['reached']}/{seeds})"


def report_text(results: dict[str, Any]) -> str:
    """The per-arm table: medians over seeds with 95 % bootstrap intervals [lo, hi]."""
    targets = [f"{t:.2f}" for t in results["targets"]]
    headers = ["arm", "algo", "seeds"] + [f"time to {float(t):.0%} (s)" for t in targets] + \
              ["final acc (%)", "vs ref (pt)", "samples/s", "bytes/sample", "late", "rejected"]
    rows = []
    for a in results["arms"]:
        n = len(a["seeds"])
        fa = a["final_accuracy"]
        pct = {k: (None if v is None else 100 * v) for k, v in fa.items()} if fa.get("median") is not None else None
        vs = a.get("vs_reference_pt")
        rows.append([a["name"], a["algo"], str(n)] + [_time_to(a["time_to"][t], n) for t in targets]
                    + [_iv(pct, ".2f"), (_iv(vs, "+.2f") + (" u" if vs["reference"] == "union" else " s")) if vs else "-",
                       _iv(a["samples_per_s"], ".0f"),
                       format_bytes(a["bytes_per_sample"]["median"]) if a["bytes_per_sample"]["median"] is not None else "-",
                       _iv(a["late"], ".0f"), _iv(a["rejected"], ".0f")])
    lines = [f"Experiment {results['experiment']} ({results['file']}), {results['backend']} backend, "
             f"seeds {', '.join(map(str, results['seeds']))}",
             "  median over seeds [95 % bootstrap interval]; times in seconds from the server's start; "
             "(k/n) = seeds that reached the target", ""]
    lines.append(table(headers, rows))
    refs = results.get("reference") or {}
    if refs:
        lines.append("")
        lines.append("  vs ref: final accuracy minus the single-process reference on the same samples, per seed "
                     "(s = one shard at the workers' batch, EDP's; u = every worker's batch unioned, a synchronous step's): "
                     + "; ".join(f"{k} {_iv({kk: (None if vv is None else 100 * vv) for kk, vv in r['final_accuracy'].items()}, '.2f')} %"
                                 for k, r in refs.items()))
    for a in results["arms"]:
        notes = []
        if a.get("deadline_s"):
            notes.append(f"deadline median {_iv(a['deadline_s'], '.3f')} s")
        if a.get("ddp_links") and a["ddp_links"] != ["routed"]:
            notes.append(f"gloo links {'/'.join(a['ddp_links'])}: not every pair crossed the emulated links (unshaped)")
        elif a.get("ddp_links"):
            notes.append("gloo links routed through the topology's hop proxies")
        if notes:
            lines.append(f"  {a['name']}: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def median_curve(curves: list[list[list[float]]], points: int = 60) -> tuple[list[float], list[float], list[float], list[float]]:
    """Accuracy against time over seeds: on a common grid, each seed's last evaluation so far; the median
    and a 95 % bootstrap interval of it per point. (t, median, lo, hi)."""
    from smolcluster.testbed.experiment.stats import bootstrap_median

    curves = [c for c in curves if c]
    if not curves:
        return [], [], [], []
    end = max(c[-1][0] for c in curves)
    grid = [end * i / (points - 1) for i in range(points)]

    def at(c: list[list[float]], t: float) -> Optional[float]:
        seen = [a for ct, a in c if ct <= t]
        return seen[-1] if seen else None

    ts, med, lo, hi = [], [], [], []
    for t in grid:
        vals = [v for v in (at(c, t) for c in curves) if v is not None]
        if len(vals) < len(curves):
            continue
        m, a, b = bootstrap_median(vals, resamples=300)
        ts.append(t), med.append(m), lo.append(a if a is not None else m), hi.append(b if b is not None else m)
    return ts, med, lo, hi


def write_plots(results: dict[str, Any], root: Path) -> list[Path]:
    """accuracy.png (median test accuracy against time per arm, with its interval band) and
    time_to_target.png (time to each target per arm, median with interval). [] without matplotlib."""
    from smolcluster.testbed.report.plots import _pyplot, plots_available

    if not plots_available():
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a in results["arms"]:
        ts, med, lo, hi = median_curve([r["curve"] for r in a["runs"].values()])
        if ts:
            line, = ax.plot(ts, med, label=f"{a['name']} ({len(a['seeds'])} seeds)")
            ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.2)
    for t in results["targets"]:
        ax.axhline(t, color="grey", linestyle=":", linewidth=0.8)
    ax.set_ylim(max(0.0, min(results["targets"]) - 0.1), 1.0)
    ax.set_xlabel("seconds from the server's start")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results['experiment']}: median over seeds, 95 % bootstrap band")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths = [root / "accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    targets = [f"{t:.2f}" for t in results["targets"]]
    width = 0.8 / max(1, len(targets))
    for j, t in enumerate(targets):
        xs, ys, errs, labels = [], [], [[], []], []
        for i, a in enumerate(results["arms"]):
            d = a["time_to"][t]
            if d["median"] is None:
                continue
            xs.append(i + (j - (len(targets) - 1) / 2) * width)
            ys.append(d["median"])
            errs[0].append(d["median"] - (d["lo"] if d["lo"] is not None else d["median"]))
            errs[1].append((d["hi"] if d["hi"] is not None else d["median"]) - d["median"])
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=f"{float(t):.0%}")
    ax.set_xticks(range(len(results["arms"])))
    ax.set_xticklabels([f"{a['name']}" for a in results["arms"]])
    ax.set_ylabel("seconds to target (median, 95 % interval)")
    ax.set_title(f"{results['experiment']}: time to target accuracy (arms that never got there have no bar)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(root / "time_to_target.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def load_results(root: Path) -> dict[str, Any]:
    path = root / RESULTS
    if not path.exists():
        from smolcluster.common.errors import SmolclusterError

        raise SmolclusterError(f"{root} has no {RESULTS}: not an experiment directory (or no run finished yet)")
    return json.loads(path.read_text())

