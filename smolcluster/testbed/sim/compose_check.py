"""`smolcluster sim FILE --backend compose --check`: measure every worker->server path in containers.

The project is brought up exactly as for training (routes, tc shaping, IFB ingress shaping, iptables
loss, the Toxiproxy service with the same latency toxics), but every node only holds its network.
Then, one worker at a time (paths share links): `measure serve` in the server's container on the
training port, and from the worker's container
- a UDP echo probe to the server's own address (the routed path, no proxy: it carries TCP only),
  paced at LOSS_PROBE_SHARE of the path's slowest rate: the loss each way, where the path has loss
  and it is applied;
- an RTT probe, a bulk upload (with the worker's TCP retransmissions meanwhile) and a bulk download
  through the worker's proxy, which forwards to the server like the training traffic does.
Results use the local check's format and judgement (smolcluster.testbed.sim.linkcheck: PathResult,
±TOLERANCE, loss_margin_pct, same "not emulable" limits since a proxy is on the path here too). The
project is always torn down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from smolcluster.testbed.linkemu.measure import UDP_PAYLOAD
from smolcluster.testbed.linkemu.proxy import split_hostport
from smolcluster.testbed.sim import compose as cmp
from smolcluster.testbed.sim.compose_cluster import SERVER_PORT, ComposeCluster, host_mnist_dir, image_for
from smolcluster.testbed.sim.docker_env import DockerEnv
from smolcluster.testbed.sim.linkcheck import (BULK_SECONDS, MIN_CHECKABLE_RTT_MS, RTT_SAMPLES, TOLERANCE, PathResult,
                                               format_check, loss_margin_pct, loss_ok, within_tolerance)
from smolcluster.testbed.topology import (Topology, path_down_mbit, path_expectation, path_loss_pct, path_to_server,
                                          server_address_for)

HOLD = ["sleep", "infinity"]  # nodes only hold their network during a check
# In containers the rate is shaped by tc, not by the proxy; the embedded proxy still moves ~1 Gbit/s
# here (measured: 946 Mbit/s on hybrid's 940 Mbit/s Ethernet paths), so rates up to this are judged.
MAX_CHECKABLE_MBIT_COMPOSE = 1000.0
# The loss probe: datagrams at this share of the path's slowest rate (queues never overflow, so only the
# emulated loss drops them), for about LOSS_PROBE_SECONDS, between the bounds below.
LOSS_PROBE_SHARE = 0.2
LOSS_PROBE_SECONDS = 3.0
LOSS_PROBE_MAX_PPS = 5000
LOSS_PROBE_COUNT = (2000, 15000)
UDP_WIRE_BYTES = UDP_PAYLOAD + 8 + 20 + 14  # + UDP, IP and Ethernet headers
COMPOSE_UNJUDGED = (f"measured, not judged (RTT < {MIN_CHECKABLE_RTT_MS:g} ms, rate > {MAX_CHECKABLE_MBIT_COMPOSE:g} Mbit/s "
                    "or unshaped, rates under netem loss, loss where it is not applied)")


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


def loss_probe_size(slowest_mbit: float) -> tuple[int, float]:
    """(datagrams, datagrams per second) for a path whose slowest direction runs at `slowest_mbit`."""
    pps = min(LOSS_PROBE_MAX_PPS, LOSS_PROBE_SHARE * slowest_mbit * 1e6 / 8 / UDP_WIRE_BYTES)
    lo, hi = LOSS_PROBE_COUNT
    return int(min(hi, max(lo, pps * LOSS_PROBE_SECONDS))), pps


def _check_path(env: DockerEnv, cluster: ComposeCluster, p: cmp.ProxyRoute) -> PathResult:
    topo, cp = cluster.topology, cluster.cp
    hops = path_to_server(topo, p.worker)
    rtt_exp, mbps_exp = path_expectation(hops)
    down_exp, loss_exp = path_down_mbit(hops), path_loss_pct(hops)
    host, port = split_hostport(p.listen)
    measure = [cp.image.python, "-m", "smolcluster.testbed.linkemu.measure"]
    loss_checked = loss_exp > 0 and cluster.loss_applied(p.worker)
    # iptables loss can be switched off for a moment: the rates are then measured on the shaping alone
    # (judged), and once more under the loss (reported: TCP gets less than the shaped rate there)
    iptables = [k for k, m in cluster.path_loss(p.worker).items() if m == "iptables"]
    loss: dict = {}
    lossy_upload: dict = {}
    with cmp.measure_server(env, cp, cp.topology.server.name, SERVER_PORT, count=4 if loss_checked else 3) as server:
        with cmp.loss_paused(env, cp, iptables):
            r = cmp.exec_in(env, cp, p.worker, [*measure, "rtt", host, str(port), "--count", str(RTT_SAMPLES)], timeout=120, check=False)
            rtt = cmp.measure_result(r, f"rtt {p.worker} -> {p.listen}")["median_ms"]
            r = cmp.exec_in(env, cp, p.worker, [*measure, "send", host, str(port), "--seconds", str(BULK_SECONDS)],
                            timeout=BULK_SECONDS + 60, check=False)
            upload = cmp.measure_result(r, f"throughput {p.worker} -> {p.listen}")
            r = cmp.exec_in(env, cp, p.worker, [*measure, "recv", host, str(port), "--seconds", str(BULK_SECONDS)],
                            timeout=BULK_SECONDS + 60, check=False)
            down = cmp.measure_result(r, f"throughput {p.listen} -> {p.worker}")["mbit"]
        if loss_checked:
            count, pps = loss_probe_size(min(mbps_exp, down_exp))
            direct = str(server_address_for(topo, p.worker))
            r = cmp.exec_in(env, cp, p.worker, [*measure, "udp", direct, str(SERVER_PORT), "--count", str(count), "--pps", f"{pps:.0f}"],
                            timeout=count / pps + 60, check=False)
            loss = cmp.measure_result(r, f"loss probe {p.worker} -> {direct}")
            r = cmp.exec_in(env, cp, p.worker, [*measure, "send", host, str(port), "--seconds", str(BULK_SECONDS)],
                            timeout=BULK_SECONDS + 60, check=False)
            lossy_upload = cmp.measure_result(r, f"throughput under loss {p.worker} -> {p.listen}")
        server.wait(timeout=30)
    mbps = upload["mbit"]

    mechanism = cluster.path_mechanism(p.worker)
    shaped = mechanism != "proxy (rate unshaped: no tc qdisc)"
    rtt_checked = rtt_exp >= MIN_CHECKABLE_RTT_MS
    # Under loss TCP gets less than the rate the kernel shapes to (that is the point of applying it): the
    # rates are judged where they were measured with the loss off (iptables), else only reported (netem).
    lossless = not loss_checked or len(iptables) == len(cluster.path_loss(p.worker))
    mbps_checked = mbps_exp <= MAX_CHECKABLE_MBIT_COMPOSE and shaped and lossless
    down_checked = down_exp <= MAX_CHECKABLE_MBIT_COMPOSE and shaped and lossless and all(
        m == "ifb" for m in cluster.path_ingress(p.worker).values())
    notes = [f"mechanism {mechanism}; through the Toxiproxy service {p.listen} (latency toxics "
             f"{round(p.latency_ms)}±{round(p.jitter_ms)} ms one way unless netem delays in the kernel)"]
    if not rtt_checked:
        notes.append(f"RTT {rtt_exp:g} ms < {MIN_CHECKABLE_RTT_MS:g} ms: below the proxy's own overhead, not judged")
    for what, rate, checked in (("rate", mbps_exp, mbps_checked), ("down rate", down_exp, down_checked)):
        if not checked and rate > MAX_CHECKABLE_MBIT_COMPOSE:
            notes.append(f"{what} {rate:g} Mbit/s > {MAX_CHECKABLE_MBIT_COMPOSE:g} Mbit/s: more than the proxy moves here, not judged")
    if not lossless:
        notes.append(f"rates not judged: TCP under {loss_exp:g}% loss gets less than the {mbps_exp:g}/{down_exp:g} Mbit/s "
                     f"the kernel shapes to (measured {mbps:.1f}/{down:.1f})")
    elif iptables:
        notes.append("rates and RTT measured with the loss switched off (iptables), so they judge the shaping alone")
    notes += [f"down rate not shaped on arrival at {k} ({m.removeprefix('none: ')}), not judged"
              for k, m in cluster.path_ingress(p.worker).items() if m != "ifb"]
    margin = None
    if loss_checked:
        margin = max(loss_margin_pct(loss_exp, loss["sent"]), loss_margin_pct(loss_exp, max(1, loss["server_received"])))
        notes.append(f"loss probe: {loss['sent']} UDP datagrams to {server_address_for(topo, p.worker)} at {loss_probe_size(min(mbps_exp, down_exp))[1]:.0f}/s, "
                     f"{loss['server_received']} arrived, {loss['echoed']} echoes came back; judged within ±{margin:.3g} points "
                     f"(±{TOLERANCE:.0%} or 3 standard errors)")
    elif loss_exp > 0:
        notes += [f"loss not applied on {k} ({m.removeprefix('none: ')}), not measured"
                  for k, m in cluster.path_loss(p.worker).items() if m not in ("iptables", "netem")]
    retrans = (lossy_upload or upload).get("retrans_pct")
    if lossy_upload:
        notes.append(f"TCP under the loss: {lossy_upload['mbit']:.1f} Mbit/s up"
                     + (f", {retrans:g}% of the worker's segments retransmitted ({lossy_upload['retrans_segs']} of "
                        f"{lossy_upload['out_segs']})" if retrans is not None else ""))
    elif retrans is not None:
        notes.append(f"the worker's TCP retransmitted {retrans:g}% of its segments during the upload "
                     f"({upload['retrans_segs']} of {upload['out_segs']})")
    result = PathResult(src=p.worker, dst=topo.server.name, hops=[f"{h.src}->{h.dst}" for h in hops],
                      rtt_ms_expected=round(rtt_exp, 3), rtt_ms_measured=round(rtt, 3), mbps_expected=round(mbps_exp, 2),
                      mbps_measured=round(mbps, 2), rtt_checked=rtt_checked, mbps_checked=mbps_checked, ok=False, notes=notes,
                      mbps_down_expected=round(down_exp, 2), mbps_down_measured=round(down, 2), mbps_down_checked=down_checked,
                      loss_pct_expected=round(loss_exp, 4), loss_up_pct_measured=loss.get("up_loss_pct"),
                      loss_down_pct_measured=loss.get("down_loss_pct"), loss_tolerance_pct=round(margin, 4) if margin else None,
                      loss_checked=loss_checked, tcp_retrans_pct=retrans)
    result.ok = ((not rtt_checked or within_tolerance(rtt, rtt_exp)) and (not mbps_checked or within_tolerance(mbps, mbps_exp))
                 and (not down_checked or within_tolerance(down, down_exp)) and loss_ok(result))
    return result


def run_compose_check(topo: Topology, env: DockerEnv, run_dir: Path, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    results, mechanisms = check_compose_links(topo, env, run_dir)
    if as_json:
        out.write(json.dumps({"topology": topo.name, "backend": "compose", "tolerance": TOLERANCE, "shaping": mechanisms,
                              "paths": [r.to_json() for r in results]}, indent=2) + "\n")
    else:
        out.write("compose backend; kernel shaping per interface: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(mechanisms.items())) + "\n"
                  f"(in containers rates up to {MAX_CHECKABLE_MBIT_COMPOSE:g} Mbit/s shaped by tc are judged)\n")
        out.write(format_check(topo, results, unjudged=COMPOSE_UNJUDGED))
    out.flush()
    return 0 if all(r.ok for r in results) else 1
