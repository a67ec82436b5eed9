"""`smolcluster sim FILE --check`: verify the emulated links like ping + iperf would, no training.

Starts the same proxy chain a local sim run uses (one proxy per hop, same toxics), with an
echo/sink server (smolcluster.testbed.linkemu.measure's protocol) standing where the training server
would be. Then, one worker path at a time (paths share hops, so never concurrently):
- RTT: median of RTT_SAMPLES one-byte ping-pongs over one TCP connection (TCP_NODELAY);
- throughput up: a bulk upload sized to ~BULK_SECONDS at the path's expected up rate, measured
  by the receiver from its first to its last byte (goodput, what the profiles' rates mean);
- throughput down: the same towards the worker (the server end sends for BULK_SECONDS), against
  the path's down rate.

Pass criterion: measured within ±TOLERANCE of expected, for RTT where the expected RTT is at
least MIN_CHECKABLE_RTT_MS and for throughput where the expected rate is at most
MAX_CHECKABLE_MBIT. Faster or shorter links cannot be emulated on loopback (the proxy's own
overhead is ~0.1-0.5 ms and it moves a few Gbit/s at best); they are still measured and
reported, marked "not emulable on loopback", and do not fail the check (`rtt_checked` /
`mbps_checked` / `mbps_down_checked` say which parts were judged).

Packet loss is never emulated by a TCP proxy, so here it is not measured either (the notes say so).
Under the compose backend it is applied in the kernel and measured (compose_check.py): a paced UDP
echo probe along the worker's routed path, each direction judged by `loss_ok` — within
±TOLERANCE of the profile's loss, or within LOSS_SIGMAS binomial standard errors of it when the
probe's sample is too small for that (the larger of the two).
Exit code 1 when any checked value is out of tolerance.
"""

from __future__ import annotations

import json
import math
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
from smolcluster.testbed.profiles import mathis_mbit
from smolcluster.testbed.sim.hops import EMULABLE_MBIT, create_link_proxies, plan_hops, worker_paths
from smolcluster.testbed.topology import Topology, path_down_mbit, path_expectation, path_loss_pct, path_to_server

TOLERANCE = 0.15
MIN_CHECKABLE_RTT_MS = 5.0
MAX_CHECKABLE_MBIT = 500.0
RTT_SAMPLES = 101  # the median of jittered RTTs: ~0.6 ms spread at Wi-Fi's ±6 ms jitter (21 gave ~1.3 ms)
BULK_SECONDS = 1.5
MIN_BULK_BYTES = 1 << 20
MAX_BULK_BYTES = 64 << 20
LOSS_SIGMAS = 3.0  # a loss measurement may be off by this many binomial standard errors


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
    # the down direction (towards the worker): measured by the sim's checks, not by every caller
    mbps_down_expected: Optional[float] = None
    mbps_down_measured: Optional[float] = None
    mbps_down_checked: bool = False
    # loss per direction, percent: expected from the profiles, measured where the backend applies it
    loss_pct_expected: float = 0.0
    loss_up_pct_measured: Optional[float] = None
    loss_down_pct_measured: Optional[float] = None
    loss_tolerance_pct: Optional[float] = None  # the absolute margin each direction was judged with
    loss_checked: bool = False
    tcp_retrans_pct: Optional[float] = None  # the sender's TCP retransmissions during the upload (compose)

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


def loss_margin_pct(expected_pct: float, samples: int) -> float:
    """How far a loss measured over `samples` packets may be from `expected_pct`: ±TOLERANCE of it, or
    LOSS_SIGMAS binomial standard errors when the sample is too small for that (the larger)."""
    p = expected_pct / 100.0
    sigma = math.sqrt(p * (1 - p) / samples) if samples > 0 else 1.0
    return max(TOLERANCE * expected_pct, 100.0 * LOSS_SIGMAS * sigma)


def loss_cost_note(path: list) -> str:
    """What the path's loss might cost TCP, by the Mathis et al. model, as a note (a model, not a measurement)."""
    rtt, mbps = path_expectation(path)
    loss = path_loss_pct(path)
    return (f"one long Reno flow at {loss:g}% loss and {rtt:g} ms RTT would get ~{mathis_mbit(rtt, loss):.3g} of the {mbps:g} "
            "Mbit/s by the Mathis et al. model; Linux's CUBIC gets more on short paths")


def download(host: str, port: int, seconds: float, timeout: float = 60.0) -> dict:
    """measure.py's download mode: the far end sends for `seconds`, this end times what arrives."""
    return measure.recv(host, port, seconds, timeout=timeout)


