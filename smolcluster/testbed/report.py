"""The run report: load a run directory, print a summary table, draw plots, compare two runs.

Input (see smolcluster/testbed/control.py): RUN_DIR/nodes/<name>/metrics.jsonl per node, or, for
runs started by hand / by the training tests, RUN_DIR/<name>/metrics.jsonl; RUN_DIR/summary.json
(else the server's own summary.json); RUN_DIR/faults.jsonl (optional).

Output: `summary_table` (plain text), `write_plots` (accuracy.png, throughput.png, timeline.png,
staleness.png in the run dir), `compare` / `write_compare_plot` for two runs, and
`fault_reactions`, which says how the cluster reacted to each fault that fired.

matplotlib is imported inside the plotting functions (Agg backend) so `import smolcluster.testbed.report`
stays cheap and works without a display.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from smolcluster.common.errors import ReportError

# Thresholds the report quotes "time to accuracy" for.
ACCURACY_TARGETS = (0.90, 0.95)
# Throughput counts as recovered after a fault once it is back to this share of its pre-fault rate.
RECOVERY_SHARE = 0.8
# Late pushes and rejoins shortly after a heal still belong to the fault (a resumed worker pushes late).
FAULT_GRACE_S = 5.0


# --------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """Everything a report needs from one run directory."""

    run_dir: Path
    summary: dict[str, Any]
    events: dict[str, list[dict[str, Any]]]  # node name -> its metrics.jsonl lines, in time order
    faults: list[dict[str, Any]]  # faults.jsonl lines, in time order (empty if none)
    start_time: float  # unix seconds: the server's first "start" event, else the earliest event
    server: str | None  # node name of the server (the node with "start"/"update"/"eval" events)
    workers: list[str] = field(default_factory=list)  # node names of the workers, sorted

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def algorithm(self) -> str:
        start = next((e for e in self.server_events("start")), {})
        return str(self.summary.get("algorithm") or start.get("algorithm") or "?")

    @property
    def end_time(self) -> float:
        times = [e["time"] for evs in self.events.values() for e in evs]
        times += [f["time"] for f in self.faults]
        return max(times) if times else self.start_time

    def server_events(self, *kinds: str) -> list[dict[str, Any]]:
        evs = self.events.get(self.server, []) if self.server else []
        return [e for e in evs if not kinds or e["event"] in kinds]

    def node_events(self, node: str, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(node, []) if not kinds or e["event"] in kinds]

    def rel(self, t: float) -> float:
        """Seconds since the run started."""
        return t - self.start_time

    def rank_names(self) -> dict[int, str]:
        """Worker rank -> node name, from the server's join events and the summary's per_worker."""
        out: dict[int, str] = {}
        for pw in self.summary.get("per_worker") or []:
            if "rank" in pw and pw.get("hostname"):
                out[int(pw["rank"])] = str(pw["hostname"])
        for e in self.server_events("join"):
            if "rank" in e and e.get("host"):
                out.setdefault(int(e["rank"]), str(e["host"]))
        return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines with a numeric "time"; a killed process may leave a torn last line, which is skipped."""
    out: list[dict[str, Any]] = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("time"), (int, float)):
            out.append(obj)
    out.sort(key=lambda e: e["time"])  # stable: same-time lines keep file order
    return out


def _node_dirs(run_dir: Path) -> dict[str, Path]:
    """Node name -> its metrics file: RUN_DIR/nodes/* first, else any direct subdirectory with metrics."""
    for base in (run_dir / "nodes", run_dir):
        found = {p.parent.name: p for p in sorted(base.glob("*/metrics.jsonl"))}
        if found:
            return found
    return {}


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Raises ReportError if it holds no metrics at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory (give the run directory, e.g. runs/latest)")
    files = _node_dirs(run_dir)
    if not files:
        raise ReportError(f"{run_dir}: no metrics.jsonl found in nodes/<name>/ or <name>/ "
                          "(is this a run directory, and did any node start?)")
    events = {name: _read_jsonl(path) for name, path in files.items()}

    server_marks = {"start", "update", "eval"}
    server = next((n for n, evs in events.items() if any(e.get("event") in server_marks for e in evs)), None)
    workers = sorted(n for n in events if n != server)

    summary: dict[str, Any] = {}
    candidates = [run_dir / "summary.json"] + ([files[server].parent / "summary.json"] if server else [])
    for path in candidates:
        if path.is_file():
            try:
                summary = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}: not valid JSON ({e}); the run may have been cut short") from None
            break

    faults_path = run_dir / "faults.jsonl"
    faults = _read_jsonl(faults_path) if faults_path.is_file() else []

    starts = [e["time"] for e in events.get(server, []) if e.get("event") == "start"] if server else []
    all_times = [e["time"] for evs in events.values() for e in evs]
    start_time = min(starts) if starts else min(all_times, default=0.0)
    return RunData(run_dir=run_dir, summary=summary, events=events, faults=faults,
                   start_time=start_time, server=server, workers=workers)


