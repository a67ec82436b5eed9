"""The rehearsal hosts behave like the real cluster the launcher will meet.

What the launcher relies on: ssh by alias with strict host key checking, the Pis only through
their Mac (ProxyJump), routed subnets between namespaces, one tmux server per host, shaped
links, a host that stops answering, a topology file with host: blocks, and teardown that
leaves nothing behind (also after a crash of the test process).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rehearsal import Rehearsal, RehearsalError, cleanup_stale, leftovers, netns_list, root_links
from tcpprobe import Sink, command

pytestmark = pytest.mark.ssh

MACS = ("mini1", "mini2", "mini3")
PIS = {"pi5": ("mini1", "192.168.50.1"), "pi4": ("mini3", "192.168.51.2")}  # Pi -> (its Mac, the Mac's address on the Pi's cable)


def ssh_cmd(r: Rehearsal, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Plain `ssh -F <config> ...`, the way the launcher will call it."""
    return subprocess.run(["ssh", "-F", str(r.ssh_config), *args], capture_output=True, text=True, timeout=timeout)


def server_side(ssh_connection: str) -> tuple[str, str]:
    """(client address, server address) from a session's SSH_CONNECTION."""
    client, _, server, _ = ssh_connection.split()
    return client, server


def test_ssh_by_alias_reaches_each_mac_directly(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    for mac in MACS:
        p = ssh_cmd(r, mac, "hostname; echo $SSH_CONNECTION; echo $HOME")
        assert p.returncode == 0, f"ssh {mac}: {p.stderr}"
        hostname, connection, home = p.stdout.splitlines()
        assert hostname == mac and home == str(r.home(mac))
        # over the management link, not through another node
        assert server_side(connection) == (str(r.management[mac].root_address.ip), str(r.management[mac].address.ip))


def test_strict_host_key_checking_rejects_a_swapped_key(hybrid_hosts: Rehearsal, tmp_path: Path) -> None:
    r = hybrid_hosts
    keys = dict(line.split(" ", 1) for line in r.known_hosts.read_text().splitlines())
    keys["mini2"] = keys["mini3"]  # mini2 presenting mini3's key must not be accepted
    swapped = tmp_path / "known_hosts"
    swapped.write_text("".join(f"{k} {v}\n" for k, v in keys.items()))
    p = ssh_cmd(r, "-o", f"UserKnownHostsFile={swapped}", "mini2", "true")
    assert p.returncode == 255 and "host key" in p.stderr.lower(), p.stderr


def test_pis_are_reachable_only_through_their_mac(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    for pi, (mac, mac_address) in PIS.items():
        p = ssh_cmd(r, "-J", mac, pi, "hostname; echo $SSH_CONNECTION")
        assert p.returncode == 0, f"ssh -J {mac} {pi}: {p.stderr}"
        hostname, connection = p.stdout.splitlines()
        assert hostname == pi
        assert server_side(connection) == (mac_address, str(r.topology.nodes[pi].addresses[f"{pi}-eth"]))
    # Without the jump: the Pis' addresses are not routed to the rehearsal from the root
    # namespace (here the default route may even accept the TCP connect: ssh then times out).
    direct = [subprocess.Popen(["ssh", "-F", str(r.ssh_config), "-o", "ConnectTimeout=1", pi, "true"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pi in PIS]
    assert [p.wait(timeout=20) for p in direct] == [255] * len(PIS)


def test_root_namespace_has_no_route_into_the_topology(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    ours = {link for link in root_links() if link.startswith(r.prefix)}
    assert ours == {m.root_dev for m in r.management.values()} and len(ours) == len(MACS)  # one management veth per Mac
    for node in r.topology.nodes.values():
        for address in node.addresses.values():
            route = json.loads(subprocess.run(["ip", "-j", "route", "get", str(address)], capture_output=True,
                                              text=True).stdout or "[{}]")[0]
            assert route.get("dev") not in ours, (node.name, str(address), route)
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route", "show"], capture_output=True, text=True).stdout)
    assert {rt["dst"] for rt in routes if rt.get("dev") in ours} == {str(m.root_address.network) for m in r.management.values()}


def test_pi4_reaches_the_server_through_mini3_until_its_route_is_removed(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    server = str(r.topology.nodes["mini1"].addresses["thunderbolt"])
    route = json.loads(r.exec("pi4", ["ip", "-j", "route", "get", server]).stdout)[0]
    assert route["gateway"] == "192.168.51.2"  # mini3
    with Sink(r, "mini1", server) as sink:
        assert r.exec("pi4", command("connect", server, sink.port), check=False).returncode == 0
        assert sink.next()["peer"] == "192.168.51.4"  # routed, not NATed: the server sees pi4 itself
        r.remove_route("pi4", "10.10.0.0/24")
        try:
            p = r.exec("pi4", command("connect", server, sink.port), check=False)
            assert p.returncode == 1 and "unreachable" in p.stderr, p.stderr
        finally:
            r.add_route("pi4", "10.10.0.0/24", "192.168.51.2")
        assert r.exec("pi4", command("connect", server, sink.port), check=False).returncode == 0


def test_each_host_has_its_own_tmux_server(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    out = r.ssh("mini2", "tmux new-session -d -s x 'sleep 600' && tmux display-message -p -t x '#{pid} #{pane_pid}'"
                         " && tmux ls").stdout.splitlines()
    try:
        server_pid, pane_pid = map(int, out[0].split())
        assert out[1].startswith("x:")
        other = r.ssh("mini3", "tmux ls", check=False)
        # mini3's tmux looks for its own server (under mini3's TMUX_TMPDIR), and there is none
        assert other.returncode == 1 and "x:" not in other.stdout, other
        assert f"{r.tmux_dir('mini3')}/tmux-0/default" in other.stderr, other.stderr
        mini2, mini3 = set(r.pids("mini2")), set(r.pids("mini3"))
        assert {server_pid, pane_pid} <= mini2 and not {server_pid, pane_pid} & mini3
    finally:
        r.ssh("mini2", "tmux kill-server", check=False)


def measured_mbit(r: Rehearsal, src: str, dst: str, nbytes: int) -> float:
    """Goodput of one bulk TCP transfer src -> dst over thunderbolt, timed by the receiver."""
    address = str(r.topology.nodes[dst].addresses["thunderbolt"])
    with Sink(r, dst, address) as sink:
        r.exec(src, command("send", address, sink.port, nbytes))
        got = sink.next()
    assert got["bytes"] == nbytes
    return got["bytes"] * 8 / got["seconds"] / 1e6


def test_shaped_link_rate_matches_in_both_directions(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    r.shape("mini2", "thunderbolt", 50)
    try:
        up = measured_mbit(r, "mini2", "mini1", 5_000_000)  # tbf on mini2's veth
        down = measured_mbit(r, "mini1", "mini2", 5_000_000)  # tbf on the bridge side, towards mini2
    finally:
        r.unshape("mini2", "thunderbolt")
    assert 50 * 0.85 <= up <= 50 * 1.15, up
    assert 50 * 0.85 <= down <= 50 * 1.15, down


def test_a_stopped_sshd_does_not_answer_until_started_again(hybrid_hosts: Rehearsal) -> None:
    r = hybrid_hosts
    r.stop_sshd("mini3")
    try:
        p = r.ssh("mini3", "true", check=False)
        assert p.returncode == 255 and "refused" in p.stderr, p.stderr
    finally:
        r.start_sshd("mini3")
    assert r.ssh("mini3", "hostname").stdout.strip() == "mini3"


def test_write_topology_adds_a_host_block_and_keeps_the_rest(hybrid_hosts: Rehearsal, tmp_path: Path) -> None:
    r = hybrid_hosts
    out = yaml.safe_load(r.write_topology(tmp_path / "hybrid-hosts.yaml").read_text())
    original = yaml.safe_load(r.topology_path.read_text())
    for body in original["nodes"].values():  # the real cluster's host blocks are replaced by the rehearsal's
        body.pop("host", None)
    hosts = {name: body.pop("host") for name, body in out["nodes"].items()}
    assert out == original
    for name, host in hosts.items():
        jump = {"jump": PIS[name][0]} if name in PIS else {}
        assert host == {"ssh": name, "user": "root", "port": 22, **jump, "os": "linux", "python": sys.executable,
                        "workdir": str(r.root / "hosts" / name / "smolcluster")}
        assert Path(host["workdir"]).is_dir()


def test_routes_false_and_teardown_on_an_exception_leave_nothing(rehearsal_requirements: None, hybrid_path: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with Rehearsal(hybrid_path, tmp_path, routes=False) as r:
            # only connected subnets: pi4 knows its cable, not the Thunderbolt subnet
            assert r.exec("pi4", ["ip", "-4", "route"]).stdout.split()[0] == "192.168.51.0/24"
            assert "10.10.0.0/24" not in r.exec("pi4", ["ip", "-4", "route"]).stdout
            assert "192.168.5" not in r.exec("mini2", ["ip", "-4", "route"]).stdout
            r.ssh("mini2", "tmux new-session -d -s left 'sleep 600'")  # a tmux server teardown must kill
            assert len(r.pids("mini2")) >= 3  # hostinit, sshd, tmux server (+ its pane)
            raise KeyboardInterrupt
    assert leftovers(r.prefix, r.root) == {"netns": [], "links": [], "state": [], "processes": [], "sockets": []}
    r.close()  # idempotent


def test_cleanup_stale_removes_a_crashed_run_and_spares_live_ones(hybrid_hosts: Rehearsal, tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from rehearsal import Rehearsal\n"
            "r = Rehearsal(sys.argv[1], Path(sys.argv[2]), direct={'mini1', 'mini2', 'mini3'}).start()\n"
            "r.ssh('mini2', \"tmux new-session -d -s s 'sleep 600'\")\n"
            "print(r.prefix, flush=True); sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(hybrid_hosts.topology_path), str(tmp_path)], cwd=Path(__file__).parent,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        prefix = owner.stdout.readline().strip()
        assert prefix, owner.stderr.read()
        assert leftovers(prefix)["netns"]  # it is up
        assert prefix not in cleanup_stale()  # its owner is alive: untouched
    finally:
        owner.send_signal(signal.SIGKILL)  # a crash: no teardown runs
        owner.wait()
    assert leftovers(prefix, tmp_path)["processes"]  # the crash left its sshds and tmux behind
    cleaned = cleanup_stale()
    assert prefix in cleaned and hybrid_hosts.prefix not in cleaned
    assert leftovers(prefix, tmp_path) == {"netns": [], "links": [], "state": [], "processes": [], "sockets": []}
    assert hybrid_hosts.prefix + "-mini1" in netns_list()
    assert hybrid_hosts.ssh("mini1", "hostname").stdout.strip() == "mini1"


def test_helpers_name_the_node_and_the_command_when_a_step_fails(hybrid_hosts: Rehearsal) -> None:
    with pytest.raises(RehearsalError, match=r"pi4: remove route 172\.16\.0\.0/12: .*ip -n smr[0-9a-f]{4}-pi4 route del"):
        hybrid_hosts.remove_route("pi4", "172.16.0.0/12")
    with pytest.raises(RehearsalError, match="no node 'pi9'"):
        hybrid_hosts.ssh("pi9", "true")
    with pytest.raises(RehearsalError, match="mini2 has no address on network 'pi5-eth'"):
        hybrid_hosts.shape("mini2", "pi5-eth", 10)


def test_every_node_reaches_its_neighbours_sshd_on_each_network(hybrid_hosts: Rehearsal) -> None:
    """The bridges pass traffic between every pair of nodes on a network (sshd listens on 0.0.0.0:22)."""
    r = hybrid_hosts
    for a in r.attachments:
        for b in (b for b in r.attachments if b.network == a.network and b.node != a.node):
            p = r.exec(a.node, command("connect", b.address.ip, 22), check=False)
            assert p.returncode == 0, (a.node, str(b.address.ip), p.stderr)


def test_a_host_whose_sshd_fails_is_named_with_sshds_error_and_nothing_is_left(
        rehearsal_requirements: None, hybrid_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Rehearsal._sshd_config
    monkeypatch.setattr(Rehearsal, "_sshd_config", lambda self, node: config(self, node) + "NoSuchOption yes\n")
    r = Rehearsal(hybrid_path, tmp_path)
    with pytest.raises(RehearsalError, match=r"mini1: hostinit/sshd exited with 255: .*Bad configuration option: NoSuchOption"):
        r.start()
    assert leftovers(r.prefix, r.root) == {"netns": [], "links": [], "state": [], "processes": [], "sockets": []}


def test_rsync_over_ssh_through_the_jump_host(hybrid_hosts: Rehearsal, tmp_path: Path) -> None:
    r = hybrid_hosts
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    workdir = r.host_block("pi4")["workdir"]
    p = subprocess.run(["rsync", "-a", "-e", f"ssh -F {r.ssh_config} -J mini3", f"{tmp_path / 'src'}/", f"pi4:{workdir}/"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert r.ssh("pi4", f"cd {workdir} && {sys.executable} pkg/mod.py").stdout == "hi\n"
