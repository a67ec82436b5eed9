"""`smolcluster launch FILE --check`: the real links, measured like `smolcluster sim --check` measures
the emulated ones (the same ping-pong RTT and bulk goodput of testbed/linkemu/measure.py, the same
table and JSON), against the topology's profiles.

Every worker->server path is measured end to end (what training sees). With --write-profiles OUT,
every hop is also measured on its own network and every host's training step is timed, and OUT gets
link profiles (one per network) and device profiles (one per node) to calibrate the simulation:
`profiles: OUT` in a topology, then `networks.NET.profile: NET-measured`, `nodes.N.device: N-measured`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

import yaml

from smolcluster.common.files import write_atomic
from smolcluster.deploy.hosts import quote_path, sh, ssh_argv
from smolcluster.deploy.plan import DeployPlan, NodePlan
from smolcluster.deploy.preflight import readline_within, run_probe
from smolcluster.deploy.runner import Runner
from smolcluster.testbed.sim.hops import hop_name, plan_hops
from smolcluster.testbed.sim.linkcheck import RTT_SAMPLES, TOLERANCE, PathResult, format_check, within_tolerance
from smolcluster.testbed.topology import Topology, path_expectation, path_to_server

MEASURE_PORT = 5201
BULK_SECONDS = 2.0
MIN_JUDGED_RTT_MS = 1.0  # below this a Python ping-pong's own ~0.05-0.1 ms is a large part of it


def _measure_cmd(node: NodePlan, args: list[str]) -> str:
    return (f"cd {quote_path(node.host.spec.workdir)} && {quote_path(node.host.spec.python)} "
            f"-m smolcluster.testbed.linkemu.measure {' '.join(shlex.quote(a) for a in args)}")


def measure_pair(runner: Runner, src: NodePlan, dst: NodePlan, address: str) -> tuple[dict, dict]:
    """RTT and goodput from src to dst's `address`: a measure server on dst, the client on src."""
    argv = ssh_argv(dst.host, sh(_measure_cmd(dst, ["serve", "--bind", "0.0.0.0", "--port", str(MEASURE_PORT),
                                                    "--count", "2", "--timeout", "60"])), runner.ssh_config)
    if runner.dry_run:
        runner.run(argv)
        for args in (["rtt", address, str(MEASURE_PORT)], ["send", address, str(MEASURE_PORT)]):
            runner.ssh(src.host, _measure_cmd(src, args))
        return {}, {}
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if "listening" not in readline_within(server, 60.0):
            raise RuntimeError(f"no measure server on {dst.name}: {server.stderr.read().decode(errors='replace').strip()}")
        rtt = _json(runner.ssh(src.host, _measure_cmd(src, ["rtt", address, str(MEASURE_PORT), "--count", str(RTT_SAMPLES)])))
        bulk = _json(runner.ssh(src.host, _measure_cmd(src, ["send", address, str(MEASURE_PORT), "--seconds", str(BULK_SECONDS)])))
        return rtt, bulk
    finally:
        server.kill()
        server.wait()


def _json(res) -> dict:
    try:
        out = json.loads(res.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"measurement failed: {res.reason()}") from None
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def check_paths(runner: Runner, plan: DeployPlan, topo: Topology) -> list[PathResult]:
    """One worker at a time (paths share links): RTT and goodput to the address it dials."""
    results = []
    for w in plan.workers:
        path = path_to_server(topo, w.name)
        rtt_exp, mbps_exp = path_expectation(path)
        rtt, bulk = measure_pair(runner, w, plan.server, w.dials or "")
        if runner.dry_run:
            continue
        rtt_ms, mbps = rtt["median_ms"], bulk["mbit"]
        rtt_checked = rtt_exp >= MIN_JUDGED_RTT_MS
        notes = [] if rtt_checked else [f"RTT {rtt_exp:g} ms < {MIN_JUDGED_RTT_MS:g} ms: measured, not judged"]
        ok = (not rtt_checked or within_tolerance(rtt_ms, rtt_exp)) and within_tolerance(mbps, mbps_exp)
        if not ok:
            notes.append("the profile does not match this link: --write-profiles OUT.yaml writes what was measured")
        results.append(PathResult(src=w.name, dst=plan.server.name, hops=[hop_name(h) for h in path],
                                  rtt_ms_expected=round(rtt_exp, 3), rtt_ms_measured=round(rtt_ms, 3),
                                  mbps_expected=round(mbps_exp, 2), mbps_measured=round(mbps, 2), rtt_checked=rtt_checked,
                                  mbps_checked=True, ok=ok, notes=notes))
    return results


