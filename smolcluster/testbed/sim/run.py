"""`smolcluster sim FILE`: run a topology on a sim backend, show progress, summarise the run.

The local backend (smolcluster.testbed.sim.local) is the default; `--backend compose` hands the same
options to smolcluster.testbed.sim.compose. `--check` measures the links instead of training
(smolcluster.testbed.sim.linkcheck).

What a run leaves in RUN_DIR (layout in smolcluster.testbed.control): the resolved topology, the
configs, every node's logs and metrics, summary.json (the server's summary plus backend, links,
time_to_90_s / time_to_95_s, per-node table rows) and, when smolcluster.testbed.report is there, plots.
Times are measured from the run start = the server's `start` event (listening, before workers join).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from smolcluster.common.errors import SimError
from smolcluster.testbed.sim.plan import RunOverrides
from smolcluster.testbed.topology import Topology, load_topology
from smolcluster.common.files import write_atomic

# Server updates between evaluations when the topology does not set eval_steps: EDP applies one
# update per push (~190 for hybrid's epoch), SyncPS one per step (~470), so both get ~20 points.
EVAL_STEPS = {"edp": 10, "syncps": 25}
ACCURACY_MARKS = (0.90, 0.95)


@dataclass(frozen=True)
class SimOptions:
    file: Path
    algo: Optional[str] = None
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    seed: Optional[int] = None
    run_dir: Optional[Path] = None
    backend: str = "local"
    toxiproxy: Optional[str] = None
    check: bool = False
    as_json: bool = False
    wandb: bool = False
    progress_interval: float = 5.0  # seconds between progress lines when stdout is not a terminal
    faults: Optional[Path] = None  # fault schedule file, added to the topology's own `faults:`
    render_only: bool = False  # compose: write the project and print how to run it by hand
    gpt_config: Optional[Path] = None  # train this gpt_config.yaml's GPT instead of the topology's model


def default_run_dir(topo: Topology, algo: str, now: Optional[float] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path("runs") / f"{topo.name}-{algo}-{stamp}"


def overrides_for(topo: Topology, opts: SimOptions, algo: str) -> RunOverrides:
    extra: dict[str, Any] = {}
    if "eval_steps" not in topo.training.extra:
        extra["eval_steps"] = EVAL_STEPS[algo]
    if opts.wandb:
        extra["wandb"] = "auto"  # online with a key, else offline; never prompts
    return RunOverrides(algorithm=algo, epochs=opts.epochs, max_steps=opts.max_steps, seed=opts.seed, extra=extra,
                        gpt_config=opts.gpt_config)


def run_sim(opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """The `smolcluster sim` command. Returns the process exit code."""
    if opts.backend not in ("local", "compose"):
        raise SimError(f"unknown backend {opts.backend!r}: use local (processes + proxies) or compose (docker)")
    if opts.algo is not None and opts.algo not in EVAL_STEPS:
        raise SimError(f"unknown algorithm {opts.algo!r}: use edp or syncps")
    if opts.as_json and not opts.check:
        raise SimError("--json goes with --check (the link check's output); a training run writes RUN_DIR/summary.json")
    if opts.backend == "compose" and opts.gpt_config is not None:
        raise SimError("--gpt-config runs on the local backend (the compose image mounts MNIST, not WikiText-2): "
                       "drop --backend compose")
    if opts.backend == "compose":
        return _run_compose(opts, out)
    topo = load_topology(opts.file)
    if opts.check:
        from smolcluster.testbed.sim.linkcheck import run_check

        return run_check(topo, toxiproxy_url=opts.toxiproxy, as_json=opts.as_json, out=out, seed=opts.seed)
    return run_local(topo, opts, out=out)


def _last_error_line(log: Path) -> str:
    """The node's own `error: ...` line (what the CLI prints for a SmolclusterError), if it wrote one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), "")


def _run_compose(opts: SimOptions, out: TextIO) -> int:
    from smolcluster.testbed.sim import compose

    entry = getattr(compose, "run_compose", None)
    if entry is None:
        raise SimError("the compose backend has no entry point yet (smolcluster.testbed.sim.compose.run_compose is missing); "
                       "use --backend local for now")
    return int(entry(opts, out=out) or 0)


