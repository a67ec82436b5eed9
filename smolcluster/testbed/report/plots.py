"""Plots of a run directory (accuracy.png, throughput.png, timeline.png, staleness.png) and of two runs
compared. matplotlib is optional (the `plots` extra): it is imported only here, inside the functions,
with the Agg backend (files only, no display); without it the callers say the plots were skipped."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

from smolcluster.testbed.report.load import RunData, load_run
from smolcluster.testbed.report.reactions import events_per_second, fault_reactions
from smolcluster.testbed.report.summary import ACCURACY_TARGETS

PLOTS_MISSING = "plots: skipped (matplotlib is not installed: pip install 'smolcluster[plots]')"


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


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
        tta = run.time_to_accuracy(thr)
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
        ys.append(events_per_second(times, max(t0, t - window), t) if t > t0 else 0.0)
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
    if run.staleness_values():
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
