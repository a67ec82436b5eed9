"""`smolcluster sim` end to end: real node processes, real proxies, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from smolcluster.common.jsonl import read_jsonl
from smolcluster.common.wait import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLOOR = {"edp": 0.90, "syncps": 0.92}  # same floors as the training tests (one epoch of MNIST)


def sim_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "smolcluster", "sim", *args]


def env_with(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "SMOLCLUSTER_DATA_DIR": str(data_dir)}


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_gone(procs: list[psutil.Process]) -> None:
    wait_until(lambda: all(gone(p) for p in procs), 10)
    for p in procs:
        assert gone(p), f"left behind: {p.pid} {p.cmdline()}"


def assert_closed(address: str) -> None:
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


@pytest.mark.parametrize("algo", ["edp", "syncps"])
def test_hybrid_sim_trains_to_accuracy(tmp_path, mnist_dir, algo):
    run_dir = tmp_path / algo
    started = time.time()
    r = subprocess.run(sim_cmd("topologies/hybrid.yaml", "--algo", algo, "--run-dir", str(run_dir)), cwd=REPO,
                       env=env_with(mnist_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.time() - started < 300

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["algorithm"] == algo and s["backend"] == "local"
    assert s["final_test_accuracy"] >= FLOOR[algo], s["final_test_accuracy"]
    assert len(s["model_sha256"]) == 64  # every backend names its final model by hash
    assert s["time_to_90_s"] is not None and 0 < s["time_to_90_s"] <= s["wall_time_s"] + 1
    assert "time_to_95_s" in s
    links = {l["name"]: l for l in s["links"]}
    assert set(links) == {"mini2->mini1", "mini3->mini1", "pi5->mini1", "pi4->mini3"}
    assert links["pi5->mini1"]["mechanism"] == "proxy" and "unshaped" in links["mini2->mini1"]["mechanism"]
    # the shared link carries mini3's and pi4's traffic: more than either first hop alone
    assert links["mini3->mini1"]["bytes_up"] > links["pi4->mini3"]["bytes_up"] > 0
    nodes = {n["node"]: n for n in s["nodes"]}
    assert set(nodes) == {"mini1", "mini2", "mini3", "pi5", "pi4"}
    for w in ("mini2", "mini3", "pi5", "pi4"):
        assert nodes[w]["steps"] > 0 and nodes[w]["samples_per_s"] > 0 and nodes[w]["bytes_out"] > 0
    assert nodes["pi4"]["slowdown"] > nodes["pi5"]["slowdown"] > nodes["mini2"]["slowdown"] == 1
    assert (run_dir / "topology.yaml").exists() and (run_dir / "config" / f"cluster_config_{algo}.yaml").exists()
    for node in nodes:
        assert (run_dir / "nodes" / node / "metrics.jsonl").exists()

    out = r.stdout
    for header in ("node", "samples/s", "staleness", "bytes out", "late", "rejected", "time to 90%:"):
        assert header in out
    for node in nodes:
        assert f"\n{node} " in out
    assert f"final test accuracy {s['final_test_accuracy']:.4f}" in out


def test_ctrl_c_leaves_no_process_or_port_behind(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    sim = subprocess.Popen(sim_cmd("topologies/hybrid.yaml", "--algo", "syncps", "--run-dir", str(run_dir)), cwd=REPO,
                           env=env_with(mnist_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def trained() -> bool:
            assert sim.poll() is None, sim.stdout.read()
            return any(e["event"] == "step" for w in ("mini2", "mini3") for e in read_jsonl(run_dir / "nodes" / w / "metrics.jsonl"))

        wait_until(trained, 120, interval=0.3, what="a worker's first step")
        children = descendants(sim.pid)
        assert len(children) >= 5  # server and four workers, mid-training
        proxies = json.loads((run_dir / "proxies.json").read_text())
        sim.send_signal(signal.SIGINT)
        out, _ = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert sim.returncode == 130, out[-2000:]
    assert "interrupted" in out
    assert_gone(children)
    for p in proxies["proxies"]:
        assert_closed(p["listen"])
    assert_closed(proxies["api"].removeprefix("http://"))


def test_workers_that_cannot_start_fail_the_run_clearly(tmp_path, mnist_dir):
    data = tmp_path / "mnist"  # a good test set (the server starts) but a corrupt training set (every worker dies)
    data.mkdir()
    for f in mnist_dir.glob("t10k-*"):
        (data / f.name).write_bytes(f.read_bytes())
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (data / name).write_bytes(b"not an IDX file")
    r = subprocess.run(sim_cmd("topologies/hybrid.yaml", "--run-dir", str(tmp_path / "run")), cwd=REPO, env=env_with(data),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "every worker exited" in r.stderr and "MNIST" in r.stderr  # names the cause, from the worker's output
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


def test_a_server_that_cannot_start_fails_the_run_with_its_reason(tmp_path, mnist_dir):
    data = tmp_path / "mnist"  # good training files, a corrupt test set: the server's first evaluation fails
    data.mkdir()
    for f in mnist_dir.glob("train-*"):
        (data / f.name).symlink_to(f)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / name).write_bytes(b"not an IDX file")
    r = subprocess.run(sim_cmd("topologies/hybrid.yaml", "--run-dir", str(tmp_path / "run")), cwd=REPO, env=env_with(data),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    # the server's own error, not only "see its log"
    assert "without a summary: " in r.stderr and "t10k-images-idx3-ubyte" in r.stderr and "not an MNIST file" in r.stderr, r.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


def test_link_check_home_wifi_passes_and_says_what_it_cannot_emulate():
    r = subprocess.run(sim_cmd("topologies/home-wifi.yaml", "--check", "--json"), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    paths = {p["from"]: p for p in json.loads(r.stdout)["paths"]}
    assert set(paths) == {"macbook", "windows", "pi"}
    for name in ("macbook", "windows"):  # Wi-Fi: slow and far enough to verify on loopback
        p = paths[name]
        assert p["ok"] and p["rtt_checked"] and p["mbps_checked"] and p["to"] == "server"
        assert p["rtt_ms_measured"] == pytest.approx(p["rtt_ms_expected"], rel=0.15)
        assert p["mbps_measured"] == pytest.approx(p["mbps_expected"], rel=0.15)
    assert paths["windows"]["mbps_expected"] == 40 and paths["windows"]["rtt_ms_expected"] == 36
    pi = paths["pi"]  # cabled GbE: below what loopback can show, reported as such
    assert pi["ok"] and not pi["rtt_checked"] and not pi["mbps_checked"]
    assert any("not emulable on loopback" in n for n in pi["notes"])
