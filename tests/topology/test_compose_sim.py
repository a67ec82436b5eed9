"""`smolcluster sim --backend compose`: training inside containers on hybrid.yaml, faults through docker,
the link check, and teardown (no container or network left, also when the run fails).

Step caps keep the whole docker suite within CI's budget on 2 cores. They are set where each
algorithm's accuracy floor is already met with margin (measured here): EDP passes 0.90 at ~60 server
updates (0.905 at 60), so 150; SyncPS reaches 0.929 after 200 steps, floor 0.92.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from smolcluster.bench.logging import PushSink
from smolcluster.common.errors import SimError
from smolcluster.testbed.sim.compose import leftovers
from smolcluster.testbed.sim.compose_run import run_compose
from smolcluster.testbed.sim.options import SimOptions

HYBRID = Path(__file__).resolve().parents[2] / "topologies" / "hybrid.yaml"

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EDP_STEPS, EDP_FLOOR = 150, 0.90
SYNCPS_STEPS, SYNCPS_FLOOR = 200, 0.92


def _sim(tmp_path: Path, monkeypatch, mnist_dir: Path, *, algo: str, max_steps: int, faults: str | None = None,
         topology: Path = HYBRID, **kw) -> tuple[int, dict, str]:
    monkeypatch.setenv("SMOLCLUSTER_DATA_DIR", str(mnist_dir))
    fault_file = None
    if faults is not None:
        fault_file = tmp_path / "faults.yaml"
        fault_file.write_text(faults)
    run_dir = tmp_path / "run"
    out = io.StringIO()
    code = run_compose(SimOptions(file=topology, algo=algo, max_steps=max_steps, run_dir=run_dir, faults=fault_file,
                                  progress_interval=10.0, **kw), out=out)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return code, summary, out.getvalue()


def _assert_clean(docker_env, project: str) -> None:
    containers, networks = leftovers(docker_env, project)
    assert not containers and not networks, f"left behind: containers {containers}, networks {networks}"


def test_edp_trains_in_containers_and_survives_a_killed_pi(docker_env, offline_image, mnist_dir, tmp_path, monkeypatch):
    # pi5 is killed (docker kill) a third of the way in and never comes back: the other three finish the run
    code, s, out = _sim(tmp_path, monkeypatch, mnist_dir, algo="edp", max_steps=EDP_STEPS,
                        faults="faults:\n  - {at_step: 40, node: pi5, action: kill}\n")
    assert code == 0, out
    assert s["backend"] == "compose" and s["algorithm"] == "edp"
    assert s["final_test_accuracy"] >= EDP_FLOOR, out
    assert s["steps"] == EDP_STEPS
    fired = [f for f in s["faults"] if f.get("target") == "pi5"]
    assert fired, f"the kill is not in the summary: {s['faults']}"
    ended = {w: '"end"' in (tmp_path / "run" / "nodes" / w / "metrics.jsonl").read_text() for w in ("mini2", "mini3", "pi5", "pi4")}
    assert ended == {"mini2": True, "mini3": True, "pi5": False, "pi4": True}, ended  # pi5 died, the rest finished
    faults_log = (tmp_path / "run" / "faults.jsonl").read_text()
    assert "pi5" in faults_log and "kill" in faults_log
    # every link says how it was emulated; here (no netem) rate by tbf and latency by the proxy
    assert {l["name"] for l in s["links"]} == {"mini2-to-mini1", "mini3-to-mini1", "pi5-to-mini1", "pi4-to-mini1"}
    for link in s["links"]:
        assert link["mechanism"] in ("netem", "tbf+proxy"), link
        assert link["kernel"] and set(link["kernel"].values()) <= {"netem", "tbf"}, link
    assert "[tbf+proxy]" in out or "[netem]" in out
    # per-node logs and metrics in the shared layout
    for node in ("mini1", "mini2", "mini3", "pi5", "pi4"):
        assert (tmp_path / "run" / "nodes" / node / "metrics.jsonl").exists()
        assert (tmp_path / "run" / "nodes" / node / "stdout.log").exists()
    _assert_clean(docker_env, s["compose_project"])


def test_syncps_trains_in_containers_and_the_server_resumes_after_a_crash(docker_env, offline_image, mnist_dir, tmp_path,
                                                                          monkeypatch):
    # server container killed after its first checkpoint (every 100 updates), started again 3 s later with --resume
    code, s, out = _sim(tmp_path, monkeypatch, mnist_dir, algo="syncps", max_steps=SYNCPS_STEPS,
                        faults="faults:\n  - {at_step: 110, action: server_crash, duration: 3}\n")
    assert code == 0, out
    assert s["backend"] == "compose" and s["algorithm"] == "syncps"
    assert s["final_test_accuracy"] >= SYNCPS_FLOOR, out
    assert s["steps"] == SYNCPS_STEPS
    metrics = (tmp_path / "run" / "nodes" / "mini1" / "metrics.jsonl").read_text().splitlines()
    resumes = [json.loads(l) for l in metrics if '"resume"' in l]
    assert resumes and resumes[0]["version"] >= 100, "the restarted server did not resume from its checkpoint"
    _assert_clean(docker_env, s["compose_project"])


def test_failed_run_is_torn_down(docker_env, offline_image, tmp_path, monkeypatch):
    # A corrupt MNIST file: every node fails while loading data; nothing may be left behind.
    bad = tmp_path / "bad-mnist"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (bad / name).write_bytes(b"not an IDX file")
    with pytest.raises(SimError, match="without a summary"):
        _sim(tmp_path, monkeypatch, bad, algo="edp", max_steps=5)
    compose_file = tmp_path / "run" / "compose" / "docker-compose.yml"
    project = next(l.split("-p ")[1].split()[0] for l in compose_file.read_text().splitlines() if "-p " in l)
    _assert_clean(docker_env, project)
    assert (tmp_path / "run" / "nodes" / "mini1" / "stdout.log").exists()  # the reason is kept


def test_every_worker_failing_stops_the_run(docker_env, offline_image, mnist_dir, tmp_path, monkeypatch):
    # Test set fine (the server starts and waits), training set corrupt (every worker fails, mini3
    # while its container keeps routing): the run must stop with the workers' error, not wait forever.
    bad = tmp_path / "half-mnist"
    bad.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes((mnist_dir / name).read_bytes())
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (bad / name).write_bytes(b"not an IDX file")
    t0 = time.time()
    with pytest.raises(SimError, match="every worker exited"):
        _sim(tmp_path, monkeypatch, bad, algo="syncps", max_steps=5)
    assert time.time() - t0 < 240
    compose_file = tmp_path / "run" / "compose" / "docker-compose.yml"
    project = next(l.split("-p ")[1].split()[0] for l in compose_file.read_text().splitlines() if "-p " in l)
    _assert_clean(docker_env, project)


def test_render_only_writes_a_project_usable_by_hand(tmp_path, monkeypatch, mnist_dir):
    code, _, out = _sim(tmp_path, monkeypatch, mnist_dir, algo="syncps", max_steps=10, render_only=True)
    assert code == 0
    compose_file = tmp_path / "run" / "compose" / "docker-compose.yml"
    assert f"-f {compose_file} up" in out and "docker-compose -p" in out
    text = compose_file.read_text()
    assert "--algo, syncps" in text and "10.10.0.1" in text
    assert (tmp_path / "run" / "config" / "cluster_config_syncps.yaml").exists()


def test_check_measures_every_path_in_containers(docker_env, offline_image, mnist_dir, tmp_path, monkeypatch):
    # home-wifi has paths slow enough to judge here: 20 / 36 ms RTT, 100 / 40 Mbit/s
    code, _, out = _sim(tmp_path, monkeypatch, mnist_dir, algo="edp", max_steps=1, check=True, as_json=True,
                        topology=HYBRID.parent / "home-wifi.yaml")
    result = json.loads(out)
    assert result["backend"] == "compose"
    paths = {p["from"]: p for p in result["paths"]}
    assert set(paths) == {"macbook", "windows", "pi"}
    for p in result["paths"]:
        assert {"from", "to", "rtt_ms_expected", "rtt_ms_measured", "mbps_expected", "mbps_measured", "ok"} <= set(p)
    judged = [p for p in result["paths"] if p["rtt_checked"] and p["mbps_checked"]]
    assert judged, result
    assert code == (0 if all(p["ok"] for p in result["paths"]) else 1)
    assert all(p["ok"] for p in judged), result


def test_logging_reaches_a_loki_on_the_hosts_loopback(docker_env, offline_image, mnist_dir, tmp_path, monkeypatch):
    # a Loki on 127.0.0.1 (the logging/ stack's default) is out of the containers' reach: they push through their
    # network's gateway, relayed by the host; every node's lines arrive with the labels, the fault as the controller's
    sink = PushSink()
    try:
        code, s, out = _sim(tmp_path, monkeypatch, mnist_dir, algo="edp", max_steps=40, logging=True, loki_url=sink.url,
                            faults="faults:\n  - {at_step: 10, node: pi4, action: pause, duration: 1.0}\n")
        lines = sink.lines()
    finally:
        sink.close()
    assert code == 0, out
    assert f"relayed to {sink.url}" in out
    hosts = {labels["host"] for labels, _, _ in lines}
    assert hosts == {"server-rank0-mini1", "worker-rank0-mini2", "worker-rank1-mini3", "worker-rank2-pi5",
                     "worker-rank3-pi4", "controller"}, hosts
    for node, host in (("mini1", "server-rank0-mini1"), ("pi4", "worker-rank3-pi4")):
        shipped = [line for labels, _, line in lines if labels["host"] == host and labels["kind"] == "metrics"]
        on_disk = (tmp_path / "run" / "nodes" / node / "metrics.jsonl").read_text().splitlines()
        assert shipped == on_disk, f"{node}: {len(shipped)} metrics lines shipped, {len(on_disk)} on disk"
    faults = [json.loads(line)["action"] for labels, _, line in lines if labels["job"] == "smolcluster-faults"]
    assert faults == ["fired", "healed"], faults
    _assert_clean(docker_env, s["compose_project"])
