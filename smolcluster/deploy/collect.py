"""Collect: every node's run directory, brought home into one local run directory laid out like a sim
run's (summary.json at the top, nodes/NODE/...), so `smolcluster report` and `compare` work on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.preflight import Check
from smolcluster.deploy.runner import Runner
from smolcluster.testbed.sim.run import ACCURACY_MARKS, time_to_accuracy


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a half-written last line
    return out


def pull_node(runner: Runner, plan: DeployPlan, node: NodePlan, dest: Path) -> Check:
    local = dest / "nodes" / node.name
    local.mkdir(parents=True, exist_ok=True)
    remote = f"{node.host.spec.workdir.rstrip('/')}/{node.run_dir(plan.run_name)}/"
    res = runner.rsync_pull(node.host, remote, f"{local}/")
    if not res.ok:
        return Check(node.name, "collect", "fail", f"could not copy {remote}: {res.reason()}", phase="collect")
    return Check(node.name, "collect", "ok", f"{remote} -> {local}", phase="collect")


def hardware_summary(plan: DeployPlan, run_dir: Path) -> dict[str, Any]:
    """The server's summary plus what a sim summary adds (nodes, evals, time to 90/95 %), backend 'hardware'."""
    server_dir = run_dir / "nodes" / plan.server.name
    server_summary = json.loads((server_dir / "summary.json").read_text()) if (server_dir / "summary.json").is_file() else {}
    metrics = _read_jsonl(server_dir / "metrics.jsonl")
    start = next((m["time"] for m in metrics if m.get("event") == "start"), None)
    evals = [m for m in metrics if m.get("event") == "eval"]
    per_worker = {w["hostname"]: w for w in server_summary.get("per_worker", [])}
    nodes = [{"node": plan.server.name, "role": "server", "host": plan.server.host.destination, "device": "-", "slowdown": 1,
              "steps": server_summary.get("steps"), "samples_per_s": None, "mean_staleness": None,
              "bytes_out": server_summary.get("bytes_sent"), "bytes_in": server_summary.get("bytes_received"),
              "late": server_summary.get("pushes_late"), "rejected": server_summary.get("pushes_rejected")}]
    for w in plan.workers:
        pw = per_worker.get(w.name, {})
        end = next((m for m in reversed(_read_jsonl(run_dir / "nodes" / w.name / "metrics.jsonl")) if m.get("event") == "end"), {})
        sps = end.get("samples_per_s", pw.get("samples_per_s"))
        nodes.append({"node": w.name, "role": "worker", "host": w.host.destination, "device": "-", "slowdown": 1,
                      "steps": end.get("steps", pw.get("steps")), "samples_per_s": round(sps, 2) if isinstance(sps, float) else sps,
                      "mean_staleness": pw.get("mean_staleness"), "pushes": pw.get("pushes"),
                      "bytes_out": None, "bytes_in": None, "late": pw.get("late"), "rejected": pw.get("rejected")})
    marks = {f"time_to_{round(m * 100)}_s": time_to_accuracy(evals, start, m) for m in ACCURACY_MARKS}
    return {**server_summary, "topology": Path(plan.topology_file).stem if plan.topology_file else None,
            "topology_file": plan.topology_file, "backend": "hardware", "run_name": plan.run_name, "run_start": start,
            "sim_wall_time_s": server_summary.get("wall_time_s"), **marks,
            "evals": [{"t": round(e["time"] - start, 2) if start else None, "version": e.get("version"),
                       "test_accuracy": e.get("test_accuracy"), "test_loss": e.get("test_loss")} for e in evals],
            "links": [], "nodes": nodes, "faults": []}


def collect(runner: Runner, plan: DeployPlan, dest: Path, echo: Callable[[str], None]) -> bool:
    dest.mkdir(parents=True, exist_ok=True)
    checks = runner.map(lambda n: pull_node(runner, plan, n, dest), plan.nodes)
    for c in checks:
        echo(c.line())
    if runner.dry_run:
        return True
    if dest.resolve() != plan.local_dir.resolve():  # the configs and topology travel with the results
        for name in ("topology.yaml", "launch.json"):
            if (plan.local_dir / name).is_file():
                (dest / name).write_bytes((plan.local_dir / name).read_bytes())
        (dest / "config").mkdir(exist_ok=True)
        for f in plan.config_dir.glob("*.yaml"):
            (dest / "config" / f.name).write_bytes(f.read_bytes())
    summary = hardware_summary(plan, dest)
    tmp = dest / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(dest / "summary.json")
    if not summary.get("algorithm"):
        echo(Check(plan.server.name, "summary", "warn", "the server wrote no summary.json (still running, or killed)",
                   phase="collect").line())
    try:
        from smolcluster.testbed.report import write_plots

        written = write_plots(dest)
        echo(f"collect    plots: {', '.join(str(p) for p in written)}")
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the collected run
        echo(f"collect    plots: skipped ({type(e).__name__}: {e})")
    echo(f"collect    run dir: {dest}  (smolcluster report {dest})")
    return all(c.level != "fail" for c in checks)
