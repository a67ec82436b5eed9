"""`smolcluster report` and `smolcluster compare`: read run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(run_dir: Path = typer.Argument(..., help="A run directory (nodes/<name>/metrics.jsonl, summary.json, faults.jsonl).")) -> None:
        """Print a run's summary table (per node, links, fault reactions) and write its plots into the run dir."""
        from smolcluster.testbed.report import PLOTS_MISSING, load_run, plots_available, summary_table, write_plots

        typer.echo(summary_table(load_run(run_dir)), nl=False)
        if not plots_available():
            typer.echo(PLOTS_MISSING)
            return
        for path in write_plots(run_dir):
            typer.echo(f"wrote {path}")


    @app.command()
    def compare(
        run_a: Path = typer.Argument(..., help="First run directory (e.g. the EDP run)."),
        run_b: Path = typer.Argument(..., help="Second run directory (e.g. the SyncPS run)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write the accuracy overlay PNG (default: compare_<A>_vs_<B>.png beside RUN_A)."),
    ) -> None:
        """Two runs side by side: accuracy, time to 90/95 %, pushes, bytes, throughput, staleness; plus an accuracy plot."""
        from smolcluster.testbed.report import PLOTS_MISSING, load_run, plots_available, write_compare_plot
        from smolcluster.testbed.report import compare as compare_runs

        a, b = load_run(run_a), load_run(run_b)
        typer.echo(compare_runs(a, b), nl=False)
        if not plots_available():
            typer.echo(PLOTS_MISSING)
            return
        target = out or run_a.resolve().parent / f"compare_{a.name}_vs_{b.name}.png"
        typer.echo(f"wrote {write_compare_plot(a, b, target)}")
