"""The benchmark commands users run: they finish, print the documented JSON, and what they compare is
really comparable (SyncPS computes the same step as one process on the unioned batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolcluster", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def test_bench_wire_json_has_every_case_and_baseline() -> None:
    from smolcluster.bench.wire import run

    result = run(min_seconds=0.2, include_large=False)
    (case,) = result["cases"]
    assert case["name"] == "mnist-784-128-10" and case["params"] == 101_770
    assert case["payload_bytes"] == 101_770 * 4
    for key in ("smolwire_gbps", "smolwire_keyed_gbps", "raw_gbps", "pickle_gbps"):
        assert case[key] > 0, key


def test_interleaved_modes_do_not_always_follow_the_same_neighbour() -> None:
    # A fixed round-robin order ran the smolwire echo right after pickle every round; that position alone
    # moved its median. Every mode must follow every other mode in some rounds, and run first in some.
    from smolcluster.bench.wire import interleaved_medians

    calls: list[str] = []
    fns = {m: (lambda m=m: calls.append(m)) for m in ("smolwire", "keyed", "raw", "pickle")}
    medians = interleaved_medians(fns, rounds=60, min_seconds=0.0, max_rounds={})
    assert set(medians) == set(fns)
    body = calls[len(fns):]  # after one warm-up call each
    assert len(body) == 60 * len(fns)
    rounds = [body[i:i + len(fns)] for i in range(0, len(body), len(fns))]
    assert all(sorted(r) == sorted(fns) for r in rounds)  # each round runs every mode once
    assert {r[0] for r in rounds} == set(fns)
    followed = {(a, b) for a, b in zip(body, body[1:]) if a != b}
    assert followed == {(a, b) for a in fns for b in fns if a != b}


def test_bench_wire_breakdown_adds_one_layer_per_row() -> None:
    from smolcluster.bench.wire_breakdown import VARIANTS, format_table, run

    rows = run(min_seconds=0.2)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert rows[0]["vs_raw"] == 1.0 and rows[0]["added_us"] is None
    for r in rows:
        assert r["round_trip_us"] > 0 and r["gbps"] > 0, r
    # each row's added time is its round trip minus the previous row's
    for prev, row in zip(rows, rows[1:]):
        assert abs(row["added_us"] - (row["round_trip_us"] - prev["round_trip_us"])) < 0.2
    assert "Connection" in format_table(rows)


@pytest.mark.slow
def test_bench_train_runs_all_six_and_syncps_matches_the_unioned_batch(mnist_dir: Path) -> None:
    # A relative data dir, as the README writes it: the runs' configs live in a temporary folder.
    out = _cli("bench", "train", "--json", "--epochs", "2", env={"SMOLCLUSTER_DATA_DIR": mnist_dir.name},
               cwd=mnist_dir.parent, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"single-bs32", "single-bs96", "syncps", "edp", "edp-gradients", "ddp-gloo"}
    for r in runs.values():
        assert set(r) >= {"processes", "batch_size", "epochs", "wall_time_s", "samples_per_s", "final_test_accuracy", "peak_rss_mb"}
        assert r["final_test_accuracy"] > 0.90, r  # every way of training actually learns
        assert r["epochs"] == 2 and len(r["epoch_test_accuracy"]) == 2, r  # evaluated after each epoch
        assert r["epoch_test_accuracy"][0] > 0.85 and r["epoch_test_accuracy"][-1] == r["final_test_accuracy"], r
    # SyncPS averages the three shards' gradients: the very step single-bs96 takes.
    assert abs(runs["syncps"]["final_test_accuracy"] - runs["single-bs96"]["final_test_accuracy"]) <= 0.005
    assert runs["syncps"]["batch_size"] == 96 and runs["edp"]["batch_size"] == 32
    assert {t["target"] for t in result["targets"]} >= {"SyncPS samples/s >= 2x DDP"}
    assert "[1/6]" in out.stderr and "[6/6]" in out.stderr  # progress is shown while it runs
    # ... down to each epoch of each run, with the accuracy the table reports
    assert out.stderr.count("epoch 2/2: test accuracy") == 6, out.stderr
    assert f"epoch 1/2: test accuracy {runs['syncps']['epoch_test_accuracy'][0]:.4f}" in out.stderr
