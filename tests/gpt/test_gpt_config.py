"""gpt_config.yaml: the original's sections and keys, --override typing, auto batch size and epochs, errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.core.training.config import apply_gpt_overrides, gpt_keys, load_gpt_config, load_run_config, parse_gpt_config
from smolcluster.resources import resource_path

from gpt_helpers import ORIGINAL_README, REPO

# The original README's gpt_config.yaml block, verbatim (learning_rate: 6e-4 is a string to PyYAML).
ORIGINAL_BLOCK = """\
model:
  model_dim: 256          # Model dimension
  num_layers: 6           # Number of transformer layers
  num_heads: 4            # Attention heads
  ff_dim: 1024            # Feed-forward dimension
  dropout: 0.1            # Dropout rate
  max_seq_len: 128        # Maximum sequence length

# Training Hyperparameters
training:
  batch_size: null        # Auto: 32 (L=128) or 16 (L=256)
  epochs: null            # Auto: 30 (wikitext) or 20 (SNLI)
  learning_rate: 6e-4     # Learning rate
  weight_decay: 0.01      # AdamW weight decay
  grad_clip_norm: 1.0     # Gradient clipping

# Learning Rate Schedule
lr_schedule:
  warmup_iters: 100       # Warmup iterations
  min_lr: 6e-5           # Minimum learning rate

# Data & Logging
data:
  tokenizer: "openai-community/gpt2"
logging:
  project_name: "smolcluster-gpt-wikitext2"
