"""The virtual backend's compute model and --calibrate's profile edit (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolcluster.common.errors import SimError
from smolcluster.resources import resource_path
from smolcluster.testbed.profiles import default_profiles_path, load_device_profiles
from smolcluster.testbed.sim.options import SimOptions
from smolcluster.testbed.sim.run import run_sim
from smolcluster.testbed.sim.virtual.calibrate import REFERENCE_DEVICE, write_reference
from smolcluster.testbed.sim.virtual.cluster import VirtualCluster
from smolcluster.testbed.topology import load_topology


def test_calibrate_rewrites_only_the_reference_figure(tmp_path):
    path = tmp_path / "profiles.yaml"
    original = default_profiles_path().read_text()
    path.write_text(original)
    write_reference(0.1234, path)
    assert load_device_profiles(path)[REFERENCE_DEVICE].ms_per_sample == pytest.approx(0.1234)
    changed = [(a, b) for a, b in zip(original.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(changed) == 1 and "ms_per_sample: 0.1234" in changed[0][1]  # comments and layout kept

    path.write_text(original.replace(f"    ms_per_sample: {load_device_profiles()[REFERENCE_DEVICE].ms_per_sample:g}\n", ""))
    assert load_device_profiles(path)[REFERENCE_DEVICE].ms_per_sample is None
    write_reference(0.05, path)  # the entry had none: added to it
    assert load_device_profiles(path)[REFERENCE_DEVICE].ms_per_sample == pytest.approx(0.05)


def test_compute_model_is_the_reference_times_the_slowdown(tmp_path):
    topo = load_topology(resource_path("topologies", "hybrid.yaml"))
    cluster = VirtualCluster(topology=topo, run_dir=tmp_path, algorithm="edp", reference_ms_per_sample=0.04)
    assert cluster.ms_per_sample("mini2") == topo.nodes["mini2"].device.ms_per_sample  # a device's own figure wins
    assert cluster.ms_per_sample("pi5") == pytest.approx(0.04 * 5)
    assert cluster.ms_per_sample("pi4") == pytest.approx(0.04 * 12.5)  # the same slowdown the local backend stretches by


def test_calibrate_needs_the_virtual_backend():
    with pytest.raises(SimError, match="--backend virtual"):
        run_sim(SimOptions(file=Path(resource_path("topologies", "hybrid.yaml")), calibrate=True))
