"""The run report on synthetic run directories with known numbers, in both run-dir layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smolcluster.cli import build_app
from smolcluster.common.errors import ReportError
from smolcluster.testbed.report import (compare, fault_reactions, load_run, node_rows, summary_table,
                                timeline_segments, write_compare_plot, write_plots)

T0 = 1_700_000_000.0  # server start (unix seconds)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path, *, layout: str = "nodes", faults: bool = True, summary: bool = True,
             algorithm: str = "edp") -> Path:
    """A 2-worker run: 10 updates/s, a pause of w2 from t=10 to t=15 (2 updates/s, w2 missing), back to 10/s at 15.5.

    Known answers: accuracy 0.85 @5 s, 0.91 @12 s, 0.96 @25 s; 2 late pushes after the heal; staleness 1
    before the fault, a peak of 6 at 15.5 s; w2 leaves at 12 s (and logs a disconnect at 12.1 s) and rejoins at 16 s.
    """
    base = root / "nodes" if layout == "nodes" else root
    t = lambda s: T0 + s  # noqa: E731
    server = [{"time": t(0), "event": "start", "algorithm": algorithm, "version": 0, "step": 0}]
    server += [{"time": t(0.5), "event": "join", "rank": 1, "host": "w1", "version": 0, "step": 0},
               {"time": t(0.6), "event": "join", "rank": 2, "host": "w2", "version": 0, "step": 0}]
    version = 0
    times = [1 + i * 0.1 for i in range(90)]  # [1, 10): 10/s
    times += [10.25 + i * 0.5 for i in range(10)]  # during the fault: 2/s
    times += [15.5 + i * 0.1 for i in range(145)]  # after: 10/s until 30
    for s in times:
        version += 1
        ev = {"time": t(s), "event": "update", "version": version, "step": version, "loss": 1.0 / version,
              "source": 1 if version % 2 else 2, "staleness": 1}
        if 10 <= s <= 15:
            ev |= {"missing": [2], "source": 1, "staleness": 0}
        if s == 15.5:
            ev["staleness"] = 6
        server.append(ev)
    server += [{"time": t(12), "event": "leave", "rank": 2, "host": "w2", "reason": "timeout"},
               {"time": t(15.2), "event": "late", "rank": 2, "step": 60},
               {"time": t(15.3), "event": "late", "rank": 2, "step": 61},
               {"time": t(16), "event": "join", "rank": 2, "host": "w2", "version": 120, "step": 120},
               {"time": t(5), "event": "eval", "version": 40, "step": 40, "test_loss": 0.5, "test_accuracy": 0.85},
               {"time": t(12), "event": "eval", "version": 95, "step": 95, "test_loss": 0.3, "test_accuracy": 0.91},
               {"time": t(25), "event": "eval", "version": 190, "step": 190, "test_loss": 0.2, "test_accuracy": 0.96},
               {"time": t(30), "event": "end", "version": version, "test_accuracy": 0.96, "test_loss": 0.2}]
    _write_jsonl(base / "srv" / "metrics.jsonl", server)
    for node in ("w1", "w2"):
        rows = [{"time": t(0.5), "event": "join", "version": 0, "step": 0}]
        # Exchanges every second: 0.5 s compute, 0.2 s communication, 0.1 s waiting.
        rows += [{"time": t(s), "event": "step", "step": s * 5, "loss": 2.0 / s, "version": s * 5,
                  "compute_s": 0.5, "comm_s": 0.2, "wait_s": 0.1, "status": "applied"} for s in range(2, 30)]
        if node == "w2":
            rows.append({"time": t(12.1), "event": "disconnect", "reason": "server closed the connection"})
        rows.append({"time": t(30), "event": "end", "steps": 140, "samples": 4480, "samples_per_s": 150.0})
        rows.sort(key=lambda r: r["time"])
        _write_jsonl(base / node / "metrics.jsonl", rows)
    if summary:
        (root / "summary.json").write_text(json.dumps({
            "algorithm": algorithm, "backend": "local", "steps": version, "wall_time_s": 30.0,
            "final_test_accuracy": 0.96, "final_test_loss": 0.2, "pushes_applied": version, "pushes_late": 2,
            "pushes_rejected": 1, "rejected_reasons": {"non-finite": 1}, "bytes_sent": 5_000_000, "bytes_received": 4_000_000,
            "per_worker": [
                {"rank": 1, "hostname": "w1", "steps": 140, "pushes": 150, "samples_per_s": 160.0, "mean_staleness": 1.0,
                 "late": 0, "rejected": 1, "joins": 1},
                {"rank": 2, "hostname": "w2", "steps": 120, "pushes": 95, "samples_per_s": 120.0, "mean_staleness": 1.1,
                 "late": 2, "rejected": 0, "joins": 2}],
            "links": [{"name": "w1->srv", "src": "w1", "dst": "srv", "network": "tb", "profile": "thunderbolt",
                       "mechanism": "proxy", "bytes_up": 2_000_000, "bytes_down": 2_500_000},
                      {"name": "w2->srv", "src": "w2", "dst": "srv", "network": "tb", "profile": "wifi",
                       "mechanism": "proxy", "bytes_up": 1_500_000, "bytes_down": 1_000_000}],
        }))
    if faults:
        _write_jsonl(root / "faults.jsonl", [
            {"time": t(10), "elapsed": 10.0, "fault": "pause", "target": "w2", "action": "fired"},
            {"time": t(15), "elapsed": 15.0, "fault": "pause", "target": "w2", "action": "healed"}])
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run-edp")


def test_load_run_finds_nodes_server_and_start(run_dir):
    run = load_run(run_dir)
    assert run.server == "srv"
    assert run.workers == ["w1", "w2"]
    assert run.start_time == T0
    assert run.algorithm == "edp"
    assert [f["action"] for f in run.faults] == ["fired", "healed"]


def test_flat_layout_and_server_summary_fallback(tmp_path):
    """Runs started by hand (server/, w1/ directly in the run dir, summary.json in the server's folder)."""
    root = make_run(tmp_path / "flat", layout="flat", summary=False, faults=False)
    (root / "srv" / "summary.json").write_text(json.dumps({"algorithm": "syncps", "wall_time_s": 29.5}))
    run = load_run(root)
    assert run.server == "srv" and run.workers == ["w1", "w2"]
    assert run.summary.wall_time_s == 29.5
    assert run.faults == []


def test_torn_last_line_is_skipped(run_dir):
    path = run_dir / "nodes" / "w1" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"time": 1700000031.0, "event": "st')  # killed mid-write
    run = load_run(run_dir)
    assert run.node_events("w1")[-1]["event"] == "end"


def test_time_to_accuracy(run_dir):
    run = load_run(run_dir)
    assert run.time_to_accuracy(0.80) == pytest.approx(5.0)
    assert run.time_to_accuracy(0.90) == pytest.approx(12.0)
    assert run.time_to_accuracy(0.95) == pytest.approx(25.0)
    assert run.time_to_accuracy(0.99) is None


def test_start_time_without_server_start_is_earliest_event(tmp_path):
    root = make_run(tmp_path / "r", faults=False)
    path = root / "nodes" / "srv" / "metrics.jsonl"
    path.write_text("".join(l + "\n" for l in path.read_text().splitlines() if '"start"' not in l))
    run = load_run(root)
    assert run.start_time == T0 + 0.5  # the first join
    assert run.time_to_accuracy(0.9) == pytest.approx(11.5)


def test_fault_reactions_numbers(run_dir):
    [r] = fault_reactions(load_run(run_dir), window_s=1.0)
    assert (r["fault"], r["target"]) == ("pause", "w2")
    assert r["at_s"] == pytest.approx(10.0)
    assert r["healed_after_s"] == pytest.approx(5.0)
    assert r["updates_during"] == 10
    assert r["updates_missing_workers"] == 10
    assert r["missing_ranks"] == [2]
    assert r["late_pushes"] == 2
    assert r["staleness_peak"] == 6
    assert r["staleness_mean_before"] == pytest.approx(1.0)
    assert sorted((d["node"], d["after_s"]) for d in r["disconnects"]) == [("srv", 2.0), ("w2", 2.1)]
    assert [(j["host"], j["after_s"]) for j in r["rejoins"]] == [("w2", 6.0)]
    assert r["throughput_before"] == pytest.approx(10.0)
    assert r["throughput_during"] == pytest.approx(2.0)
    assert r["recovered_after_s"] == pytest.approx(5.5)


def test_startup_burst_does_not_set_the_recovery_bar(run_dir):
    """A burst of 40 updates in the first 0.4 s lifts the mean pre-fault rate to 14/s; the baseline is the
    steady 10/s (median of 1 s windows), so the cluster back at 10/s counts as recovered."""
    path = run_dir / "nodes" / "srv" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    burst = [{"time": T0 + 1 + i * 0.01, "event": "update", "version": 0, "step": 0, "loss": 1.0, "source": 1,
              "staleness": 1} for i in range(40)]
    _write_jsonl(path, rows + burst)
    [r] = fault_reactions(load_run(run_dir), window_s=1.0)
    assert r["throughput_before"] == pytest.approx(10.0)
    assert r["recovered_after_s"] == pytest.approx(5.5)


def test_unhealed_fault_lasts_until_target_rejoins(run_dir):
    _write_jsonl(run_dir / "faults.jsonl", [{"time": T0 + 10, "elapsed": 10.0, "fault": "kill", "target": "w2", "action": "fired"}])
    [r] = fault_reactions(load_run(run_dir), window_s=1.0)
    assert r["healed_after_s"] is None
    assert r["window_s"] == pytest.approx(6.0)  # w2's join at 16 s
    assert r["updates_missing_workers"] == 10


def test_explicit_heal_reports_its_own_reaction(run_dir):
    """A partition of w2 at 10 s ended by a `heal` entry at 15 s: the heal says what it ended and how the
    cluster came back after it, measured against the rate before the partition (not the degraded one)."""
    _write_jsonl(run_dir / "faults.jsonl", [
        {"time": T0 + 10, "fault": "cut-w2", "target": "w2->srv", "action": "fired", "kind": "partition", "duration": None},
        {"time": T0 + 15, "fault": "heal-w2", "target": "w2->srv", "action": "fired", "kind": "heal", "duration": None},
        {"time": T0 + 15, "fault": "cut-w2", "target": "w2->srv", "action": "healed", "kind": "partition", "by": "heal-w2"}])
    cut, heal = fault_reactions(load_run(run_dir), window_s=1.0)
    assert cut["healed_after_s"] == pytest.approx(5.0) and "ends" not in cut
    assert heal["ends"] == [{"fault": "cut-w2", "after_s": 5.0}]
    assert heal["throughput_before"] == pytest.approx(10.0)  # before the partition, not the 2/s before the heal
    assert heal["recovered_after_s"] == pytest.approx(0.5)  # 10/s again from 15.5 s
    assert [(j["host"], j["after_s"]) for j in heal["rejoins"]] == [("w2", 1.0)]
    assert heal["late_pushes"] == 2 and heal["staleness_peak"] == 6
    table = summary_table(load_run(run_dir))
    assert "heal-w2 w2->srv  (ends cut-w2 after 5.0 s)" in table
    assert "(not healed)" not in table
    assert "throughput 10.0 updates/s before cut-w2, back to >=80 % after 0.5 s" in table


def test_resume_entry_and_instant_restart_are_not_unhealed(run_dir):
    _write_jsonl(run_dir / "faults.jsonl", [
        {"time": T0 + 10, "fault": "stop-w2", "target": "w2", "action": "fired", "kind": "pause", "duration": None},
        {"time": T0 + 15, "fault": "go-w2", "target": "w2", "action": "fired", "kind": "resume", "duration": None},
        {"time": T0 + 15, "fault": "stop-w2", "target": "w2", "action": "healed", "kind": "pause", "by": "go-w2"},
        {"time": T0 + 20, "fault": "again-w1", "target": "w1", "action": "fired", "kind": "restart", "duration": None},
        {"time": T0 + 22, "fault": "gone-w1", "target": "w1", "action": "fired", "kind": "kill", "duration": None}])
    table = summary_table(load_run(run_dir))
    assert "go-w2 w2  (ends stop-w2 after 5.0 s)" in table
    assert "again-w1 w1  (instant)" in table
    assert "gone-w1 w1  (permanent)" in table
    assert "(not healed)" not in table


def _crash_run(root: Path, after_per_s: float) -> Path:
    """A server crash at 10 s (a 1 s outage by the schedule) whose server serves again at 13 s: 10 updates/s
    before, none from 10 to 13.2 s, then `after_per_s` until 30 s."""
    run = make_run(root, faults=False)
    metrics = run / "nodes" / "srv" / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    kept = [r for r in rows if r["event"] != "update" or r["time"] < T0 + 10]
    n = int((30 - 13.2) * after_per_s)
    kept += [{"time": T0 + 13.2 + i / after_per_s, "event": "update", "version": 100 + i, "step": 100 + i, "source": 1 + i % 2,
              "staleness": 1} for i in range(n)]
    kept += [{"time": T0 + 13.0, "event": "resume", "version": 80, "step": 80},
             {"time": T0 + 13.0, "event": "start", "version": 80, "step": 80}]
    _write_jsonl(metrics, sorted(kept, key=lambda r: r["time"]))
    _write_jsonl(run / "faults.jsonl", [
        {"time": T0 + 10, "fault": "crash-srv", "target": "srv", "action": "fired", "kind": "server_crash", "duration": 1},
        {"time": T0 + 11, "fault": "crash-srv", "target": "srv", "action": "healed", "kind": "server_crash"}])
    return run


def test_server_crash_says_when_the_server_served_again_and_the_rate_after(tmp_path):
    """The crash lasts 1 s by the schedule, the restart 3 s more: recovery counts from the crash, the server's
    own return is stated, and the rate after recovery is compared with the rate before."""
    [r] = fault_reactions(load_run(_crash_run(tmp_path / "full", 10.0)), window_s=1.0)
    assert r["server_back_after_s"] == pytest.approx(3.0) and r["healed_after_s"] == pytest.approx(1.0)
    assert r["recovered_after_s"] == pytest.approx(3.2)
    assert r["throughput_before"] == pytest.approx(10.0) and r["throughput_after"] == pytest.approx(10.0)
    table = summary_table(load_run(tmp_path / "full"))
    assert "server serving again after 3.0 s" in table
    assert "back to >=80 % after 3.2 s, then 10.0 (100 % of before)" in table


def test_a_cluster_that_stays_slower_after_a_crash_says_how_much(tmp_path):
    [r] = fault_reactions(load_run(_crash_run(tmp_path / "slow", 6.0)), window_s=1.0)
    assert r["recovered_after_s"] is None and r["throughput_after"] == pytest.approx(6.0)
    assert "not back to 80 % before the run ended (6.0 updates/s after it, 60 % of before)" in summary_table(
        load_run(tmp_path / "slow"))


def test_fault_that_never_recovers(run_dir):
    """A fault at 29.5 s: the run ends before a full window at the old rate fits."""
    _write_jsonl(run_dir / "faults.jsonl", [{"time": T0 + 29.5, "fault": "kill", "target": "srv", "action": "fired"}])
    [r] = fault_reactions(load_run(run_dir), window_s=1.0)
    assert r["recovered_after_s"] is None
    assert "not back to 80 %" in summary_table(load_run(run_dir))


def test_node_rows_use_summary_and_links(run_dir):
    rows = {r.node: r for r in node_rows(load_run(run_dir))}
    assert rows["srv"].role == "server" and rows["srv"].bytes_out == 5_000_000 and rows["srv"].late == 2
    assert rows["w1"].samples_per_s == 160.0 and rows["w1"].rejected == 1
    assert (rows["w2"].bytes_out, rows["w2"].bytes_in) == (1_500_000, 1_000_000)
    assert rows["w2"].late == 2


def test_node_rows_without_summary_come_from_metrics(tmp_path):
    """A crashed server writes no summary: steps, samples/s, staleness and late counts come from the metrics."""
    run = load_run(make_run(tmp_path / "r", summary=False))
    rows = {r.node: r for r in node_rows(run)}
    assert rows["srv"].steps == 245 and rows["srv"].late == 2 and rows["srv"].rejected == 0
    assert rows["w1"].samples_per_s == 150.0 and rows["w1"].steps == 140
    assert rows["w2"].late == 2 and rows["w1"].late == 0
    assert rows["w2"].mean_staleness == pytest.approx(1.0)  # w2 pushed only outside the fault, all at staleness 1


def test_summary_table_contents(run_dir):
    text = summary_table(load_run(run_dir))
    assert "algorithm edp, backend local, 2 workers" in text
    assert "final test accuracy 0.9600" in text
    assert "time to 90%: 12.0 s" in text and "time to 95%: 25.0 s" in text
    assert "2 late, 1 rejected (non-finite: 1)" in text
    w2 = next(l for l in text.splitlines() if l.startswith("w2 "))
    assert w2.split() == ["w2", "worker", "120", "120", "1.10", "1.0", "MB", "1.5", "MB", "2", "0"]
    assert "w2->srv" in text and "wifi" in text
    assert "Faults (1)" in text
    assert "t=10.0 s  pause w2  (healed after 5.0 s)" in text
    assert "10 with missing workers (ranks 2)" in text and "2 late pushes" in text and "staleness peak 6" in text
    assert "rejoined: w2 +6.0 s" in text


def test_timeline_segments_end_at_each_exchange(run_dir):
    segs = timeline_segments(load_run(run_dir), "w1")
    # The exchange at 2 s: compute 1.2-1.7, communication 1.7-1.9, waiting 1.9-2.0.
    assert segs["wait"][0] == pytest.approx((1.9, 0.1))
    assert segs["comm"][0] == pytest.approx((1.7, 0.2))
    assert segs["compute"][0] == pytest.approx((1.2, 0.5))
    for phase in segs.values():
        assert len(phase) == 28


def test_timeline_segments_never_overlap_previous_exchange(tmp_path):
    """Durations that add up to more than the gap since the previous line are clipped at it."""
    root = tmp_path / "r"
    _write_jsonl(root / "nodes" / "srv" / "metrics.jsonl", [{"time": T0, "event": "start", "algorithm": "syncps"}])
    _write_jsonl(root / "nodes" / "w1" / "metrics.jsonl", [
        {"time": T0 + 1.0, "event": "join"},
        {"time": T0 + 1.5, "event": "step", "compute_s": 0.4, "comm_s": 0.3, "wait_s": 0.1}])
    segs = timeline_segments(load_run(root), "w1")
    assert segs["wait"] == [pytest.approx((1.4, 0.1))]
    assert segs["comm"] == [pytest.approx((1.1, 0.3))]
    assert segs["compute"] == [pytest.approx((1.0, 0.1))]


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 400


def test_write_plots(run_dir):
    paths = write_plots(run_dir)
    assert [p.name for p in paths] == ["accuracy.png", "throughput.png", "timeline.png", "staleness.png"]
    for p in paths:
        assert p.parent == run_dir
        _assert_png(p)


def test_no_staleness_plot_without_staleness(tmp_path):
    root = make_run(tmp_path / "r", faults=False, algorithm="syncps")
    path = root / "nodes" / "srv" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    _write_jsonl(path, [{k: v for k, v in r.items() if k != "staleness"} for r in rows])
    assert "staleness.png" not in [p.name for p in write_plots(root)]


def test_compare_side_by_side(tmp_path):
    a = load_run(make_run(tmp_path / "edp-run"))
    b_root = make_run(tmp_path / "syncps-run", faults=False, algorithm="syncps")
    summary = json.loads((b_root / "summary.json").read_text()) | {"final_test_accuracy": 0.97, "wall_time_s": 40.0}
    (b_root / "summary.json").write_text(json.dumps(summary))
    text = compare(a, load_run(b_root))
    lines = {l.split("  ")[0].strip(): l.split() for l in text.splitlines()}
    assert "A: edp-run" in text and "B: syncps-run" in text
    assert lines["algorithm"][-2:] == ["edp", "syncps"]
    assert lines["final accuracy"][-2:] == ["0.9600", "0.9700"]
    assert lines["wall time"][-4:] == ["30.0", "s", "40.0", "s"]
    assert lines["time to 90%"][-4:] == ["12.0", "s", "12.0", "s"]
    assert lines["faults fired"][-2:] == ["1", "0"]
    assert lines["mean samples/s per worker"][-2:] == ["140", "140"]
    out = write_compare_plot(a, load_run(b_root), tmp_path / "plots" / "cmp.png")
    _assert_png(out)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        load_run(tmp_path / "empty")


def test_cli_report_and_compare(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", faults=False)
    runner = CliRunner()
    res = runner.invoke(build_app(), ["report", str(a)])
    assert res.exit_code == 0, res.output
    assert "time to 90%: 12.0 s" in res.output and "wrote" in res.output
    assert (a / "timeline.png").exists()
    res = runner.invoke(build_app(), ["compare", str(a), str(b), "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert "final accuracy" in res.output
    _assert_png(tmp_path / "c.png")
    res = runner.invoke(build_app(), ["compare", str(a), str(b)])
    assert res.exit_code == 0, res.output
    _assert_png(tmp_path / "compare_a_vs_b.png")


def test_sim_summary_shapes(run_dir):
    """The sim's summary.json: per-node bytes in "nodes" (own traffic, not forwarded) and link profiles as dicts."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["nodes"] = [{"node": "w2", "role": "worker", "bytes_out": 7_000, "bytes_in": 9_000}]
    summary["links"][1]["profile"] = {"name": "wifi", "delay_ms": 5.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    run = load_run(run_dir)
    rows = {r.node: r for r in node_rows(run)}
    assert (rows["w2"].bytes_out, rows["w2"].bytes_in) == (7_000, 9_000)
    assert (rows["w1"].bytes_out, rows["w1"].bytes_in) == (2_000_000, 2_500_000)  # no sim row: from its link
    link = next(l for l in summary_table(run).splitlines() if l.startswith("w2->srv"))
    assert link.split()[:4] == ["w2->srv", "tb", "wifi", "proxy"]
