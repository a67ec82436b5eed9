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


@bench_app.command("train")
def bench_train(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    workers: int = typer.Option(3, "--workers", min=1, help="Worker processes for SyncPS, EDP and DDP."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Epochs over MNIST for every run (accuracy is also reported after the first)."),
) -> None:
    """Single process vs SyncPS vs EDP vs torch DDP (gloo) on MNIST: time, throughput, accuracy, memory."""
    import sys as _sys

    from smolcluster.bench.train import format_table, run_all, to_json

    runs = run_all(workers=workers, epochs=epochs, progress=lambda m: print(m, file=_sys.stderr))
    print(to_json(runs) if json_out else format_table(runs))


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


@bench_app.command("wire")
def bench_wire(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    breakdown: bool = typer.Option(False, "--breakdown", help="Instead: the MNIST case layer by layer, from raw TCP "
                                   "to a full Connection, to show where the time beyond raw goes."),
) -> None:
    """A model state over loopback TCP and back: smolwire (keyless and keyed) vs raw bytes vs the original's pickled dicts."""
    if breakdown:
        import json

        from smolcluster.bench import wire_breakdown

        rows = wire_breakdown.run()
        typer.echo(json.dumps({"variants": rows}) if as_json else wire_breakdown.format_table(rows))
        return
    from smolcluster.bench.wire import main as wire_main

    wire_main(as_json=as_json)


# --------------------------------------------------------------------------- security


@app.command()
def keygen(
    path: Path = typer.Argument(..., help="Where to write the cluster key (copy it to every node)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key file."),
) -> None:
    """Write a new random cluster key (32 bytes, hex, mode 0600). Nodes use it via --key-file or SMOLCLUSTER_CLUSTER_KEY."""
    from smolcluster.auth import write_key_file

    write_key_file(path, force=force)
    typer.echo(f"wrote a new cluster key to {path} (mode 0600); copy it to every node")


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


# --------------------------------------------------------------------------- sim


@app.command()
def sim(
    file: Path = typer.Argument(..., help="Topology file, e.g. topologies/hybrid.yaml."),
    algo: Optional[str] = typer.Option(None, "--algo", help=ALGO_HELP + " Default: the topology's training.algorithm."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs over each worker's shard (default: the topology's)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many server updates."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for data shards, init and link jitter (default: the topology's)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where everything goes (default runs/<topology>-<algo>-<timestamp>)."),
    backend: str = typer.Option("local", "--backend", help="local (processes + impairing proxies, no root) or compose (docker)."),
    toxiproxy: Optional[str] = typer.Option(None, "--toxiproxy", help="URL of a real Toxiproxy API to use instead of the embedded one."),
    check: bool = typer.Option(False, "--check", help="Measure every worker->server path (RTT, throughput) against its profile; no training."),
    as_json: bool = typer.Option(False, "--json", help="With --check: print JSON instead of a table."),
    wandb: bool = typer.Option(False, "--wandb", help="Log to W&B (online with a key, else offline; never prompts)."),
    faults: Optional[Path] = typer.Option(None, "--faults", help="Fault schedule file (faults: [...]) added to the topology's own faults."),
    render_only: bool = typer.Option(False, "--render-only", help="With --backend compose: write the compose project and print how to run it by hand."),
) -> None:
    """Run a topology as an emulated cluster: every node a process, every link hop an impairing proxy."""
    from smolcluster.sim.run import SimOptions, install_sigterm_as_interrupt, run_sim

    install_sigterm_as_interrupt()
    opts = SimOptions(file=file, algo=algo, epochs=epochs, max_steps=max_steps, seed=seed, run_dir=run_dir, backend=backend,
                      toxiproxy=toxiproxy, check=check, as_json=as_json, wandb=wandb, faults=faults,
                      render_only=render_only)
    raise typer.Exit(run_sim(opts))


# --------------------------------------------------------------------------- faults


@faults_app.command("show")
def faults_show(
    file: Path = typer.Argument(..., help="Topology file (its faults: list is included)."),
    faults: Optional[Path] = typer.Option(None, "--faults", help="Fault schedule file to check and add."),
) -> None:
    """Check a fault schedule against a topology and print every fault it fires (random: entries drawn)."""
    from smolcluster.faults import schedule_for
    from smolcluster.topology import load_topology

    topo = load_topology(file)
    expanded = schedule_for(topo, faults).expand(topo.training.seed)  # as `smolcluster sim` draws it
    for f in expanded:
        typer.echo(f"{f.name:<36} {f.describe()}")
    typer.echo(f"{len(expanded)} faults")


