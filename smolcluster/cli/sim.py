"""`smolcluster sim`: run a topology as an emulated cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolcluster.cli.options import ALGO_HELP


def register(app: typer.Typer) -> None:
    @app.command()
    def sim(
        file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml."),
        algo: Optional[str] = typer.Option(None, "--algo", help=ALGO_HELP + " Default: the topology's training.algorithm."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs over each worker's shard (default: the topology's)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many server updates."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for data shards, init and link jitter (default: the topology's)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where everything goes (default runs/<topology>-<algo>-<timestamp>)."),
        backend: str = typer.Option("local", "--backend", help="local (processes + impairing proxies, no root), compose (docker) or virtual (one process in virtual time: bit-identical reruns, hundreds of nodes)."),
        toxiproxy: Optional[str] = typer.Option(None, "--toxiproxy", help="URL of a real Toxiproxy API to use instead of the embedded one."),
        check: bool = typer.Option(False, "--check", help="Measure every worker->server path (RTT, throughput) against its profile; no training."),
        as_json: bool = typer.Option(False, "--json", help="With --check: print JSON instead of a table."),
        wandb: bool = typer.Option(False, "--wandb", help="Log to W&B (online with a key, else offline; never prompts)."),
        faults: Optional[Path] = typer.Option(None, "--faults", help="Fault schedule file (faults: [...]) added to the topology's own faults."),
        render_only: bool = typer.Option(False, "--render-only", help="With --backend compose: write the compose project and print how to run it by hand."),
        logging: bool = typer.Option(False, "--logging", help="Ship every node's logs and metrics to Loki: the logging/ stack (Grafana), started here, or --loki-url."),
        loki_url: Optional[str] = typer.Option(None, "--loki-url", help="With --logging: an existing Loki to push to instead of starting the stack."),
        gpt_config: Optional[Path] = typer.Option(None, "--gpt-config", help="Train the GPT of this gpt_config.yaml (e.g. configs/gpt_config.yaml) "
                                                  "on WikiText-2 instead of the topology's model; the cluster settings stay the topology's."),
        calibrate: bool = typer.Option(False, "--calibrate", help="With --backend virtual: measure this machine's training step once "
                                       "and write it into the reference device profile (mac-mini's ms_per_sample); no training."),
    ) -> None:
        """Run a topology as an emulated cluster: every node a process, every link hop an impairing proxy
        (--backend virtual: every node in this process, in virtual time)."""
        from smolcluster.testbed.sim.options import SimOptions
        from smolcluster.testbed.sim.run import install_sigterm_as_interrupt, run_sim

        install_sigterm_as_interrupt()
        opts = SimOptions(file=file, algo=algo, epochs=epochs, max_steps=max_steps, seed=seed, run_dir=run_dir, backend=backend,
                          toxiproxy=toxiproxy, check=check, as_json=as_json, wandb=wandb, faults=faults,
                          render_only=render_only, logging=logging or bool(loki_url), loki_url=loki_url, gpt_config=gpt_config,
                          calibrate=calibrate)
        raise typer.Exit(run_sim(opts))
