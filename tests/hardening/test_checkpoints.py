"""Defects 12 and 13 (checkpoints): one digest covers the whole file, so a bit flip in the optimizer state or
an edited counter is a clear "checkpoint corrupt" naming the file and the intact previous checkpoint; a
checkpoint written by main's code still loads; temp files of killed writes are removed at start; a full
disk leaves the previous checkpoint intact, is one log line, and training goes on (for real: a tiny
tmpfs, not a mock)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from attack import lines
from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.config import ModelConfig
from smolcluster.core.training.models import build_model, loss_fn
from smolcluster.core.training.optim import build_optimizer
from smolcluster.core.net.wire import PREAMBLE

FIXTURE = Path(__file__).parent / "fixtures" / "main-edp-hidden8.smcl"  # see fixtures/make_main_fixture.py
FIXTURE_DIGEST = "f0a2aca6f8599da3e21cff7210db1eed52bf73507bde015453b501fcb2458f0b"
# written by main at wire version 1, before flat buffers (whole-file digest): see fixtures/make_main_v1_fixture.py
V1_FIXTURE = Path(__file__).parent / "fixtures" / "main-v1-syncps-hidden8.smcl"
V1_FIXTURE_DIGEST = "c0f3b71bba6f9d9a0cf2cb4411a74b592d535b3939a9b6a04d0e5c18084b0dc4"


def _trained_state(version: int, hidden: int = 8) -> ckpt.ServerState:
    model = build_model(ModelConfig(hidden=hidden), seed=1)
    opt = build_optimizer("adam", model.parameters(), 0.001)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, torch.rand(8, 784), torch.randint(0, 10, (8,))).backward()
        opt.step()
    return ckpt.ServerState(algorithm="syncps", version=version, step=version, model=model.state_dict(),
                            optimizer=opt.state_dict(), counters={"applied": version, "late": 1, "rejected": 2})


def _two_checkpoints(directory: Path) -> Path:
    ckpt.save_checkpoint(directory, _trained_state(10))
    return ckpt.save_checkpoint(directory, _trained_state(20))


def _edit(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1, old
    return raw.replace(old, new)


def _flip(raw: bytes, offset: int) -> bytes:
    b = bytearray(raw)
    b[offset] ^= 0x10
    return bytes(b)


def _model_offset(raw: bytes) -> int:
    """A byte inside the first tensor of the payload: the model's first layer."""
    header_len = PREAMBLE.unpack_from(raw)[4]
    return PREAMBLE.size + header_len + 16


def _optimizer_offset(raw: bytes) -> int:
    """A byte inside the last tensor of the payload: the optimizer's exp_avg_sq of the last layer."""
    return len(raw) - 32 - 7  # before the 32-byte digest


EDITS = {
    "bit flip in optimizer state": lambda raw: _flip(raw, _optimizer_offset(raw)),
    "bit flip in the model": lambda raw: _flip(raw, _model_offset(raw)),
    "version edited": lambda raw: _edit(raw, b'"version":20', b'"version":90'),
    "step edited": lambda raw: _edit(raw, b'"step":20', b'"step":21'),
    "learning rate edited": lambda raw: _edit(raw, b'"lr":0.001', b'"lr":0.101'),
    "counter edited": lambda raw: _edit(raw, b'"rejected":2', b'"rejected":0'),
    "key renamed": lambda raw: _edit(raw, b'"server_data_step"', b'"server_data_stap"'),
    "truncated": lambda raw: raw[:-100],
    "bytes appended": lambda raw: raw + b"\0" * 8,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_any_change_to_a_checkpoint_is_reported_as_corrupt(tmp_path, edit):
    """Before, the digest covered only the model tensors: all but the model bit flip loaded silently (a negative
    exp_avg_sq resumed and took accuracy from 0.90 to 0.10 in one step), a renamed key was a KeyError traceback."""
    path = _two_checkpoints(tmp_path)
    path.write_bytes(EDITS[edit](path.read_bytes()))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path)
    text = str(e.value)
    assert f"checkpoint {path} is corrupt" in text, text
    prev = tmp_path / ckpt.PREVIOUS_NAME
    assert f"the previous checkpoint {prev} (version 10) is intact" in text and f"mv {prev} {path}" in text, text
    assert ckpt.read_checkpoint(prev).version == 10  # and it really is


def test_a_checkpoint_written_by_main_still_loads():
    state = ckpt.read_checkpoint(FIXTURE)
    assert state.legacy and state.algorithm == "edp" and state.version == 7 and state.worker_progress == {"1": 35}
    assert ckpt.state_digest(state.model) == FIXTURE_DIGEST
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(state.optimizer["state"][0])