# --------------------------------------------------------------------------- numbers


def time_to_accuracy(run: RunData, threshold: float) -> float | None:
    """Seconds from the run's start to the first evaluation with test accuracy >= threshold (None: never)."""
    for e in run.server_events("eval"):
        acc = e.get("test_accuracy")
        if acc is not None and acc >= threshold:
            return run.rel(e["time"])
    return None


def final_accuracy(run: RunData) -> float | None:
    if run.summary.get("final_test_accuracy") is not None:
        return float(run.summary["final_test_accuracy"])
    evals = [e for e in run.server_events("eval") if e.get("test_accuracy") is not None]
    return float(evals[-1]["test_accuracy"]) if evals else None


def wall_time(run: RunData) -> float:
    if run.summary.get("wall_time_s") is not None:
        return float(run.summary["wall_time_s"])
    return run.end_time - run.start_time


def _count(run: RunData, key: str, event: str) -> int:
    """A summary counter, else the number of such server events (a crashed server writes no summary)."""
    if run.summary.get(key) is not None:
        return int(run.summary[key])
    return len(run.server_events(event))


def _staleness_values(run: RunData, t0: float = -math.inf, t1: float = math.inf) -> list[float]:
    return [float(e["staleness"]) for e in run.server_events("update")
            if e.get("staleness") is not None and t0 <= e["time"] <= t1]


def mean_staleness(run: RunData) -> float | None:
    vals = _staleness_values(run)
    if vals:
        return statistics.fmean(vals)
    per = [(pw.get("mean_staleness"), pw.get("pushes") or 0) for pw in run.summary.get("per_worker") or []]
    per = [(m, n) for m, n in per if m is not None and n]
    return sum(m * n for m, n in per) / sum(n for _, n in per) if per else None


def _link_bytes(link: dict[str, Any]) -> tuple[int | None, int | None]:
    """(bytes worker->server, bytes server->worker) of one summary["links"] entry, whichever naming it uses."""
    for up, down in (("bytes_up", "bytes_down"), ("bytes_sent", "bytes_received"), ("bytes_out", "bytes_in")):
        if up in link or down in link:
            return link.get(up), link.get(down)
    return None, None


def _links(run: RunData) -> list[dict[str, Any]]:
    links = run.summary.get("links") or []
    if isinstance(links, dict):  # {"pi4->mini3": {...}} form
        links = [{"name": k} | (v if isinstance(v, dict) else {}) for k, v in links.items()]
    out = []
    for link in links:
        if not isinstance(link, dict):
            continue
        if ("src" not in link or "dst" not in link) and "->" in str(link.get("name", "")):
            src, dst = str(link["name"]).split("->", 1)
            link = {"src": src, "dst": dst} | link
        out.append(link)
    return out


@dataclass
class NodeRow:
    node: str
    role: str
    steps: int | None = None
    samples_per_s: float | None = None
    mean_staleness: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    late: int | None = None
    rejected: int | None = None
    joins: int | None = None


