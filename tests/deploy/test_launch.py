"""The real-hardware launcher rehearsed for real: hybrid.yaml's five nodes as hosts with sshd, tmux and
rsync on routed subnets (tests/deploy/rehearsal.py), the Pis reachable only through `host.jump`.

From this process as the controller, the commands a user types: `bash launch_edp.sh FILE --ssh-config F
--wait`, `--status`, `--stop`, `--collect`, `--attach`, `--check`, `smolcluster report`,
`smolcluster topology netsetup --apply`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rehearsal import Rehearsal

from smolcluster.common.wait import wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def write_rehearsal_topology(r: Rehearsal, path: Path) -> Path:
    """The rehearsal copy of hybrid.yaml: host blocks for the namespaces, W&B off (speed), short eval cadence."""
    r.write_topology(path)
    data = yaml.safe_load(path.read_text())
    data["training"] |= {"wandb": "off", "eval_steps": 25}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def launch(r: Rehearsal, topo: Path, runs: Path, *args: str, algo: str = "edp", timeout: float = 600,
           script: bool = True) -> subprocess.CompletedProcess:
    """`bash launch_<algo>.sh TOPO --ssh-config F --runs-dir RUNS ARGS` (or `smolcluster launch` with script=False)."""
    env = dict(os.environ, SMOLCLUSTER_PYTHON=sys.executable, SMOLCLUSTER_DATA_DIR=str(r.mnist_dir))
    env.pop("SMOLCLUSTER_CLUSTER_KEY", None)
    head = ["bash", str(REPO / f"launch_{algo}.sh"), str(topo)] if script else \
        [sys.executable, "-m", "smolcluster", "launch", str(topo), "--algo", algo]
    return subprocess.run([*head, "--ssh-config", str(r.ssh_config), "--runs-dir", str(runs), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def tmux_sessions(r: Rehearsal, node: str) -> list[str]:
    out = r.ssh(node, "tmux ls -F '#{session_name}' 2>/dev/null; true", check=True).stdout
    return [line for line in out.split() if line]


def run_processes(r: Rehearsal) -> dict[str, list[str]]:
    """Per host, the smolcluster node processes still running there."""
    out = {}
    for node in r.topology.nodes:
        cmds = []
        for pid in r.pids(node):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "-m smolcluster" in cmd:
                cmds.append(cmd)
        out[node] = cmds
    return out


@pytest.fixture(scope="module")
def cluster(rehearsal_requirements, mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    with Rehearsal(REPO / "topologies" / "hybrid.yaml", root / "hosts") as r:
        r.mnist_dir = mnist_dir  # what the controller copies to hosts that have none
        topo = write_rehearsal_topology(r, root / "hybrid-rehearsal.yaml")
        yield r, topo, root / "runs"


@pytest.mark.parametrize("algo, steps", [("edp", 150), ("syncps", 250)])
def test_trains_over_ssh_to_090_and_collects_a_sim_like_run(cluster, algo, steps):
    r, topo, runs = cluster
    name = f"train-{algo}"
    p = launch(r, topo, runs, "--max-steps", str(steps), "--wait", "--run-name", name, algo=algo)
    assert p.returncode == 0, p.stdout + p.stderr
    for node in ("mini1", "mini2", "mini3", "pi5", "pi4"):
        assert f"start      {node}" in p.stdout  # one line per host and step
    run_dir = runs / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "hardware" and summary["algorithm"] == algo
    assert summary["final_test_accuracy"] >= 0.90, summary["final_test_accuracy"]
    assert [n["node"] for n in summary["nodes"]] == ["mini1", "mini2", "mini3", "pi5", "pi4"]
    # the layout of a sim run: summary.json on top, nodes/NODE/{metrics.jsonl,<role>.log}, configs, topology, plots
    for node, role in (("mini1", "server"), ("mini2", "worker"), ("pi4", "worker")):
        assert (run_dir / "nodes" / node / "metrics.jsonl").is_file() and (run_dir / "nodes" / node / f"{role}.log").is_file()
    assert (run_dir / "config" / f"cluster_config_{algo}.yaml").is_file() and (run_dir / "topology.yaml").is_file()
    assert (run_dir / "accuracy.png").is_file()

    status = launch(r, topo, runs, "--status", "--run-name", name, algo=algo)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("exited (0)") == 5, status.stdout

    report = subprocess.run([sys.executable, "-m", "smolcluster", "report", str(run_dir)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert report.returncode == 0, report.stderr
    assert "backend hardware" in report.stdout and "pi4" in report.stdout
    assert all(not tmux_sessions(r, n) for n in r.topology.nodes), "a finished run leaves no tmux session"


def test_stop_mid_run_is_clean_and_the_key_is_never_exposed(cluster):
    r, topo, runs = cluster
    name = "stop-me"
    p = launch(r, topo, runs, "--run-name", name, "--epochs", "50")  # far longer than the test: --stop ends it
    assert p.returncode == 0, p.stdout + p.stderr
    key = (runs / name / "cluster.key").read_text().strip()
    assert len(key) == 64 and (runs / name / "cluster.key").stat().st_mode & 0o777 == 0o600

    def training() -> bool:
        st = launch(r, topo, runs, "--status", "--run-name", name)
        return st.stdout.count("running") == 5 and " update " in st.stdout
    deadline = time.monotonic() + 120
    while not training():
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(1)

    # every process on this machine: all five hosts and the controller share this /proc
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        assert key.encode() not in text and bytes.fromhex(key) not in text, f"key on the command line of {cmdline}"
    for node in r.topology.nodes:  # the key file is the only file that holds it, on every host
        assert (r.host_dir(node) / "smolcluster" / ".smolcluster" / "cluster.key").stat().st_mode & 0o777 == 0o600
        for f in (r.host_dir(node) / "smolcluster" / "runs").rglob("*"):
            if f.is_file() and f.suffix in (".log", ".jsonl", ".json", ".yaml", "") and f.stat().st_size < 50 << 20:
                assert key not in f.read_text(errors="replace"), f"key in {f}"
    for f in (runs / name).rglob("*"):
        if f.is_file() and f.name != "cluster.key" and f.suffix != ".png":
            assert key not in f.read_text(errors="replace"), f"key in {f}"

    stop = launch(r, topo, runs, "--stop", "--run-name", name)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    server_dir = r.host_dir("mini1") / "smolcluster" / "runs" / name / "nodes" / "mini1"
    summary = json.loads((server_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    assert list((server_dir / "checkpoints").glob("*.smcl")), "the final checkpoint"
    assert run_processes(r) == {n: [] for n in r.topology.nodes}
    assert all(not tmux_sessions(r, n) for n in r.topology.nodes)


def test_attach_makes_a_local_pane_per_node(cluster, tmp_path):
    r, topo, runs = cluster
    p = launch(r, topo, runs, "--run-name", "attach-me", "--max-steps", "3000")
    assert p.returncode == 0, p.stdout + p.stderr
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path))  # this test's own local tmux server
    env.pop("TMUX", None)
    try:
        a = subprocess.run([sys.executable, "-m", "smolcluster", "launch", "--attach", "--run-name", "attach-me",
                            "--runs-dir", str(runs), "--ssh-config", str(r.ssh_config)], capture_output=True, text=True,
                           timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert a.returncode == 0, a.stdout + a.stderr
        panes = subprocess.run(["tmux", "list-panes", "-t", "attach-me-panes", "-F", "#{pane_current_command}"],
                               capture_output=True, text=True, env=env, check=True).stdout.split()
        assert len(panes) == 5 and set(panes) == {"ssh"}, panes
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
        launch(r, topo, runs, "--stop", "--run-name", "attach-me", "--grace", "10")
    assert run_processes(r) == {n: [] for n in r.topology.nodes}


def _nothing_started(r: Rehearsal) -> None:
    assert run_processes(r) == {n: [] for n in r.topology.nodes}
    assert all(not tmux_sessions(r, n) for n in r.topology.nodes if n != "mini3" or r._sshd_pid("mini3"))


def test_preflight_names_a_worker_without_a_route_and_starts_nothing(cluster):
    r, topo, runs = cluster
    r.remove_route("pi4", "10.10.0.0/24")
    try:
        p = launch(r, topo, runs, "--run-name", "no-route")
    finally:
        r.add_route("pi4", "10.10.0.0/24", "192.168.51.2")
    assert p.returncode == 1
    line = next(line for line in p.stdout.splitlines() if line.startswith("preflight  pi4") and "FAIL" in line)
    assert "cannot reach the server at 10.10.0.1:65432" in line and "netsetup" in line, line
    assert "nothing was started" in p.stdout
    _nothing_started(r)


def test_preflight_names_a_host_without_the_project(cluster):
    r, topo, runs = cluster
    if not all((r.host_dir(n) / "smolcluster" / "smolcluster").is_dir() for n in r.topology.nodes):
        assert launch(r, topo, runs, "--run-name", "sync-first", "--max-steps", "5", "--wait").returncode == 0
        wait_until(lambda: run_processes(r) == {n: [] for n in r.topology.nodes}, timeout=60, what="the workers to leave")
    r.ssh("mini3", f"rm -rf {r.host_dir('mini3')}/smolcluster/smolcluster")
    p = launch(r, topo, runs, "--run-name", "no-project", "--no-sync")
    assert p.returncode == 1
    line = next(line for line in p.stdout.splitlines() if line.startswith("preflight  mini3") and "project" in line)
    assert "FAIL" in line and "not importable" in line and "drop --no-sync" in line, line
    assert not any(line.startswith("preflight  mini2") and "project" in line and "FAIL" in line for line in p.stdout.splitlines())
    assert "nothing was started" in p.stdout
    _nothing_started(r)


def test_preflight_names_a_host_that_does_not_answer_ssh(cluster):
    r, topo, runs = cluster
    r.stop_sshd("mini3")
    try:
        p = launch(r, topo, runs, "--preflight")
    finally:
        r.start_sshd("mini3")
    assert p.returncode == 1
    line = next(line for line in p.stdout.splitlines() if line.startswith("preflight  mini3"))
    assert "ssh" in line and "FAIL" in line and "cannot reach" in line and "ssh-copy-id" in line, line
    assert "nothing was started" in p.stdout
    _nothing_started(r)


def test_link_check_measures_every_path_and_a_shaped_link_within_15_percent(cluster, tmp_path):
    r, topo, runs = cluster
    r.shape("mini2", "thunderbolt", 50)
    try:
        p = launch(r, topo, runs, "--check", "--json", "--write-profiles", str(tmp_path / "measured.yaml"), timeout=900)
    finally:
        r.unshape("mini2", "thunderbolt")
    assert p.returncode in (0, 1) and p.stdout.startswith("{"), p.stdout + p.stderr  # 1: profiles and links differ
    report = json.loads(p.stdout)
    paths = {row["from"]: row for row in report["paths"]}
    assert set(paths) == {"mini2", "mini3", "pi5", "pi4"}
    assert abs(paths["mini2"]["mbps_measured"] - 50) <= 0.15 * 50, paths["mini2"]
    assert paths["pi4"]["hops"] == ["pi4->mini3", "mini3->mini1"]
    from smolcluster.testbed.profiles import load_device_profiles, load_link_profiles

    links = load_link_profiles(tmp_path / "measured.yaml")
    assert set(links) == {"thunderbolt-measured", "pi5-eth-measured", "pi4-eth-measured"}
    assert abs(links["thunderbolt-measured"].rate_mbit - 50) <= 0.15 * 50  # the slowest thunderbolt hop: mini2's
    assert set(load_device_profiles(tmp_path / "measured.yaml")) == {f"{n}-measured" for n in r.topology.nodes}


def test_netsetup_apply_gives_hosts_their_routes(rehearsal_requirements, mnist_dir, tmp_path):
    with Rehearsal(REPO / "topologies" / "hybrid.yaml", tmp_path / "hosts", routes=False) as r:
        r.mnist_dir = mnist_dir
        topo = write_rehearsal_topology(r, tmp_path / "t.yaml")
        before = launch(r, topo, tmp_path / "runs", "--preflight")
        assert before.returncode == 1 and "preflight  pi4" in before.stdout
        apply = subprocess.run([sys.executable, "-m", "smolcluster", "topology", "netsetup", str(topo), "--apply",
                                "--ssh-config", str(r.ssh_config)], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert apply.returncode == 0, apply.stdout + apply.stderr
        assert "netsetup   pi4        route      ok    ip route replace 10.10.0.0/24 via 192.168.51.2" in apply.stdout
        after = launch(r, topo, tmp_path / "runs", "--preflight")
        assert after.returncode == 0, after.stdout
        assert "preflight  passed" in after.stdout


def test_logging_ships_every_hosts_lines_to_a_loki_every_node_reaches(cluster, tmp_path):
    """`--logging --loki-url`: the nodes push (no agent); here a Loki receiver on mini1 that even the Pis reach."""
    r, topo, runs = cluster
    out = tmp_path / "received.json"
    sink = r.spawn("mini1", [sys.executable, str(Path(__file__).with_name("lokisink.py")), "3100", str(out)])
    try:
        wait_until(lambda: Path(str(out) + ".ready").exists(), timeout=30, what="the Loki receiver on mini1")
        p = launch(r, topo, runs, "--run-name", "shipped", "--max-steps", "60", "--wait", "--logging",
                   "--loki-url", "http://10.10.0.1:3100")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "every node pushes to http://10.10.0.1:3100" in p.stdout
        assert p.stdout.count("reaches Loki at 10.10.0.1:3100") == 5  # preflight: every node, the Pis through their Mac
    finally:
        sink.terminate()
        sink.wait(timeout=30)
    received = json.loads(out.read_text())
    hosts = {labels["host"] for labels, _, _ in received}
    assert hosts == {"server-rank0-mini1", "worker-rank0-mini2", "worker-rank1-mini3", "worker-rank2-pi5", "worker-rank3-pi4"}
    assert {labels["run"] for labels, _, _ in received} == {"shipped"}
    assert {labels["kind"] for labels, _, _ in received} == {"log", "metrics"}


def test_the_gpt_launch_script_trains_on_the_synced_wikitext(cluster, tmp_path):
    """launch_edp_gpt.sh, as the original had: WikiText-2 goes to every host with the code; a tiny GPT here."""
    r, topo, runs = cluster
    text_dir = Path(os.environ.get("SMOLCLUSTER_TEXT_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))
    if not (text_dir / "valid.txt").is_file():
        pytest.skip(f"no WikiText-2 in {text_dir}; set SMOLCLUSTER_TEXT_DIR")
    gpt = yaml.safe_load((REPO / "configs" / "gpt_config.yaml").read_text())
    gpt["model"] |= {"model_dim": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64, "max_seq_len": 32}
    gpt["training"] |= {"batch_size": 8, "eval_batches": 2, "device": "cpu"}
    gpt["data"] |= {"tokenizer": "byte"}
    gpt["logging"] |= {"wandb": "off"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(gpt, sort_keys=False))
    env = dict(os.environ, SMOLCLUSTER_PYTHON=sys.executable, SMOLCLUSTER_DATA_DIR=str(r.mnist_dir),
               SMOLCLUSTER_TEXT_DIR=str(text_dir), GPT_CONFIG=str(tmp_path / "tiny.yaml"))
    p = subprocess.run(["bash", str(REPO / "launch_edp_gpt.sh"), str(topo), "--ssh-config", str(r.ssh_config),
                        "--runs-dir", str(runs), "--run-name", "gpt", "--max-steps", "20", "--wait"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.stdout.count("WikiText-2, key") == 5  # synced to every host
    summary = json.loads((runs / "gpt" / "summary.json").read_text())
    assert summary["final_test_perplexity"] is not None and summary["steps"] == 20
