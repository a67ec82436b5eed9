"""`smolcluster sim FILE --check`: verify the emulated links like ping + iperf would, no training.

Starts the same proxy chain a local sim run uses (one proxy per hop, same toxics), with an
echo/sink server (smolcluster.testbed.linkemu.measure's protocol) standing where the training server
would be. Then, one worker path at a time (paths share hops, so never concurrently):
- RTT: median of RTT_SAMPLES one-byte ping-pongs over one TCP connection (TCP_NODELAY);
- throughput: a bulk upload sized to ~BULK_SECONDS at the path's expected rate, measured by the
  receiver from its first to its last byte (goodput, what the profiles' rates mean).

Pass criterion: measured within ±TOLERANCE of expected, for RTT where the expected RTT is at
least MIN_CHECKABLE_RTT_MS and for throughput where the expected rate is at most
MAX_CHECKABLE_MBIT. Faster or shorter links cannot be emulated on loopback (the proxy's own
overhead is ~0.1-0.5 ms and it moves a few Gbit/s at best); they are still measured and
reported, marked "not emulable on loopback", and do not fail the check (`rtt_checked` /
`mbps_checked` say which parts were judged). Packet loss is never emulated by a TCP proxy.
Exit code 1 when any checked value is out of tolerance.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, TextIO

from smolcluster.common.errors import ProxyError
from smolcluster.common.text import table
from smolcluster.testbed.linkemu import measure
from smolcluster.testbed.linkemu.api import ToxiproxyServer
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.linkemu.proxy import split_hostport
from smolcluster.testbed.sim.hops import EMULABLE_MBIT, create_link_proxies, plan_hops, worker_paths
from smolcluster.testbed.topology import Topology, path_expectation, path_to_server

TOLERANCE = 0.15
MIN_CHECKABLE_RTT_MS = 5.0
MAX_CHECKABLE_MBIT = 500.0
RTT_SAMPLES = 101  # the median of jittered RTTs: ~0.6 ms spread at Wi-Fi's ±6 ms jitter (21 gave ~1.3 ms)
BULK_SECONDS = 1.5
MIN_BULK_BYTES = 1 << 20
MAX_BULK_BYTES = 64 << 20


@dataclass
class PathResult:
    src: str
    dst: str
    hops: list[str]
    rtt_ms_expected: float
    rtt_ms_measured: float
    mbps_expected: float
    mbps_measured: float
    rtt_checked: bool
    mbps_checked: bool
    ok: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["from"], d["to"] = d.pop("src"), d.pop("dst")
        return {"from": d.pop("from"), "to": d.pop("to"), **d}


def _measure_handler(conn: socket.socket) -> None:
    conn.settimeout(60)
    measure.handle_connection(conn)  # the same echo/bulk handler `measure serve` uses


def bulk_upload(host: str, port: int, nbytes: int, timeout: float = 60.0) -> dict:
    """Send `nbytes` (measure.py's bulk mode); the receiver times first to last byte."""
    payload = memoryview(bytes(measure.CHUNK))
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(measure.MODE_BULK)
        sent = 0
        while sent < nbytes:
            n = min(len(payload), nbytes - sent)
            s.sendall(payload[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    r = json.loads(reply)
    return {"bytes": r["bytes"], "seconds": r["seconds"], "mbit": r["bytes"] * 8 / r["seconds"] / 1e6 if r["seconds"] > 0 else 0.0}


def within_tolerance(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= TOLERANCE * expected


def check_path(topo: Topology, worker: str, first_hop: str, hops: list[str]) -> PathResult:
    path = path_to_server(topo, worker)
    rtt_exp, mbps_exp = path_expectation(path)
    host, port = split_hostport(first_hop)
    rtt = measure.rtt(host, port, count=RTT_SAMPLES)["median_ms"]
    shaped = mbps_exp <= EMULABLE_MBIT
    nbytes = int(mbps_exp * 1e6 / 8 * BULK_SECONDS) if shaped else MAX_BULK_BYTES
    mbps = bulk_upload(host, port, max(MIN_BULK_BYTES, min(MAX_BULK_BYTES, nbytes)))["mbit"]

    rtt_checked, mbps_checked = rtt_exp >= MIN_CHECKABLE_RTT_MS, mbps_exp <= MAX_CHECKABLE_MBIT
    notes = []
    if not rtt_checked:
        notes.append(f"RTT {rtt_exp:g} ms < {MIN_CHECKABLE_RTT_MS:g} ms: not emulable on loopback (proxy overhead), not judged")
    if not mbps_checked:
        notes.append(f"rate {mbps_exp:g} Mbit/s > {MAX_CHECKABLE_MBIT:g} Mbit/s: not emulable on loopback, not judged")
    loss = [h for h in path if h.profile.loss_pct]
    if loss:
        notes.append("loss " + ", ".join(f"{h.profile.loss_pct:g}% on {h.src}->{h.dst}" for h in loss) + ": not emulated by the proxy")
    ok = (not rtt_checked or within_tolerance(rtt, rtt_exp)) and (not mbps_checked or within_tolerance(mbps, mbps_exp))
    return PathResult(src=worker, dst=topo.server.name, hops=hops, rtt_ms_expected=round(rtt_exp, 3), rtt_ms_measured=round(rtt, 3),
                      mbps_expected=round(mbps_exp, 2), mbps_measured=round(mbps, 2), rtt_checked=rtt_checked,
                      mbps_checked=mbps_checked, ok=ok, notes=notes)


def check_links(topo: Topology, toxiproxy_url: Optional[str] = None, seed: Optional[int] = None) -> list[PathResult]:
    """Build the proxy chain towards an echo/sink server, measure every worker's path, tear it all down."""
    plans = plan_hops(topo)
    paths = worker_paths(topo)
    sink = measure.LoopbackServer(_measure_handler)  # echo for RTT, sink for bulk: measure.py's protocol
    embedded: Optional[ToxiproxyServer] = None
    created: list[str] = []
    try:
        if toxiproxy_url is None:
            embedded = ToxiproxyServer("127.0.0.1", 0, seed=seed)
            embedded.start()
            client = ToxiproxyClient(embedded.api_url)
        else:
            client = ToxiproxyClient(toxiproxy_url)
        created = [p.name for p in plans]
        listen = create_link_proxies(client, plans, sink.address)
        return [check_path(topo, w.name, listen[paths[w.name][0]], paths[w.name]) for w in topo.workers]
    finally:
        if embedded is not None:
            embedded.stop()
        else:
            for name in created:
                try:
                    client.delete_proxy(name)
                except ProxyError:
                    pass
        sink.close()


def format_check(topo: Topology, results: list[PathResult], unjudged: str = "") -> str:
    """The link check's table; `unjudged` explains the n/e marks (default: what loopback cannot emulate)."""
    rows = []
    for r in results:
        rtt_mark = ("ok" if within_tolerance(r.rtt_ms_measured, r.rtt_ms_expected) else "FAIL") if r.rtt_checked else "n/e"
        bw_mark = ("ok" if within_tolerance(r.mbps_measured, r.mbps_expected) else "FAIL") if r.mbps_checked else "n/e"
        rows.append([f"{r.src}->{r.dst}", " | ".join(r.hops), f"{r.rtt_ms_expected:g}", f"{r.rtt_ms_measured:.2f}", rtt_mark,
                     f"{r.mbps_expected:g}", f"{r.mbps_measured:.1f}", bw_mark, _verdict(r)])
    unjudged = unjudged or (f"not emulable on loopback (RTT < {MIN_CHECKABLE_RTT_MS:g} ms or rate > {MAX_CHECKABLE_MBIT:g} "
                            "Mbit/s): measured, not judged")
    lines = [f"link check: {topo.name} ({topo.file}); tolerance ±{TOLERANCE:.0%}; n/e = {unjudged}",
             table(["path", "hops", "RTT exp ms", "RTT ms", "", "Mbit/s exp", "Mbit/s", "", "result"], rows)]
    notes = [f"  {r.src}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["notes:", *notes]
    failed = [r for r in results if not r.ok]
    judged = [r for r in results if r.rtt_checked or r.mbps_checked]
    lines.append(f"{len(judged) - len(failed)}/{len(judged)} judged paths pass"
                 + (f"; {len(results) - len(judged)} measured only" if len(judged) < len(results) else "")
                 + (f"; FAILED: {', '.join(r.src for r in failed)}" if failed else ""))
    return "\n".join(lines) + "\n"


def _verdict(r: PathResult) -> str:
    if not r.ok:
        return "FAIL"
    return "PASS" if r.rtt_checked or r.mbps_checked else "not judged"


def run_check(topo: Topology, toxiproxy_url: Optional[str] = None, as_json: bool = False, out: TextIO = sys.stdout,
              seed: Optional[int] = None) -> int:
    # seeded like a run (the topology's seed), so the jitter draws and the verdict are reproducible
    results = check_links(topo, toxiproxy_url=toxiproxy_url, seed=topo.training.seed if seed is None else seed)
    if as_json:
        out.write(json.dumps({"topology": topo.name, "tolerance": TOLERANCE, "paths": [r.to_json() for r in results]}, indent=2) + "\n")
    else:
        out.write(format_check(topo, results))
    out.flush()
    return 0 if all(r.ok for r in results) else 1
