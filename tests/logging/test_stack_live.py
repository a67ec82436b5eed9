"""The real stack, where its images can be had: up, a sim run shipping to it, every node's lines
queried back from Loki's query_range API, down. Skipped with the reason where the images are absent
(no registry reachable here: see the README's logging section)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from smolcluster.common.wait import wait_until
from smolcluster.testbed import logstack
from smolcluster.testbed.logstack import LoggingUnavailable

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _images_present() -> bool:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True)
    return "grafana/loki:3.7.8" in out.stdout.split() and "grafana/grafana:13.2.3" in out.stdout.split()


def _query(loki: str, query: str, start_ns: int) -> list[dict]:
    qs = urllib.parse.urlencode({"query": query, "start": str(start_ns), "end": str(time.time_ns()), "limit": "5000"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{loki}/loki/api/v1/query_range?{qs}", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_a_sim_run_is_queryable_in_loki(tmp_path, mnist_dir, monkeypatch):
    try:
        logstack.docker()
    except LoggingUnavailable as e:
        pytest.skip(f"no Docker engine: {e.reason}")
    if not _images_present():
        pytest.skip("the logging stack's images (grafana/loki:3.7.8, grafana/grafana:13.2.3) are not on this "
                    "machine and no registry is reachable to pull them")
    monkeypatch.setenv("SMOLCLUSTER_GRAFANA_PASSWORD_FILE", str(tmp_path / "pw"))
    info = logstack.up(tmp_path / "runs", loki_port=3198, grafana_port=3098)
    try:
        start = time.time_ns()
        run = tmp_path / "runs" / "live"
        p = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(REPO / "topologies" / "faults-small.yaml"),
                            "--max-steps", "40", "--run-dir", str(run), "--logging", "--loki-url", info.loki_url],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        hosts = {"server-rank0-srv", "worker-rank0-w1", "worker-rank1-w2"}

        def every_node_queryable() -> bool:
            found = {s["stream"]["host"] for s in _query(info.loki_url, f'{{run="{run.name}"}}', start)}
            return hosts <= found

        assert wait_until(every_node_queryable, 60, interval=1.0), "not every node's lines reached Loki"
        metrics = _query(info.loki_url, f'{{run="{run.name}", host="server-rank0-srv", kind="metrics"}}', start)
        on_disk = (run / "nodes" / "srv" / "metrics.jsonl").read_text().splitlines()
        assert sum(len(s["values"]) for s in metrics) == len(on_disk)
    finally:
        logstack.down(remove_data=True)
