"""`smolcluster sim FILE --backend compose --check`: measure every worker->server path in containers.

The project is brought up exactly as for training (routes, tc shaping, the Toxiproxy service with the
same latency toxics), but every node only holds its network. Then, one worker at a time (paths share
links): `measure serve` in the server's container on the training port, and from the worker's
container an RTT probe and a bulk upload to the worker's proxy, which forwards to the server like the
training traffic does. Results use the local check's format and judgement
(smolcluster.testbed.sim.linkcheck: PathResult, ±TOLERANCE, same "not emulable" limits since a proxy is on
the path here too). The project is always torn down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from smolcluster.testbed.linkemu.proxy import split_hostport
from smolcluster.testbed.sim import compose as cmp
from smolcluster.testbed.sim.compose_cluster import SERVER_PORT, ComposeCluster, host_mnist_dir, image_for, path_mechanism
from smolcluster.testbed.sim.docker_env import DockerEnv
from smolcluster.testbed.sim.linkcheck import (BULK_SECONDS, MIN_CHECKABLE_RTT_MS, RTT_SAMPLES, TOLERANCE, PathResult,
                                               format_check, within_tolerance)
from smolcluster.testbed.topology import Topology, path_expectation, path_to_server

HOLD = ["sleep", "infinity"]  # nodes only hold their network during a check
# In containers the rate is shaped by tc, not by the proxy; the embedded proxy still moves ~1 Gbit/s
# here (measured: 946 Mbit/s on hybrid's 940 Mbit/s Ethernet paths), so rates up to this are judged.
MAX_CHECKABLE_MBIT_COMPOSE = 1000.0


def check_compose_links(topo: Topology, env: DockerEnv, run_dir: Path) -> tuple[list[PathResult], dict[str, str]]:
    """(one PathResult per worker, "node/network" -> kernel mechanism). Tears the project down."""
    image, _ = image_for(env, host_mnist_dir())
    cp = cmp.render_compose(topo, run_dir, image, server_port=SERVER_PORT, commands={n: HOLD for n in topo.nodes})
    cluster = ComposeCluster(topology=topo, run_dir=run_dir, algorithm=topo.training.algorithm, env=env, cp=cp)
    results = []
    with cluster:
        cluster.start()
        for p in cp.proxies:
            results.append(_check_path(env, cluster, p))
    return results, dict(cp.mechanisms)


def _check_path(env: DockerEnv, cluster: ComposeCluster, p: cmp.ProxyRoute) -> PathResult:
    topo, cp = cluster.topology, cluster.cp
    hops = path_to_server(topo, p.worker)
    rtt_exp, mbps_exp = path_expectation(hops)
    host, port = split_hostport(p.listen)
    measure = [cp.image.python, "-m", "smolcluster.testbed.linkemu.measure"]
    with cmp.measure_server(env, cp, cp.topology.server.name, SERVER_PORT, count=2) as server:
        r = cmp.exec_in(env, cp, p.worker, [*measure, "rtt", host, str(port), "--count", str(RTT_SAMPLES)], timeout=120, check=False)
        rtt = cmp.measure_result(r, f"rtt {p.worker} -> {p.listen}")["median_ms"]
        r = cmp.exec_in(env, cp, p.worker, [*measure, "send", host, str(port), "--seconds", str(BULK_SECONDS)],
                        timeout=BULK_SECONDS + 60, check=False)
        mbps = cmp.measure_result(r, f"throughput {p.worker} -> {p.listen}")["mbit"]
        server.wait(timeout=30)

    mechanism = path_mechanism(cluster.kernel_mechanisms(p.worker))
    rtt_checked, mbps_checked = rtt_exp >= MIN_CHECKABLE_RTT_MS, mbps_exp <= MAX_CHECKABLE_MBIT_COMPOSE and mechanism != "proxy (rate unshaped: no tc qdisc)"
    notes = [f"mechanism {mechanism}; through the Toxiproxy service {p.listen} (latency toxics "
             f"{round(p.latency_ms)}±{round(p.jitter_ms)} ms one way unless netem delays in the kernel)"]
    if not rtt_checked:
        notes.append(f"RTT {rtt_exp:g} ms < {MIN_CHECKABLE_RTT_MS:g} ms: below the proxy's own overhead, not judged")
    if not mbps_checked:
        notes.append(f"rate {mbps_exp:g} Mbit/s > {MAX_CHECKABLE_MBIT_COMPOSE:g} Mbit/s: more than the proxy moves here, not judged")
    loss = [h for h in hops if h.profile.loss_pct]
    if loss and mechanism != "netem":
        notes.append("loss " + ", ".join(f"{h.profile.loss_pct:g}% on {h.src}->{h.dst}" for h in loss) + ": not emulated (needs netem)")
    ok = (not rtt_checked or within_tolerance(rtt, rtt_exp)) and (not mbps_checked or within_tolerance(mbps, mbps_exp))
    return PathResult(src=p.worker, dst=topo.server.name, hops=[f"{h.src}->{h.dst}" for h in hops],
                      rtt_ms_expected=round(rtt_exp, 3), rtt_ms_measured=round(rtt, 3), mbps_expected=round(mbps_exp, 2),
                      mbps_measured=round(mbps, 2), rtt_checked=rtt_checked, mbps_checked=mbps_checked, ok=ok, notes=notes)


def run_compose_check(topo: Topology, env: DockerEnv, run_dir: Path, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    results, mechanisms = check_compose_links(topo, env, run_dir)
    if as_json:
        out.write(json.dumps({"topology": topo.name, "backend": "compose", "tolerance": TOLERANCE, "shaping": mechanisms,
                              "paths": [r.to_json() for r in results]}, indent=2) + "\n")
    else:
        out.write("compose backend; kernel shaping per interface: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(mechanisms.items())) + "\n"
                  f"(in containers rates up to {MAX_CHECKABLE_MBIT_COMPOSE:g} Mbit/s shaped by tc are judged)\n")
        out.write(format_check(topo, results))
    out.flush()
    return 0 if all(r.ok for r in results) else 1