def node_rows(run: RunData) -> list[NodeRow]:
    """One row per node: the server's totals, then each worker from summary per_worker, its own metrics, the
    sim's per-node numbers (summary "nodes") and, last, the links it is the source of."""
    rows: list[NodeRow] = []
    s = run.summary
    if run.server:
        updates = run.server_events("update")
        rows.append(NodeRow(node=run.server, role="server",
                            steps=s.get("steps", updates[-1].get("version") if updates else 0),
                            bytes_in=s.get("bytes_received"), bytes_out=s.get("bytes_sent"),
                            late=_count(run, "pushes_late", "late"), rejected=_count(run, "pushes_rejected", "reject"),
                            mean_staleness=mean_staleness(run)))
    names = run.rank_names()
    rank_of = {v: k for k, v in names.items()}
    per_worker = {str(pw.get("hostname")): pw for pw in s.get("per_worker") or []}
    links = _links(run)
    sim_nodes = {str(n.get("node")): n for n in s.get("nodes") or [] if isinstance(n, dict)}
    for node in sorted(set(run.workers) | set(per_worker)):
        pw = per_worker.get(node, {})
        rank = pw.get("rank", rank_of.get(node))
        row = NodeRow(node=node, role="worker", steps=pw.get("steps"), samples_per_s=pw.get("samples_per_s"),
                      mean_staleness=pw.get("mean_staleness"), late=pw.get("late"), rejected=pw.get("rejected"),
                      joins=pw.get("joins"), bytes_in=pw.get("bytes_received"), bytes_out=pw.get("bytes_sent"))
        # A worker's own metrics fill what the server's summary lacks (e.g. the server crashed).
        own = run.node_events(node)
        ends = [e for e in own if e["event"] == "end"]
        steps = [e for e in own if e["event"] == "step"]
        if row.steps is None:
            row.steps = ends[-1].get("steps") if ends else (steps[-1].get("step") if steps else None)
        if row.samples_per_s is None and ends:
            row.samples_per_s = ends[-1].get("samples_per_s")
        if rank is not None:
            rank = int(rank)
            if row.mean_staleness is None:
                vals = [float(e["staleness"]) for e in run.server_events("update")
                        if e.get("source") == rank and e.get("staleness") is not None]
                row.mean_staleness = statistics.fmean(vals) if vals else None
            if row.late is None:
                row.late = sum(1 for e in run.server_events("late") if e.get("rank") == rank)
            if row.rejected is None:
                row.rejected = sum(1 for e in run.server_events("reject") if e.get("rank") == rank)
        sim_node = sim_nodes.get(node, {})  # the sim's own per-node bytes exclude traffic a node forwards
        if row.bytes_in is None and row.bytes_out is None and (sim_node.get("bytes_in") is not None or sim_node.get("bytes_out") is not None):
            row.bytes_in, row.bytes_out = sim_node.get("bytes_in"), sim_node.get("bytes_out")
        if row.bytes_in is None and row.bytes_out is None:
            mine = [_link_bytes(l) for l in links if l.get("src") == node]
            if mine and any(u is not None or d is not None for u, d in mine):
                row.bytes_out = sum(u or 0 for u, _ in mine)
                row.bytes_in = sum(d or 0 for _, d in mine)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- faults


def _rate(times: list[float], t0: float, t1: float) -> float:
    """Events per second in [t0, t1)."""
    if t1 <= t0:
        return 0.0
    return sum(1 for t in times if t0 <= t < t1) / (t1 - t0)