# --------------------------------------------------------------------------- local run


def run_local(topo: Topology, opts: SimOptions, out: TextIO = sys.stdout,
              on_tick: Optional[Callable[[Any], None]] = None) -> int:
    """Run the topology on the local backend until the server finishes. `on_tick(cluster)` is called
    about twice a second (e.g. a fault injector)."""
    from smolcluster.testbed.faults import FaultInjector, schedule_for
    from smolcluster.testbed.sim.local import LocalCluster

    schedule = schedule_for(topo, opts.faults)  # a bad fault entry fails here, before anything starts
    algo = opts.algo or topo.training.algorithm
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir(topo, algo)
    progress = Progress(out, opts.progress_interval)
    cluster = LocalCluster(topology=topo, run_dir=run_dir, algorithm=algo, overrides=overrides_for(topo, opts, algo),
                           toxiproxy_url=opts.toxiproxy, seed=opts.seed)
    print(f"smolcluster sim: {topo.name} ({opts.file}), {algo}, local backend, run dir {run_dir}", file=out)
    for link in cluster.plans:
        notes = "; ".join(link.notes())
        print(f"  link {link.name:<16} {_profile_text(link.profile)}  [{link.mechanism()}]" + (f"  ({notes})" if notes else ""), file=out)
    for w in topo.workers:
        print(f"  node {w.name:<8} {w.device.name} -> slowdown x{cluster.slowdown(w.name):g}, path {' | '.join(cluster.paths[w.name])}", file=out)
    out.flush()
    try:
        with cluster:
            cluster.start()
            injector = FaultInjector(schedule, cluster, seed=opts.seed if opts.seed is not None else topo.training.seed)

            def tick(c: Any) -> None:
                progress.update(c)
                if on_tick is not None:
                    on_tick(c)

            injector.start()
            try:
                code = cluster.wait(on_tick=tick)
            finally:
                injector.stop()  # heals what is still active before the nodes are stopped
            progress.done()
    except KeyboardInterrupt:
        progress.done()
        print(f"\ninterrupted: every node process and link proxy was stopped; partial results in {run_dir}", file=out)
        return 130
    summary_path = cluster.nodes_dir / topo.server.name / "summary.json"
    if code != 0 or not summary_path.exists():
        log = summary_path.parent / "stdout.log"
        reason = _last_error_line(log)
        raise SimError(f"the server exited with code {code} without a summary"
                       + (f": {reason}" if reason else "") + f"; see {log}")
    summary = build_summary(cluster, json.loads(summary_path.read_text()))
    if injector.events:  # what each fault hit and how the cluster reacted
        from smolcluster.testbed.report import describe_fault, fault_reactions, load_run

        summary["faults"] = fault_reactions(load_run(run_dir))
        summary["faults_failed"] = [e for e in injector.events if e["action"] == "failed"]
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(format_summary(summary), file=out)
    if injector.events:
        print("faults", *[describe_fault(r) for r in summary["faults"]],
              *[f"FAILED {e['fault']}: {e['error']}" for e in summary["faults_failed"]], sep="\n  ", file=out)
    _write_plots(run_dir, out)
    print(f"run dir: {run_dir}", file=out)
    return 0


def _profile_text(p: Any) -> str:
    rate = f"{p.up_mbit:g}/{p.down_mbit:g} Mbit/s" if p.up_mbit != p.down_mbit else f"{p.rate_mbit:g} Mbit/s"
    return f"{p.name}: {p.delay_ms:g}±{p.jitter_ms:g} ms, {rate}"


def _write_plots(run_dir: Path, out: TextIO) -> None:
    try:
        from smolcluster.testbed import report
    except ImportError:
        print("plots: skipped (smolcluster.testbed.report is not available yet)", file=out)
        return
    write_plots = getattr(report, "write_plots", None)
    if write_plots is None:
        print("plots: skipped (smolcluster.testbed.report has no write_plots yet)", file=out)
        return
    try:
        written = write_plots(run_dir)
        print(f"plots: {', '.join(str(p) for p in written) if written else 'written'}", file=out)
    except Exception as e:  # a plotting failure must not lose the run's summary
        print(f"plots: failed ({type(e).__name__}: {e})", file=out)


