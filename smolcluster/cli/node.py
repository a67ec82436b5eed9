"""The training roles a user starts on each machine: server, worker, and the cluster key."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolcluster.cli.options import ALGO_HELP

RUN_NAME_HELP = ("The run this node belongs to: the `run` label of its log lines (default: the run dir's name, "
                 "or RUN for RUN/nodes/HOST and runs/RUN/HOST).")


def register(app: typer.Typer) -> None:
    @app.command()
    def server(
        algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
        config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with nn_config.yaml and cluster_config_<algo>.yaml."),
        run_dir: Path = typer.Option(Path("runs/latest"), "--run-dir", help="Where logs, metrics, checkpoints and summary.json go."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the checkpoint dir."),
        bind: Optional[str] = typer.Option(None, "--bind", help="Address to listen on (default 0.0.0.0, every interface; without a cluster key the server warns that anyone who can reach it can join)."),
        port: Optional[int] = typer.Option(None, "--port", help="Override the port from the cluster config (0 picks a free one)."),
        slowdown: float = typer.Option(1.0, "--slowdown", help="Stretch compute by this factor (device emulation)."),
        run_name: Optional[str] = typer.Option(None, "--run-name", envvar="SMOLCLUSTER_RUN_NAME", help=RUN_NAME_HELP),
    ) -> None:
        """Run the parameter server (rank 0)."""
        from smolcluster.core.training.node import run_server

        run_server(algo=algo, config_dir=config_dir, run_dir=run_dir, resume=resume, bind=bind, port=port, slowdown=slowdown,
                   run_name=run_name)


    @app.command()
    def worker(
        rank: int = typer.Argument(..., help="This worker's rank (1..num_workers)."),
        hostname: str = typer.Argument(..., help="This worker's hostname; the server address comes from host_ip[hostname]."),
        algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
        config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with nn_config.yaml and cluster_config_<algo>.yaml."),
        run_dir: Path = typer.Option(Path("runs/latest"), "--run-dir", help="Where this worker's logs and metrics go."),
        connect: Optional[str] = typer.Option(None, "--connect", help="HOST:PORT to dial instead of host_ip[hostname]:port (e.g. a link proxy)."),
        slowdown: float = typer.Option(1.0, "--slowdown", help="Stretch compute by this factor (device emulation)."),
        run_name: Optional[str] = typer.Option(None, "--run-name", envvar="SMOLCLUSTER_RUN_NAME", help=RUN_NAME_HELP),
    ) -> None:
        """Run one worker."""
        from smolcluster.core.training.node import run_worker

        run_worker(rank=rank, hostname=hostname, algo=algo, config_dir=config_dir, run_dir=run_dir, connect=connect, slowdown=slowdown,
                   run_name=run_name)


    @app.command()
    def keygen(
        path: Path = typer.Argument(..., help="Where to write the cluster key (copy it to every node)."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing key file."),
    ) -> None:
        """Write a new random cluster key (32 bytes, hex, mode 0600). Nodes read it from the file named by cluster_key_file in the cluster config, or from $SMOLCLUSTER_CLUSTER_KEY."""
        from smolcluster.core.net.auth import write_key_file

        write_key_file(path, force=force)
        typer.echo(f"wrote a new cluster key to {path} (mode 0600); copy it to every node")
