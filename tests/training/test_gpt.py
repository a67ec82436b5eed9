"""The small GPT trains through the same parameter-server core, on byte-level text."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

GPT = {"model": {"type": "GPT", "vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 64},
       "dataset": "text", "batch_size": 16, "eval_steps": 20, "learning_rate": 0.003,
       "num_epochs": 6}  # the corpus is ~10 steps per epoch per shard


@pytest.mark.parametrize("algo", ["syncps", "edp"])
def test_gpt_loss_falls_over_the_wire(local_cluster, algo, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    c = local_cluster(algo, nn=GPT | {"text_file": str(text)}, cluster={"max_steps": 60, "push_interval": 2,
                                                                        "worker_update_interval": 2} if algo == "edp"
                      else {"max_steps": 60})
    c.start_server()
    for r in (1, 2, 3):
        c.start_worker(r)
    assert c.wait_server(timeout=180) == 0, c.log("server")
    s = c.summary()
    assert s["steps"] == 60
    assert s["final_test_loss"] < 0.6 * math.log(256), s  # well below a uniform guess over 256 bytes
    assert s["final_test_accuracy"] > 0.3, s  # next-byte accuracy on held-out text
