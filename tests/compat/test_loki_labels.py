"""The original README's Loki queries select the right lines from what real nodes write.

A shipper (Promtail/Alloy's logfmt stage, or a push client) turns each line's label keys into Loki
labels; here the lines are parsed the same way and the queries' selectors matched against them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from compat_helpers import REPO, tail

from smolcluster.core.training.telemetry import LABELS, parse_logfmt

# The original README's "Query examples", as printed there.
ORIGINAL_QUERIES = (
    '{job="smolcluster-worker"}',
    '{job="smolcluster-server"}',
    '{host="worker-rank0-mini2"}',
    '{level="ERROR"}',
    '{job="smolcluster-worker"} |= "loss"',
)
LOKI_LABELS = (*LABELS, "level")


def select(lines: list[str], query: str) -> list[str]:
    """The lines a LogQL query of the form {k="v", ...} [|= "text"] selects."""
    m = re.fullmatch(r'\{(.*?)\}\s*(?:\|=\s*"(.*)")?', query.strip())
    assert m, query
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    out = []
    for line in lines:
        labels = {k: v for k, v in parse_logfmt(line).items() if k in LOKI_LABELS}
        if all(labels.get(k) == v for k, v in wanted.items()) and (m.group(2) is None or m.group(2) in line):
            out.append(line)
    return out


def log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("ts=")]


@pytest.mark.slow
def test_the_original_queries_select_the_right_lines_of_a_hybrid_run(tmp_path: Path, mnist_dir: Path):
    run_dir = tmp_path / "hybrid-edp-loki"
    env = {"SMOLCLUSTER_DATA_DIR": str(mnist_dir), "PATH": "/usr/bin:/bin"}
    sim = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(REPO / "topologies" / "hybrid.yaml"), "--algo", "edp",
                          "--max-steps", "150", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
    nodes = run_dir / "nodes"
    by_node = {"mini1": log_lines(nodes / "mini1" / "server.log")}
    by_node |= {w: log_lines(nodes / w / "worker.log") for w in ("mini2", "mini3", "pi5", "pi4")}
    # A server that cannot start (--resume with no checkpoint) says why at ERROR, in its own log.
    failed = tmp_path / "failed-server"
    bad = subprocess.run([sys.executable, "-m", "smolcluster", "server", "--algo", "edp", "--config-dir", str(run_dir / "config"),
                          "--run-dir", str(failed), "--resume", "--port", "0", "--bind", "127.0.0.1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("error: no checkpoint"), bad.stderr
    failed_lines = log_lines(failed / "server.log")
    everything = [line for lines in by_node.values() for line in lines] + failed_lines

    for line in everything:  # every line carries every label
        labels = parse_logfmt(line)
        assert set(LOKI_LABELS) <= set(labels), line
        assert labels["algorithm"] == "edp" and labels["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
    assert {parse_logfmt(line)["run"] for lines in by_node.values() for line in lines} == {run_dir.name}

    workers, server, mini2, errors, loss = (select(everything, q) for q in ORIGINAL_QUERIES)
    assert sorted(workers) == sorted(line for w in ("mini2", "mini3", "pi5", "pi4") for line in by_node[w])
    assert sorted(server) == sorted(by_node["mini1"] + failed_lines) and by_node["mini1"]
    assert mini2 == by_node["mini2"] and mini2, tail(nodes / "mini2" / "stdout.log")
    assert errors and all(line in failed_lines and "level=ERROR" in line for line in errors), errors
    assert all("no checkpoint" in parse_logfmt(line)["msg"] for line in errors), errors
    assert loss and set(loss) <= set(workers) and all("loss" in line for line in loss)
    for w in ("mini2", "mini3", "pi5", "pi4"):  # each worker's losses are in Loki
        assert any(line in loss for line in by_node[w]), by_node[w][-3:]
    # the original numbering: mini2..pi4 are smolcluster ranks 1..4 and the original's workers 0..3
    assert [parse_logfmt(by_node[w][0])["host"] for w in ("mini2", "mini3", "pi5", "pi4")] == \
        ["worker-rank0-mini2", "worker-rank1-mini3", "worker-rank2-pi5", "worker-rank3-pi4"]
    assert parse_logfmt(by_node["mini1"][0])["host"] == "server-rank0-mini1"