# --------------------------------------------------------------------------- progress


class Progress:
    """One updating line on a terminal; a line every `interval` seconds otherwise (logs, CI)."""

    def __init__(self, out: TextIO, interval: float):
        self.out = out
        self.interval = interval
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.last = 0.0
        self.width = 0

    def update(self, cluster: Any) -> None:
        now = time.time()
        if not self.tty and now - self.last < self.interval:
            return
        self.last = now
        t = cluster.tail
        acc = t.latest_accuracy()
        steps = " ".join(f"{w} {t.steps[w]}" + ("✓" if w in t.ended else "") for w in t.workers)
        line = (f"[{cluster.elapsed():6.1f}s] version {t.version:5d} | acc {acc:.4f}" if acc is not None
                else f"[{cluster.elapsed():6.1f}s] version {t.version:5d} | acc   -   ") + f" | steps {steps}"
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()
            self.width = 0


# --------------------------------------------------------------------------- summary


def time_to_accuracy(evals: list[dict], start: Optional[float], mark: float) -> Optional[float]:
    """Seconds from the run start to the first evaluation at or above `mark` (None: never reached)."""
    if start is None:
        return None
    for e in evals:
        if e.get("test_accuracy", 0.0) >= mark:
            return round(e["time"] - start, 2)
    return None


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def build_summary(cluster: Any, server_summary: dict) -> dict:
    """The server's summary plus the sim's fields: backend, links, nodes, time_to_90_s, time_to_95_s."""
    from smolcluster.testbed.sim.local import own_bytes

    topo: Topology = cluster.topology
    server_name = topo.server.name
    server_metrics = _metrics(cluster.nodes_dir / server_name / "metrics.jsonl")
    start = next((m["time"] for m in server_metrics if m.get("event") == "start"), None)
    evals = [m for m in server_metrics if m.get("event") == "eval"]
    stats = cluster.final_link_stats or {}
    hop_bytes = {name: (s.get("upstream_bytes", 0), s.get("downstream_bytes", 0)) for name, s in stats.items()}
    own = own_bytes(cluster.paths, hop_bytes) if stats else {}

    links = []
    for p in cluster.plans:
        s = stats.get(p.name)
        links.append({"name": p.name, "src": p.hop.src, "dst": p.hop.dst, "network": p.hop.network,
                      "profile": _profile_dict(p.profile), "mechanism": p.mechanism(), "rate_shaped": p.rate_shaped(),
                      "loss_emulated": False, "notes": p.notes(),
                      "bytes_up": s.get("upstream_bytes") if s else None, "bytes_down": s.get("downstream_bytes") if s else None,
                      "connections": s.get("connections_total") if s else None})

    per_worker = {w["hostname"]: w for w in server_summary.get("per_worker", [])}
    nodes = [{"node": server_name, "role": "server", "device": topo.server.device.name,
              "slowdown": cluster.slowdown(server_name), "steps": server_summary.get("steps"),
              "samples_per_s": None, "mean_staleness": None,
              "bytes_out": server_summary.get("bytes_sent"), "bytes_in": server_summary.get("bytes_received"),
              "late": server_summary.get("pushes_late"), "rejected": server_summary.get("pushes_rejected")}]
    for w in topo.workers:
        pw = per_worker.get(w.name, {})
        wm = _metrics(cluster.nodes_dir / w.name / "metrics.jsonl")
        end = next((m for m in reversed(wm) if m.get("event") == "end"), {})
        steps = [m for m in wm if m.get("event") == "step"]
        # a worker stopped by the sim wrote no `end`: count its step lines instead
        step_count = end.get("steps", (max(m.get("step", 0) for m in steps) + 1) if steps else pw.get("steps"))
        sps = end.get("samples_per_s", pw.get("samples_per_s"))
        up, down = own.get(w.name, (None, None))
        nodes.append({"node": w.name, "role": "worker", "device": w.device.name, "slowdown": cluster.slowdown(w.name),
                      "steps": step_count, "samples_per_s": round(sps, 2) if isinstance(sps, float) else sps,
                      "mean_staleness": pw.get("mean_staleness"), "pushes": pw.get("pushes"),
                      "bytes_out": up, "bytes_in": down, "late": pw.get("late"), "rejected": pw.get("rejected")})

    return {**server_summary,
            "topology": topo.name, "topology_file": str(topo.file), "backend": "local",
            "toxiproxy": cluster.toxiproxy_url or "embedded",
            "run_start": start, "sim_wall_time_s": round(cluster.elapsed(), 2),
            "time_to_90_s": time_to_accuracy(evals, start, 0.90), "time_to_95_s": time_to_accuracy(evals, start, 0.95),
            "evals": [{"t": round(e["time"] - start, 2) if start else None, "version": e.get("version"),
                       "test_accuracy": e.get("test_accuracy"), "test_loss": e.get("test_loss")} for e in evals],
            "links": links, "nodes": nodes, "stopped_after_end": list(cluster.stopped_after_end), "faults": []}