@faults_app.command("matrix")
def faults_matrix(
    as_json: bool = typer.Option(False, "--json", help='Print {"results": [...]} instead of the table.'),
    topology: Optional[Path] = typer.Option(None, "--topology", help="Topology to run on (default topologies/faults-small.yaml: a server and workers w1, w2)."),
    faults: Optional[str] = typer.Option(None, "--faults", help="Comma-separated fault scenarios (default: all)."),
    algos: str = typer.Option("edp,syncps", "--algos", help="Comma-separated algorithms."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the run directories go (default runs/faults-matrix-<time>)."),
) -> None:
    """Run every fault x algorithm as a short real sim and print outcome, final accuracy and recovery time."""
    import json as _json
    import sys as _sys
    import time as _time

    from smolcluster.errors import ConfigError
    from smolcluster.faults.matrix import ALGORITHMS, SCENARIO_NAMES, SMALL_TOPOLOGY, format_matrix, matrix_json, run_matrix

    names = [n.strip() for n in faults.split(",")] if faults else list(SCENARIO_NAMES)
    algo_list = [a.strip() for a in algos.split(",") if a.strip()]
    for n in names:
        if n not in SCENARIO_NAMES:
            raise ConfigError(None, "--faults", f"unknown fault scenario {n!r}", f"use some of: {', '.join(SCENARIO_NAMES)}")
    for a in algo_list:
        if a not in ALGORITHMS:
            raise ConfigError(None, "--algos", f"unknown algorithm {a!r}", "use edp and/or syncps")
    out = out_dir or Path("runs") / f"faults-matrix-{_time.strftime('%Y%m%d-%H%M%S')}"

    def progress(o) -> None:
        print(f"{o.fault} x {o.algorithm}: {'pass' if o.passed else 'FAIL'} ({o.wall_s:.0f} s, {o.run_dir})", file=_sys.stderr)

    results = run_matrix(names, algo_list, out, topology or SMALL_TOPOLOGY, progress=progress)
    typer.echo(_json.dumps(matrix_json(results), indent=2) if as_json else format_matrix(results))
    raise typer.Exit(0 if all(r.passed for r in results) else 1)


# --------------------------------------------------------------------------- reports


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (nodes/<name>/metrics.jsonl, summary.json, faults.jsonl).")) -> None:
    """Print a run's summary table (per node, links, fault reactions) and write its plots into the run dir."""
    from smolcluster.report import load_run, summary_table, write_plots

    typer.echo(summary_table(load_run(run_dir)), nl=False)
    for path in write_plots(run_dir):
        typer.echo(f"wrote {path}")


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First run directory (e.g. the EDP run)."),
    run_b: Path = typer.Argument(..., help="Second run directory (e.g. the SyncPS run)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the accuracy overlay PNG (default: compare_<A>_vs_<B>.png beside RUN_A)."),
) -> None:
    """Two runs side by side: accuracy, time to 90/95 %, pushes, bytes, throughput, staleness; plus an accuracy plot."""
    from smolcluster.report import compare as compare_runs
    from smolcluster.report import load_run, write_compare_plot

    a, b = load_run(run_a), load_run(run_b)
    typer.echo(compare_runs(a, b), nl=False)
    target = out or run_a.resolve().parent / f"compare_{a.name}_vs_{b.name}.png"
    typer.echo(f"wrote {write_compare_plot(a, b, target)}")


@app.command()
def launch(
    algo: str = typer.Option(..., "--algo", help=ALGO_HELP),
    config_dir: Path = typer.Option(Path("configs"), "--config-dir", help="Folder with the cluster and nn configs (same path on every host)."),
    remote_dir: str = typer.Option("~/smolcluster", "--remote-dir", help="Checkout of this repository on every host."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Runs go to runs/NAME/<host> (default: <algo>-<time>)."),
    ssh_user: Optional[str] = typer.Option(None, "--ssh-user", help="SSH user, if not the one in ~/.ssh/config."),
    python: str = typer.Option("python3", "--python", help="Python on the hosts (with smolcluster installed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the SSH commands instead of running them."),
) -> None:
    """Start the server and every worker of the real cluster in tmux sessions over SSH."""
    import time as _time

    from smolcluster.launch import launch as do_launch
    from smolcluster.launch import plan_launch

    steps = plan_launch(algo, config_dir, remote_dir, run_name or f"{algo}-{_time.strftime('%Y%m%d-%H%M%S')}", python)
    raise typer.Exit(do_launch(steps, ssh_user=ssh_user, dry_run=dry_run))


# --------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app()
    except SmolclusterError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
