"""The original project's three config files, exactly as its README prints them, load and train unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from compat_helpers import ORIGINAL_CONFIGS, ORIGINAL_README, run_cluster

from smolcluster.core.training.config import load_run_config

FILES = ("nn_config.yaml", "cluster_config_edp.yaml", "cluster_config_syncps.yaml")


def readme_yaml_block(readme: str, heading: str) -> str:
    start = readme.index("```yaml\n", readme.index(heading)) + len("```yaml\n")
    return readme[start:readme.index("```", start)]


@pytest.mark.skipif(not ORIGINAL_README.exists(), reason=f"{ORIGINAL_README} not found")
@pytest.mark.parametrize("name", FILES)
def test_fixtures_are_the_original_readme_blocks_verbatim(name: str):
    readme = ORIGINAL_README.read_text()
    assert (ORIGINAL_CONFIGS / name).read_text() == readme_yaml_block(readme, f"### {name}")


def test_the_original_configs_load_with_their_meaning():
    edp = load_run_config(ORIGINAL_CONFIGS, "edp")
    nn = edp.nn
    assert (nn.batch_size, nn.learning_rate, nn.num_epochs, nn.eval_steps) == (32, 0.001, 2, 200)
    assert nn.track_gradients and nn.polyak_alpha == 0.5
    assert nn.gradient_clipping == 1.0  # {enabled: true, max_norm: 1.0}
    assert (nn.model.type, nn.model.input_dim, nn.model.hidden, nn.model.out) == ("SimpleNN", 784, 128, 10)
    assert nn.dataset == "MNIST"  # {name: MNIST}
    c = edp.cluster
    assert (c.server, c.workers, c.num_workers, c.port, c.seed) == ("mini1", ("pi5", "win", "macbook"), 3, 65432, 42)
    assert c.worker_update_interval == 10 and c.use_quantization is False
    assert c.host_ip == {"mini1": "10.10.0.1", "macbook": "10.10.0.1", "pi5": "192.168.50.1", "win": "10.10.0.1"}
    assert c.server_address_for("pi5") == "192.168.50.1"  # host_ip: the server address as seen from that host
    syncps = load_run_config(ORIGINAL_CONFIGS, "syncps").cluster
    assert syncps.worker_update_interval == 4 and syncps.timeout == 0.1


def test_clipping_disabled_the_original_way(tmp_path: Path):
    for name in FILES:
        text = (ORIGINAL_CONFIGS / name).read_text()
        (tmp_path / name).write_text(text.replace("enabled: true ", "enabled: false"))
    assert load_run_config(tmp_path, "edp").nn.gradient_clipping is None


@pytest.mark.slow
@pytest.mark.parametrize("algo, floor", [("edp", 0.93), ("syncps", 0.93)])
def test_the_original_configs_train_unchanged(procs, tmp_path: Path, mnist_dir: Path, monkeypatch, algo: str, floor: float):
    """Server mini1 and the workers pi5, win and macbook the config names, over loopback (--connect), for the
    config's own two epochs."""
    monkeypatch.setenv("SMOLCLUSTER_DATA_DIR", str(mnist_dir))  # the original's nn_config names no data dir
    procs.env["SMOLCLUSTER_DATA_DIR"] = str(mnist_dir)
    summary = run_cluster(procs, tmp_path, algo, ORIGINAL_CONFIGS, "mini1", ["pi5", "win", "macbook"], timeout=400)
    assert summary["final_test_accuracy"] >= floor, summary
    assert summary["epochs"] == 2 and summary["stop_reason"] == "finished"
    assert sorted(w["hostname"] for w in summary["per_worker"]) == ["macbook", "pi5", "win"]
    if algo == "edp":  # EDP workers finish their epochs; a SyncPS server ends the run at its last step
        assert all(w["finished"] for w in summary["per_worker"]), summary["per_worker"]
    else:
        assert summary["steps"] == 2 * (60_000 // 3 // 32), summary