def measured_profiles(runner: Runner, plan: DeployPlan, topo: Topology, echo: Callable[[str], None]) -> dict:
    """Link profiles per network (its hops measured alone) and device profiles per node (step time)."""
    nodes = {n.name: n for n in plan.nodes}
    per_network: dict[str, list[tuple[float, float]]] = {}
    for hp in plan_hops(topo):
        hop = hp.hop
        address = str(topo.nodes[hop.dst].addresses[hop.network])
        rtt, bulk = measure_pair(runner, nodes[hop.src], nodes[hop.dst], address)
        if rtt:
            per_network.setdefault(hop.network, []).append((rtt["median_ms"], bulk["mbit"]))
            echo(f"check      {hp.name:<14} {hop.network:<12} RTT {rtt['median_ms']:.3f} ms, {bulk['mbit']:.1f} Mbit/s")
    links = {}
    for net, samples in per_network.items():
        rtt = sorted(s[0] for s in samples)[len(samples) // 2]
        rate = min(s[1] for s in samples)
        links[f"{net}-measured"] = {"delay_ms": round(rtt / 2, 4), "jitter_ms": 0.0, "loss_pct": 0.0, "rate_mbit": round(rate, 1)}
    steps = {}
    for node in plan.nodes:
        result, res = run_probe(runner, node, ["steptime", "200"])
        if result and "ms_per_step" in result:
            steps[node.name] = result["ms_per_step"]
            echo(f"check      {node.name:<14} step time {result['ms_per_step']:.3f} ms (MNIST model, batch 32)")
    devices = {}
    if steps:
        macs = [steps[n] for n in steps if topo.nodes[n].device.name == "mac-mini"]
        reference = min(macs) if macs else min(steps.values())  # speed 1.0 = a Mac mini (else the fastest host)
        for name, ms in steps.items():
            d = topo.nodes[name].device
            devices[f"{name}-measured"] = {"speed": round(reference / ms, 3), "cores": d.cores, "memory_mb": d.memory_mb}
    return {"links": links, "devices": devices}


def check_links(runner: Runner, plan: DeployPlan, topo: Optional[Topology], echo: Callable[[str], None], *,
                as_json: bool, write_profiles: Optional[Path], out: TextIO = sys.stdout) -> int:
    if topo is None:
        echo("check      needs a topology file (the profiles to compare against)")
        return 2
    results = check_paths(runner, plan, topo)
    if write_profiles is not None:
        profiles = measured_profiles(runner, plan, topo, echo)
        if not runner.dry_run:
            header = (f"# measured by smolcluster launch {topo.file} --check on the real cluster; use it from a topology\n"
                      "# with `profiles: <this file>`, then networks.<net>.profile: <net>-measured, nodes.<n>.device: <n>-measured\n")
            write_atomic(write_profiles, header + yaml.safe_dump(profiles, sort_keys=False))
            echo(f"check      wrote {write_profiles}: {len(profiles['links'])} link and {len(profiles['devices'])} device profiles")
    if runner.dry_run:
        return 0
    if as_json:
        out.write(json.dumps({"topology": topo.name, "tolerance": TOLERANCE, "backend": "hardware",
                              "paths": [r.to_json() for r in results]}, indent=2) + "\n")
    else:
        out.write(format_check(topo, results, unjudged=f"not judged (RTT < {MIN_JUDGED_RTT_MS:g} ms: a Python ping-pong's own "
                                                        "overhead is a large part of it); measured on the real network"))
    return 0 if all(r.ok for r in results) else 1
