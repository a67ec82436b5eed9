"""Wait: stay until the server exits, with a live progress line like `smolcluster sim`'s."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from smolcluster.deploy.plan import DeployPlan
from smolcluster.deploy.runner import Runner
from smolcluster.deploy.status import NodeStatus, all_status

POLL_S = 2.0


def progress_line(elapsed: float, statuses: list[NodeStatus]) -> str:
    server = statuses[0]
    version = server.last.get("version", 0) if server.last else 0
    acc = server.last_eval.get("test_accuracy")
    workers = " ".join(f"{s.node} {s.last.get('step', 0) if s.last else 0}" + ("✓" if s.state == "exited" else "")
                       for s in statuses[1:])
    return (f"[{elapsed:6.1f}s] version {version:5d} | acc " + (f"{acc:.4f}" if acc is not None else "  -   ")
            + f" | steps {workers}")


def wait(runner: Runner, plan: DeployPlan, out: TextIO = sys.stdout, interval: float = 5.0) -> NodeStatus:
    """Poll every host until the server has exited; returns the server's final status."""
    tty = hasattr(out, "isatty") and out.isatty()
    t0, last_print = time.monotonic(), 0.0
    while True:
        statuses = all_status(runner, plan)
        now = time.monotonic()
        if runner.dry_run or statuses[0].state in ("exited", "not started"):
            if tty:
                out.write("\n")
            return statuses[0]
        line = progress_line(now - t0, statuses)
        if tty:
            out.write("\r" + line)
        elif now - last_print >= interval:
            out.write(line + "\n")
            last_print = now
        out.flush()
        time.sleep(POLL_S)
