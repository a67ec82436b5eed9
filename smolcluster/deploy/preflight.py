"""Preflight: find what would make a real run fail, per host, before anything starts.

Asked of every host over ssh (the probe script on stdin, so it works before anything is synced):
Python version, OS, tmux and rsync (where macOS keeps Homebrew tools), free disk, clock offset,
the project as importable from the workdir (the same code as here?), torch and the other modules,
MNIST. Then the server port is held open on the server host and every worker makes a TCP connect
to the exact address it will dial, and says which next hop its OS chose.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from smolcluster.common.pyversion import HOW_TO_UPGRADE, MIN_PYTHON, python_problem
from smolcluster.deploy import probe
from smolcluster.deploy.hosts import ssh_argv, sh, quote_path
from smolcluster.deploy.plan import DATA_SUBDIR, DeployPlan, NodePlan
from smolcluster.deploy.runner import Runner

MIN_FREE_MB, LOW_FREE_MB = 500, 2000
CLOCK_WARN_S = 1.0
PROBE_SOURCE = Path(probe.__file__).read_bytes()


@dataclass(frozen=True)
class Check:
    """One line of launch output: a phase, a host, a step, how it went, and the fix when it did not."""

    node: str
    step: str
    level: str  # ok | info | warn | fail
    message: str
    fix: str = ""
    phase: str = "preflight"

    def line(self) -> str:
        mark = {"ok": "ok", "info": "--", "warn": "WARN", "fail": "FAIL"}[self.level]
        return (f"{self.phase:<9}  {self.node:<10} {self.step:<8} {mark:<4}  {self.message}"
                + (f"  (fix: {self.fix})" if self.fix else ""))


def local_digest() -> str:
    import smolcluster

    return probe.source_digest(str(Path(smolcluster.__file__).resolve().parent))


def python_cmd(node: NodePlan) -> str:
    return quote_path(node.host.spec.python)


def probe_command(node: NodePlan, args: list[str]) -> str:
    """The remote command line that runs the probe (read from stdin) with `args` on the node's OS."""
    if node.host.is_windows:  # cmd.exe: double quotes; python expands a leading ~ itself
        return f'"{node.host.spec.python}" - ' + " ".join(f'"{a}"' for a in args)
    return sh(f"{python_cmd(node)} - {' '.join(args)}")


def run_probe(runner: Runner, node: NodePlan, args: list[str], timeout: float = 90.0):
    """Run a probe command on the node's host; (parsed JSON or None, Result)."""
    res = runner.ssh_raw(node.host, probe_command(node, args), stdin=PROBE_SOURCE, timeout=timeout)
    try:
        return json.loads(res.out.strip().splitlines()[-1]), res
    except (ValueError, IndexError):
        return None, res


def _ssh_failed(node: NodePlan, res, ssh_config: str | None) -> Check:
    how = f"ssh{' -F ' + ssh_config if ssh_config else ''} {node.host.destination}"
    if res.code == 255 or "ssh:" in res.err or "Permission denied" in res.err:
        return Check(node.name, "ssh", "fail", f"cannot reach {node.host.destination} over ssh: {res.reason()}",
                     f"check the host is up and that `{how} true` works without a password (ssh-copy-id)")
    if res.code == 127 or "not found" in res.err:
        return Check(node.name, "python", "fail", f"no Python as {node.host.spec.python!r}: {res.reason()}",
                     f"install Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} ({HOW_TO_UPGRADE}) or set nodes.{node.name}.host.python")
    return Check(node.name, "probe", "fail", f"the host probe failed: {res.reason()}", f"run `{how}` and look")