def test_a_checkpoint_written_at_wire_version_1_loads():
    assert V1_FIXTURE.read_bytes()[4] == 1  # the file is a version 1 frame
    state = ckpt.read_checkpoint(V1_FIXTURE)
    assert not state.legacy and state.algorithm == "syncps" and state.version == 9
    assert ckpt.state_digest(state.model) == V1_FIXTURE_DIGEST and state.counters["applied"] == 18


def test_an_implausible_old_checkpoint_is_corrupt_too(tmp_path):
    """An old-format file has only a model digest: a negative second moment is still caught on load."""
    raw = bytearray(FIXTURE.read_bytes())
    state = ckpt.read_checkpoint(FIXTURE)
    last = state.optimizer["state"][3]["exp_avg_sq"]  # fc2.bias: the payload's last tensor
    offset = len(raw) - last.numel() * 4
    raw[offset:offset + 4] = torch.tensor([-1.0]).numpy().tobytes()
    (tmp_path / ckpt.CHECKPOINT_NAME).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="exp_avg_sq has negative values"):
        ckpt.load_checkpoint(tmp_path)


def test_a_write_that_fails_leaves_both_checkpoints(tmp_path):
    _two_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / f".{ckpt.CHECKPOINT_NAME}.{os.getpid()}.tmp").mkdir()  # the temp file cannot be created, even as root
    with pytest.raises(ckpt.CheckpointError, match=f"could not write checkpoint {tmp_path / ckpt.CHECKPOINT_NAME}"):
        ckpt.save_checkpoint(tmp_path, _trained_state(30))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert ckpt.load_checkpoint(tmp_path).version == 20


# --------------------------------------------------------------------------- live servers


def _nn_hidden8() -> dict:
    return {"model": {"type": "SimpleNN", "hidden": 8}}


def _resume_from(local_cluster, algo: str, fixture: Path) -> tuple[Any, dict, dict]:
    """A one-worker run of 60 steps resumed from `fixture`: the cluster, its resume line and summary."""
    c = local_cluster(algo, nn=_nn_hidden8(), cluster={"max_steps": 60}, workers=["w1"])
    (c.server_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture, c.server_dir / "checkpoints" / ckpt.CHECKPOINT_NAME)
    c.start_server("--resume")
    c.start_worker(1)
    assert c.wait_server(timeout=120) == 0, c.log("server")
    [resume] = [m for m in c.metrics() if m["event"] == "resume"]
    return c, resume, c.summary()


@pytest.mark.slow
def test_a_server_resumes_from_mains_checkpoint_and_trains(local_cluster):
    c, resume, s = _resume_from(local_cluster, "edp", FIXTURE)
    assert resume["version"] == 7 and resume["model_digest"] == FIXTURE_DIGEST
    assert s["steps"] == 60 and s["final_test_accuracy"] > 0.5, s
    assert "older checkpoint" in (c.server_dir / "server.log").read_text()
    assert not ckpt.read_checkpoint(c.server_dir / "checkpoints" / ckpt.CHECKPOINT_NAME).legacy  # rewritten


@pytest.mark.slow
def test_a_syncps_server_resumes_from_a_wire_version_1_checkpoint_and_trains(local_cluster):
    """Main's checkpoint (per-tensor state) resumes into the flat-buffer model: same digest, then training."""
    c, resume, s = _resume_from(local_cluster, "syncps", V1_FIXTURE)
    assert resume["version"] == 9 and resume["model_digest"] == V1_FIXTURE_DIGEST
    assert s["steps"] == 60 and s["final_test_accuracy"] > 0.5 and s["pushes_applied"] >= 18 + 51, s
    rewritten = c.server_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
    assert rewritten.read_bytes()[4] == 2 and ckpt.read_checkpoint(rewritten).version == 60


