"""The fault x algorithm matrix: one short real sim run per pair, checked the same way everywhere.

`smolcluster faults matrix` and the fault-injection suite (tests/faults/) both use SCENARIOS and
check_run(), so the table a user prints and what CI asserts are the same thing.

Each run is `smolcluster sim topologies/faults-small.yaml --faults <scenario>.yaml` in a subprocess (the
real command, with a hard time bound: a hang is killed and reported, never waited out). Another
topology works too (`--topology FILE`): the scenarios name roles, not nodes — the server, the worker
every fault hits (the first worker that routes for nobody) and that worker's first hop (Roles). A
run passes when:
- it ends by itself within the bound, exit code 0;
- final test accuracy >= the scenario's floor;
- accounting is consistent: for every worker, each push it got an answer for (applied, late,
  rejected) is on the server's record, and the server has no push the worker could not have sent
  (slack: one in-flight push per disconnect, kill or server crash); every rejection has a reason;
- the last checkpoint loads and holds the final model version;
- faults.jsonl has every scheduled fault fired (and healed when it lasts), none failed, and the
  summary's fault reactions list it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.common.jsonl import read_jsonl
from smolcluster.common.text import table
from smolcluster.core import algorithms
from smolcluster.core.training.checkpoint import load_checkpoint
from smolcluster.resources import resource_path
from smolcluster.testbed.faults.injector import read_fault_log
from smolcluster.testbed.topology import load_topology, path_to_server
from smolcluster.common.files import write_atomic

SMALL_TOPOLOGY = resource_path("topologies", "faults-small.yaml")

# Each algorithm's run length, trigger step and accuracy floor are its registry entry's fault_matrix,
# sized for topologies/faults-small.yaml (server + 2 workers, 20 ms links: ~12 s of training, mostly
# waiting on the links, so little CPU): faults fire ~3 s in, after the first checkpoint, and a 3 s
# fault leaves ~5 s to recover before max_steps. Without faults both built-ins reach ~0.92 there.
BOUND_S = 120.0  # a run takes ~25 s here; four times that, and a bit, means it hung
COMPOSE_EXTRA_S = 120.0  # --backend compose: bringing the containers up and down on top of that
BACKENDS = ("local", "compose")


@dataclass(frozen=True)
class Roles:
    """The nodes of the matrix's topology that the scenarios' `{server}`, `{worker}` and `{link}` stand for."""

    server: str
    worker: str  # every fault hits this worker; the others keep training
    link: str  # that worker's first hop towards the server, "A->B"


def roles_for(topology: Path | str) -> Roles:
    """The server, the first worker that routes for nobody (else the first worker) and its first hop."""
    topo = load_topology(topology)
    if len(topo.workers) < 2:
        raise ConfigError(topo.file, "nodes", f"the fault matrix needs at least two workers (one to break, one that keeps "
                          f"training); this topology has {len(topo.workers)}", "add a worker, or use topologies/faults-small.yaml")
    worker = next((w for w in topo.workers if not w.forwarding), topo.workers[0])
    hop = path_to_server(topo, worker.name)[0]
    return Roles(server=topo.server.name, worker=worker.name, link=f"{hop.src}->{hop.dst}")


@dataclass(frozen=True)
class Scenario:
    fault: str  # the matrix row
    entries: tuple[dict[str, Any], ...]  # fault entries without trigger; `step_offset` shifts one; {worker} etc.: Roles
    bound_s: float = BOUND_S

    def floor(self, algo: str) -> float:
        return algorithms.get(algo).fault_matrix.floor

    def faults(self, algo: str, roles: Roles | None = None) -> list[dict[str, Any]]:
        """The scenario's fault entries for `algo` on a topology (default: faults-small.yaml's srv, w1, w2)."""
        names = dataclasses.asdict(roles or roles_for(SMALL_TOPOLOGY))
        out = []
        for e in self.entries:
            e = {k: v.format(**names) if isinstance(v, str) else v for k, v in e.items()}
            e["at_step"] = algorithms.get(algo).fault_matrix.trigger_step + e.pop("step_offset", 0)
            out.append(e)
        return out


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("kill", ({"name": "kill-{worker}", "node": "{worker}", "action": "kill", "duration": 3},)),
    Scenario("pause", ({"name": "pause-{worker}", "node": "{worker}", "action": "pause", "duration": 3},)),
    Scenario("restart", ({"name": "restart-{worker}", "node": "{worker}", "action": "restart"},)),
    Scenario("server_crash", ({"name": "crash-{server}", "action": "server_crash", "duration": 1},)),
    Scenario("partition", ({"name": "cut-{worker}", "link": "{link}", "action": "partition"},
                           {"name": "heal-{worker}", "link": "{link}", "action": "heal", "step_offset": 20})),
    Scenario("latency_spike", ({"name": "slow-{worker}", "link": "{link}", "action": "latency_spike",
                                "latency_ms": 300, "jitter_ms": 50, "duration": 3},)),
    Scenario("bandwidth_collapse", ({"name": "thin-{worker}", "link": "{link}", "action": "bandwidth_collapse",
                                     "rate_kbps": 200, "duration": 3},)),
    Scenario("connection_reset", ({"name": "reset-{worker}", "link": "{link}", "action": "connection_reset"},)),
    Scenario("slow_close", ({"name": "slowclose-{worker}", "link": "{link}", "action": "slow_close",
                             "delay_ms": 2000, "duration": 3},)),
    Scenario("data_limit", ({"name": "limit-{worker}", "link": "{link}", "action": "data_limit",
                             "bytes": 2_000_000, "duration": 3},)),
)
SCENARIO_NAMES = tuple(s.fault for s in SCENARIOS)


def scenario(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.fault == name:
            return s
    raise KeyError(f"no fault scenario {name!r}; known: {', '.join(SCENARIO_NAMES)}")


@dataclass
class Outcome:
    fault: str
    algorithm: str
    passed: bool
    final_test_accuracy: float | None
    recovery_s: float | None  # first fault's "throughput back to >= 80 %" time (smolcluster.testbed.report)
    wall_s: float
    run_dir: Path
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "algorithm": self.algorithm, "passed": self.passed,
                "final_test_accuracy": self.final_test_accuracy, "recovery_s": self.recovery_s,
                "wall_s": round(self.wall_s, 1), "run_dir": str(self.run_dir), "problems": self.problems}


# --------------------------------------------------------------------------- running


def run_scenario(sc: Scenario, algo: str, run_dir: Path, topology: Path = SMALL_TOPOLOGY,
                 env: dict[str, str] | None = None, backend: str = "local") -> Outcome:
    """One real `smolcluster sim` run with the scenario's faults, then check_run()."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    roles = roles_for(topology)
    faults_file = run_dir.parent / f"{run_dir.name}.faults.yaml"
    write_atomic(faults_file, yaml.safe_dump({"faults": sc.faults(algo, roles)}, sort_keys=False))
    max_steps = algorithms.get(algo).fault_matrix.max_steps
    argv = [sys.executable, "-m", "smolcluster", "sim", str(topology), "--algo", algo, "--max-steps", str(max_steps),
            "--run-dir", str(run_dir), "--faults", str(faults_file), "--backend", backend]
    bound = sc.bound_s + (COMPOSE_EXTRA_S if backend == "compose" else 0.0)
    log_path = run_dir.parent / f"{run_dir.name}.sim.log"
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=(os.name != "nt"))
        try:
            code: int | None = proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            code = None
            _stop(proc)
        except BaseException:  # Ctrl-C or a test timeout: never leave a sim (and its nodes) behind
            _stop(proc)
            raise
    wall = time.time() - t0
    problems = [f"did not finish within {bound:.0f} s (hang); killed"] if code is None else []
    if code not in (0, None):
        problems.append(f"smolcluster sim exited with {code}: {_tail(log_path)}")
    return check_run(sc, algo, run_dir, wall, problems, roles)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the sim turns it into a clean stop of every node and proxy), then SIGKILL."""
    proc.send_signal(signal.SIGTERM) if os.name != "nt" else proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])


def run_matrix(faults: Iterable[str] = SCENARIO_NAMES, algos: Iterable[str] | None = None,
               out_dir: Path = Path("runs/faults-matrix"), topology: Path = SMALL_TOPOLOGY,
               progress: Callable[[Outcome], None] | None = None, backend: str = "local") -> list[Outcome]:
    """Every fault scenario x algorithm (default: every registered one)."""
    roles_for(topology)  # a topology the matrix cannot use fails here, before any run
    results = []
    for name in faults:
        sc = scenario(name)
        for algo in algos if algos is not None else algorithms.in_fault_matrix():
            outcome = run_scenario(sc, algo, Path(out_dir) / f"{name}-{algo}", topology, backend=backend)
            results.append(outcome)
            if progress is not None:
                progress(outcome)
    return results


# --------------------------------------------------------------------------- checks


def check_run(sc: Scenario, algo: str, run_dir: Path, wall_s: float, problems: list[str] | None = None,
              roles: Roles | None = None) -> Outcome:
    problems = list(problems or [])
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    elif not problems:
        problems.append("no summary.json")
    acc = summary.get("final_test_accuracy")
    if acc is not None and acc < sc.floor(algo):
        problems.append(f"final test accuracy {acc:.4f} below the floor {sc.floor(algo)}")
    log = read_fault_log(run_dir)
    problems += fault_log_problems(sc, algo, log, summary, roles)
    if summary:
        problems += accounting_problems(run_dir, algo, summary, log)
        problems += checkpoint_problems(run_dir, algo, summary)
    reactions = summary.get("faults") or []
    recovery = reactions[0].get("recovered_after_s") if reactions else None
    return Outcome(sc.fault, algo, not problems, acc, recovery, wall_s, run_dir, problems)


def fault_log_problems(sc: Scenario, algo: str, log: list[dict[str, Any]], summary: dict[str, Any],
                       roles: Roles | None = None) -> list[str]:
    out = []
    reacted = {r.get("fault") for r in summary.get("faults") or []}
    for entry in sc.faults(algo, roles):
        name = entry["name"]
        mine = [e for e in log if e.get("fault") == name]
        if not any(e["action"] == "fired" for e in mine):
            out.append(f"fault {name} never fired (faults.jsonl: {[e['action'] for e in mine]})")
        if any(e["action"] == "failed" for e in mine):
            out.append(f"fault {name} failed: {[e.get('error') for e in mine if e['action'] == 'failed']}")
        if entry.get("duration") and not any(e["action"] == "healed" for e in mine):
            out.append(f"fault {name} has a duration but was never healed")
        if summary and name not in reacted:
            out.append(f"the summary's fault reactions do not list {name}")
    return out


def accounting_problems(run_dir: Path, algo: str, summary: dict[str, Any], log: list[dict[str, Any]]) -> list[str]:
    """Every push a worker got an answer for is on the server's record, and the server has nothing
    the worker did not send: worker-answered <= server-recorded <= worker-answered + unanswered + slack
    (unanswered: pushes its last process sent without an answer, e.g. the server ended meanwhile)."""
    nodes = run_dir / "nodes"
    server_name = next((p.parent.name for p in nodes.glob("*/summary.json")), None)
    if server_name is None:
        return ["no server summary in nodes/*/summary.json"]
    server = read_jsonl(nodes / server_name / "metrics.jsonl")
    crashes = sum(1 for e in log if e["action"] == "fired" and e["kind"] in ("server_crash", "kill", "restart")
                  and e["target"] == server_name)
    out = []
    rejects = [e for e in server if e["event"] == "reject"]
    if any(not e.get("reason") for e in rejects):
        out.append(f"rejections without a reason: {[e for e in rejects if not e.get('reason')][:3]}")
    if summary.get("pushes_rejected", 0) != sum((summary.get("rejected_reasons") or {}).values()):
        out.append(f"pushes_rejected {summary.get('pushes_rejected')} != sum of rejected_reasons {summary.get('rejected_reasons')}")
    for w in summary.get("per_worker", []):
        rank, host = w["rank"], w["hostname"]
        events = read_jsonl(nodes / host / "metrics.jsonl")
        if events and events[-1]["event"] != "end" and _cut_off_at_end(events, server):
            pass  # disconnected when the server finished: no BYE could reach it, the sim stopped it
        elif not events or events[-1]["event"] != "end":  # crashed, or stuck
            errors = [l for l in (nodes / host / "stdout.log").read_text(errors="replace").splitlines()
                      if l.startswith(("error:", "Traceback")) or "Error" in l[:40]] if (nodes / host / "stdout.log").exists() else []
            out.append(f"{host} did not finish cleanly (no final 'end' event){': ' + errors[-1] if errors else ''}")
        steps = [e for e in events if e["event"] == "step"]
        answered = sum(1 for e in steps if e.get("status") in ("applied", "late", "rejected"))
        disconnects = sum(1 for e in events if e["event"] == "disconnect")
        killed = sum(1 for e in log if e["action"] == "fired" and e["kind"] in ("kill", "restart") and e["target"] == host)
        # an update names its one `source` (asynchronous) or its `contributors` (synchronous)
        applied = sum(1 for e in server if e["event"] == "update"
                      and (e.get("source") == rank or rank in (e.get("contributors") or [])))
        late = sum(1 for e in server if e["event"] == "late" and e.get("rank") == rank)
        rejected = sum(1 for e in rejects if e.get("rank") == rank)
        recorded = applied + late + rejected
        slack = disconnects + killed + crashes
        end = events[-1] if events and events[-1]["event"] == "end" else {}
        unanswered = max(0, end.get("pushes_sent", 0) - end.get("pushes_answered", 0))
        if not answered - crashes <= recorded <= answered + unanswered + slack:
            out.append(f"{host}: {answered} pushes answered but the server recorded {recorded} "
                       f"(applied {applied}, late {late}, rejected {rejected}; slack {slack})")
        worker_rejected = sum(1 for e in steps if e.get("status") == "rejected")
        if worker_rejected > rejected:
            out.append(f"{host}: told {worker_rejected} pushes were rejected, the server recorded {rejected}")
    if not crashes:  # a resumed server restores its counters from the checkpoint; otherwise they must match the events
        n_late = sum(1 for e in server if e["event"] == "late")
        if summary.get("pushes_late") != n_late or summary.get("pushes_rejected") != len(rejects):
            out.append(f"summary counters (late {summary.get('pushes_late')}, rejected {summary.get('pushes_rejected')}) "
                       f"differ from the server's events (late {n_late}, rejected {len(rejects)})")
        # pushes applied: a worker's EDP update each, or each worker contribution to a closed SyncPS step
        updates = [e for e in server if e["event"] == "update"]
        n_applied = (sum(1 for e in updates if e.get("source", 0) != 0) if algo == "edp" else
                     sum(sum(1 for r in e.get("contributors") or [] if r != 0) for e in updates))
        if summary.get("pushes_applied") != n_applied:
            out.append(f"summary pushes_applied {summary.get('pushes_applied')} != {n_applied} pushes in the update events")
    return out


def _cut_off_at_end(worker_events: list[dict[str, Any]], server_events: list[dict[str, Any]]) -> bool:
    """The worker's last events are reconnect attempts and the server has ended: they began before its final
    `end` (cut off), or after it (a killed or restarted worker whose new process came up, on a loaded
    machine, only once the server had finished: it could not join any more)."""
    server_end = max((e["time"] for e in server_events if e["event"] == "end"), default=None)
    return server_end is not None and bool(worker_events) and worker_events[-1]["event"] == "disconnect"


def checkpoint_problems(run_dir: Path, algo: str, summary: dict[str, Any]) -> list[str]:
    ckpt_dirs = sorted((run_dir / "nodes").glob("*/checkpoints"))
    if not ckpt_dirs:
        return ["no checkpoint directory"]
    try:
        state = load_checkpoint(ckpt_dirs[0])
    except Exception as e:  # any failure to load is the finding
        return [f"last checkpoint does not load: {e}"]
    out = []
    if state.algorithm != algo:
        out.append(f"checkpoint is from {state.algorithm}, not {algo}")
    if state.version != summary.get("steps"):
        out.append(f"checkpoint version {state.version} != final version {summary.get('steps')}")
    return out


# --------------------------------------------------------------------------- output


def format_matrix(results: list[Outcome]) -> str:
    rows = [[r.fault, r.algorithm, "pass" if r.passed else "FAIL",
             f"{r.final_test_accuracy:.4f}" if r.final_test_accuracy is not None else "-",
             f"{r.recovery_s:.1f}" if r.recovery_s is not None else "-", f"{r.wall_s:.0f}"] for r in results]
    lines = [table(["fault", "algorithm", "outcome", "final acc", "recovery s", "wall s"], rows)]
    for r in results:
        for p in r.problems:
            lines.append(f"{r.fault} x {r.algorithm}: {p}")
    return "\n".join(lines)


def matrix_json(results: list[Outcome]) -> dict[str, Any]:
    return {"results": [r.to_json() for r in results]}