def host_checks(node: NodePlan, facts: dict, *, t_sent: float, t_back: float, synced: bool, will_sync: bool,
                digest: str, have_local_data: bool) -> list[Check]:
    """Judge one host's facts. `synced`: the project was just synced; `will_sync`: launch will sync it."""
    n, out = node.name, []
    py = tuple(facts.get("python", (0, 0, 0)))
    problem = python_problem(py, facts.get("executable"))
    if problem:
        out.append(Check(n, "python", "fail", problem, f"then set nodes.{n}.host.python to it"))
        return out
    out.append(Check(n, "ssh", "ok", f"{facts.get('os')} {facts.get('machine')} ({facts.get('hostname')}), "
                     f"Python {'.'.join(map(str, py))} at {facts.get('executable')}"))
    if not node.host.is_windows:
        for tool in ("tmux", "rsync"):
            info = facts.get(tool)
            if info is None:
                out.append(Check(n, tool, "fail", f"{tool} not found (also looked in /opt/homebrew/bin, /usr/local/bin)",
                                 f"install it: brew install {tool} (macOS), sudo apt install {tool} (Linux)"))
            else:
                out.append(Check(n, tool, "ok", f"{info['version']} ({info['path']})"))
    free = facts.get("free_mb")
    if free is not None:
        level = "fail" if free < MIN_FREE_MB else "warn" if free < LOW_FREE_MB else "ok"
        out.append(Check(n, "disk", level, f"{free / 1024:.1f} GB free at {facts.get('workdir')}",
                         "free some space (checkpoints and logs go there)" if level != "ok" else ""))
    # The host reads its clock last, just before replying: the reply's arrival here is the reference
    # (off by one ssh teardown, tens of ms), not the midpoint of a call that imported torch.
    offset = facts["time"] - t_back
    level = "warn" if abs(offset) > CLOCK_WARN_S else "ok"
    out.append(Check(n, "clock", level, f"offset {offset:+.2f} s from this machine",
                     "sync clocks (sudo sntp -sS time.apple.com, or timedatectl set-ntp true): times in the report "
                     "come from every node's own clock" if level == "warn" else ""))
    out += _project_checks(node, facts, synced=synced, will_sync=will_sync, digest=digest)
    present = len(facts.get("mnist_present", []))
    if present == 4:
        out.append(Check(n, "data", "ok", f"MNIST present in {facts.get('workdir')}/{DATA_SUBDIR}"))
    elif have_local_data:
        out.append(Check(n, "data", "info", "MNIST missing there: it will be copied from this machine"))
    else:
        out.append(Check(n, "data", "warn", "MNIST missing there and not found here: the node will try to download it",
                         "set SMOLCLUSTER_DATA_DIR on this machine to a folder with the MNIST files, so launch copies them"))
    return out


def _project_checks(node: NodePlan, facts: dict, *, synced: bool, will_sync: bool, digest: str) -> list[Check]:
    n, out = node.name, []
    project = facts.get("smolcluster")
    if project is not None and not project.get("in_workdir"):  # `python -m smolcluster` there would run another copy
        facts = {**facts, "smolcluster_error": f"this Python would import another copy, at {project['path']}"}
        project = None
    if project is None:
        problem = facts.get("smolcluster_error", "not importable")
        if will_sync and not synced:
            out.append(Check(n, "project", "info", "smolcluster is not there yet: it will be synced"))
        else:
            out.append(Check(n, "project", "fail", f"smolcluster is not importable from {facts.get('workdir')}: {problem}",
                             "let launch copy it (drop --no-sync), or put the project in that workdir"))
    elif project["digest"] != digest:
        if will_sync and not synced:
            out.append(Check(n, "project", "info", "smolcluster there differs from this machine's: it will be synced"))
        else:
            out.append(Check(n, "project", "fail", f"smolcluster at {project['path']} is not the same code as on this machine",
                             "let launch sync it (drop --no-sync), or update that copy"))
    else:
        out.append(Check(n, "project", "ok", f"the same smolcluster as here ({digest[:12]})"))
    if facts.get("torch") is None:
        out.append(Check(n, "torch", "fail", f"torch is not importable ({facts.get('torch_error', 'missing')})",
                         f"pip install torch with {node.host.spec.python} (Linux x86: add --index-url "
                         "https://download.pytorch.org/whl/cpu for the CPU build)"))
    else:
        out.append(Check(n, "torch", "ok", f"torch {facts['torch']}"))
    missing = facts.get("missing_modules") or []
    if missing:
        out.append(Check(n, "modules", "fail", f"missing Python modules: {', '.join(missing)}",
                         f"pip install -e {node.host.spec.workdir} (after a sync), or pip install numpy pyyaml typer psutil"))
    return out


def gather_facts(runner: Runner, plan: DeployPlan, *, synced: bool, will_sync: bool,
                 have_local_data: bool) -> tuple[dict[str, dict], list[Check]]:
    """Facts from every host in parallel, judged. Returns (facts by node, checks)."""
    digest = local_digest()

    def one(node: NodePlan) -> tuple[NodePlan, dict | None, list[Check]]:
        t0 = time.time()
        workdir = node.host.spec.workdir if node.host.is_windows else quote_path(node.host.spec.workdir)
        facts, res = run_probe(runner, node, ["facts", workdir, DATA_SUBDIR])
        t1 = time.time()
        if runner.dry_run:
            return node, None, []
        if facts is None:
            return node, None, [_ssh_failed(node, res, runner.ssh_config)]
        return node, facts, host_checks(node, facts, t_sent=t0, t_back=t1, synced=synced, will_sync=will_sync,
                                        digest=digest, have_local_data=have_local_data)

    results = runner.map(one, plan.nodes)
    facts = {node.name: f for node, f, _ in results if f is not None}
    checks = [c for _, _, checks in results for c in checks]
    down = {c.node for c in checks if c.step == "ssh" and c.level == "fail"}
    return facts, [_blame_the_jump(c, plan, down) for c in checks]