def fault_reactions(run: RunData, window_s: float | None = None) -> list[dict[str, Any]]:
    """For each fault that fired: what it hit and how the cluster reacted.

    A fault's window runs from "fired" to its matching "healed" line (same fault and target), or, for a
    fault that is never healed, to the target's next join, else the end of the run. Late pushes,
    disconnects and rejoins are counted up to FAULT_GRACE_S after the window (a resumed worker's first
    push is late). Throughput = server updates per second over a sliding window of `window_s` seconds
    (default: long enough for ~10 updates at the pre-fault rate, at least 1 s); the pre-fault rate is the
    median over such windows in the 10 s before the fault (the plain mean when fewer than 3 fit); "recovered"
    is the first moment t >= fired from which the next window runs at >= 80 % of the pre-fault rate.
    """
    updates = run.server_events("update")
    utimes = [e["time"] for e in updates]
    end = run.end_time
    fired = [f for f in run.faults if f.get("action", "fired") == "fired"]
    out: list[dict[str, Any]] = []
    for f in fired:
        t_fire = float(f["time"])
        fault, target = str(f.get("fault", "?")), str(f.get("target", ""))
        healed = next((h["time"] for h in run.faults if h.get("action") == "healed" and h["time"] >= t_fire
                       and h.get("fault") == fault and str(h.get("target", "")) == target), None)
        if healed is not None:
            t_end = float(healed)
        else:
            rejoin = next((e["time"] for e in run.server_events("join") if e["time"] > t_fire and e.get("host") == target), None)
            t_end = float(rejoin) if rejoin is not None else end
        t_grace = t_end + FAULT_GRACE_S
        # Workers disconnect when a finished server closes (just before its final eval and "end" line):
        # that is the run ending, not the fault, so stop counting at its last update.
        run_end = next((e["time"] for e in run.server_events("end") if e["time"] >= t_fire), None)
        if run_end is not None:
            t_grace = min(t_grace, max((u for u in utimes if u <= run_end), default=run_end))

        during = [e for e in updates if t_fire <= e["time"] <= t_end]
        missing = [e for e in during if e.get("missing")]
        late = [e for e in run.server_events("late") if t_fire <= e["time"] <= t_grace]
        stale_in = _staleness_values(run, t_fire, t_grace)
        stale_before = _staleness_values(run, -math.inf, t_fire)
        disconnects = [{"node": run.server, "rank": e.get("rank"), "host": e.get("host"), "reason": e.get("reason"),
                        "after_s": round(e["time"] - t_fire, 3)}
                       for e in run.server_events("leave") if t_fire <= e["time"] <= t_grace]
        for node in run.workers:
            disconnects += [{"node": node, "host": node, "reason": e.get("reason"), "after_s": round(e["time"] - t_fire, 3)}
                            for e in run.node_events(node, "disconnect") if t_fire <= e["time"] <= t_grace]
        rejoins = [{"rank": e.get("rank"), "host": e.get("host"), "after_s": round(e["time"] - t_fire, 3)}
                   for e in run.server_events("join") if t_fire < e["time"] <= t_grace]

        # Pre-fault throughput over up to 10 s of training before the fault: the median of its windows,
        # so a start-up burst or one hiccup does not set the bar that "recovered" is measured against.
        first = utimes[0] if utimes else t_fire
        pre_span = min(10.0, t_fire - first)
        pre_rate = _rate(utimes, t_fire - pre_span, t_fire) if pre_span > 0 else 0.0
        win = window_s if window_s is not None else max(1.0, 10.0 / pre_rate if pre_rate > 0 else 1.0)
        n_windows = int(pre_span // win)
        if n_windows >= 3:
            pre_rate = statistics.median(_rate(utimes, t_fire - (k + 1) * win, t_fire - k * win) for k in range(n_windows))
        recovered_after: float | None = None
        if pre_rate > 0:
            for t in [t_fire] + [u for u in utimes if u > t_fire]:
                if t + win > end:
                    break
                if _rate(utimes, t, t + win) >= RECOVERY_SHARE * pre_rate:
                    recovered_after = t - t_fire
                    break
        out.append({
            "fault": fault,
            "target": target,
            "time": t_fire,
            "at_s": round(run.rel(t_fire), 3),
            "healed_after_s": round(float(healed) - t_fire, 3) if healed is not None else None,
            "window_s": round(t_end - t_fire, 3),
            "updates_during": len(during),
            "updates_missing_workers": len(missing),
            "missing_ranks": sorted({r for e in missing for r in e["missing"]}),
            "late_pushes": len(late),
            "staleness_peak": max(stale_in) if stale_in else None,
            "staleness_mean_before": round(statistics.fmean(stale_before), 3) if stale_before else None,
            "disconnects": disconnects,
            "rejoins": rejoins,
            "throughput_before": round(pre_rate, 3) if pre_rate else None,
            "throughput_during": round(_rate(utimes, t_fire, t_end), 3) if t_end > t_fire else None,
            "throughput_window_s": round(win, 3),
            "recovered_after_s": round(recovered_after, 3) if recovered_after is not None else None,
            "detail": {k: v for k, v in f.items() if k not in {"time", "elapsed", "fault", "target", "action"}},
        })
    return out


# --------------------------------------------------------------------------- text


def _fmt(v: Any, spec: str = "", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec) if spec else str(v)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_seconds(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.1f} s"


def _table(header: list[str], rows: Iterable[list[str]], right: set[int] | None = None) -> list[str]:
    rows = [header] + list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = right if right is not None else set(range(1, len(header)))
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def describe_fault(r: dict[str, Any]) -> str:
    """One fault reaction: a headline, then one indented line per kind of reaction."""
    head = f"t={r['at_s']:.1f} s  {r['fault']} {r['target']}".rstrip()
    head += f"  (healed after {r['healed_after_s']:.1f} s)" if r["healed_after_s"] is not None else "  (not healed)"
    parts = [f"{r['updates_during']} updates during it, {r['updates_missing_workers']} with missing workers"
             + (f" (ranks {', '.join(map(str, r['missing_ranks']))})" if r["missing_ranks"] else ""),
             f"{r['late_pushes']} late pushes"]
    if r["staleness_peak"] is not None:
        parts.append(f"staleness peak {r['staleness_peak']:g}"
                     + (f" (mean before {r['staleness_mean_before']:.2f})" if r["staleness_mean_before"] is not None else ""))
    if r["disconnects"]:
        parts.append(f"{len(r['disconnects'])} disconnects")
    if r["rejoins"]:
        parts.append("rejoined: " + ", ".join(f"{j['host'] or j['rank']} +{j['after_s']:.1f} s" for j in r["rejoins"]))
    if r["throughput_before"]:
        tp = f"throughput {r['throughput_before']:.1f} updates/s before"
        if r["throughput_during"] is not None:
            tp += f", {r['throughput_during']:.1f} during"
        tp += (f", back to >=80 % after {r['recovered_after_s']:.1f} s" if r["recovered_after_s"] is not None
               else ", not back to 80 % before the run ended")
        parts.append(tp)
    return head + "".join(f"\n      {p}" for p in parts)


def summary_table(run: RunData) -> str:
    """The printed run report: headline numbers, a row per node, links, and fault reactions."""
    s = run.summary
    lines = [f"Run {run.run_dir}"]
    backend = s.get("backend")
    lines.append(f"  algorithm {run.algorithm}" + (f", backend {backend}" if backend else "")
                 + f", {len(run.workers)} workers, stop reason {_fmt(s.get('stop_reason'))}")
    acc = final_accuracy(run)
    lines.append(f"  wall time {wall_time(run):.1f} s, final test accuracy {_fmt(acc, '.4f')}"
                 + (f" (loss {s['final_test_loss']:.4f})" if s.get("final_test_loss") is not None else ""))
    lines.append("  " + ", ".join(f"time to {t:.0%}: {fmt_seconds(time_to_accuracy(run, t))}" for t in ACCURACY_TARGETS))
    lines.append(f"  pushes: {_count(run, 'pushes_applied', 'update')} applied, {_count(run, 'pushes_late', 'late')} late, "
                 f"{_count(run, 'pushes_rejected', 'reject')} rejected"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in s['rejected_reasons'].items())})" if s.get("rejected_reasons") else ""))
    lines.append("")
    rows = [[r.node, r.role, _fmt(r.steps), _fmt(r.samples_per_s, ".0f"), _fmt(r.mean_staleness, ".2f"),
             fmt_bytes(r.bytes_in), fmt_bytes(r.bytes_out), _fmt(r.late), _fmt(r.rejected)] for r in node_rows(run)]
    lines += _table(["node", "role", "steps", "samples/s", "staleness", "bytes in", "bytes out", "late", "rejected"],
                    rows, right=set(range(2, 9)))
    links = _links(run)
    if links:
        lines += ["", "Links"]
        lrows = []
        for l in links:
            up, down = _link_bytes(l)
            lrows.append([str(l.get("name") or f"{l.get('src')}->{l.get('dst')}"), str(l.get("network", "-")),
                          str(prof.get("name", "-") if isinstance(prof := l.get("profile", "-"), dict) else prof),
                          str(l.get("mechanism", "-")), fmt_bytes(up), fmt_bytes(down)])
        lines += _table(["link", "network", "profile", "mechanism", "bytes up", "bytes down"], lrows, right={4, 5})
    reactions = fault_reactions(run)
    if reactions:
        lines += ["", f"Faults ({len(reactions)})"]
        lines += ["  " + describe_fault(r) for r in reactions]
    return "\n".join(lines) + "\n"


