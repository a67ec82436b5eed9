"""Status: per node, running / exited (with its code) / not started, and its last metrics line.

One ssh call per host runs a small script that reads the node's pid, exit_code, tmux session and
the tail of its metrics; on Windows the same facts come from PowerShell and the pid file.
"""

from __future__ import annotations

import base64
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from smolcluster.common.text import table
from smolcluster.deploy.hosts import quote_path
from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.runner import Runner


@dataclass
class NodeStatus:
    node: str
    role: str
    state: str  # running | exited | not started | unreachable
    exit_code: int | None = None
    session: bool = False
    server_json: dict | None = None
    last: dict[str, Any] = field(default_factory=dict)  # last metrics line
    last_eval: dict[str, Any] = field(default_factory=dict)  # server: last eval line
    error: str = ""

    @property
    def describe(self) -> str:
        if self.state == "exited":
            return f"exited ({self.exit_code})"
        return self.state


def posix_status_script(plan: DeployPlan, node: NodePlan) -> str:
    rd = node.run_dir(plan.run_name)
    s = shlex.quote(plan.session_of(node))
    return (f"cd {quote_path(node.host.spec.workdir)} 2>/dev/null || {{ echo 'workdir=0'; exit 0; }}; rd={shlex.quote(rd)}; "
            'if [ -f "$rd/pid" ]; then pid=$(cat "$rd/pid"); if kill -0 "$pid" 2>/dev/null; then echo alive=1; else echo alive=0; fi; fi; '
            '[ -f "$rd/exit_code" ] && echo "exit_code=$(cat "$rd/exit_code")"; '
            f"if tmux has-session -t {s} 2>/dev/null; then echo session=1; fi; "
            '[ -f "$rd/server.json" ] && echo "server_json=$(cat "$rd/server.json")"; '
            'echo "last=$(tail -n 1 "$rd/metrics.jsonl" 2>/dev/null)"; '
            """echo "last_eval=$(grep '"event":"eval"' "$rd/metrics.jsonl" 2>/dev/null | tail -n 1)"; true""")


def powershell(script: str) -> str:
    """A command line for Windows' OpenSSH (cmd.exe): PowerShell with the script encoded, so no quoting."""
    return "powershell -NoProfile -NonInteractive -EncodedCommand " + base64.b64encode(script.encode("utf-16-le")).decode()


def windows_status_script(plan: DeployPlan, node: NodePlan) -> str:
    rd = node.run_dir(plan.run_name).replace("/", "\\")
    wd = node.host.spec.workdir.replace("~", "$HOME")
    return (f'Set-Location "{wd}"; $rd = "{rd}"; '
            'if (Test-Path "$rd\\pid") { $p = Get-Content "$rd\\pid"; if (Get-Process -Id $p -ErrorAction SilentlyContinue) '
            '{ "alive=1" } else { "alive=0" } }; '
            'if (Test-Path "$rd\\exit_code") { "exit_code=" + (Get-Content "$rd\\exit_code") }; '
            'if (Test-Path "$rd\\server.json") { "server_json=" + (Get-Content "$rd\\server.json" -Raw) }; '
            'if (Test-Path "$rd\\metrics.jsonl") { "last=" + (Get-Content "$rd\\metrics.jsonl" -Tail 1) }')


def parse_status(node: NodePlan, text: str) -> NodeStatus:
    kv: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            kv[key.strip()] = value.strip()
    st = NodeStatus(node=node.name, role=node.role, state="not started", session=kv.get("session") == "1")
    if kv.get("exit_code", "").lstrip("-").isdigit():
        st.state, st.exit_code = "exited", int(kv["exit_code"])
    elif kv.get("alive") == "1" or st.session:
        st.state = "running"
    elif kv.get("alive") == "0":
        st.state, st.error = "exited", "gone without an exit code (killed?)"
    for key, attr in (("server_json", "server_json"), ("last", "last"), ("last_eval", "last_eval")):
        try:
            value = json.loads(kv.get(key) or "null")
        except ValueError:
            value = None  # a half-written last line
        if value is not None:
            setattr(st, attr, value)
    return st


def node_status(runner: Runner, plan: DeployPlan, node: NodePlan) -> NodeStatus:
    if node.host.is_windows:
        res = runner.ssh_raw(node.host, powershell(windows_status_script(plan, node)), timeout=60)
    else:
        res = runner.ssh(node.host, posix_status_script(plan, node), timeout=60)
    if not res.ok and not runner.dry_run:
        return NodeStatus(node=node.name, role=node.role, state="unreachable", error=res.reason())
    return parse_status(node, res.out)


def all_status(runner: Runner, plan: DeployPlan) -> list[NodeStatus]:
    return runner.map(lambda n: node_status(runner, plan, n), plan.nodes)


def format_status(plan: DeployPlan, statuses: list[NodeStatus]) -> str:
    rows = []
    now = time.time()
    for st, node in zip(statuses, plan.nodes):
        last = st.last
        step = last.get("version") if st.role == "server" else last.get("step", last.get("steps"))  # "end" lines count steps
        acc = st.last_eval.get("test_accuracy") if st.role == "server" else None
        loss = last.get("loss") if isinstance(last.get("loss"), (int, float)) else None
        age = f"{now - last['time']:.0f}s ago" if isinstance(last.get("time"), (int, float)) else "-"
        rows.append([st.node, st.role, node.host.destination, st.describe + (f": {st.error}" if st.error else ""),
                     str(last.get("event", "-")), "-" if step is None else str(step),
                     "-" if loss is None else f"{loss:.4f}", "-" if acc is None else f"{acc:.4f}", age])
    head = f"run {plan.run_name} ({plan.algorithm}), launched {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(plan.created))}"
    return head + "\n" + table(["node", "role", "host", "state", "last event", "step/version", "loss", "accuracy", "updated"], rows)
