"""Link fidelity under the compose backend: loss without netem (iptables drops on arrival), a node's
down rate held for what it receives (IFB ingress shaping), both measured by the link check; and a
fault-matrix run on a topology with its own node names, training through a lossy link.

The rendering tests need no Docker; the two `docker` tests bring data/lossy-lan.yaml up (~50 s each).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smolcluster.core import algorithms
from smolcluster.testbed.linkemu import measure
from smolcluster.testbed.sim.compose import ImageSpec, leftovers, render_compose
from smolcluster.testbed.sim.compose_cluster import path_mechanism
from smolcluster.testbed.sim.compose_run import run_compose
from smolcluster.testbed.sim.options import SimOptions
from smolcluster.testbed.topology import load_topology

HERE = Path(__file__).resolve().parent
LOSSY = HERE / "data" / "lossy-lan.yaml"
TOPOLOGIES = HERE.parents[1] / "topologies"
IMAGE = ImageSpec(tag="smolcluster:test", python="python")


def _render(topology: Path, tmp_path: Path):
    cp = render_compose(load_topology(topology), tmp_path, IMAGE)
    links = {f"{l.node}/{l.network}": l for l in [*cp.links, *cp.toxiproxy_links]}
    return cp, links, lambda svc: (cp.compose_dir / "entrypoints" / f"{svc}.sh").read_text()


def _in_script(cmds: list[list[str]], script: str) -> bool:
    return all(shlex.join(c).replace("'$DEV'", '"$DEV"').replace("'$IPT'", '"$IPT"') in script for c in cmds)


# --------------------------------------------------------------------------- rendering (no Docker)


def test_a_lossy_attachment_drops_what_arrives_at_both_ends_but_not_on_the_proxy_leg(tmp_path):
    cp, links, script = _render(LOSSY, tmp_path)
    lossy, hub, toxi = links["lossy/lan"], links["hub/lan"], links["toxiproxy/lan"]
    assert lossy.loss_pct == 2 and lossy.lossy  # what reaches the laptop-like worker: 2 % lost
    # what the worker sends is lost where it arrives: at the Toxiproxy service standing in for the server
    assert ("10.78.0.2", 2.0) in toxi.loss_by_source and toxi.loss_pct == 0
    # the service's leg to the server is no link of the topology: never dropped, either way
    assert toxi.exempt[0] == "10.78.0.1" and hub.exempt == (cp.toxiproxy_address["lan"],)
    for svc, link in (("lossy", lossy), ("toxiproxy", toxi), ("hub", hub)):
        assert _in_script(link.loss(), script(svc)), svc
        assert "--probability 0.02 -j DROP" in script(svc) and "-t raw -A PREROUTING -i \"$DEV\"" in script(svc)
    # the exemption comes before the drop in the chain
    s = script("toxiproxy")
    assert s.index("-s 10.78.0.1 -j RETURN") < s.index("-s 10.78.0.2 -m statistic")
    # the loss mechanism is probed in the container, and reported with the reason when it is missing
    assert "command -v \"$IPT\"" in s and "LOSS_WHY" in s and 'loss lan $LOSS' in s


def test_a_down_rate_below_what_the_sender_sends_is_shaped_on_arrival(tmp_path):
    _, links, script = _render(LOSSY, tmp_path)
    slow = links["slowdown/lan"]
    assert slow.rate_mbit == 100 and slow.ingress_mbit == 40  # sends up at 100, receives down at 40
    assert links["lossy/lan"].ingress_mbit == 50  # a 50 Mbit/s attachment next to a server sending at 200
    assert links["hub/lan"].ingress_mbit is None and links["toxiproxy/lan"].ingress_mbit is None
    assert _in_script(slow.ingress(), script("slowdown"))
    assert "ip link add ifb0 type ifb" in script("slowdown") and "mirred egress redirect dev ifb0" in script("slowdown")
    assert "ifb" not in script("hub") and "ifb" not in script("toxiproxy")
    # the lossy worker sends one segment per packet (so drops are per segment); the hub keeps GSO for slowdown
    assert {k for k, l in links.items() if l.unsegmented} == {"lossy/lan"}
    assert 'ip link set dev "$DEV" gso_max_segs 1' in script("lossy")
    assert all("gso_max_segs" not in script(svc) for svc in ("slowdown", "hub", "toxiproxy"))


def test_gso_goes_off_only_where_every_path_through_the_interface_is_lossy(tmp_path):
    """Segmenting in software costs a lossless path sharing the interface its rate (a 940 Mbit/s Pi measured 128):
    home-wifi's laptops lose 0.1 % and go unsegmented, the server and Toxiproxy interfaces also carry the Pi's path."""
    _, links, _ = _render(TOPOLOGIES / "home-wifi.yaml", tmp_path / "home")
    assert {k for k, l in links.items() if l.unsegmented} == {"macbook/home", "windows/home"}
    # with every worker's hop lossy, the server's end (and the Toxiproxy standing in for it) sends per segment too
    data = yaml.safe_load(LOSSY.read_text())
    data["nodes"]["slowdown"]["links"]["lan"]["loss_pct"] = 1
    all_lossy = tmp_path / "all-lossy.yaml"
    all_lossy.write_text(yaml.safe_dump(data))
    _, links, script = _render(all_lossy, tmp_path / "all")
    assert {k for k, l in links.items() if l.unsegmented} == {"lossy/lan", "slowdown/lan", "hub/lan", "toxiproxy/lan"}
    assert 'ip link set dev "$DEV" gso_max_segs 1' in script("hub")


def test_home_wifi_laptops_get_their_down_rate_and_a_symmetric_cluster_gets_nothing_extra(tmp_path):
    _, links, script = _render(TOPOLOGIES / "home-wifi.yaml", tmp_path / "home")
    # Wi-Fi laptops on a cabled LAN: the server sends at 940, the laptops receive at their Wi-Fi down rate
    assert {k: l.ingress_mbit for k, l in links.items()} == {
        "server/home": None, "macbook/home": 200, "windows/home": 80, "pi/home": None, "toxiproxy/home": None}
    _, links, script = _render(TOPOLOGIES / "hybrid.yaml", tmp_path / "hybrid")
    assert not any(l.ingress_mbit or l.lossy for l in links.values())
    assert not any("iptables" in script(n) or "ifb" in script(n) for n in ("mini1", "mini3", "pi4", "toxiproxy"))


def test_a_router_sends_down_the_networks_it_routes_for(tmp_path):
    topo = tmp_path / "routed.yaml"
    topo.write_text("""
