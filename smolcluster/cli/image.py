"""`smolcluster image ...`: container images for the compose backend."""

from __future__ import annotations


import typer


def register(app: typer.Typer) -> None:
    image_app = typer.Typer(help="Container images for the compose backend.", no_args_is_help=True)
    app.add_typer(image_app, name="image")

    @image_app.command("build")
    def image_build(
        offline: bool = typer.Option(False, "--offline", help="Build with no pull at all: a minimal root run with this host's /usr, Python and repo bind-mounted read-only (Linux only)."),
        tag: str = typer.Option("smolcluster:latest", "--tag", help="Tag for the user image (compose/Dockerfile); the offline image is tagged smolcluster-offline:<hash>."),
        force: bool = typer.Option(False, "--force", help="Rebuild the offline image even if it exists."),
    ) -> None:
        """Build the node image: compose/Dockerfile (needs a registry) or, with --offline, one assembled locally."""
        from smolcluster.testbed.sim.docker_env import detect_docker
        from smolcluster.testbed.sim.image import build_offline_image, build_user_image

        env = detect_docker()
        built = build_offline_image(env, force=force) if offline else build_user_image(env, tag)
        typer.echo(built)