def check_path(topo: Topology, worker: str, first_hop: str, hops: list[str]) -> PathResult:
    path = path_to_server(topo, worker)
    rtt_exp, mbps_exp = path_expectation(path)
    host, port = split_hostport(first_hop)
    rtt = measure.rtt(host, port, count=RTT_SAMPLES)["median_ms"]
    shaped = mbps_exp <= EMULABLE_MBIT
    nbytes = int(mbps_exp * 1e6 / 8 * BULK_SECONDS) if shaped else MAX_BULK_BYTES
    mbps = bulk_upload(host, port, max(MIN_BULK_BYTES, min(MAX_BULK_BYTES, nbytes)))["mbit"]

    down_exp = path_down_mbit(path)
    down = download(host, port, BULK_SECONDS)["mbit"]

    rtt_checked, mbps_checked = rtt_exp >= MIN_CHECKABLE_RTT_MS, mbps_exp <= MAX_CHECKABLE_MBIT
    down_checked = down_exp <= MAX_CHECKABLE_MBIT
    notes = []
    if not rtt_checked:
        notes.append(f"RTT {rtt_exp:g} ms < {MIN_CHECKABLE_RTT_MS:g} ms: not emulable on loopback (proxy overhead), not judged")
    for what, rate, checked in (("rate", mbps_exp, mbps_checked), ("down rate", down_exp, down_checked)):
        if not checked:
            notes.append(f"{what} {rate:g} Mbit/s > {MAX_CHECKABLE_MBIT:g} Mbit/s: not emulable on loopback, not judged")
    loss = [h for h in path if h.profile.loss_pct]
    if loss:
        notes.append("loss " + ", ".join(f"{h.profile.loss_pct:g}% on {h.src}->{h.dst}" for h in loss)
                     + ": not emulated by the proxy, not measured (" + loss_cost_note(path) + "; --backend compose applies it)")
    ok = ((not rtt_checked or within_tolerance(rtt, rtt_exp)) and (not mbps_checked or within_tolerance(mbps, mbps_exp))
          and (not down_checked or within_tolerance(down, down_exp)))
    return PathResult(src=worker, dst=topo.server.name, hops=hops, rtt_ms_expected=round(rtt_exp, 3), rtt_ms_measured=round(rtt, 3),
                      mbps_expected=round(mbps_exp, 2), mbps_measured=round(mbps, 2), rtt_checked=rtt_checked,
                      mbps_checked=mbps_checked, ok=ok, notes=notes, mbps_down_expected=round(down_exp, 2),
                      mbps_down_measured=round(down, 2), mbps_down_checked=down_checked, loss_pct_expected=round(path_loss_pct(path), 4))


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


def _mark(checked: bool, ok: bool) -> str:
    return ("ok" if ok else "FAIL") if checked else "n/e"


def loss_ok(r: PathResult) -> bool:
    """Both directions' measured loss within the margin they were judged with (true when not judged)."""
    if not r.loss_checked:
        return True
    margin = r.loss_tolerance_pct or 0.0
    return all(m is not None and abs(m - r.loss_pct_expected) <= margin
               for m in (r.loss_up_pct_measured, r.loss_down_pct_measured))


def format_check(topo: Topology, results: list[PathResult], unjudged: str = "") -> str:
    """The link check's table; `unjudged` explains the n/e marks (default: what loopback cannot emulate)."""
    rows = []
    for r in results:
        down = r.mbps_down_measured is not None
        lossy = r.loss_up_pct_measured is not None
        rows.append([f"{r.src}->{r.dst}", " | ".join(r.hops), f"{r.rtt_ms_expected:g}", f"{r.rtt_ms_measured:.2f}",
                     _mark(r.rtt_checked, within_tolerance(r.rtt_ms_measured, r.rtt_ms_expected)),
                     f"{r.mbps_expected:g}", f"{r.mbps_measured:.1f}",
                     _mark(r.mbps_checked, within_tolerance(r.mbps_measured, r.mbps_expected)),
                     f"{r.mbps_down_expected:g}" if down else "-", f"{r.mbps_down_measured:.1f}" if down else "-",
                     _mark(r.mbps_down_checked, down and within_tolerance(r.mbps_down_measured, r.mbps_down_expected)),
                     f"{r.loss_pct_expected:g}", f"{r.loss_up_pct_measured:.2f}/{r.loss_down_pct_measured:.2f}" if lossy else "-",
                     _mark(r.loss_checked, loss_ok(r)) if r.loss_pct_expected or lossy else "",
                     _verdict(r)])
    unjudged = unjudged or (f"not emulable on loopback (RTT < {MIN_CHECKABLE_RTT_MS:g} ms or rate > {MAX_CHECKABLE_MBIT:g} "
                            "Mbit/s, or loss): measured, not judged")
    lines = [f"link check: {topo.name} ({topo.file}); tolerance ±{TOLERANCE:.0%} (loss: ±{TOLERANCE:.0%} or "
             f"{LOSS_SIGMAS:g} standard errors of the probe); n/e = {unjudged}",
             table(["path", "hops", "RTT exp ms", "RTT ms", "", "up exp Mbit/s", "up Mbit/s", "",
                    "down exp", "down", "", "loss exp %", "loss up/down %", "", "result"], rows)]
    notes = [f"  {r.src}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["notes:", *notes]
    failed = [r for r in results if not r.ok]
    judged = [r for r in results if r.rtt_checked or r.mbps_checked or r.mbps_down_checked or r.loss_checked]
    lines.append(f"{len(judged) - len(failed)}/{len(judged)} judged paths pass"
                 + (f"; {len(results) - len(judged)} measured only" if len(judged) < len(results) else "")
                 + (f"; FAILED: {', '.join(r.src for r in failed)}" if failed else ""))
    return "\n".join(lines) + "\n"


def _verdict(r: PathResult) -> str:
    if not r.ok:
        return "FAIL"
    return "PASS" if r.rtt_checked or r.mbps_checked or r.mbps_down_checked or r.loss_checked else "not judged"


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
