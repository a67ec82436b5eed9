"""The `smolcluster` command: one module per command group, each with a `register(app)`.

Every command imports what it runs inside its function, so `smolcluster --help` stays fast.
"""

from __future__ import annotations

import typer

from smolcluster.common.errors import SmolclusterError

COMMAND_GROUPS = ("node", "sim", "topology", "linkemu", "faults", "report", "deploy", "logs", "image", "bench")


def build_app() -> typer.Typer:
    import importlib

    app = typer.Typer(
        help="smolcluster: parameter-server training (EDP, SyncPS) over TCP, and a testbed to run it on "
        "an emulated cluster (local processes or docker-compose) with faults.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for group in COMMAND_GROUPS:
        importlib.import_module(f"smolcluster.cli.{group}").register(app)
    return app


def main() -> None:
    try:
        build_app()()
    except SmolclusterError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