@pytest.mark.slow
def test_resuming_from_a_corrupt_checkpoint_is_a_clear_error(local_cluster):
    c = local_cluster("syncps", cluster={"max_steps": 40, "checkpoint_interval": 20}, workers=["w1"])
    c.start_server()
    c.start_worker(1)
    assert c.wait_server(timeout=120) == 0, c.log("server")
    path = c.server_dir / "checkpoints" / ckpt.CHECKPOINT_NAME
    path.write_bytes(_flip(path.read_bytes(), _optimizer_offset(path.read_bytes())))
    out = subprocess.run([sys.executable, "-m", "smolcluster", "server", "--algo", "syncps", "--config-dir",
                          str(c.config_dir), "--run-dir", str(c.server_dir), "--port", "0", "--resume"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert f"checkpoint {path} is corrupt" in out.stderr and "is intact: to resume from it" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_killed_writers_leave_no_temp_files_and_every_restart_resumes(local_cluster):
    """kill -9 during checkpointing left orphan .checkpoint.smcl.<pid>.tmp files (1-3 per 10 kills)."""
    c = local_cluster("syncps", cluster={"checkpoint_interval": 3, "max_steps": 400}, workers=["w1"])
    c.start_server()
    c.start_worker(1, "--slowdown", "4")
    checkpoints = c.server_dir / "checkpoints"
    for kill in range(5):
        n = sum(1 for m in c.metrics() if m["event"] == "checkpoint")
        c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "checkpoint") >= n + 2, 120, "two checkpoints")
        c.procs.signal("server", signal.SIGKILL)
        c.procs.wait("server", timeout=10)
        if kill == 4:  # what a kill in the middle of a write leaves, for certain
            (checkpoints / f".{ckpt.CHECKPOINT_NAME}.99999.tmp").write_bytes(b"half a checkpoint")
        saved = ckpt.load_checkpoint(checkpoints)
        c.start_server("--resume")
        c.wait_for(lambda: sum(1 for m in c.metrics() if m["event"] == "resume") > kill, 60, "the resume")
        resume = [m for m in c.metrics() if m["event"] == "resume"][-1]
        assert resume["version"] == saved.version and resume["model_digest"] == ckpt.state_digest(saved.model)
        assert not list(checkpoints.glob("*.tmp")), list(checkpoints.glob("*.tmp"))
    assert c.wait_server(timeout=240) == 0, c.log("server")
    # the planted file is named among what the last start removed (a kill mid-write may have left one more)
    cleanups = [line for line in (c.server_dir / "server.log").read_text().splitlines()
                if "temp file(s) left by checkpoint writes that were killed" in line]
    assert any(f".{ckpt.CHECKPOINT_NAME}.99999.tmp" in line for line in cleanups), cleanups
    assert c.summary()["final_test_accuracy"] >= 0.85


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC)."""
    filler = directory / "filler"
    chunk = bytes(64 << 10)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


@pytest.fixture
def tiny_disk(tmp_path):
    """A 6 MB tmpfs (a real file system that fills up); needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(local_cluster, tiny_disk):
    """Defect 13: the first checkpoint that did not fit crashed the server with an OSError traceback and left a
    partial temp file with the disk at 100 %; the worker exited 0 as if the run had finished."""
    checkpoints = tiny_disk / "checkpoints"
    c = local_cluster("syncps", cluster={"checkpoint_interval": 20, "max_steps": 500, "checkpoint_dir": str(checkpoints)},
                      workers=["w1"])
    c.start_server()
    c.start_worker(1, "--slowdown", "6")
    events = lambda kind: [m for m in c.metrics() if m["event"] == kind]  # noqa: E731
    c.wait_for(lambda: len(events("checkpoint")) >= 3, 120, "two periodic checkpoints")
    filler = _fill(tiny_disk)
    c.wait_for(lambda: events("checkpoint_failed"), 120, "a checkpoint that does not fit")
    good = ckpt.load_checkpoint(checkpoints)  # the previous one, intact
    assert good.version == events("checkpoint")[-1]["version"]
    assert not list(checkpoints.glob("*.tmp"))
    filler.unlink()  # space again: the next interval writes
    failed_at = events("checkpoint_failed")[-1]["version"]
    c.wait_for(lambda: any(m["version"] > failed_at for m in events("checkpoint")), 120, "the next checkpoint")
    _fill(tiny_disk)  # and full again for the final checkpoint
    assert c.wait_server(timeout=240) == 0, c.log("server")
    assert c.procs.wait("w1", timeout=60) == 0, c.log("w1")
    s = c.summary()
    failures = events("checkpoint_failed")
    log = c.server_dir / "server.log"
    print(f"\n{len(failures)} checkpoints did not fit ({failures[0]['error']}); stop {s['stop_reason']}")
    assert s["stop_status"] == "finished" and s["steps"] == 500 and s["final_test_accuracy"] >= 0.85, s
    assert s["checkpoint_failures"] == len(failures) >= 2 and s["final_checkpoint"] is None
    assert len(lines(log, "not written")) == len(failures)  # one line each
    assert all("No space left on device" in f["error"] for f in failures)
    assert not lines(log, "Traceback") and not lines(c.server_dir / "stdout.log", "Traceback")
    assert not list(checkpoints.glob("*.tmp"))
    assert ckpt.load_checkpoint(checkpoints).version > failed_at
