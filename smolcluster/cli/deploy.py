"""`smolcluster launch`: the real cluster over SSH and tmux (what launch_edp.sh / launch_syncps.sh call)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolcluster.cli.options import ALGO_HELP


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"help_option_names": ["-h", "--help"]})
    def launch(
        file: Optional[Path] = typer.Argument(None, help="Topology file with the nodes (and their host: blocks), e.g. topologies/hybrid.yaml."),
        algo: Optional[str] = typer.Option(None, "--algo", help=ALGO_HELP + " Default: the topology's training.algorithm."),
        preflight: bool = typer.Option(False, "--preflight", help="Only check every host (ssh, Python, tools, disk, clock, project, torch, data, port, routes); change nothing."),
        status: bool = typer.Option(False, "--status", help="Per node: running, exited (code) or not started, and its last metrics line."),
        stop: bool = typer.Option(False, "--stop", help="Stop the run: Ctrl-C to the server (final checkpoint, summary), then whatever is left."),
        wait: bool = typer.Option(False, "--wait", help="After launching (or for --run-name's run), stay until the server exits, then collect."),
        collect: Optional[Path] = typer.Option(None, "--collect", is_flag=False, flag_value=".", metavar="[DIR]",
                                               help="Bring every node's results home into one run dir (default runs/RUN) for `smolcluster report`."),
        attach: bool = typer.Option(False, "--attach", help="A local tmux session with one pane per node, attached to each node's session."),
        check: bool = typer.Option(False, "--check", help="Measure every worker->server path (RTT, throughput) against the topology's profiles."),
        as_json: bool = typer.Option(False, "--json", help="With --check: print JSON."),
        write_profiles: Optional[Path] = typer.Option(None, "--write-profiles", help="With --check: write the measured links and device step times as profiles (YAML)."),
        run_name: Optional[str] = typer.Option(None, "--run-name", help="Name of the run (default: TOPOLOGY-ALGO-TIMESTAMP); --status etc. act on it (default: the latest)."),
        ssh_config: Optional[str] = typer.Option(None, "--ssh-config", help="An ssh config file, passed to every ssh and rsync (-F)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print every ssh/rsync/tmux command that would run; run none."),
        no_sync: bool = typer.Option(False, "--no-sync", help="Do not copy code, configs, data and key (the hosts already have them)."),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="Cluster key to use (default: $SMOLCLUSTER_CLUSTER_KEY, else a fresh one per run)."),
        port: Optional[int] = typer.Option(None, "--port", help="Server port (default 65432)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs over each worker's shard (default: the topology's)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many server updates."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: the topology's)."),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where this controller keeps its runs (launch.json, collected results)."),
        grace: float = typer.Option(30.0, "--grace", help="With --stop: seconds to wait for a clean exit before killing."),
        config_dir: Optional[Path] = typer.Option(None, "--config-dir", help="The original project's layout: nodes from cluster_config_<algo>.yaml (no topology file)."),
        ssh_user: Optional[str] = typer.Option(None, "--ssh-user", help="With --config-dir: ssh user for every host."),
        remote_dir: str = typer.Option("~/smolcluster", "--remote-dir", help="With --config-dir: workdir on every host."),
        python: str = typer.Option("python3", "--python", help="With --config-dir: Python on every host."),
        logging: bool = typer.Option(False, "--logging", help="Ship every node's logs and metrics to Loki: the logging/ stack started here (Grafana), or --loki-url."),
        loki_url: Optional[str] = typer.Option(None, "--loki-url", help="With --logging: an existing Loki every node can reach, instead of starting the stack here."),
        controller: Optional[str] = typer.Option(None, "--controller", help="With --logging: the topology node this machine is (default: found by its addresses)."),
        gpt_config: Optional[Path] = typer.Option(None, "--gpt-config", help="Train the GPT of this gpt_config.yaml on WikiText-2 (synced to the hosts) instead of the topology's model."),
    ) -> None:
        """Run on the real cluster: preflight, sync, start (server first, one tmux session per host), and status/stop/wait/collect/attach."""
        from smolcluster.common.errors import ConfigError
        from smolcluster.deploy.launch import LaunchOptions, run
        from smolcluster.testbed.topology import HostSpec

        chosen = [name for name, on in (("preflight", preflight), ("status", status), ("stop", stop), ("collect", collect is not None),
                                        ("attach", attach), ("check", check)) if on]
        if len(chosen) > 1:
            raise ConfigError(None, "--" + chosen[1], f"--{chosen[0]} and --{chosen[1]} cannot be combined", "give one of them")
        if wait and chosen:
            raise ConfigError(None, "--wait", f"--wait goes with a launch, not with --{chosen[0]}", "drop one of them")
        opts = LaunchOptions(
            topology=file, algo=algo, action=chosen[0] if chosen else "launch", wait=wait, run_name=run_name,
            runs_dir=runs_dir, ssh_config=ssh_config, dry_run=dry_run, sync=not no_sync, key_file=key_file, port=port,
            epochs=epochs, max_steps=max_steps, seed=seed,
            collect_dir=None if collect in (None, Path(".")) else collect, as_json=as_json, write_profiles=write_profiles,
            config_dir=config_dir if file is None else None, grace_s=grace,
            logging=logging or bool(loki_url), loki_url=loki_url, controller=controller, gpt_config=gpt_config,
            host_defaults=HostSpec(ssh="", user=ssh_user, workdir=remote_dir, python=python))
        if file is None and config_dir is None and opts.action in ("launch", "preflight", "check"):
            opts.config_dir = Path("configs")
        raise typer.Exit(run(opts))
