"""How the cluster reacted to each fault that fired: what it hit, updates and late pushes during it,
disconnects and rejoins, and when throughput came back."""

from __future__ import annotations

import math
import statistics
from typing import Any

from smolcluster.testbed.report.load import RunData

# Throughput counts as recovered after a fault once it is back to this share of its pre-fault rate.
RECOVERY_SHARE = 0.8
# Late pushes and rejoins shortly after a heal still belong to the fault (a resumed worker pushes late).
FAULT_GRACE_S = 5.0
# Entries that end other faults (faults.jsonl marks what they ended with `healed ... by: <name>`).
UNDO_KINDS = ("heal", "resume")
# Faults over the moment they fire: a restart is kill-and-start at once.
INSTANT_KINDS = ("restart",)


def events_per_second(times: list[float], t0: float, t1: float) -> float:
    """Events per second in [t0, t1)."""
    if t1 <= t0:
        return 0.0
    return sum(1 for t in times if t0 <= t < t1) / (t1 - t0)


def _median_rate(utimes: list[float], t0: float, t1: float, win: float) -> float:
    """Updates/s over [t0, t1): the median of its `win`-second windows (the plain mean when fewer than 3 fit)."""
    n_windows = int((t1 - t0) // win)
    if n_windows >= 3:
        return statistics.median(events_per_second(utimes, t1 - (k + 1) * win, t1 - k * win) for k in range(n_windows))
    return events_per_second(utimes, t0, t1)


def _pre_fault_rate(utimes: list[float], t: float, window_s: float | None) -> tuple[float, float]:
    """(updates/s before `t`, the sliding window used): over up to 10 s of training before `t`, the median
    of its windows, so a start-up burst or one hiccup does not set the bar "recovered" is measured against."""
    first = utimes[0] if utimes else t
    pre_span = min(10.0, t - first)
    pre_rate = events_per_second(utimes, t - pre_span, t) if pre_span > 0 else 0.0
    win = window_s if window_s is not None else max(1.0, 10.0 / pre_rate if pre_rate > 0 else 1.0)
    return (_median_rate(utimes, t - pre_span, t, win) if pre_span > 0 else 0.0), win


def fault_reactions(run: RunData, window_s: float | None = None) -> list[dict[str, Any]]:
    """For each fault that fired: what it hit and how the cluster reacted.

    A fault's window runs from "fired" to its matching "healed" line (same fault and target), or, for a
    fault that is never healed, to the target's next join, else the end of the run. Late pushes,
    disconnects and rejoins are counted up to FAULT_GRACE_S after the window (a resumed worker's first
    push is late). Throughput = server updates per second over a sliding window of `window_s` seconds
    (default: long enough for ~10 updates at the pre-fault rate, at least 1 s); the pre-fault rate is the
    median over such windows in the 10 s before the fault (the plain mean when fewer than 3 fit); "recovered"
    is the first moment t >= fired from which the next window runs at >= 80 % of the pre-fault rate, and
    "after" the median rate over up to 10 s from then on (from the first update after the window if it never
    recovered; up to the last update before the server's end), so a cluster that stays slower shows how much. A server crash also says when the server was back
    (its `resume` line): the restart, not the configured duration, is most of a crash's recovery time.

    An entry that ends other faults (`heal`, `resume`) reacts on its own terms: its window is the moment
    it fired, `ends` lists the faults it ended and how long they had lasted, the rejoins, late pushes and
    disconnects are those of the FAULT_GRACE_S after it, and "recovered" is measured from it against the
    rate before the first fault it ended (the rate right before a heal is the degraded one).
    """
    updates = run.server_events("update")
    utimes = [e["time"] for e in updates]
    end = run.end_time
    fired = [f for f in run.faults if f.get("action", "fired") == "fired"]
    fired_at = {str(f.get("fault")): float(f["time"]) for f in fired}
    out: list[dict[str, Any]] = []
    for f in fired:
        t_fire = float(f["time"])
        fault, target, kind = str(f.get("fault", "?")), str(f.get("target", "")), f.get("kind")
        ends = [{"fault": str(h.get("fault")), "after_s": round(t_fire - fired_at[str(h.get("fault"))], 3)}
                for h in run.faults if h.get("action") == "healed" and h.get("by") == fault and str(h.get("fault")) in fired_at]
        healed = next((h["time"] for h in run.faults if h.get("action") == "healed" and h["time"] >= t_fire
                       and h.get("fault") == fault and str(h.get("target", "")) == target), None)
        if healed is not None:
            t_end = float(healed)
        elif kind in UNDO_KINDS or kind in INSTANT_KINDS:
            t_end = t_fire
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
        stale_in = run.staleness_values(t_fire, t_grace)
        stale_before = run.staleness_values(-math.inf, t_fire)
        disconnects = [{"node": run.server, "rank": e.get("rank"), "host": e.get("host"), "reason": e.get("reason"),
                        "after_s": round(e["time"] - t_fire, 3)}
                       for e in run.server_events("leave") if t_fire <= e["time"] <= t_grace]
        for node in run.workers:
            disconnects += [{"node": node, "host": node, "reason": e.get("reason"), "after_s": round(e["time"] - t_fire, 3)}
                            for e in run.node_events(node, "disconnect") if t_fire <= e["time"] <= t_grace]
        rejoins = [{"rank": e.get("rank"), "host": e.get("host"), "after_s": round(e["time"] - t_fire, 3)}
                   for e in run.server_events("join") if t_fire < e["time"] <= t_grace]

        # an undo is measured against the rate before the fault it ended, not the degraded rate just before it
        t_ref = min((fired_at[e["fault"]] for e in ends), default=t_fire) if kind in UNDO_KINDS else t_fire
        pre_rate, win = _pre_fault_rate(utimes, t_ref, window_s)
        recovered_after: float | None = None
        if pre_rate > 0:
            for t in [t_fire] + [u for u in utimes if u > t_fire]:
                if t + win > end:
                    break
                if events_per_second(utimes, t, t + win) >= RECOVERY_SHARE * pre_rate:
                    recovered_after = t - t_fire
                    break
        # from the recovery, or (never recovered) from the first update after the fault's window
        t_back = (t_fire + recovered_after if recovered_after is not None
                  else next((u for u in utimes if u > t_end), None))
        last = max((u for u in utimes if run_end is None or u <= run_end), default=None)
        after_rate = (_median_rate(utimes, t_back, min(last, t_back + 10.0), win)
                      if t_back is not None and last is not None and last - t_back >= win else None)
        server_back = (next((e["time"] - t_fire for e in run.server_events("resume") if e["time"] > t_fire), None)
                       if kind == "server_crash" else None)
        record = {
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
            "throughput_during": round(events_per_second(utimes, t_fire, t_end), 3) if t_end > t_fire else None,
            "throughput_window_s": round(win, 3),
            "recovered_after_s": round(recovered_after, 3) if recovered_after is not None else None,
            "throughput_after": round(after_rate, 3) if after_rate is not None else None,
            "detail": {k: v for k, v in f.items() if k not in {"time", "elapsed", "fault", "target", "action"}},
        }
        if kind == "server_crash":
            record["server_back_after_s"] = round(server_back, 3) if server_back is not None else None
        if kind in UNDO_KINDS:
            record["ends"] = ends
        out.append(record)
    return out


def describe_fault(r: dict[str, Any]) -> str:
    """One fault reaction: a headline, then one indented line per kind of reaction."""
    head = f"t={r['at_s']:.1f} s  {r['fault']} {r['target']}".rstrip()
    kind = (r.get("detail") or {}).get("kind")
    undo = "ends" in r
    if undo:
        head += ("  (ends " + ", ".join(f"{e['fault']} after {e['after_s']:.1f} s" for e in r["ends"]) + ")"
                 if r["ends"] else "  (ended no active fault)")
    elif r["healed_after_s"] is not None:
        head += f"  (healed after {r['healed_after_s']:.1f} s)"
    elif kind in INSTANT_KINDS:
        head += "  (instant)"
    elif kind in ("kill", "server_crash") and (r.get("detail") or {}).get("duration") is None:
        head += "  (permanent)"
    else:
        head += "  (not healed)"
    grace = f"in the {FAULT_GRACE_S:g} s after it"
    parts = ([] if undo or kind in INSTANT_KINDS else
             [f"{r['updates_during']} updates during it, {r['updates_missing_workers']} with missing workers"
              + (f" (ranks {', '.join(map(str, r['missing_ranks']))})" if r["missing_ranks"] else "")])
    parts.append(f"{r['late_pushes']} late pushes" + (f" {grace}" if undo or kind in INSTANT_KINDS else ""))
    if r["staleness_peak"] is not None:
        parts.append(f"staleness peak {r['staleness_peak']:g}"
                     + (f" (mean before {r['staleness_mean_before']:.2f})" if r["staleness_mean_before"] is not None else ""))
    if r["disconnects"]:
        parts.append(f"{len(r['disconnects'])} disconnects")
    if "server_back_after_s" in r:
        parts.append(f"server serving again after {r['server_back_after_s']:.1f} s (restarted from its checkpoint)"
                     if r["server_back_after_s"] is not None else "server not restarted")
    if r["rejoins"]:
        parts.append("rejoined: " + ", ".join(f"{j['host'] or j['rank']} +{j['after_s']:.1f} s" for j in r["rejoins"]))
    if r["throughput_before"]:
        ended = f" {r['ends'][0]['fault']}" if undo and r["ends"] else ""
        tp = f"throughput {r['throughput_before']:.1f} updates/s before{ended}"
        if r["throughput_during"] is not None:
            tp += f", {r['throughput_during']:.1f} during"
        after = r.get("throughput_after")
        share = f"{100 * after / r['throughput_before']:.0f} % of before" if after is not None else ""
        if r["recovered_after_s"] is not None:
            tp += f", back to >=80 % after {r['recovered_after_s']:.1f} s" + (f", then {after:.1f} ({share})" if share else "")
        else:
            tp += ", not back to 80 % before the run ended" + (f" ({after:.1f} updates/s after it, {share})" if share else "")
        parts.append(tp)
    return head + "".join(f"\n      {p}" for p in parts)

