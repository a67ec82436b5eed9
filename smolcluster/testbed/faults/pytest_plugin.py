"""A pytest plugin: a live simulated cluster to break in your own tests.

smolcluster registers it with pytest (the `pytest11` entry point `smolcluster`), so every test in an
environment where smolcluster is installed can ask for the `cluster` fixture: it starts a topology
on the local backend (a process per node, a Toxiproxy-API proxy per link hop), yields a
RunningCluster, and stops every node and proxy afterwards (and fails the test if a process is left).

    import signal
    import pytest

    @pytest.mark.smolcluster(topology="cluster.yaml", algo="syncps", training={"learning_rate": 0.01})
    def test_training_goes_on_while_a_worker_is_paused(cluster):
        cluster.wait_version(5)
        cluster.signal("laptop", signal.SIGSTOP)
        cluster.wait_version(20)                       # the others carry the run
        cluster.signal("laptop", signal.SIGCONT)

Settings (the marker's keywords; an indirect parametrization `{"algo": "syncps", ...}` of the fixture
overrides them): `topology` (file, default the shipped topologies/faults-small.yaml: srv, w1, w2),
`algo` (default the topology's training.algorithm), `max_steps` (default 5000: the run outlives the
test, the fixture stops it), `seed` (1), `training` (more training keys, as under a topology's
`training:`), `env` (extra environment for the node processes).

MNIST comes from $SMOLCLUSTER_DATA_DIR (else the nodes' default cache/download); a conftest can
override the `smolcluster_data_dir` fixture instead. The `.toxiproxy` client is toxiproxy-python's
(`pip install toxiproxy-python`); `.api` is smolcluster's own client for the same HTTP API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlparse

import psutil
import pytest

from smolcluster.common.wait import wait_until
from smolcluster.core.training.data import DATA_DIR_ENV
from smolcluster.resources import resource_path
from smolcluster.testbed.faults.injector import FaultInjector
from smolcluster.testbed.faults.schedule import parse_faults
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.sim.local import LocalCluster
from smolcluster.testbed.sim.plan import RunOverrides
from smolcluster.testbed.topology import load_topology

MARKER = "smolcluster"
SETTINGS = ("topology", "algo", "max_steps", "seed", "training", "env")
DEFAULT_MAX_STEPS = 5000  # enough that the run outlives the test; the fixture stops it


@dataclass
class RunningCluster:
    """A started cluster. `.control` is the ClusterControl the fault injector drives (a LocalCluster)."""

    control: LocalCluster
    _toxiproxy: Any = field(default=None, repr=False)
    _injectors: list[FaultInjector] = field(default_factory=list, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.control.run_dir

    @property
    def api(self) -> ToxiproxyClient:
        """smolcluster's client for the links' Toxiproxy HTTP API (proxies are named by hop, e.g. "w1->srv")."""
        return self.control.toxiproxy

    @property
    def toxiproxy(self) -> Any:
        """A toxiproxy-python client on the links' proxies (`.get_proxy("w1->srv").toxics()`, `.destroy()`, ...)."""
        if self._toxiproxy is None:
            try:
                from toxiproxy import Toxiproxy
            except ImportError:
                raise pytest.UsageError("cluster.toxiproxy needs toxiproxy-python: pip install toxiproxy-python "
                                        "(or use cluster.api, smolcluster's own client for the same API)") from None
            api = urlparse(self.control.toxiproxy.api_url)
            self._toxiproxy = Toxiproxy()
            self._toxiproxy.update_api_consumer(api.hostname, api.port)
        return self._toxiproxy

    @property
    def nodes(self) -> dict[str, psutil.Process]:
        """Node name -> its live process (psutil, for status and signals)."""
        return {name: psutil.Process(p.pid) for name, p in self.control.procs.procs.items() if p.alive()}

    def signal(self, node: str, sig: int) -> None:
        self.control.procs.signal(node, sig)

    def state(self, node: str) -> str:
        """psutil status: 'running', 'sleeping', 'stopped' (SIGSTOP), 'zombie', or 'gone'."""
        p = self.control.procs.procs.get(node)
        if p is None or not p.alive():
            return "gone"
        return psutil.Process(p.pid).status()

    def wait_version(self, version: int, timeout: float = 60.0) -> int:
        """Block until the server applied `version` model updates."""
        reached = wait_until(lambda: self.control.server_version() >= version, timeout)
        assert reached, f"server stuck at version {self.control.server_version()} (< {version}) after {timeout:.0f} s"
        return self.control.server_version()

    def inject(self, faults: Sequence[dict[str, Any]], seed: int = 1) -> FaultInjector:
        """Start firing fault entries (docs/faults.md; `at` counts from the cluster's start). Returns the
        running injector (`.events`, `.done()`, `.stop()` heals what is active); the fixture stops it at the end."""
        injector = FaultInjector(parse_faults(list(faults), self.control.topology), self.control, seed=seed).start()
        self._injectors.append(injector)
        return injector

    def close(self) -> None:
        for injector in self._injectors:
            injector.stop()
        if self._toxiproxy is not None:  # toxiproxy-python keeps its API address on a class: put it back
            from toxiproxy.api import APIConsumer

            APIConsumer.host, APIConsumer.port = self._saved_api
        self.control.stop()

    def __post_init__(self) -> None:
        try:
            from toxiproxy.api import APIConsumer

            self._saved_api = (APIConsumer.host, APIConsumer.port)
        except ImportError:
            self._saved_api = None


def cluster_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `smolcluster` marker's keywords (closest marker wins), then the fixture's indirect parameter."""
    out: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        out.update(marker.kwargs)
    out.update(getattr(request, "param", None) or {})
    unknown = sorted(set(out) - set(SETTINGS))
    if unknown:
        raise pytest.UsageError(f"unknown smolcluster cluster setting(s) {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    return out


@pytest.fixture(scope="session")
def smolcluster_data_dir() -> Optional[Path]:
    """Where the node processes find MNIST: $SMOLCLUSTER_DATA_DIR, else None (their default cache, or a download)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, smolcluster_data_dir: Optional[Path]) -> Iterator[RunningCluster]:
    """A running cluster of the `smolcluster` marker's topology (default faults-small.yaml), stopped afterwards."""
    settings = cluster_settings(request)
    topo = load_topology(settings.get("topology") or resource_path("topologies", "faults-small.yaml"))
    algo = settings.get("algo") or topo.training.algorithm
    env = {DATA_DIR_ENV: str(smolcluster_data_dir)} if smolcluster_data_dir else {}
    env.update({k: str(v) for k, v in (settings.get("env") or {}).items()})
    training = dict(settings.get("training") or {})
    overrides = RunOverrides(algorithm=algo, epochs=training.pop("epochs", None), seed=training.pop("seed", None),
                             max_steps=settings.get("max_steps", DEFAULT_MAX_STEPS), extra=training)
    control = LocalCluster(topology=topo, run_dir=tmp_path / f"run-{algo}", algorithm=algo, overrides=overrides, env=env,
                           seed=settings.get("seed", 1))
    running = RunningCluster(control)
    try:
        control.start()
        yield running
    finally:
        running.close()
        leftover = [p for p in control.procs.history if p.alive()]
        assert not leftover, f"processes left running: {[p.name for p in leftover]}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(topology=..., algo=..., max_steps=..., seed=..., training={{...}}, env={{...}}): "
                                       "settings for smolcluster's `cluster` fixture")
