"""Both algorithms on real processes over loopback TCP: accuracy, faults, resume, bad pushes."""

from __future__ import annotations

import signal

import pytest
import torch

from smolcluster.core.training.checkpoint import load_checkpoint, state_digest
from smolcluster.core.net.transport import TransportConfig, connect
from smolcluster.core.net.wire import Message, MessageKind

pytestmark = pytest.mark.slow

FLOOR = {"syncps": 0.92, "edp": 0.90}
SLOW = "8"  # stretch compute so a run outlasts a restart (torch import takes seconds on a busy machine)


def accounted(summary: dict) -> None:
    """Every push the workers made is applied, late or rejected: nothing silently lost."""
    pushes = sum(w["pushes"] for w in summary["per_worker"])
    assert summary["pushes_applied"] >= pushes - summary["pushes_late"] - summary["pushes_rejected"] - 3


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_three_workers_train_to_accuracy(local_cluster, algo):
    c = local_cluster(algo)
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r)
    assert c.wait_server(timeout=240) == 0, c.log("server")
    s = c.summary()
    assert s["algorithm"] == algo
    assert s["final_test_accuracy"] >= FLOOR[algo], s
    assert s["pushes_rejected"] == 0 and s["pushes_applied"] > 0
    assert {w["hostname"] for w in s["per_worker"]} == {"w1", "w2", "w3"}
    assert all(w["samples_per_s"] > 0 for w in s["per_worker"])
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    for w in ("w1", "w2", "w3"):
        assert c.procs.wait(w, timeout=30) == 0, c.log(w)
    evals = [m for m in c.metrics() if m["event"] == "eval"]
    assert evals and evals[-1]["test_accuracy"] == pytest.approx(s["final_test_accuracy"])


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_worker_killed_and_restarted(local_cluster, algo):
    c = local_cluster(algo, cluster={"timeout": 0.5})
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r, "--slowdown", SLOW)  # long enough for a restarted worker to come back
    c.wait_for(lambda: any(m["event"] == "update" and m["version"] >= 60 for m in c.metrics()), 120, "60 updates")
    c.procs.signal("w2", signal.SIGKILL)
    killed_at = max(m["version"] for m in c.metrics() if m["event"] == "update")
    # the others carry on without it
    c.wait_for(lambda: max(m["version"] for m in c.metrics() if m["event"] == "update") >= killed_at + 40, 120,
               "progress after the kill")
    c.start_worker(2, "--slowdown", SLOW)
    c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "join" and m["host"] == "w2") >= 2, 60, "rejoin")
    rejoin = [m for m in c.metrics() if m["event"] == "join" and m["host"] == "w2"][-1]
    assert rejoin["version"] > killed_at  # the rejoiner received current weights, not the initial ones
    worker_join = [m for m in c.metrics("w2") if m["event"] == "join"][-1]
    assert worker_join["version"] == rejoin["version"]
    assert c.wait_server(timeout=240) == 0, c.log("server")
    s = c.summary()
    assert s["final_test_accuracy"] >= FLOOR[algo] - 0.02, s
    assert [w for w in s["per_worker"] if w["hostname"] == "w2"][0]["joins"] == 2


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_server_killed_and_resumed_from_checkpoint(local_cluster, algo):
    c = local_cluster(algo, cluster={"checkpoint_interval": 25})
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r, "--slowdown", SLOW)
    c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "checkpoint") >= 3, 120, "two checkpoints after the initial one")
    c.procs.signal("server", signal.SIGKILL)
    c.procs.wait("server", timeout=10)
    saved = load_checkpoint(c.server_dir / "checkpoints")
    c.start_server("--resume")
    c.wait_for(lambda: any(m["event"] == "resume" for m in c.metrics()), 60, "resume")
    resume = [m for m in c.metrics() if m["event"] == "resume"][-1]
    assert resume["model_digest"] == state_digest(saved.model)  # bit for bit
    assert resume["version"] == saved.version
    assert c.wait_server(timeout=240) == 0, c.log("server")
    s = c.summary()
    assert s["steps"] > saved.version
    assert s["final_test_accuracy"] >= FLOOR[algo] - 0.02, s
    for w in ("w1", "w2", "w3"):
        assert c.procs.wait(w, timeout=60) == 0, c.log(w)


