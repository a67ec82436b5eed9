"""The `smolcluster` command: one module per command group, each with a `register(app)`.

Every command imports what it runs inside its function, so `smolcluster --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from smolcluster.common.errors import SmolclusterError
from smolcluster.common.pyversion import python_problem

COMMAND_GROUPS = ("node", "train", "sim", "topology", "linkemu", "faults", "report", "deploy", "logs", "image", "bench", "experiment")


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
    problem = python_problem()
    if problem:  # pip refuses to install on an old Python; a checkout run with `python -m smolcluster` lands here
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        build_app()()
    except SmolclusterError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
