"""Collect: every node's run directory, brought home into one local run directory laid out like a sim
run's (summary.json at the top, nodes/NODE/...), so `smolcluster report` and `compare` work on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from smolcluster.common.files import write_atomic
from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.preflight import Check
from smolcluster.deploy.runner import Runner
from smolcluster.testbed.report import PLOTS_MISSING, RunSummary, build_summary, plots_available, write_plots, write_summary
from smolcluster.testbed.report.summary import SUMMARY_FILE


def pull_node(runner: Runner, plan: DeployPlan, node: NodePlan, dest: Path) -> Check:
    local = dest / "nodes" / node.name
    local.mkdir(parents=True, exist_ok=True)
    remote = f"{node.host.spec.workdir.rstrip('/')}/{node.run_dir(plan.run_name)}/"
    res = runner.rsync_pull(node.host, remote, f"{local}/")
    if not res.ok:
        return Check(node.name, "collect", "fail", f"could not copy {remote}: {res.reason()}", phase="collect")
    return Check(node.name, "collect", "ok", f"{remote} -> {local}", phase="collect")


def hardware_summary(plan: DeployPlan, run_dir: Path) -> RunSummary:
    """The server's summary plus what a sim summary adds (nodes, evals, time to 90/95 %), backend 'hardware'."""
    server_file = run_dir / "nodes" / plan.server.name / SUMMARY_FILE
    server_summary = json.loads(server_file.read_text()) if server_file.is_file() else {}
    return build_summary(server_summary, backend="hardware", nodes_dir=run_dir / "nodes", server_name=plan.server.name,
                         workers=[w.name for w in plan.workers], hosts={n.name: n.host.destination for n in plan.nodes},
                         topology=Path(plan.topology_file).stem if plan.topology_file else None,
                         topology_file=plan.topology_file, run_name=plan.run_name,
                         wall_time_s=server_summary.get("wall_time_s"))


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
                write_atomic(dest / name, (plan.local_dir / name).read_bytes())
        (dest / "config").mkdir(exist_ok=True)
        for f in plan.config_dir.glob("*.yaml"):
            write_atomic(dest / "config" / f.name, f.read_bytes())
    summary = hardware_summary(plan, dest)
    write_summary(dest / SUMMARY_FILE, summary)
    if not summary.algorithm:
        echo(Check(plan.server.name, "summary", "warn", "the server wrote no summary.json (still running, or killed)",
                   phase="collect").line())
    if not plots_available():
        echo(f"collect    {PLOTS_MISSING}")
    else:
        try:
            echo(f"collect    plots: {', '.join(str(p) for p in write_plots(dest))}")
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the collected run
            echo(f"collect    plots: skipped ({type(e).__name__}: {e})")
    echo(f"collect    run dir: {dest}  (smolcluster report {dest})")
    return all(c.level != "fail" for c in checks)
