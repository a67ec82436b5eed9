"""`smolcluster logging up|down|status`: the Loki + Grafana (+ Alloy) stack of logging/, by hand.

`smolcluster sim --logging` and `smolcluster launch --logging` start it for a run themselves."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    logging_app = typer.Typer(help="The Loki + Grafana log stack (logging/): up, down, status.", no_args_is_help=True)
    app.add_typer(logging_app, name="logging")

    @logging_app.command("up")
    def logging_up(
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run directories (what Alloy tails with --agent)."),
        agent: bool = typer.Option(False, "--agent", help="Also start Grafana Alloy tailing runs/*/nodes/* (then nodes should not push)."),
        bind: str = typer.Option("127.0.0.1", "--bind", help="Address Loki and Grafana listen on (a cluster address lets remote nodes push)."),
    ) -> None:
        """Start the stack and wait until Loki is ready; print the Grafana URL (and a new admin password once)."""
        from smolcluster.testbed.logstack import LoggingUnavailable, up

        try:
            info = up(runs_dir, agent=agent, grafana_bind=bind, loki_bind=bind)
        except LoggingUnavailable as e:
            typer.echo(f"logging: not started: {e.reason}")
            raise typer.Exit(1) from None
        typer.echo(f"Grafana {info.grafana_url} (user {info.admin_user}); nodes push to {info.loki_url}")
        if info.password_is_new:
            typer.echo(f"Grafana admin password (shown once; kept in {info.password_file}): {info.admin_password}")

    @logging_app.command("down")
    def logging_down(remove_data: bool = typer.Option(False, "--remove-data", help="Also delete Loki's and Grafana's volumes.")) -> None:
        """Stop and remove the stack's containers (its data volumes stay unless --remove-data)."""
        from smolcluster.testbed.logstack import LoggingUnavailable, down

        try:
            down(remove_data=remove_data)
        except LoggingUnavailable as e:
            typer.echo(f"logging: {e.reason}")
            raise typer.Exit(1) from None
        typer.echo("logging stack stopped")

    @logging_app.command("status")
    def logging_status() -> None:
        """Which services run, and whether Loki is ready."""
        from smolcluster.testbed.logstack import LoggingUnavailable, status

        try:
            st = status()
        except LoggingUnavailable as e:
            typer.echo(f"logging: {e.reason}")
            raise typer.Exit(1) from None
        if not st.services:
            typer.echo("logging stack: not running (smolcluster logging up)")
            return
        for service, state in sorted(st.services.items()):
            typer.echo(f"{service:<10} {state}")
        typer.echo(f"Loki {'ready' if st.loki_ready else 'not ready'} ({st.loki_push_url}); Grafana {st.grafana_url}")