def _blame_the_jump(check: Check, plan: DeployPlan, down: set[str]) -> Check:
    """A host behind one that does not answer fails too: name the one to fix."""
    via = next((n.host.via for n in plan.nodes if n.name == check.node), None)
    if check.step != "ssh" or check.level != "fail" or via is None or via.node not in down:
        return check
    return Check(check.node, "ssh", "fail", f"cannot reach {check.node}: it is reached through {via.node}, which does not answer ssh",
                 f"fix {via.node} first (see its line)")


def reachability(runner: Runner, plan: DeployPlan, *, hold_s: float = 30.0) -> list[Check]:
    """Hold the server port open on the server host; every worker connects to the address it will dial."""
    server = plan.server
    argv = ssh_argv(server.host, probe_command(server, ["listen", str(plan.port), f"{hold_s:g}", str(len(plan.workers))]),
                    runner.ssh_config)
    if runner.dry_run:
        runner.run(argv, stdin=PROBE_SOURCE)
        for w in plan.workers:
            run_probe(runner, w, ["connect", w.dials or "", str(plan.port), "5"])
        return []
    listener = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        listener.stdin.write(PROBE_SOURCE)
        listener.stdin.close()
        first = readline_within(listener, 60.0)
        ready = json.loads(first) if first.strip().startswith("{") else {"ready": False, "error": first.strip() or
                                                                          listener.stderr.read().decode(errors="replace").strip()}
        if not ready.get("ready"):
            return [Check(server.name, "port", "fail", f"cannot listen on port {plan.port}: {ready.get('error')}",
                          "stop whatever uses it (a previous run? `smolcluster launch --stop`), or pick another with --port")]
        out = [Check(server.name, "port", "ok", f"port {plan.port} is free")]
        out += runner.map(lambda w: _connect_check(runner, w, plan.port), plan.workers)
        # A worker that could not connect leaves the probe waiting: end it now, so the port is free
        # for the server (killing our ssh client does not stop a remote command without a tty).
        runner.ssh(server.host, f"kill {int(ready['pid'])} 2>/dev/null; true", timeout=30)
        return out
    finally:
        listener.kill()
        listener.wait()


def readline_within(proc: subprocess.Popen, seconds: float) -> str:
    """The first stdout line of `proc`, or "" if none arrives in time (the reader is a thread: no select on pipes everywhere)."""
    box: list[bytes] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(seconds)
    return box[0].decode(errors="replace") if box else ""


def _connect_check(runner: Runner, w: NodePlan, port: int) -> Check:
    result, res = run_probe(runner, w, ["connect", w.dials or "", str(port), "5"])
    if result is None:
        return Check(w.name, "route", "fail", f"could not run the connect probe: {res.reason()}")
    route = result.get("route") or {}
    via = route.get("via")
    hop = ("no route to it" if route.get("error") else f"next hop {via}" if via else
           "directly attached" if route else "route unknown")
    if not result.get("connected"):
        cause = route.get("error") or result.get("error")
        return Check(w.name, "route", "fail", f"cannot reach the server at {w.dials}:{port} ({cause}; {hop})",
                     f"give {w.name} a route to {w.dials} (smolcluster topology netsetup FILE --node {w.name}), "
                     "and check firewalls on the way")
    expected = w.first_hop
    if route and expected is not None and via != expected:
        return Check(w.name, "route", "warn", f"reaches {w.dials}:{port}, but through {via or 'no gateway'}; "
                     f"the topology routes it via {expected}", "check the routes on that host against the topology")
    if route and expected is None and via is not None:
        return Check(w.name, "route", "warn", f"reaches {w.dials}:{port} through {via}; the topology expects it directly attached")
    return Check(w.name, "route", "ok", f"reaches {w.dials}:{port} in {result.get('ms')} ms ({hop})")


def loki_reachability(runner: Runner, plan: DeployPlan) -> list[Check]:
    """With --logging, every node's TCP connect to its Loki. Not reaching it only warns: the node still
    trains and keeps its logs in files; shipping must never stop a run."""
    from urllib.parse import urlsplit

    def one(node: NodePlan) -> Check:
        url = urlsplit(node.loki_url or "")
        result, res = run_probe(runner, node, ["connect", url.hostname or "", str(url.port or 80), "5"])
        if result is not None and result.get("connected"):
            return Check(node.name, "loki", "ok", f"reaches Loki at {url.hostname}:{url.port}")
        cause = (result or {}).get("error") or res.reason()
        return Check(node.name, "loki", "warn", f"cannot reach Loki at {url.hostname}:{url.port} ({cause}): its lines stay in its files",
                     "check the address and that Loki listens there (smolcluster logging status), or give --loki-url")

    if runner.dry_run:
        return []
    return runner.map(one, [n for n in plan.nodes if n.loki_url])


def report(checks: list[Check], echo: Callable[[str], None]) -> bool:
    """Print every check in node order; True when none failed."""
    for c in checks:
        echo(c.line())
    return not any(c.level == "fail" for c in checks)
