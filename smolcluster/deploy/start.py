"""Start: the server first, in a tmux session on its host; once it listens (its server.json), the workers.

Each node runs the command a user would type, inside `tmux new-session -d`, with its output also in
runs/RUN/nodes/NODE/stdout.log, its pid in .../pid and, when it ends, its exit code in .../exit_code.
On Windows (no tmux) the node is started detached with PowerShell's Start-Process and a pid file.
"""

from __future__ import annotations

import shlex
import time
from typing import Callable

from smolcluster.deploy.hosts import quote_path
from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.preflight import Check
from smolcluster.deploy.runner import Runner
from smolcluster.deploy.status import node_status, powershell

SERVER_LISTEN_TIMEOUT_S = 90.0


def node_args(plan: DeployPlan, node: NodePlan) -> list[str]:
    common = ["--algo", plan.algorithm, "--config-dir", plan.remote_config_dir(), "--run-dir", node.run_dir(plan.run_name)]
    if node.role == "server":
        return ["-m", "smolcluster", "server", *common]
    return ["-m", "smolcluster", "worker", str(node.rank), node.name, *common]


def posix_start_script(plan: DeployPlan, node: NodePlan) -> str:
    """What ssh runs: (re)create the node's tmux session running the node command."""
    rd = shlex.quote(node.run_dir(plan.run_name))
    py = quote_path(node.host.spec.python)
    loki = f" SMOLCLUSTER_LOKI_URL={shlex.quote(node.loki_url)}" if node.loki_url else ""
    node_cmd = (f"echo $$ > {rd}/pid; exec env PYTHONUNBUFFERED=1{loki} {py} "
                f"{' '.join(shlex.quote(a) for a in node_args(plan, node))}")
    # The exit code is written by the group, not by tee: `$?` after the pipe would be tee's.
    inner = (f"cd {quote_path(node.host.spec.workdir)} && "
             f"{{ sh -c {shlex.quote(node_cmd)}; echo $? > {rd}/exit_code; }} 2>&1 | tee -a {rd}/stdout.log")
    session = shlex.quote(plan.session_of(node))
    return (f"cd {quote_path(node.host.spec.workdir)} && mkdir -p {rd} && rm -f {rd}/exit_code {rd}/pid && "
            f"{{ tmux kill-session -t {session} 2>/dev/null; true; }} && "
            f"tmux new-session -d -s {session} {shlex.quote(inner)}")


def windows_start_script(plan: DeployPlan, node: NodePlan) -> str:
    rd = node.run_dir(plan.run_name).replace("/", "\\")
    wd = node.host.spec.workdir.replace("~", "$HOME")
    args = ", ".join("'" + a.replace("'", "''") + "'" for a in node_args(plan, node))
    return (f'Set-Location "{wd}"; New-Item -ItemType Directory -Force -Path "{rd}" | Out-Null; '
            f'Remove-Item -ErrorAction SilentlyContinue "{rd}\\exit_code"; $env:PYTHONUNBUFFERED = "1"; '
            + (f'$env:SMOLCLUSTER_LOKI_URL = "{node.loki_url}"; ' if node.loki_url else "")
            + f'$p = Start-Process -FilePath "{node.host.spec.python}" -ArgumentList {args} -WorkingDirectory "{wd}" '
            + f'-RedirectStandardOutput "{rd}\\stdout.log" -RedirectStandardError "{rd}\\stderr.log" -WindowStyle Hidden -PassThru; '
            + f'$p.Id | Out-File -Encoding ascii "{rd}\\pid"')


def start_node(runner: Runner, plan: DeployPlan, node: NodePlan) -> Check:
    if node.host.is_windows:
        res = runner.ssh_raw(node.host, powershell(windows_start_script(plan, node)), timeout=60)
        how = "detached (Start-Process, pid file)"
    else:
        res = runner.ssh(node.host, posix_start_script(plan, node), timeout=60)
        how = f"tmux session {plan.session_of(node)}"
    if not res.ok:
        return Check(node.name, node.role, "fail", f"could not start: {res.reason()}", "run with --dry-run to see the command",
                     phase="start")
    return Check(node.name, node.role, "ok", f"started in {how}", phase="start")


def wait_for_server(runner: Runner, plan: DeployPlan, timeout: float = SERVER_LISTEN_TIMEOUT_S) -> Check:
    """Poll the server's server.json over ssh; fail early if the server exits first."""
    server = plan.server
    deadline = time.monotonic() + timeout
    while True:
        st = node_status(runner, plan, server)
        if runner.dry_run or st.server_json:
            where = f"{st.server_json['host']}:{st.server_json['port']}" if st.server_json else "?"
            return Check(server.name, "listen", "ok", f"the server listens on {where}", phase="start")
        if st.state in ("exited", "unreachable") or time.monotonic() > deadline:
            tail = runner.ssh(server.host, f"tail -n 5 {quote_path(server.host.spec.workdir)}/"
                                           f"{shlex.quote(server.run_dir(plan.run_name))}/stdout.log 2>/dev/null").out.strip()
            why = st.describe if st.state != "running" else f"not listening after {timeout:.0f}s"
            return Check(server.name, "listen", "fail", f"the server is {why}; its last output:\n    "
                         + ("\n    ".join(tail.splitlines()) or "(none)"),
                         f"read {server.host.spec.workdir}/{server.run_dir(plan.run_name)}/stdout.log", phase="start")
        time.sleep(0.5)


def start(runner: Runner, plan: DeployPlan, echo: Callable[[str], None]) -> bool:
    """Server, wait until it listens, then every worker in parallel. True when all started."""
    for check in (start_node(runner, plan, plan.server),):
        echo(check.line())
        if check.level == "fail":
            return False
    listening = wait_for_server(runner, plan)
    echo(listening.line())
    if listening.level == "fail":
        return False
    checks = runner.map(lambda w: start_node(runner, plan, w), plan.workers)
    for c in checks:
        echo(c.line())
    return all(c.level != "fail" for c in checks)
