"""`smolcluster proxy`: the embedded impairing proxy, standalone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def proxy(
        api: str = typer.Option("127.0.0.1:8474", "--api", help="HOST:PORT for the Toxiproxy HTTP API (port 0 picks a free one)."),
        config: Optional[Path] = typer.Option(None, "--config", help="JSON list of proxies to create at start, as Toxiproxy's -config."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for jitter, slicing and toxicity rolls."),
    ) -> None:
        """Run the embedded impairing TCP proxy (Toxiproxy HTTP API) until Ctrl-C."""
        import time

        from smolcluster.testbed.linkemu.api import ToxiproxyServer, load_proxy_config
        from smolcluster.testbed.linkemu.proxy import split_hostport

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
