"""`smolcluster topology ...`: read, check and explain topology files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    topology_app = typer.Typer(help="Read, check and explain topology files.", no_args_is_help=True)
    app.add_typer(topology_app, name="topology")

    @topology_app.command("validate")
    def topology_validate(file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml.")) -> None:
        """Check a topology file: addresses, subnets, profiles, routes, every worker's path to the server and back,
        the training keys (as nn_config / cluster_config check them) and the fault entries."""
        from smolcluster.testbed.faults import schedule_for
        from smolcluster.testbed.topology import load_topology

        topo = load_topology(file)
        faults = schedule_for(topo)
        typer.echo(f"OK: {len(topo.nodes)} nodes, {len(topo.networks)} networks"
                   + (f", {len(faults)} fault entries" if len(faults) else "") + f" ({file})")

    @topology_app.command("show")
    def topology_show(file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml.")) -> None:
        """Print networks, nodes, routes, and each worker's hop-by-hop path to the server with expected RTT and bandwidth."""
        from smolcluster.testbed.topology import format_topology, load_topology

        typer.echo(format_topology(load_topology(file)), nl=False)

    @topology_app.command("netsetup")
    def topology_netsetup(
        file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml."),
        node: Optional[str] = typer.Option(None, "--node", help="Only this node (default: every node)."),
        apply: bool = typer.Option(False, "--apply", help="Run the commands on each host over ssh (sudo -n where not root)."),
        ssh_config: Optional[str] = typer.Option(None, "--ssh-config", help="An ssh config file for every ssh (-F)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="With --apply: print the ssh commands, run none."),
    ) -> None:
        """Print (or --apply) each node's addresses, routes and forwarding as commands for its OS (host.os)."""
        from smolcluster.common.errors import ConfigError
        from smolcluster.deploy.netsetup import apply as apply_steps
        from smolcluster.deploy.netsetup import format_steps
        from smolcluster.deploy.runner import Runner
        from smolcluster.testbed.topology import load_topology

        topo = load_topology(file)
        if node is not None and node not in topo.nodes:
            raise ConfigError(file, "--node", f"no node named {node!r}", f"use one of: {', '.join(topo.nodes)}")
        names = [node] if node else list(topo.nodes)
        if not apply:
            typer.echo(format_steps(topo, names), nl=False)
            return
        runner = Runner(ssh_config=ssh_config, dry_run=dry_run, echo=typer.echo)
        raise typer.Exit(0 if apply_steps(topo, names, runner, typer.echo) else 1)