def _compare_values(run: RunData) -> dict[str, str]:
    sps = [r.samples_per_s for r in node_rows(run) if r.role == "worker" and r.samples_per_s is not None]
    stale = mean_staleness(run)
    return {
        "algorithm": run.algorithm,
        "backend": str(run.summary.get("backend") or "-"),
        "workers": str(len(run.workers)),
        "faults fired": str(sum(1 for f in run.faults if f.get("action", "fired") == "fired")),
        "wall time": f"{wall_time(run):.1f} s",
        "final accuracy": _fmt(final_accuracy(run), ".4f"),
        **{f"time to {t:.0%}": fmt_seconds(time_to_accuracy(run, t)) for t in ACCURACY_TARGETS},
        "pushes applied": str(_count(run, "pushes_applied", "update")),
        "pushes late": str(_count(run, "pushes_late", "late")),
        "pushes rejected": str(_count(run, "pushes_rejected", "reject")),
        "bytes sent (server)": fmt_bytes(run.summary.get("bytes_sent")),
        "bytes received (server)": fmt_bytes(run.summary.get("bytes_received")),
        "mean samples/s per worker": f"{statistics.fmean(sps):.0f}" if sps else "-",
        "mean staleness": _fmt(stale, ".2f"),
    }


def compare(run_a: RunData, run_b: RunData) -> str:
    """Two runs side by side, one metric per row."""
    a, b = _compare_values(run_a), _compare_values(run_b)
    label_a, label_b = f"A: {run_a.name}", f"B: {run_b.name}"
    if label_a == label_b:
        label_a, label_b = f"A: {run_a.run_dir}", f"B: {run_b.run_dir}"
    rows = [[k, a[k], b[k]] for k in a]
    return "\n".join(_table(["", label_a, label_b], rows)) + "\n"


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _fault_spans(run: RunData) -> list[tuple[float, float | None, str]]:
    """(start, end or None, label) in seconds since the run start, one per fired fault."""
    spans = []
    for r in fault_reactions(run):
        end = r["at_s"] + r["healed_after_s"] if r["healed_after_s"] is not None else None
        spans.append((r["at_s"], end, f"{r['fault']} {r['target']}".strip()))
    return spans


