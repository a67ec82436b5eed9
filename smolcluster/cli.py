"""The `smolcluster` command. Each command imports its module lazily so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolcluster.errors import SmolclusterError

app = typer.Typer(
    help="smolcluster: parameter-server training (EDP, SyncPS) over TCP, and a testbed to run it on "
    "an emulated cluster (local processes or docker-compose) with faults.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print a table (or JSON with --json).", no_args_is_help=True)
topology_app = typer.Typer(help="Read, check and explain topology files.", no_args_is_help=True)
faults_app = typer.Typer(help="Fault injection.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(topology_app, name="topology")
app.add_typer(faults_app, name="faults")

ALGO_HELP = "Training algorithm: edp (asynchronous, elastic) or syncps (synchronous, straggler deadline)."


# --------------------------------------------------------------------------- training roles


@app.command()
def server(
    algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
    config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with nn_config.yaml and cluster_config_<algo>.yaml."),
    run_dir: Path = typer.Option(Path("runs/latest"), "--run-dir", help="Where logs, metrics, checkpoints and summary.json go."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the checkpoint dir."),
    bind: Optional[str] = typer.Option(None, "--bind", help="Address to listen on (default 0.0.0.0, or 127.0.0.1 with no cluster key)."),
    port: Optional[int] = typer.Option(None, "--port", help="Override the port from the cluster config (0 picks a free one)."),
    slowdown: float = typer.Option(1.0, "--slowdown", help="Stretch compute by this factor (device emulation)."),
) -> None:
    """Run the parameter server (rank 0)."""
    from smolcluster.node import run_server

    run_server(algo=algo, config_dir=config_dir, run_dir=run_dir, resume=resume, bind=bind, port=port, slowdown=slowdown)


@app.command()
def worker(
    rank: int = typer.Argument(..., help="This worker's rank (1..num_workers)."),
    hostname: str = typer.Argument(..., help="This worker's hostname; the server address comes from host_ip[hostname]."),
    algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
    config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with nn_config.yaml and cluster_config_<algo>.yaml."),
    run_dir: Path = typer.Option(Path("runs/latest"), "--run-dir", help="Where this worker's logs and metrics go."),
    connect: Optional[str] = typer.Option(None, "--connect", help="HOST:PORT to dial instead of host_ip[hostname]:port (e.g. a link proxy)."),
    slowdown: float = typer.Option(1.0, "--slowdown", help="Stretch compute by this factor (device emulation)."),
) -> None:
    """Run one worker."""
    from smolcluster.node import run_worker

    run_worker(rank=rank, hostname=hostname, algo=algo, config_dir=config_dir, run_dir=run_dir, connect=connect, slowdown=slowdown)


# --------------------------------------------------------------------------- topology


@topology_app.command("validate")
def topology_validate(file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml.")) -> None:
    """Check a topology file: addresses, subnets, profiles, routes, every worker's path to the server and back."""
    from smolcluster.topology import load_topology

    topo = load_topology(file)
    typer.echo(f"OK: {len(topo.nodes)} nodes, {len(topo.networks)} networks ({file})")


@topology_app.command("show")
def topology_show(file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml.")) -> None:
    """Print networks, nodes, routes, and each worker's hop-by-hop path to the server with expected RTT and bandwidth."""
    from smolcluster.topology import format_topology, load_topology

    typer.echo(format_topology(load_topology(file)), nl=False)


# --------------------------------------------------------------------------- link emulation


@app.command()
def proxy(
    api: str = typer.Option("127.0.0.1:8474", "--api", help="HOST:PORT for the Toxiproxy HTTP API (port 0 picks a free one)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON list of proxies to create at start, as Toxiproxy's -config."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for jitter, slicing and toxicity rolls."),
) -> None:
    """Run the embedded impairing TCP proxy (Toxiproxy HTTP API) until Ctrl-C."""
    import time

    from smolcluster.linkemu.api import ToxiproxyServer, load_proxy_config
    from smolcluster.linkemu.proxy import split_hostport

    host, port = split_hostport(api)
    specs = load_proxy_config(config) if config else []
    server = ToxiproxyServer(host, port, seed=seed)
    server.start()
    try:
        server.populate(specs)
        typer.echo(f"Toxiproxy API on {server.api_url}")
        for p in server.proxies().values():
            typer.echo(f"  {p.name}: {p.listen} -> {p.upstream} ({'enabled' if p.enabled else 'disabled'})")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@bench_app.command("proxy")
def bench_proxy(
    megabytes: int = typer.Option(200, "--mb", help="Megabytes to send per case."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Loopback throughput of the embedded proxy: direct, no toxics, latency, bandwidth."""
    import json

    from smolcluster.linkemu.bench import run_proxy_bench

    rows = run_proxy_bench(megabytes)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['path']:<36} {row['MB/s']:>8.0f} MB/s")


# --------------------------------------------------------------------------- container images

image_app = typer.Typer(help="Container images for the compose backend.", no_args_is_help=True)
app.add_typer(image_app, name="image")


@image_app.command("build")
def image_build(
    offline: bool = typer.Option(False, "--offline", help="Build with no pull at all: a minimal root run with this host's /usr, Python and repo bind-mounted read-only (Linux only)."),
    tag: str = typer.Option("smolcluster:latest", "--tag", help="Tag for the user image (compose/Dockerfile); the offline image is tagged smolcluster-offline:<hash>."),
    force: bool = typer.Option(False, "--force", help="Rebuild the offline image even if it exists."),
) -> None:
    """Build the node image: compose/Dockerfile (needs a registry) or, with --offline, one assembled locally."""
    from smolcluster.sim.docker_env import detect_docker
    from smolcluster.sim.image import build_offline_image, build_user_image

    env = detect_docker()
    built = build_offline_image(env, force=force) if offline else build_user_image(env, tag)
    typer.echo(built)


# --------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app()
    except SmolclusterError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
