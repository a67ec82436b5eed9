"""`smolcluster launch`: the real cluster over SSH and tmux."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolcluster.cli.options import ALGO_HELP


def register(app: typer.Typer) -> None:
    @app.command()
    def launch(
        algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
        config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with the cluster and nn configs (same path on every host)."),
        remote_dir: str = typer.Option("~/smolcluster", "--remote-dir", help="Checkout of this repository on every host."),
        run_name: Optional[str] = typer.Option(None, "--run-name", help="Runs go to runs/NAME/<host> (default: <algo>-<time>)."),
        ssh_user: Optional[str] = typer.Option(None, "--ssh-user", help="SSH user, if not the one in ~/.ssh/config."),
        python: str = typer.Option("python3", "--python", help="Python on the hosts (with smolcluster installed)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the SSH commands instead of running them."),
    ) -> None:
        """Start the server and every worker of the real cluster in tmux sessions over SSH."""
        import time as _time

        from smolcluster.deploy.launch import launch as do_launch
        from smolcluster.deploy.launch import plan_launch

        steps = plan_launch(algo, config_dir, remote_dir, run_name or f"{algo}-{_time.strftime('%Y%m%d-%H%M%S')}", python)
        raise typer.Exit(do_launch(steps, ssh_user=ssh_user, dry_run=dry_run, python=python))
