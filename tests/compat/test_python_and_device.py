"""An old Python gets a message naming its version and the way out; device selection; torch build info."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
import torch

from smolcluster.common.errors import ConfigError
from smolcluster.common.pyversion import python_problem
from smolcluster.core.training.device import Accelerators, pick_device, torch_info
from smolcluster.core.training.models import build_model, loss_fn
from smolcluster.core.training.config import ModelConfig

FAKE_39 = "import sys; sys.version_info = (3, 9, 6, 'final', 0); "


def test_the_message_names_the_version_and_how_to_get_a_newer_one():
    msg = python_problem((3, 9, 6, "final", 0), "/usr/bin/python3")
    assert "3.10 or newer" in msg and "/usr/bin/python3 is Python 3.9.6" in msg
    assert "uv python install" in msg and "brew install python@" in msg
    assert python_problem((3, 10, 0)) is None and python_problem() is None


def test_the_cli_stops_an_old_python_with_that_message():
    out = subprocess.run([sys.executable, "-c", FAKE_39 + "from smolcluster.cli import main; main()"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: smolcluster needs Python 3.10 or newer"), out.stderr
    assert "Traceback" not in out.stderr


def test_the_launchers_preflight_names_an_old_python_on_a_host():
    """The probe runs on whatever Python a host has (stdlib, old syntax) and reports its version; preflight judges it."""
    from smolcluster.deploy.plan import NodePlan
    from smolcluster.deploy.hosts import Host
    from smolcluster.deploy.preflight import host_checks
    from smolcluster.testbed.topology import HostSpec

    node = NodePlan(name="mini2", role="worker", rank=1, host=Host(node="mini2", spec=HostSpec(ssh="mini2", os="macos")))
    facts = {"python": [3, 9, 6], "executable": "/usr/bin/python3", "time": 0.0}
    (check,) = host_checks(node, facts, t_sent=0.0, t_back=0.0, synced=False, will_sync=True, digest="", have_local_data=True)
    assert check.level == "fail" and check.node == "mini2" and check.step == "python"
    assert "needs Python 3.10 or newer; /usr/bin/python3 is Python 3.9.6" in check.message and "uv python install" in check.message
    probe = Path(__file__).resolve().parents[2] / "smolcluster" / "deploy" / "probe.py"
    compile(probe.read_text(), str(probe), "exec", flags=0, dont_inherit=True)  # parses; no 3.10+ syntax at module level


@pytest.mark.parametrize("wanted, mps, cuda, picked", [
    ("auto", True, False, "mps"),  # Apple silicon
    ("auto", False, True, "cuda"),
    ("auto", True, True, "mps"),
    ("auto", False, False, "cpu"),
    ("cpu", True, True, "cpu"),
    ("cuda", False, True, "cuda"),
    ("mps", True, False, "mps"),
])
def test_device_selection(wanted, mps, cuda, picked):
    assert pick_device(wanted, Accelerators(mps=mps, cuda=cuda)).type == picked


@pytest.mark.parametrize("wanted", ["cuda", "mps"])
def test_asking_for_a_missing_accelerator_is_a_clear_error(wanted):
    with pytest.raises(ConfigError) as err:
        pick_device(wanted, Accelerators(mps=False, cuda=False), file="configs/nn_config.yaml")
    assert err.value.key == "device" and "configs/nn_config.yaml" in str(err.value) and "device: cpu" in err.value.fix


def test_the_cpu_path_for_real():
    device = pick_device("cpu", Accelerators.probe())
    model = build_model(ModelConfig(), seed=0).to(device)
    loss = loss_fn(model, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.device == device for p in model.parameters())


def test_torch_info_says_which_build_runs():
    info = torch_info(123.4)
    assert info["version"] == torch.__version__ and info["import_rss_mb"] == 123.4
    assert info["build"] == ("cpu" if torch.version.cuda is None else f"cuda {torch.version.cuda}")
