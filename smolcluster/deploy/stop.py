"""Stop: gracefully first, then whatever is left; no process or tmux session of the run remains.

1. SIGINT to the server (as Ctrl-C): it tells the workers the run is over (BYE), writes its final
   checkpoint and summary.json, and exits.
2. The workers leave on that BYE; wait for them.
3. After the grace period: SIGTERM, then SIGKILL, to whatever still runs, and kill the tmux sessions.
Windows nodes have no Ctrl-C over ssh: Stop-Process on their pid file.
"""

from __future__ import annotations

import shlex
import time
from typing import Callable

from smolcluster.deploy.hosts import quote_path
from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.preflight import Check
from smolcluster.deploy.runner import Runner
from smolcluster.deploy.status import NodeStatus, all_status, node_status, powershell

GRACE_S = 30.0


def _signal_script(plan: DeployPlan, node: NodePlan, sig: str) -> str:
    rd = shlex.quote(node.run_dir(plan.run_name))
    return (f"cd {quote_path(node.host.spec.workdir)} && pid=$(cat {rd}/pid 2>/dev/null) && "
            f'[ -n "$pid" ] && kill -{sig} "$pid" 2>/dev/null; true')


def _kill_script(plan: DeployPlan, node: NodePlan) -> str:
    """TERM, up to 5 s, KILL; then the tmux session (its shell and tee with it)."""
    rd = shlex.quote(node.run_dir(plan.run_name))
    return (f"cd {quote_path(node.host.spec.workdir)} 2>/dev/null; pid=$(cat {rd}/pid 2>/dev/null); "
            'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; i=0; '
            'while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; kill -KILL "$pid" 2>/dev/null; fi; '
            f"tmux kill-session -t {shlex.quote(plan.session_of(node))} 2>/dev/null; true")


def _windows_kill_script(plan: DeployPlan, node: NodePlan) -> str:
    rd = node.run_dir(plan.run_name).replace("/", "\\")
    wd = node.host.spec.workdir.replace("~", "$HOME")
    return (f'Set-Location "{wd}"; if (Test-Path "{rd}\\pid") {{ Stop-Process -Id (Get-Content "{rd}\\pid") '
            '-ErrorAction SilentlyContinue }')


def _wait_exit(runner: Runner, plan: DeployPlan, nodes: list[NodePlan], seconds: float) -> dict[str, NodeStatus]:
    deadline = time.monotonic() + seconds
    while True:
        st = {n.name: s for n, s in zip(nodes, runner.map(lambda n: node_status(runner, plan, n), nodes))}
        if runner.dry_run or all(s.state != "running" for s in st.values()) or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def stop(runner: Runner, plan: DeployPlan, echo: Callable[[str], None], grace: float = GRACE_S) -> bool:
    """True when the server stopped cleanly (exit 0: final checkpoint and summary) and nothing is left."""
    server = plan.server
    if server.host.is_windows:
        runner.ssh_raw(server.host, powershell(_windows_kill_script(plan, server)))
    else:
        runner.ssh(server.host, _signal_script(plan, server, "INT"))
    echo(Check(server.name, "server", "ok", "sent Ctrl-C (SIGINT): final checkpoint, summary, BYE to the workers",
               phase="stop").line())
    st = _wait_exit(runner, plan, [server], grace)[server.name]
    clean = runner.dry_run or (st.state == "exited" and st.exit_code == 0)
    echo(Check(server.name, "server", "ok" if clean else "warn", f"server {st.describe}", phase="stop").line())
    left = _wait_exit(runner, plan, plan.workers, grace) if plan.workers else {}
    for node in plan.nodes:  # whatever is left, and every session
        if node.host.is_windows:
            runner.ssh_raw(node.host, powershell(_windows_kill_script(plan, node)))
        else:
            runner.ssh(node.host, _kill_script(plan, node))
    final = all_status(runner, plan)
    remaining = [s for s in final if s.state == "running" or s.session]
    for s in final:
        was = left.get(s.node)
        how = "left on the server's BYE" if was is not None and was.state == "exited" else "stopped"
        level = "fail" if s in remaining else "ok"
        echo(Check(s.node, s.role, level, f"{s.describe}" + (f" ({how})" if s.role == "worker" and level == "ok" else "")
                   + (", tmux session still there" if s.session else ""), phase="stop").line())
    return clean and not remaining


def reap_workers(runner: Runner, plan: DeployPlan, echo: Callable[[str], None], grace: float = 15.0) -> None:
    """After the server ended: workers leave on its BYE; one that never got it (it was still starting,
    or lost the connection) would retry for minutes. Give them `grace`, then stop what is left."""
    left = _wait_exit(runner, plan, plan.workers, grace)
    for node in plan.workers:
        st = left.get(node.name)
        if st is not None and (st.state == "running" or st.session):
            if node.host.is_windows:
                runner.ssh_raw(node.host, powershell(_windows_kill_script(plan, node)))
            else:
                runner.ssh(node.host, _kill_script(plan, node))
            echo(Check(node.name, "worker", "warn", f"still running {grace:.0f} s after the server ended: stopped",
                       phase="wait").line())
