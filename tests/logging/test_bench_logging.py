"""`smolcluster bench logging` runs every mode and reports what reached the receiver and what was dropped."""

from __future__ import annotations

import json

from smolcluster.bench.logging import MODES, main


def test_bench_logging_json_has_every_mode(capsys) -> None:
    assert main(["--steps", "60", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in result["modes"]}
    assert list(rows) == list(MODES)
    assert rows["off"]["ratio_vs_off"] == 1.0 and rows["off"]["sent_lines"] == 0
    lines = 2 * (60 + 6)  # a log and a metrics line per step, warm-up included
    assert rows["live"]["sent_lines"] == lines and rows["live"]["dropped_lines"] == 0
    # with Loki away every line is dropped, and so may be the node's own "degraded" warning
    assert rows["dead"]["sent_lines"] == 0 and lines <= rows["dead"]["dropped_lines"] <= lines + 1
    assert rows["hanging"]["sent_lines"] == 0 and lines <= rows["hanging"]["dropped_lines"] <= lines + 1
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["cpu_ratio_vs_off"] > 0
