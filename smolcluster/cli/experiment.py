"""`smolcluster experiment FILE` and `smolcluster experiment show DIR`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def experiment(
        target: str = typer.Argument(..., metavar="FILE | show", help="An experiment file (e.g. experiments/stragglers.yaml), "
                                     "or `show` to reprint an experiment directory's report."),
        show_dir: Optional[Path] = typer.Argument(None, metavar="[DIR]", help="With show: the experiment directory."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the runs go (default runs/experiment-<name>-<timestamp>); "
                                               "an existing one is resumed: finished runs are kept."),
        as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the report (the runs' output goes to stderr)."),
    ) -> None:
        """Run every arm x seed of an experiment file on the sim and report time to target, final accuracy,
        throughput and traffic per arm (medians with 95 % bootstrap intervals); resumable."""
        from smolcluster.common.errors import SmolclusterError
        from smolcluster.testbed.experiment.results import load_results, report_text

        if target == "show":
            if show_dir is None:
                raise SmolclusterError("experiment show needs the experiment directory: smolcluster experiment show DIR")
            results = load_results(show_dir)
            print(json.dumps(results, indent=2) if as_json else report_text(results), end="" if not as_json else "\n")
            return
        if show_dir is not None:
            raise SmolclusterError(f"unexpected argument {show_dir}: use smolcluster experiment FILE [--run-dir DIR]")

        from smolcluster.testbed.experiment.runner import run_experiment
        from smolcluster.testbed.experiment.spec import load_experiment
        from smolcluster.testbed.sim.run import install_sigterm_as_interrupt

        exp = load_experiment(Path(target))
        root = run_dir or Path("runs") / f"experiment-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        install_sigterm_as_interrupt()
        out = sys.stderr if as_json else sys.stdout
        code = run_experiment(exp, root, out=out)
        results = load_results(root)
        if as_json:
            print(json.dumps(results, indent=2))
        else:
            print("\n" + report_text(results), end="")
            from smolcluster.testbed.report.plots import PLOTS_MISSING

            plots = [p for p in (root / "accuracy.png", root / "time_to_target.png") if p.exists()]
            print(f"results: {root / 'results.json'}, report: {root / 'report.txt'}, "
                  + (f"plots: {', '.join(map(str, plots))}" if plots else PLOTS_MISSING))
        raise typer.Exit(code)
