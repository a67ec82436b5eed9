"""Start a run on the real cluster: the server and every worker in a tmux session, over SSH.

The cluster config says who is who: `server` and `workers` are SSH host names (or ~/.ssh/config
aliases), a worker's rank is its position in `workers` + 1, and each host reaches the server at
host_ip[host]. Each node runs the same `smolcluster server|worker` command a user would type.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from smolcluster.common.pyversion import REMOTE_CHECK
from smolcluster.core.training.config import load_run_config


@dataclass(frozen=True)
class LaunchStep:
    host: str
    session: str
    command: str  # what runs inside tmux on that host

    def ssh_argv(self, ssh_user: str | None) -> list[str]:
        target = f"{ssh_user}@{self.host}" if ssh_user else self.host
        # -d: detached; kill a stale session of the same name first so a relaunch is clean
        remote = (f"tmux kill-session -t {self.session} 2>/dev/null; "
                  f"tmux new-session -d -s {self.session} {shlex.quote(self.command)}")
        return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", target, remote]


def plan_launch(algo: str, config_dir: Path, remote_dir: str, run_name: str, python: str = "python3") -> list[LaunchStep]:
    """Server first (workers retry until it listens), then the workers in rank order."""
    cfg = load_run_config(config_dir, algo)
    cl = cfg.cluster
    common = f"--algo {algo} --config-dir {shlex.quote(str(config_dir))}"
    cd = f"cd {remote_dir} && "
    steps = [LaunchStep(cl.server, f"smolcluster-{algo}-server",
                        cd + f"{python} -m smolcluster server {common} --run-dir runs/{run_name}/{cl.server}")]
    for rank, host in enumerate(cl.workers, start=1):
        steps.append(LaunchStep(host, f"smolcluster-{algo}-worker",
                                cd + f"{python} -m smolcluster worker {rank} {host} {common} --run-dir runs/{run_name}/{host}"))
    return steps


def check_pythons(steps: list[LaunchStep], *, ssh_user: str | None, python: str, echo=print) -> int:
    """Before anything starts: every host's Python is new enough (else its message, naming the way out)."""
    bad = 0
    for host in dict.fromkeys(s.host for s in steps):
        target = f"{ssh_user}@{host}" if ssh_user else host
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", target, f"{python} -c {shlex.quote(REMOTE_CHECK)}"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            bad += 1
            echo(f"  {host}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f'exit {result.returncode}'}")
    return bad


def launch(steps: list[LaunchStep], *, ssh_user: str | None, dry_run: bool, echo=print, python: str = "python3") -> int:
    if not dry_run and check_pythons(steps, ssh_user=ssh_user, python=python, echo=echo):
        echo("not started: fix the Python on the hosts above first")
        return 1
    failures = 0
    for step in steps:
        argv = step.ssh_argv(ssh_user)
        echo(" ".join(shlex.quote(a) for a in argv))
        if dry_run:
            continue
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            failures += 1
            echo(f"  failed on {step.host}: {result.stderr.strip() or result.returncode}")
    if not dry_run:
        echo(f"started {len(steps) - failures} of {len(steps)} nodes; attach with: ssh HOST -t tmux attach -t SESSION")
    return 1 if failures else 0
