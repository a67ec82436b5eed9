"""`smolcluster proxy` runs the embedded Toxiproxy standalone until Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smolcluster.testbed.linkemu import ToxiproxyClient


@pytest.mark.slow
def test_proxy_command_serves_the_api_and_config(tmp_path: Path) -> None:
    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([{"name": "l1", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9"}]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolcluster", "proxy", "--api", "127.0.0.1:0", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("Toxiproxy API on http://127.0.0.1:"), first + proc.stderr.read()
        url = first.split()[-1]
        assert "l1: 127.0.0.1:" in proc.stdout.readline()
        cl = ToxiproxyClient(url)
        assert set(cl.proxies()) == {"l1"}
        cl.add_toxic("l1", "latency", {"latency": 10})
        assert cl.toxics("l1")[0]["name"] == "latency_downstream"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_proxy_command_rejects_a_bad_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from smolcluster.cli import build_app

    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([{"name": "l1", "upstream": "nowhere"}]))
    result = CliRunner().invoke(build_app(), ["proxy", "--api", "127.0.0.1:0", "--config", str(config)])
    assert result.exit_code != 0
    assert "[0]" in str(result.exception) and "HOST:PORT" in str(result.exception)
