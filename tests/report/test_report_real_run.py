"""The report on a real run: a SyncPS server and two worker processes on loopback, one worker paused (SIGSTOP)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from helpers import NodeProcesses, write_configs

from smolcluster.testbed.report import fault_reactions, load_run, summary_table, write_plots

pytestmark = pytest.mark.slow

WORKERS = ["w1", "w2"]


def _fault(run_dir: Path, start: float, **fields) -> None:
    """Record a fault the way the fault injector does (one JSON line per fired / healed)."""
    now = time.time()
    with open(run_dir / "faults.jsonl", "a") as f:
        f.write(json.dumps({"time": now, "elapsed": now - start} | fields) + "\n")


def test_report_of_a_real_run_with_a_paused_worker(tmp_path, mnist_dir):
    run_dir = tmp_path / "run-syncps"
    cfg = write_configs(tmp_path / "config", "syncps", mnist_dir, nn={"eval_steps": 50}, workers=WORKERS,
                        cluster={"seed": 1, "max_steps": 600, "checkpoint_interval": 0})
    c = NodeProcesses(run_dir / "nodes", "syncps", cfg, server="srv", workers=WORKERS)
    with c.procs:
        c.start_server()
        start = time.time()
        for rank in (1, 2):
            c.start_worker(rank)
        # Pause after a couple of seconds of steady training: the report's pre-fault throughput (the
        # baseline for "recovered") is then not the burst of the first fraction of a second.
        c.wait_for(lambda: sum(e["event"] == "update" for e in c.metrics()) >= 200, 90, "200 updates")
        c.procs.signal("w2", signal.SIGSTOP)
        _fault(run_dir, start, fault="pause", target="w2", action="fired")
        time.sleep(2.5)  # the pause itself; shorter than heartbeat_timeout: w2 stays connected, SyncPS closes steps without it
        c.procs.signal("w2", signal.SIGCONT)
        _fault(run_dir, start, fault="pause", target="w2", action="healed")
        assert c.wait_server(120) == 0

    run = load_run(run_dir)
    assert run.server == "srv" and run.workers == ["w1", "w2"]
    assert run.summary.algorithm == "syncps" and run.summary.steps == 600

    # Time to accuracy matches the first qualifying eval in the server's own metrics.
    evals = [e for e in c.metrics() if e["event"] == "eval"]
    server_start = next(e["time"] for e in c.metrics() if e["event"] == "start")
    first_90 = next((e["time"] - server_start for e in evals if e["test_accuracy"] >= 0.9), None)
    assert run.time_to_accuracy(0.9) == (pytest.approx(first_90) if first_90 is not None else None)

    [r] = fault_reactions(run)
    assert (r["fault"], r["target"]) == ("pause", "w2")
    assert r["healed_after_s"] == pytest.approx(2.5, abs=0.5)
    # SyncPS closed steps at its 1 s straggler deadline without w2: fewer updates, each missing rank 2.
    assert r["updates_missing_workers"] >= 1 and r["missing_ranks"] == [2]
    assert r["throughput_during"] < r["throughput_before"]
    assert r["disconnects"] == []  # paused for less than heartbeat_timeout; the run's own end is not counted
    assert r["recovered_after_s"] is not None and r["recovered_after_s"] > 0

    text = summary_table(run)
    assert "Faults (1)" in text and "pause w2" in text and "with missing workers (ranks 2)" in text
    assert "final test accuracy" in text
    for p in write_plots(run_dir):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