def _draw_faults(ax, spans: list[tuple[float, float | None, str]], label_y: float | None = None) -> None:
    """Shade each fault (or a dashed line for one never healed) and write its name at the top."""
    for i, (t0, t1, label) in enumerate(spans):
        if t1 is not None and t1 > t0:
            ax.axvspan(t0, t1, color="tab:red", alpha=0.12, lw=0)
        ax.axvline(t0, color="tab:red", ls="--", lw=1)
        if label_y is not None:
            ax.text(t0, label_y, f" {label}", color="tab:red", fontsize=8, va="top", ha="left",
                    transform=ax.get_xaxis_transform(), rotation=0,
                    bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})
            label_y -= 0.07  # stagger labels of faults close in time


def _plot_accuracy(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    evals = [e for e in run.server_events("eval") if e.get("test_accuracy") is not None]
    t_eval = [run.rel(e["time"]) for e in evals]
    ax_acc.plot(t_eval, [e["test_accuracy"] for e in evals], "o-", color="tab:blue", ms=4, label="test accuracy")
    for thr in ACCURACY_TARGETS:
        ax_acc.axhline(thr, color="grey", lw=0.7, ls=":")
        tta = time_to_accuracy(run, thr)
        if tta is not None:
            ax_acc.annotate(f"{thr:.0%} at {tta:.1f} s", (tta, thr), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax_acc.set_ylabel("test accuracy")
    if evals:
        lo = min(e["test_accuracy"] for e in evals)
        ax_acc.set_ylim(max(0.0, min(lo, 0.85) - 0.05), 1.0)
    ax_acc.set_title(f"{run.name}: {run.algorithm}, test accuracy and loss against wall-clock time")

    # Worker train loss first and faint, so the test loss stays readable on top.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, node in enumerate(run.workers):
        steps = [e for e in run.node_events(node, "step") if e.get("loss") is not None]
        if steps:
            ax_loss.plot([run.rel(e["time"]) for e in steps], [e["loss"] for e in steps], lw=0.8, alpha=0.35,
                         color=colors[(i + 1) % len(colors)], label=f"train loss {node}")
    ax_loss.plot(t_eval, [e.get("test_loss") for e in evals], "o-", color="black", ms=4, lw=2, label="test loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("wall-clock time since server start (s)")
    ax_loss.set_xlim(left=0)  # same origin as time-to-accuracy and the timeline
    spans = _fault_spans(run)
    _draw_faults(ax_acc, spans, label_y=0.98)
    _draw_faults(ax_loss, spans)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if ax is ax_loss else "lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_series(times: list[float], t0: float, t1: float, window: float) -> tuple[list[float], list[float]]:
    """Updates/s in a trailing window, sampled every window/4 seconds."""
    xs, ys = [], []
    step = max(window / 4, 0.05)
    t = t0 + step
    while t <= t1 + step:
        xs.append(t)
        ys.append(_rate(times, max(t0, t - window), t) if t > t0 else 0.0)
        t += step
    return xs, ys


def _plot_throughput(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    times = [run.rel(e["time"]) for e in run.server_events("update")]
    if times:
        window = max(1.0, (times[-1] - times[0]) / 40)
        xs, ys = _throughput_series(times, 0.0, run.rel(run.end_time), window)
        ax.plot(xs, ys, color="tab:green", label=f"server updates/s ({window:.1f} s window)")
    _draw_faults(ax, _fault_spans(run), label_y=0.98)
    ax.set_xlabel("wall-clock time since server start (s)")
    ax.set_ylabel("model updates / s")
    ax.set_title(f"{run.name}: server throughput")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Colors of the timeline's segments.
PHASE_COLORS = {"compute": "tab:blue", "comm": "tab:orange", "wait": "tab:gray"}


def timeline_segments(run: RunData, node: str) -> dict[str, list[tuple[float, float]]]:
    """(start, duration) segments per phase for one worker, in seconds since the run start.

    Approximation: a worker's "step" line carries compute_s, comm_s and wait_s accumulated since its
    previous line, not when each happened. We lay them out backwards from the line's timestamp as
    compute, then communication, then waiting (the push is sent after computing, and the wait for the
    server ends when the reply arrives at the timestamp). Segments are clipped at the previous line's
    timestamp so they never overlap; the remaining gap (eval, data loading, logging) stays blank.
    """
    segs: dict[str, list[tuple[float, float]]] = {k: [] for k in PHASE_COLORS}
    prev: float | None = None
    for e in run.node_events(node):
        if e["event"] in ("join", "disconnect"):
            prev = run.rel(e["time"])
            continue
        if e["event"] != "step":
            continue
        t = run.rel(e["time"])
        floor = prev if prev is not None else -math.inf
        cursor = t
        for phase, key in (("wait", "wait_s"), ("comm", "comm_s"), ("compute", "compute_s")):
            d = float(e.get(key) or 0.0)
            start = max(cursor - d, floor)
            if cursor - start > 0:
                segs[phase].append((start, cursor - start))
            cursor = start
        prev = t
    return segs


def _plot_timeline(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    rows = ([run.server] if run.server else []) + run.workers
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.7 * len(rows)))
    y = {node: i for i, node in enumerate(reversed(rows))}  # server on top
    h = 0.6
    for node in run.workers:
        for phase, segs in timeline_segments(run, node).items():
            if segs:
                ax.broken_barh(segs, (y[node] - h / 2, h), facecolors=PHASE_COLORS[phase], lw=0)
    if run.server:
        # The server's row: one tick per model update, green diamonds for evaluations.
        ups = [run.rel(e["time"]) for e in run.server_events("update")]
        ax.vlines(ups, y[run.server] - h / 2, y[run.server] + h / 2, color="tab:green", lw=0.4, alpha=0.6)
        evs = [run.rel(e["time"]) for e in run.server_events("eval")]
        ax.plot(evs, [y[run.server]] * len(evs), "D", color="darkgreen", ms=5, ls="none")
        starts = [run.rel(e["time"]) for e in run.server_events("start", "resume")]
        ax.plot(starts, [y[run.server]] * len(starts), "^", color="black", ms=7, ls="none")
    # Joins and leaves, from the server's view (a killed worker writes nothing itself) and the worker's own.
    joins, leaves = [], []
    for e in run.server_events("join"):
        if e.get("host") in y:
            joins.append((run.rel(e["time"]), y[e["host"]]))
    for e in run.server_events("leave"):
        if e.get("host") in y:
            leaves.append((run.rel(e["time"]), y[e["host"]]))
    for node in run.workers:
        leaves += [(run.rel(e["time"]), y[node]) for e in run.node_events(node, "disconnect")]
        if not any(e.get("host") == node for e in run.server_events("join")):
            joins += [(run.rel(e["time"]), y[node]) for e in run.node_events(node, "join")]
    if joins:
        ax.plot(*zip(*joins), ">", color="green", ms=8, ls="none", mec="black", mew=0.5)
    if leaves:
        ax.plot(*zip(*leaves), "X", color="red", ms=8, ls="none", mec="black", mew=0.5)
    _draw_faults(ax, _fault_spans(run), label_y=1.0)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label={"comm": "communication", "wait": "waiting"}.get(k, k)) for k, c in PHASE_COLORS.items()]
    handles += [Line2D([], [], color="tab:green", lw=1, label="server update"),
                Line2D([], [], marker="D", color="darkgreen", ls="none", label="eval"),
                Line2D([], [], marker="^", color="black", ls="none", label="server start / resume"),
                Line2D([], [], marker=">", color="green", mec="black", ls="none", label="join"),
                Line2D([], [], marker="X", color="red", mec="black", ls="none", label="leave / disconnect")]
    if run.faults:
        handles.append(Patch(color="tab:red", alpha=0.25, label="fault"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_yticks(list(y.values()), list(y.keys()))
    ax.set_ylim(-0.6, len(rows) - 0.4 + 0.5)
    ax.set_xlim(left=min(0.0, ax.get_xlim()[0]))
    ax.set_xlabel("wall-clock time since server start (s)")
    ax.set_title(f"{run.name}: per-node timeline (worker time split laid out backwards from each exchange)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_staleness(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    ups = [e for e in run.server_events("update") if e.get("staleness") is not None]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = run.rank_names()
    for src in sorted({e.get("source") for e in ups}, key=lambda s: (s is None, s)):
        mine = [e for e in ups if e.get("source") == src]
        ax.plot([run.rel(e["time"]) for e in mine], [e["staleness"] for e in mine], ".", ms=3, alpha=0.5,
                label=f"push from {names.get(src, f'rank {src}')}" if src is not None else "push")
    if ups:
        # Running mean over ~20 pushes shows the trend through the per-push noise.
        k = 20
        vals = [float(e["staleness"]) for e in ups]
        mean = [statistics.fmean(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
        ax.plot([run.rel(e["time"]) for e in ups], mean, color="black", lw=1.5, label=f"mean of last {k}")
    _draw_faults(ax, _fault_spans(run), label_y=0.98)
    ax.set_xlabel("wall-clock time since server start (s)")
    ax.set_ylabel("staleness τ (versions)")
    ax.set_title(f"{run.name}: staleness of applied pushes")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write accuracy.png, throughput.png, timeline.png and (when pushes carry staleness) staleness.png."""
    run = load_run(run_dir)
    out = [_plot_accuracy(run, run.run_dir / "accuracy.png"),
           _plot_throughput(run, run.run_dir / "throughput.png"),
           _plot_timeline(run, run.run_dir / "timeline.png")]
    if _staleness_values(run):
        out.append(_plot_staleness(run, run.run_dir / "staleness.png"))
    return out


def write_compare_plot(run_a: RunData, run_b: RunData, out: str | Path) -> Path:
    """Both runs' test accuracy against wall-clock time on one plot."""
    plt = _pyplot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for run, tag, color in ((run_a, "A", "tab:blue"), (run_b, "B", "tab:orange")):
        evals = [e for e in run.server_events("eval") if e.get("test_accuracy") is not None]
        ax.plot([run.rel(e["time"]) for e in evals], [e["test_accuracy"] for e in evals], "o-", ms=4, color=color,
                label=f"{tag}: {run.name} ({run.algorithm})")
        for t0, t1, label in _fault_spans(run):
            ax.axvline(t0, color=color, ls="--", lw=0.8, alpha=0.7)
    for thr in ACCURACY_TARGETS:
        ax.axhline(thr, color="grey", lw=0.7, ls=":")
    ax.set_ylim(top=1.0)
    ax.set_xlabel("wall-clock time since server start (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy against wall-clock time" + (" (dashed: faults)" if run_a.faults or run_b.faults else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
