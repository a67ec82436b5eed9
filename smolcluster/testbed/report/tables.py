"""The run report as text: the summary table every run prints (`smolcluster sim` at its end,
`smolcluster report` for any run directory) and two runs side by side (`smolcluster compare`)."""

from __future__ import annotations

import statistics
from typing import Any

from smolcluster.common.text import format_bytes, table
from smolcluster.testbed.report.load import RunData, node_rows
from smolcluster.testbed.report.reactions import describe_fault, fault_reactions
from smolcluster.testbed.report.summary import ACCURACY_TARGETS


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def fmt_seconds(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.1f} s"


def summary_table(run: RunData) -> str:
    """The printed run report: headline numbers, a row per node, links, and fault reactions."""
    s = run.summary
    lines = [f"Run {run.run_dir}"]
    lines.append(f"  algorithm {run.algorithm}" + (f", backend {s.backend}" if s.backend else "")
                 + f", {len(run.workers)} workers, stop reason {_fmt(s.stop_reason)}")
    lines.append(f"  wall time {run.wall_time():.1f} s"
                 + (f" ({s.sim_wall_time_s:.1f} s with start-up)" if s.sim_wall_time_s is not None else "")
                 + f", final test accuracy {_fmt(run.final_accuracy(), '.4f')}"
                 + (f" (loss {s.final_test_loss:.4f})" if s.final_test_loss is not None else ""))
    lines.append("  " + ", ".join(f"time to {t:.0%}: {fmt_seconds(run.time_to_accuracy(t))}" for t in ACCURACY_TARGETS)
                 + " (from the server's start)")
    gpt = s.extra
    if gpt.get("final_test_perplexity") is not None:  # a GPT run: its splits and tokenizer, with the perplexity
        lines.append(f"  {gpt['data']['eval_split']} perplexity {gpt['final_test_perplexity']:.1f}, tokenizer "
                     f"{gpt['tokenizer']['name']} ({gpt['tokenizer']['vocab_size']} tokens); {gpt['data']['note']}")
    lines.append(f"  pushes: {run.count('pushes_applied', 'update')} applied, {run.count('pushes_late', 'late')} late, "
                 f"{run.count('pushes_rejected', 'reject')} rejected"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in s.rejected_reasons.items())})" if s.rejected_reasons else ""))
    if s.torch:
        rss = s.torch.get("import_rss_mb")  # not measured where every node shares one process (virtual)
        lines.append(f"  torch {s.torch.get('version')} ({s.torch.get('build')})"
                     + (f", {rss:.0f} MB RSS per node once imported" if rss is not None else ""))
    lines.append("")
    nodes = node_rows(run)
    emulated = any(r.device is not None for r in nodes)  # the backend says which device each node played
    headers = ["node", "role"] + (["device", "slowdown"] if emulated else []) + \
              ["steps", "samples/s", "staleness", "bytes in", "bytes out", "late", "rejected"]
    rows = [[r.node, r.role] + ([_fmt(r.device), f"x{r.slowdown:g}" if r.slowdown is not None else "-"] if emulated else [])
            + [_fmt(r.steps), _fmt(r.samples_per_s, ".0f"), _fmt(r.mean_staleness, ".2f"), format_bytes(r.bytes_in),
               format_bytes(r.bytes_out), _fmt(r.late), _fmt(r.rejected)] for r in nodes]
    lines.append(table(headers, rows, right=range(len(headers) - 7, len(headers))))
    if s.links:
        counted = any(link.connections is not None for link in s.links)
        lines += ["", "Links (up = towards the server)"]
        rows = [[str(link.name or f"{link.src}->{link.dst}"), _fmt(link.network), str(link.profile.get("name", "-")),
                 _fmt(link.mechanism), format_bytes(link.bytes_up), format_bytes(link.bytes_down)]
                + ([_fmt(link.connections)] if counted else []) for link in s.links]
        headers = ["link", "network", "profile", "mechanism", "bytes up", "bytes down"] + (["conns"] if counted else [])
        lines.append(table(headers, rows, right=range(4, len(headers))))
    reactions = fault_reactions(run)
    failed = s.faults_failed or []
    if reactions or failed:
        lines += ["", f"Faults ({len(reactions)})"]
        lines += ["  " + describe_fault(r) for r in reactions]
        lines += [f"  FAILED {e.get('fault')}: {e.get('error')}" for e in failed]
    return "\n".join(lines) + "\n"


def _compare_values(run: RunData) -> dict[str, str]:
    sps = [r.samples_per_s for r in node_rows(run) if r.role == "worker" and r.samples_per_s is not None]
    return {
        "algorithm": run.algorithm,
        "backend": run.summary.backend or "-",
        "workers": str(len(run.workers)),
        "faults fired": str(sum(1 for f in run.faults if f.get("action", "fired") == "fired")),
        "wall time": f"{run.wall_time():.1f} s",
        "final accuracy": _fmt(run.final_accuracy(), ".4f"),
        **{f"time to {t:.0%}": fmt_seconds(run.time_to_accuracy(t)) for t in ACCURACY_TARGETS},
        "pushes applied": str(run.count("pushes_applied", "update")),
        "pushes late": str(run.count("pushes_late", "late")),
        "pushes rejected": str(run.count("pushes_rejected", "reject")),
        "bytes sent (server)": format_bytes(run.summary.bytes_sent),
        "bytes received (server)": format_bytes(run.summary.bytes_received),
        "mean samples/s per worker": f"{statistics.fmean(sps):.0f}" if sps else "-",
        "mean staleness": _fmt(run.mean_staleness(), ".2f"),
    }


def compare(run_a: RunData, run_b: RunData) -> str:
    """Two runs side by side, one metric per row."""
    a, b = _compare_values(run_a), _compare_values(run_b)
    label_a, label_b = f"A: {run_a.name}", f"B: {run_b.name}"
    if label_a == label_b:
        label_a, label_b = f"A: {run_a.run_dir}", f"B: {run_b.run_dir}"
    return table(["", label_a, label_b], [[k, a[k], b[k]] for k in a], right={1, 2}) + "\n"