networks:
  core: {subnet: 10.1.0.0/24, profile: ethernet-1g}
  edge: {subnet: 10.2.0.0/24, profile: wan-cable}          # 20 up / 300 down
nodes:
  s: {role: server, device: mac-mini, addresses: {core: 10.1.0.1}, routes: [{dest: 10.2.0.0/24, via: 10.1.0.2}]}
  r: {role: worker, device: mac-mini, addresses: {core: 10.1.0.2, edge: 10.2.0.1}, forwarding: true}
  leaf: {role: worker, device: mac-mini, addresses: {edge: 10.2.0.2}, routes: [{dest: 10.1.0.0/24, via: 10.2.0.1}]}
""")
    _, links, _ = _render(topo, tmp_path / "run")
    assert links["leaf/edge"].rate_mbit == 20  # towards the server: up
    assert links["r/edge"].rate_mbit == 300  # the router sends the leaf its down rate
    assert links["r/core"].rate_mbit == 940


def test_path_mechanism_names_what_applied_each_part():
    assert path_mechanism({"tbf"}, ["iptables", "iptables"], []) == "tbf+iptables-loss+proxy"
    assert path_mechanism({"tbf"}, [], ["ifb"]) == "tbf+ifb+proxy"
    assert path_mechanism({"tbf"}, ["none: no iptables command in the container"], ["none: ..."]) == "tbf+proxy"
    assert path_mechanism({"netem"}, ["netem"], []) == "netem"
    assert path_mechanism({"none"}) == "proxy (rate unshaped: no tc qdisc)"


def test_udp_probe_counts_both_directions_on_a_lossless_path():
    echo = measure.UdpEcho("127.0.0.1", 0)  # what `measure serve` runs beside its TCP listener
    try:
        r = measure.udp_probe("127.0.0.1", echo.sock.getsockname()[1], count=3000, pps=3000, wait_s=0.3)
    finally:
        echo.close()
    assert (r["sent"], r["server_received"], r["echoed"]) == (3000, 3000, 3000)
    assert r["up_loss_pct"] == 0 and r["down_loss_pct"] == 0


# --------------------------------------------------------------------------- in containers


def _assert_clean(docker_env, project: str) -> None:
    containers, networks = leftovers(docker_env, project)
    assert not containers and not networks, f"left behind: containers {containers}, networks {networks}"


@pytest.mark.docker
@pytest.mark.slow
def test_check_measures_2pct_loss_and_a_40mbit_down_rate_in_containers(docker_env, offline_image, tmp_path, monkeypatch,
                                                                      mnist_dir):
    monkeypatch.setenv("SMOLCLUSTER_DATA_DIR", str(mnist_dir))
    out = io.StringIO()
    code = run_compose(SimOptions(file=LOSSY, backend="compose", check=True, as_json=True, run_dir=tmp_path / "run"), out=out)
    result = json.loads(out.getvalue())
    paths = {p["from"]: p for p in result["paths"]}
    lossy, slow = paths["lossy"], paths["slowdown"]
    # 2 % each way, measured by the UDP probe within its stated margin (±15 % or 3 standard errors)
    assert lossy["loss_checked"] and lossy["loss_pct_expected"] == 2.0, lossy
    for way in ("loss_up_pct_measured", "loss_down_pct_measured"):
        assert abs(lossy[way] - 2.0) <= lossy["loss_tolerance_pct"] <= 0.5, lossy
    assert any("iptables-loss" in n or "mechanism netem" in n for n in lossy["notes"]), lossy["notes"]
    # TCP sees it: the worker retransmits about as many segments as the link drops (one per packet)
    assert 1.0 <= lossy["tcp_retrans_pct"] <= 4.0, lossy
    # the shaping itself, measured with the loss switched off for a moment, holds both ways
    assert lossy["mbps_checked"] and lossy["mbps_down_checked"], lossy
    # the down rate holds towards the worker although the server sends at 200 Mbit/s
    assert slow["mbps_down_checked"] and slow["mbps_down_expected"] == 40.0, slow
    assert abs(slow["mbps_down_measured"] - 40.0) <= 0.15 * 40.0, slow
    assert slow["mbps_checked"] and abs(slow["mbps_measured"] - 100.0) <= 0.15 * 100.0, slow
    assert slow["loss_pct_expected"] == 0 and not slow["loss_checked"]
    summary = [{k: p[k] for k in ("from", "rtt_ms_measured", "mbps_measured", "mbps_down_measured", "loss_up_pct_measured",
                                  "loss_down_pct_measured", "ok")} for p in result["paths"]]
    assert code == 0 and lossy["ok"] and slow["ok"], summary


@pytest.mark.docker
@pytest.mark.slow
def test_fault_matrix_on_other_node_names_trains_through_a_lossy_link_in_containers(docker_env, offline_image, tmp_path,
                                                                                    mnist_dir):
    """`faults matrix --backend compose --topology lossy-lan.yaml`: roles hub / lossy / lossy->hub, EDP trains to
    the matrix's floor while lossy's link loses 2 % and is partitioned and healed."""
    r = subprocess.run([sys.executable, "-m", "smolcluster", "faults", "matrix", "--json", "--backend", "compose",
                        "--topology", str(LOSSY), "--faults", "partition", "--algos", "edp", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "SMOLCLUSTER_DATA_DIR": str(mnist_dir)})
    [res] = json.loads(r.stdout)["results"]
    assert r.returncode == 0 and res["passed"], r.stdout + r.stderr
    assert res["final_test_accuracy"] >= algorithms.get("edp").fault_matrix.floor
    summary = json.loads((Path(res["run_dir"]) / "summary.json").read_text())
    assert [f["fault"] for f in summary["faults"]] == ["cut-lossy", "heal-lossy"]
    assert summary["faults"][1]["ends"][0]["fault"] == "cut-lossy"
    link = next(l for l in summary["links"] if l["src"] == "lossy")
    assert link["loss_emulated"] and link["mechanism"] in ("tbf+ifb+iptables-loss+proxy", "netem+ifb"), link
    assert next(l for l in summary["links"] if l["src"] == "slowdown")["mechanism"] in ("tbf+ifb+proxy", "netem+ifb"), summary["links"]
    _assert_clean(docker_env, summary["compose_project"])


@pytest.mark.parametrize("iptables, reason", [
    (None, "no iptables command in the container (install Debian's iptables)"),
    ("echo 'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied' >&2; exit 4",
     "iptables failed: iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied"),
])
def test_without_usable_iptables_the_entrypoint_falls_back_and_says_why(tmp_path, iptables, reason):
    """The probe the entrypoints run, executed by sh: no iptables, or one that fails, leaves loss off with the reason."""
    from smolcluster.testbed.sim.compose import _LOSS_PROBE

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("head", "tr"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    if iptables is not None:
        (bin_dir / "iptables").write_text(f"#!/bin/sh\n{iptables}\n")
        (bin_dir / "iptables").chmod(0o755)
    r = subprocess.run(["/bin/sh", "-c", f'MECH=tbf\n{_LOSS_PROBE}\necho "$LOSS: $LOSS_WHY"'], capture_output=True, text=True,
                       env={"PATH": str(bin_dir)}, timeout=30)
    assert r.stdout.strip() == f"none: {reason}", r.stdout + r.stderr
