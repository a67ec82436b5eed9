"""`smolcluster sim FILE`: run a topology on a sim backend (or, with --check, measure its links).

The backends: local (local.py, the default: processes and impairing proxies) and compose
(compose_run.py: containers); the link check: linkcheck.py (local) and compose_check.py. Whatever
the backend, a run leaves the same RUN_DIR (layout in smolcluster.testbed.control), summary.json
included (smolcluster.testbed.report.summary), and ends by printing the report's summary table.
Times are measured from the run start = the server's `start` event (listening, before workers join).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, TextIO

from smolcluster.common.errors import SimError
from smolcluster.core import algorithms
from smolcluster.testbed.sim.compose_run import run_compose
from smolcluster.testbed.sim.linkcheck import run_check
from smolcluster.testbed.sim.local import run_local
from smolcluster.testbed.sim.options import SimOptions
from smolcluster.testbed.sim.virtual.cluster import run_virtual
from smolcluster.testbed.topology import load_topology


def run_sim(opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """The `smolcluster sim` command. Returns the process exit code."""
    if opts.backend not in ("local", "compose", "virtual"):
        raise SimError(f"unknown backend {opts.backend!r}: use local (processes + proxies), compose (docker) "
                       "or virtual (one process, virtual time)")
    if opts.algo is not None and opts.algo not in algorithms.names():
        raise SimError(f"unknown algorithm {opts.algo!r}: use {algorithms.choices()}")
    if opts.as_json and not opts.check:
        raise SimError("--json goes with --check (the link check's output); a training run writes RUN_DIR/summary.json")
    if opts.backend == "compose" and opts.gpt_config is not None:
        raise SimError("--gpt-config runs on the local backend (the compose image mounts MNIST, not WikiText-2): "
                       "drop --backend compose")
    if opts.calibrate and opts.backend != "virtual":
        raise SimError("--calibrate measures the virtual backend's compute reference: add --backend virtual")
    if opts.backend == "compose":
        return run_compose(opts, out)
    topo = load_topology(opts.file)
    if opts.check:
        return run_check(topo, toxiproxy_url=opts.toxiproxy, as_json=opts.as_json, out=out, seed=opts.seed)
    if opts.backend == "virtual":
        if algorithms.get(opts.algo or topo.training.algorithm).collective:
            raise SimError("DDP runs real torch.distributed process groups, which virtual time cannot schedule: "
                           "use --backend local")
        return run_virtual(topo, opts, out=out)
    return run_local(topo, opts, out=out)


def install_sigterm_as_interrupt() -> None:
    """SIGTERM (e.g. from a test or a supervisor) stops the sim like Ctrl-C: nodes and proxies cleaned up."""
    if threading.current_thread() is threading.main_thread() and os.name != "nt":
        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
