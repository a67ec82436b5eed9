"""`smolcluster bench ...`: benchmarks that print a table (or JSON)."""

from __future__ import annotations


import typer


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks that print a table (or JSON with --json).", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

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


    @bench_app.command("virtual")
    def bench_virtual(
        out: str = typer.Option("runs/bench-virtual", "--out", help="Where every run's directory goes."),
        algos: str = typer.Option("edp,syncps", "--algos", help="Comma-separated algorithms for the fidelity table."),
        local_runs: int = typer.Option(3, "--local-runs", min=1, help="Local runs per cell (their median is the reference)."),
        skip_fidelity: bool = typer.Option(False, "--skip-fidelity", help="Only the scale runs."),
        skip_scale: bool = typer.Option(False, "--skip-scale", help="Only the fidelity table."),
        reuse: bool = typer.Option(False, "--reuse", help="Take finished runs already under --out instead of running them again."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
    ) -> None:
        """The virtual backend vs the local one on hybrid and home-wifi (time to 90 %, updates/s, staleness: ±15 %),
        and rack-64 / rack-256 at scale (wall s per simulated s, peak memory, accuracy)."""
        import json
        import sys as _sys
        from pathlib import Path

        from smolcluster.bench import virtual

        say = lambda m: print(m, file=_sys.stderr)  # noqa: E731
        names = [a for a in algos.split(",") if a]
        fid = [] if skip_fidelity else virtual.fidelity(Path(out), names, local_runs, progress=say, reuse=reuse)
        model_terms = virtual.terms_rows(Path(out), names, local_runs) if fid else []
        sc = [] if skip_scale else virtual.scale(Path(out), progress=say, reuse=reuse)
        if as_json:
            typer.echo(json.dumps({"fidelity": fid, "terms": model_terms, "scale": sc}, indent=2))
            return
        if fid:
            typer.echo(virtual.format_fidelity(fid) + "\n\n" + virtual.format_terms(model_terms))
        if sc:
            typer.echo(("\n" if fid else "") + virtual.format_scale(sc))

    @bench_app.command("proxy")
    def bench_proxy(
        megabytes: int = typer.Option(200, "--mb", help="Megabytes to send per case."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Loopback throughput of the embedded proxy: direct, no toxics, latency, bandwidth."""
        import json

        from smolcluster.bench.proxy import run_proxy_bench

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

    @bench_app.command("logging")
    def bench_logging(
        steps: int = typer.Option(1000, "--steps", min=1, help="Timed training steps per run."),
        rounds: int = typer.Option(9, "--rounds", min=1, help="Rounds of every mode (the table shows medians)."),
        modes: str = typer.Option("off,live,dead,hanging", "--modes", help="Comma-separated: off, live, dead, hanging."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    ) -> None:
        """Training steps with Loki shipping off, to a live receiver, to a dead Loki and to a hanging one."""
        from smolcluster.bench.logging import main as logging_main

        raise typer.Exit(logging_main(["--steps", str(steps), "--rounds", str(rounds), "--modes", modes]
                                      + (["--json"] if as_json else [])))