def _profile_dict(p: Any) -> dict:
    return {"name": p.name, "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms, "loss_pct": p.loss_pct,
            "up_mbit": p.up_mbit, "down_mbit": p.down_mbit}


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return _bytes(v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    node_rows = [[n["node"], n["role"], n["device"], f"x{n['slowdown']:g}", _fmt(n["steps"]), _fmt(n["samples_per_s"]),
                  _fmt(n["mean_staleness"]), _fmt(n["bytes_out"], "bytes"), _fmt(n["bytes_in"], "bytes"),
                  _fmt(n["late"]), _fmt(n["rejected"])] for n in s["nodes"]]
    link_rows = [[l["name"], l["profile"]["name"], l["mechanism"], _fmt(l["bytes_up"], "bytes"), _fmt(l["bytes_down"], "bytes"),
                  _fmt(l["connections"])] for l in s["links"]]
    t90, t95 = s.get("time_to_90_s"), s.get("time_to_95_s")
    overall = [
        f"algorithm {s['algorithm']}, {s['steps']} server updates, stop reason: {s.get('stop_reason', '-')}",
        f"final test accuracy {s['final_test_accuracy']:.4f} (loss {s['final_test_loss']:.4f})",
        f"wall time {s['wall_time_s']:.1f} s (server), {s['sim_wall_time_s']:.1f} s (whole sim)",
        f"time to 90% accuracy: {f'{t90:.1f} s' if t90 is not None else 'not reached'}; "
        f"to 95%: {f'{t95:.1f} s' if t95 is not None else 'not reached'}  (from the server's start)",
        f"pushes applied {s['pushes_applied']}, late {s['pushes_late']}, rejected {s['pushes_rejected']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in s['rejected_reasons'].items())})" if s.get("rejected_reasons") else ""),
    ]
    if s.get("final_test_perplexity") is not None:  # a GPT run: the splits and the tokenizer, with the perplexity
        overall.insert(2, f"{s['data']['eval_split']} perplexity {s['final_test_perplexity']:.1f}, tokenizer "
                          f"{s['tokenizer']['name']} ({s['tokenizer']['vocab_size']} tokens); {s['data']['note']}")
    if s.get("torch"):
        overall.append(f"torch {s['torch']['version']} ({s['torch']['build']}), {s['torch']['import_rss_mb']:.0f} MB RSS per node "
                       "once imported")
    return "\n".join([
        "", "nodes (bytes out = towards the server; a worker's bytes come from its first-hop proxy)",
        table(["node", "role", "device", "slowdown", "steps", "samples/s", "staleness", "bytes out", "bytes in", "late", "rejected"], node_rows),
        "", "links (" + ("one proxy per worker path" if s.get("backend") == "compose" else "one proxy per hop")
        + "; up = towards the server)",
        table(["link", "profile", "mechanism", "bytes up", "bytes down", "conns"], link_rows),
        "", *overall, ""])


def install_sigterm_as_interrupt() -> None:
    """SIGTERM (e.g. from a test or a supervisor) stops the sim like Ctrl-C: nodes and proxies cleaned up."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and os.name != "nt":
        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
