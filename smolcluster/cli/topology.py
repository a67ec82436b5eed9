"""`smolcluster topology ...`: read, check and explain topology files."""

from __future__ import annotations

from pathlib import Path

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