"""


def test_the_original_block_loads_with_its_meaning(tmp_path):
    path = tmp_path / "gpt_config.yaml"
    path.write_text(ORIGINAL_BLOCK)
    g = load_gpt_config(path)
    assert (g.model.model_dim, g.model.num_layers, g.model.num_heads, g.model.ff_dim, g.model.max_seq_len) == (256, 6, 4, 1024, 128)
    assert g.model.dropout == 0.1
    assert g.training.learning_rate == pytest.approx(6e-4) and isinstance(g.training.learning_rate, float)
    assert g.lr_schedule.min_lr == pytest.approx(6e-5) and g.lr_schedule.warmup_iters == 100
    assert g.training.weight_decay == 0.01 and g.training.grad_clip_norm == 1.0
    assert g.data.tokenizer == "openai-community/gpt2" and g.logging.project_name == "smolcluster-gpt-wikitext2"
    assert (g.batch_size(), g.epochs()) == (32, 30)


@pytest.mark.skipif(not ORIGINAL_README.is_file(), reason="the original README is not beside the checkout")
def test_the_block_is_the_original_readmes():
    text = ORIGINAL_README.read_text()
    assert ORIGINAL_BLOCK.split("# Model Architecture\n")[-1] in text


def test_the_shipped_config_is_the_originals_defaults():
    shipped = resource_path("configs", "gpt_config.yaml")
    assert shipped.is_file() and shipped.resolve() == (REPO / "configs" / "gpt_config.yaml").resolve()
    g = load_gpt_config(shipped)
    original = parse_gpt_config(yaml.safe_load(ORIGINAL_BLOCK), None)
    assert g.model == original.model
    assert (g.batch_size(), g.epochs(), g.training.learning_rate, g.lr_schedule) == \
        (original.batch_size(), original.epochs(), original.training.learning_rate, original.lr_schedule)


@pytest.mark.parametrize("seq_len, batch", [(128, 32), (256, 16), (64, 64), (512, 8)])
def test_auto_batch_size_follows_the_sequence_length(seq_len, batch):
    g = parse_gpt_config({"model": {"max_seq_len": seq_len}}, None)
    assert g.batch_size() == batch
    assert parse_gpt_config({"model": {"max_seq_len": seq_len}, "training": {"batch_size": 7}}, None).batch_size() == 7


def test_auto_epochs():
    assert parse_gpt_config({}, None).epochs() == 30
    assert parse_gpt_config({"training": {"epochs": 5}}, None).epochs() == 5
    resolved = parse_gpt_config({}, None).resolved()
    assert resolved["training"]["batch_size"] == 32 and resolved["training"]["epochs"] == 30


def test_overrides_take_the_keys_type():
    raw = apply_gpt_overrides(yaml.safe_load(ORIGINAL_BLOCK), [
        "training.batch_size=16", "training.epochs=5", "training.learning_rate=3e-4", "model.dropout=0",
        "training.grad_clip_norm=null", "training.max_steps=200", "data.tokenizer=bpe", "training.device=cpu",
        "logging.wandb=off"])
    g = parse_gpt_config(raw, None)
    assert g.training.batch_size == 16 and type(g.training.batch_size) is int
    assert g.training.epochs == 5 and g.training.max_steps == 200
    assert g.training.learning_rate == 3e-4 and type(g.training.learning_rate) is float
    assert g.model.dropout == 0.0 and type(g.model.dropout) is float
    assert g.training.grad_clip_norm is None
    assert (g.data.tokenizer, g.training.device, g.logging.wandb) == ("bpe", "cpu", "off")


def test_an_override_adds_a_key_to_a_section_the_file_lacks():
    raw = apply_gpt_overrides({"model": {"model_dim": 128}}, ["lr_schedule.warmup_iters=7", "model.num_layers=3"])
    g = parse_gpt_config(raw, None)
    assert (g.lr_schedule.warmup_iters, g.model.num_layers, g.model.model_dim) == (7, 3, 128)


@pytest.mark.parametrize("item, problem, fix", [
    ("training.batchsize=16", "unknown key", "did you mean 'training.batch_size'"),
    ("optimizer.lr=1e-3", "unknown key", "model.model_dim"),
    ("training=3", "is a section, not a key", "training.epochs"),
    ("model.model_dim.x=3", "unknown key", "model.model_dim"),
    ("training.batch_size", "is not KEY=VALUE", "--override training.batch_size=16"),
    ("training.batch_size=abc", "expected an integer", "32"),
    ("training.batch_size=2.5", "expected an integer", "32"),
    ("training.batch_size=0", "must be at least 1", ""),
    ("training.learning_rate=fast", "expected a number", "6e-4"),
    ("training.learning_rate=inf", "finite", ""),
    ("training.epochs=null", None, None),  # null is allowed: auto
    ("training.device=tpu", "got 'tpu'", "auto, cpu, mps or cuda"),
])
def test_bad_overrides_name_the_key_and_the_fix(item, problem, fix):
    if problem is None:
        assert parse_gpt_config(apply_gpt_overrides({}, [item]), None).training.epochs is None
        return
    with pytest.raises(ConfigError) as e:
        apply_gpt_overrides({}, [item])
    msg = str(e.value)
    assert "--override" in msg and problem in msg and fix in msg, msg
    assert item.partition("=")[0] in msg


def test_an_unknown_key_lists_every_valid_one():
    with pytest.raises(ConfigError) as e:
        apply_gpt_overrides({}, ["nope.x=1"])
    for key in gpt_keys():
        assert key in str(e.value)
    assert {"model.max_seq_len", "training.max_steps", "lr_schedule.min_lr", "data.dir", "logging.project_name",
            "training.eval_interval", "training.checkpoint_interval", "training.device"} <= set(gpt_keys())


@pytest.mark.parametrize("raw, key, problem", [
    ({"model": {"model_dim": 100, "num_heads": 3}}, "model.model_dim", "not divisible by model.num_heads"),
    ({"lr_schedule": {"min_lr": 1e-2}}, "lr_schedule.min_lr", "above training.learning_rate"),
    ({"trainin": {"epochs": 3}}, "trainin", "did you mean 'training'"),
    ({"training": {"epochs": 0}}, "training.epochs", "at least 1"),
    ({"training": ["epochs"]}, "training", "must be a mapping"),
    ({"model": {"model_dim": 1 << 19, "num_layers": 100}}, "model", "parameters is more than"),
    ({"data": {"dataset": "ptb"}}, "data.dataset", "wikitext-2"),
])
def test_file_errors_name_file_key_and_fix(tmp_path, raw, key, problem):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_gpt_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{key}'" in msg and problem in msg and "fix:" in msg, msg


def test_nn_config_with_gpt_config_refuses_keys_the_gpt_config_decides(tmp_path):
    (tmp_path / "gpt.yaml").write_text(ORIGINAL_BLOCK)
    (tmp_path / "nn_config.yaml").write_text("gpt_config: gpt.yaml\nbatch_size: 64\n")
    (tmp_path / "cluster_config_edp.yaml").write_text(yaml.safe_dump(
        {"server": "s", "workers": ["w"], "num_workers": 1, "host_ip": {"w": "127.0.0.1"}}))
    with pytest.raises(ConfigError) as e:
        load_run_config(tmp_path, "edp")
    assert "batch_size" in str(e.value) and "training.batch_size" in str(e.value) and "nn_config.yaml" in str(e.value)
    (tmp_path / "nn_config.yaml").write_text("gpt_config: gpt.yaml\ndevice: cpu\npolyak_alpha: 0.5\n")
    cfg = load_run_config(tmp_path, "edp")
    nn = cfg.nn
    assert cfg.gpt is not None and cfg.gpt.data.tokenizer == "openai-community/gpt2"
    assert (nn.optimizer, nn.weight_decay, nn.batch_size, nn.num_epochs, nn.gradient_clipping) == ("adamw", 0.01, 32, 30, 1.0)
    assert (nn.model.type, nn.model.n_embd, nn.model.n_layer, nn.model.ff_dim, nn.model.block_size) == ("GPT", 256, 6, 1024, 128)
    assert (nn.device, nn.polyak_alpha, nn.dataset) == ("cpu", 0.5, "wikitext-2")


def test_cli_rejects_an_unknown_override_with_the_valid_keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "smolcluster", "train", "--run-dir", str(tmp_path / "run"),
                          "--override", "training.epochs=5", "training.batchsize=16"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training.batchsize" in errors[0] and "did you mean 'training.batch_size'" in errors[0], out.stderr
    assert re.search(r"model\.model_dim.*logging\.project_name", errors[0])
    assert not (tmp_path / "run").exists()  # nothing started
