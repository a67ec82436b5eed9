"""Attach: a local tmux session with one pane per node, each attached to that node's remote session
over ssh — the original project's "a pane per process" view of a run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Callable

from smolcluster.deploy.hosts import sh, ssh_argv
from smolcluster.deploy.plan import DeployPlan
from smolcluster.deploy.runner import Runner


def local_session(plan: DeployPlan) -> str:
    return f"{plan.run_name}-panes".replace(".", "_").replace(":", "_")


def pane_command(runner: Runner, plan: DeployPlan, node) -> str:
    remote = f"tmux attach -t {shlex.quote(plan.session_of(node))} || {{ echo 'no session (the node exited)'; sleep 3600; }}"
    argv = ssh_argv(node.host, sh(remote), runner.ssh_config, tty=True)
    return " ".join(shlex.quote(a) for a in argv)


def attach(runner: Runner, plan: DeployPlan, echo: Callable[[str], None], *, enter: bool | None = None) -> bool:
    """Create (or replace) the local session; enter it when stdin is a terminal (or `enter`)."""
    session = local_session(plan)
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}  # allowed from inside tmux too
    runner.run(["tmux", "kill-session", "-t", session])
    first, *rest = plan.nodes
    steps = [["tmux", "new-session", "-d", "-s", session, "-x", "220", "-y", "60", pane_command(runner, plan, first)]]
    for node in rest:
        steps.append(["tmux", "split-window", "-t", session, pane_command(runner, plan, node)])
        steps.append(["tmux", "select-layout", "-t", session, "tiled"])
    for argv in steps:
        if runner.dry_run:
            runner.run(argv)
            continue
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            echo(f"attach     could not build the local tmux session: {res.stderr.strip()}")
            return False
    echo(f"attach     local tmux session {session}: one pane per node ({', '.join(n.name for n in plan.nodes)})")
    if enter if enter is not None else (sys.stdin.isatty() and not runner.dry_run):
        os.execvpe("tmux", ["tmux", "attach", "-t", session], env)
    echo(f"attach     enter it with: tmux attach -t {session}")
    return True