def _client(c, rank: int):
    conn = connect("127.0.0.1", c.port, key=None, config=TransportConfig(heartbeat_timeout=10))
    conn.send(Message(MessageKind.HELLO, {"rank": rank, "hostname": f"w{rank}", "algorithm": c.algo}))
    welcome = conn.recv(timeout=30)
    assert welcome.kind == MessageKind.WELCOME
    return conn, welcome


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_bad_pushes_rejected_and_model_unchanged(local_cluster, algo):
    c = local_cluster(algo, cluster={"idle_timeout": 3.0, "timeout": 0.3})
    c.start_server()
    conn, welcome = _client(c, 1)
    before = {k: v.clone() for k, v in welcome.tensors.items()}
    nan = {k: torch.full_like(v, float("nan")) for k, v in before.items()}
    fields = {"step": 0, "base_version": 0, "samples": 32, "worker_step": 1, "mode": "weights", "want_weights": True}
    conn.send(Message(MessageKind.PUSH, fields, tensors=nan))
    reply = conn.recv(timeout=30)
    assert reply.kind == MessageKind.ACK and reply.fields["status"] == "rejected"
    assert reply.fields["version"] == 0
    for k, v in reply.tensors.items():
        assert torch.equal(v, before[k])  # the server model is unchanged
    # wrong shapes: rejected at the wire before any tensor is parsed, the connection is dropped
    bad = {k: torch.zeros(3) for k in before}
    conn.send(Message(MessageKind.PUSH, fields, tensors=bad))
    with pytest.raises(Exception):
        conn.recv(timeout=10)
    conn.close()
    # the server keeps serving: a well-behaved worker still joins and sees the unchanged model
    conn2, welcome2 = _client(c, 2)
    assert welcome2.fields["version"] == 0
    for k, v in welcome2.tensors.items():
        assert torch.equal(v, before[k])
    conn2.close()
    c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "reject") == 2, 30, "both rejections recorded")
    c.procs.signal("server", signal.SIGINT)
    c.wait_server(timeout=60)
    s = c.summary()
    assert s["pushes_rejected"] == 2
    assert s["rejected_reasons"].get("non-finite") == 1
    assert sum(v for k, v in s["rejected_reasons"].items() if k != "non-finite") == 1
    log = (c.server_dir / "server.log").read_text()
    assert "non-finite" in log and "SchemaMismatch" in log


def test_edp_with_int8_quantization_trains_and_sends_a_quarter(local_cluster):
    c = local_cluster("edp", cluster={"use_quantization": True})
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r)
    assert c.wait_server(timeout=240) == 0, c.log("server")
    s = c.summary()
    assert s["final_test_accuracy"] >= FLOOR["edp"], s
    assert s["pushes_rejected"] == 0, (s["rejected_reasons"], [m for m in c.metrics() if m["event"] == "reject"])
    full = 101_770 * 4  # float32 bytes of the model
    per_push = s["bytes_received"] / s["pushes_applied"]
    assert per_push < 0.3 * full, per_push  # int8 values + per-row scale and zero point


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_sigterm_stops_the_server_cleanly_with_checkpoint_and_summary(local_cluster, algo):
    c = local_cluster(algo)
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r, "--slowdown", SLOW)
    c.wait_for(lambda: any(m["event"] == "update" and m["version"] >= 20 for m in c.metrics()), 120, "20 updates")
    # every worker joined (one still starting up would meet a closing server and retry until its deadline)
    c.wait_for(lambda: {m["host"] for m in c.metrics() if m["event"] == "join"} == {"w1", "w2", "w3"}, 120, "all joins")
    c.procs.signal("server", signal.SIGTERM)  # what a supervisor or `docker stop` sends
    assert c.wait_server(timeout=30) == 0, c.log("server")
    s = c.summary()
    assert s["stop_reason"] == "interrupted" and s["steps"] >= 20, s
    assert load_checkpoint(c.server_dir / "checkpoints").version == s["steps"]  # nothing trained is lost
    for w in ("w1", "w2", "w3"):  # the workers were told (BYE) and finished instead of reconnecting forever
        assert c.procs.wait(w, timeout=60) == 0, c.log(w)


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_ctrl_c_on_a_worker_leaves_the_cluster_cleanly(local_cluster, algo):
    c = local_cluster(algo, cluster={"max_steps": 200})  # fewer than one epoch of pushes without w2
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r, "--slowdown", SLOW)
    # w2 is training (it recorded an exchange with the server), not still starting up
    c.wait_for(lambda: any(m["event"] == "step" for m in c.metrics("w2")), 120, "w2's first exchange")
    c.procs.signal("w2", signal.SIGINT)  # Ctrl-C in the worker's terminal
    assert c.procs.wait("w2", timeout=30) == 0, c.log("w2")
    [end] = [m for m in c.metrics("w2") if m["event"] == "end"]
    assert end["stop_reason"] == "interrupted" and end["steps"] > 0, (end, c.log("w2"))
    # The server was told (a BYE with the reason), so it did not see a lost connection ...
    [bye] = [m for m in c.metrics() if m["event"] == "bye" and m["host"] == "w2"]
    assert bye["reason"] == "interrupted" and bye["finished"] is False, bye
    assert not [m for m in c.metrics() if m["event"] == "leave" and m["host"] == "w2"]
    # ... and the others finish the run.
    assert c.wait_server(timeout=240) == 0, c.log("server")
    s = c.summary()
    assert s["steps"] == 200 and s["stop_reason"] == "max_steps 200 reached", s
    for w in ("w1", "w3"):
        assert c.procs.wait(w, timeout=60) == 0, c.log(w)


def test_syncps_server_stops_when_every_worker_left_before_the_first_step(local_cluster):
    c = local_cluster("syncps", cluster={"idle_timeout": 2.0})
    c.start_server()
    conn, _ = _client(c, 1)  # joins, then goes away before the other two ever arrive
    conn.close()
    assert c.wait_server(timeout=30) == 0, c.log("server")
    s = c.summary()
    assert s["stop_reason"] == "no worker connected for 2s" and s["steps"] == 0, s
