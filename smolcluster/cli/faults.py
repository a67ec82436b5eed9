"""`smolcluster faults ...`: fault schedules and the fault x algorithm matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    faults_app = typer.Typer(help="Fault injection.", no_args_is_help=True)
    app.add_typer(faults_app, name="faults")

    @faults_app.command("show")
    def faults_show(
        file: Path = typer.Argument(..., help="Topology file (its faults: list is included)."),
        faults: Optional[Path] = typer.Option(None, "--faults", help="Fault schedule file to check and add."),
    ) -> None:
        """Check a fault schedule against a topology and print every fault it fires (random: entries drawn)."""
        from smolcluster.testbed.faults import schedule_for
        from smolcluster.testbed.topology import load_topology

        topo = load_topology(file)
        expanded = schedule_for(topo, faults).expand(topo.training.seed)  # as `smolcluster sim` draws it
        for f in expanded:
            typer.echo(f"{f.name:<36} {f.describe()}")
        typer.echo(f"{len(expanded)} faults")


    @faults_app.command("matrix")
    def faults_matrix(
        as_json: bool = typer.Option(False, "--json", help='Print {"results": [...]} instead of the table.'),
        topology: Optional[Path] = typer.Option(None, "--topology", help="Topology to run on (default topologies/faults-small.yaml: a server and workers w1, w2). Any node names: the faults hit its first worker that routes for nobody."),
        faults: Optional[str] = typer.Option(None, "--faults", help="Comma-separated fault scenarios (default: all)."),
        algos: Optional[str] = typer.Option(None, "--algos", help="Comma-separated algorithms (default: all, e.g. edp,syncps)."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the run directories go (default runs/faults-matrix-<time>)."),
        backend: str = typer.Option("local", "--backend", help="Sim backend of every run: local or compose (docker)."),
    ) -> None:
        """Run every fault x algorithm as a short real sim and print outcome, final accuracy and recovery time."""
        import json as _json
        import sys as _sys
        import time as _time

        from smolcluster.common.errors import ConfigError
        from smolcluster.core import algorithms
        from smolcluster.testbed.faults.matrix import BACKENDS, SCENARIO_NAMES, SMALL_TOPOLOGY, format_matrix, matrix_json, run_matrix

        names = [n.strip() for n in faults.split(",")] if faults else list(SCENARIO_NAMES)
        algo_list = [a.strip() for a in algos.split(",") if a.strip()] if algos else list(algorithms.in_fault_matrix())
        for n in names:
            if n not in SCENARIO_NAMES:
                raise ConfigError(None, "--faults", f"unknown fault scenario {n!r}", f"use some of: {', '.join(SCENARIO_NAMES)}")
        for a in algo_list:
            if a not in algorithms.in_fault_matrix():
                problem = f"unknown algorithm {a!r}" if a not in algorithms.names() else f"{a} is not in the fault matrix"
                raise ConfigError(None, "--algos", problem, f"use some of: {', '.join(algorithms.in_fault_matrix())}")
        if backend not in BACKENDS:
            raise ConfigError(None, "--backend", f"unknown backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
        out = out_dir or Path("runs") / f"faults-matrix-{_time.strftime('%Y%m%d-%H%M%S')}"

        def progress(o) -> None:
            print(f"{o.fault} x {o.algorithm}: {'pass' if o.passed else 'FAIL'} ({o.wall_s:.0f} s, {o.run_dir})", file=_sys.stderr)

        results = run_matrix(names, algo_list, out, topology or SMALL_TOPOLOGY, progress=progress, backend=backend)
        typer.echo(_json.dumps(matrix_json(results), indent=2) if as_json else format_matrix(results))
        raise typer.Exit(0 if all(r.passed for r in results) else 1)
