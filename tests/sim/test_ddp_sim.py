"""The DDP arm through the local sim: gloo ranks in real processes, their pair connections through the
hop proxies (or direct with ddp_routes: false), an arm like the others (run dir, metrics, summary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smolcluster.testbed.sim.ddp_routes import gloo_dials, pair_paths
from smolcluster.testbed.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
HYBRID = REPO / "topologies" / "hybrid.yaml"


def test_every_worker_pair_has_a_path_along_the_topology():
    paths = pair_paths(load_topology(HYBRID))
    assert len(paths) == 12  # 4 workers, ordered pairs
    mini3_pi4 = paths[("mini3", "pi4")]
    assert [(p.hop.src, p.hop.dst) for p in mini3_pi4.hops] == [("mini3", "pi4")] and not mini3_pi4.via_server
    # the Pis route only the Macs' subnet: pi4 -> pi5 goes the way a default route via the Macs would
    pis = paths[("pi4", "pi5")]
    assert pis.via_server and [(p.hop.src, p.hop.dst) for p in pis.hops] == [("pi4", "mini3"), ("mini3", "mini1"), ("mini1", "pi5")]


def test_gloo_dial_rule_is_one_sided():
    a, b = "127.0.0.1:40000", "127.0.0.1:40001"
    assert gloo_dials(a, b) != gloo_dials(b, a)


@pytest.mark.slow
@pytest.mark.parametrize("routes", [True, False])
def test_ddp_sim_trains_and_reports_its_links(tmp_path, mnist_dir, routes):
    topo = HYBRID
    if not routes:
        topo = tmp_path / "hybrid.yaml"
        topo.write_text(HYBRID.read_text().replace("  min_workers: 2", "  min_workers: 2\n  ddp_routes: false"))
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(topo), "--algo", "ddp", "--max-steps", "50",
                        "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["algorithm"] == "ddp" and s["steps"] == 50 and s["final_test_accuracy"] > 0.85
    assert s["pushes_rejected"] == 0 and s["ddp"] == {"backend": "gloo", "world_size": 4, "routes": routes}
    nodes = {n["node"]: n for n in s["nodes"]}
    for w in ("mini2", "mini3", "pi5", "pi4"):  # every rank took every step, in lockstep
        end = [json.loads(line) for line in (run_dir / "nodes" / w / "metrics.jsonl").read_text().splitlines() if '"end"' in line]
        assert end[-1]["steps"] == 50 and nodes[w]["bytes_out"] > 0
    gloo = [link for link in s["links"] if link["name"].startswith("gloo ")]
    if routes:
        assert s["ddp_links"]["mode"] == "routed" and s["ddp_links"]["routed_pairs"] == 6
        moved = sorted(link["bytes_up"] + link["bytes_down"] for link in gloo)
        # every pair connected; gloo's ring all-reduce over 4 ranks carries the gradients on 4 of them
        assert len(gloo) == 6 and moved[0] > 0 and all(m > 10_000_000 for m in moved[-4:])
        assert sorted(s["ddp_links"]["via_server"]) == ["pi4->pi5", "pi5->pi4"]
    else:
        assert s["ddp_links"]["mode"] == "direct" and "unshaped" in s["ddp_links"]["note"] and gloo == []
    assert s["evals"][-1]["version"] == 50 and (run_dir / "accuracy.png").exists() == ("plots: skipped" not in r.stdout)


def test_the_virtual_backend_refuses_ddp():
    from smolcluster.common.errors import SimError
    from smolcluster.testbed.sim.options import SimOptions
    from smolcluster.testbed.sim.run import run_sim

    with pytest.raises(SimError, match="use --backend local"):
        run_sim(SimOptions(file=HYBRID, algo="ddp", backend="virtual"))
