"""The same GPT and config trained distributed: EDP and SyncPS on the sim (`smolcluster sim ... --gpt-config`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from gpt_helpers import REPO
from smolcluster.common.errors import ConfigError
from smolcluster.core.training.config import load_run_config
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.topology import load_topology

TOPOLOGY = REPO / "topologies" / "thunderbolt.yaml"  # a server and two workers


def test_generated_configs_train_the_gpt_config(tiny_config, tmp_path, wikitext_dir):
    gpt_file = tiny_config({"training": {"max_steps": 77}})
    topo = load_topology(TOPOLOGY)
    cfg = write_run_configs(topo, tmp_path / "config", RunOverrides(algorithm="syncps", epochs=2, gpt_config=gpt_file,
                                                                    extra={"eval_steps": 25}),
                            server_address=lambda w: "127.0.0.1", port=0)
    nn = yaml.safe_load((tmp_path / "config" / "nn_config.yaml").read_text())
    assert nn == {"device": "cpu", "gpt_config": "gpt_config.yaml"}  # the topology's MNIST model and batch are gone
    copy = yaml.safe_load((tmp_path / "config" / "gpt_config.yaml").read_text())
    assert copy["data"]["dir"] == str(wikitext_dir.resolve()) and copy["training"]["epochs"] == 2
    assert cfg.gpt is not None and cfg.nn.model.type == "GPT" and cfg.nn.optimizer == "adamw"
    assert (cfg.nn.batch_size, cfg.nn.num_epochs, cfg.nn.eval_steps) == (16, 2, 25)
    assert cfg.cluster.max_steps == 77  # training.max_steps caps the server's updates
    assert load_run_config(tmp_path / "config", "syncps") == cfg


def test_a_bad_gpt_config_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("training: {batch_sise: 3}\n")
    with pytest.raises(ConfigError) as e:
        write_run_configs(load_topology(TOPOLOGY), tmp_path / "config", RunOverrides(algorithm="edp", gpt_config=bad),
                          server_address=lambda w: "127.0.0.1", port=0)
    assert str(bad) in str(e.value) and "training.batch_sise" in str(e.value) and "batch_size" in str(e.value)


# Both reach this on the offline split from ~6.2 (ln 512, a uniform guess) in 100 server updates.
LOSS_REACHED = 5.0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_edp_and_syncps_train_the_gpt_on_the_sim(algo, tiny_config, tmp_path):
    gpt_file = tiny_config({"training": {"max_steps": 100, "eval_interval": 50}})
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "smolcluster", "sim", str(TOPOLOGY), "--algo", algo, "--gpt-config",
                          str(gpt_file), "--run-dir", str(run)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_test_loss"] < LOSS_REACHED < math.log(512), s["final_test_loss"]
    assert s["final_test_perplexity"] == pytest.approx(math.exp(s["final_test_loss"]))
    assert (s["data"]["train_split"], s["data"]["eval_split"]) == ("valid", "test")
    assert s["tokenizer"]["name"] == "bpe-512" and s["gpt"]["model"]["model_dim"] == 64
    assert s["steps"] >= 80 and s["pushes_rejected"] == 0
    server_log = (run / "nodes" / "mini1" / "server.log").read_text()
    assert "training on valid, evaluating on test" in server_log and "training on valid, evaluating on test" in out.stdout
    assert "test perplexity" in out.stdout and "bpe-512" in out.stdout
