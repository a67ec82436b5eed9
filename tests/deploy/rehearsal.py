"""Real hosts for the deployment rehearsal: a topology's nodes as Linux network namespaces.

Each node of a topology file becomes a network namespace with the topology's addresses on
real routed subnets and a real OpenSSH server, so the real-hardware launcher can be
rehearsed end to end (ssh, ProxyJump, rsync, tmux) without the hardware:

    with Rehearsal("topologies/hybrid.yaml", tmp_path) as r:
        r.ssh("mini2", "hostname").stdout       # "mini2\\n": ssh -F <root>/client/ssh_config mini2
        r.ssh("pi5", "hostname")                # through mini1: ssh -F ... -J mini1 pi5
        r.write_topology(tmp_path / "t.yaml")   # the topology with a host: block per node

Layout, for hybrid.yaml (prefix smrXXXX, all names carry it so parallel runs never collide):

    smrXXXX_switch            one Linux bridge per topology network. Not in the root
                              namespace: docker's br_netfilter + iptables FORWARD DROP there
                              would drop bridged traffic.
    smrXXXX-<node>            one per node: a veth per topology address (peer enslaved to
                              the network's bridge), lo, ip_forward as the topology says,
                              the topology's static routes, an sshd on 0.0.0.0:22.
    root namespace            the controller (this process). Reaches the nodes in `direct`
                              (default: every node that is not a Raspberry Pi) over
                              point-to-point management veths in a random /24 of
                              100.64.0.0/10 (CGNAT space, so it cannot clash with docker
                              networks that reuse the topology's subnets). The Pis have no
                              management address: ssh reaches them only through their Mac.

Every host shares this machine's filesystem and uid (root). What separates them: the
network namespace, a UTS namespace (own hostname), and two variables sshd sets in every
session: TMUX_TMPDIR=<root>/hosts/<node>/tmux (each host its own tmux server) and
HOME=<root>/hosts/<node>/home (each host its own ~). Files under <root>:

    authorized_keys                       the client key, for every sshd
    client/id_ed25519{,.pub}              the controller's throwaway key
    client/known_hosts                    each node's host key under its name (HostKeyAlias)
    client/ssh_config                     one `Host <node>` block per node
    hosts/<node>/sshd_config, ssh_host_ed25519_key, sshd.pid, sshd.log, hostinit.log
    hosts/<node>/tmux/                    TMUX_TMPDIR of that host
    hosts/<node>/home/                    HOME of that host (empty: no shell startup files)
    hosts/<node>/smolcluster/             the host's workdir in write_topology()

What a launcher rehearsed here must expect:
- ssh needs `-F <root>/client/ssh_config` (and rsync `-e "ssh -F ..."`); ~/.ssh is shared by
  every host and this machine, so nothing is written there. ssh passes -F on to the ProxyJump ssh.
- One filesystem for all hosts: write logs/pids under the host's workdir, never to fixed paths
  like /tmp/x. The venv's editable install points at the test checkout, so a worker imports the
  rsynced copy only when started from its workdir (`cd WORKDIR && python -m smolcluster ...`).
- Processes started with exec()/spawn() see the machine's hostname; only ssh sessions (under
  hostinit) see the node's.
- On this CI machine a TCP connect through the default route "succeeds" for any address (the
  sandbox proxies it): probe hosts with ssh (BatchMode, ConnectTimeout), not with a TCP connect.
- PID 1 does not reap: `[ssh] <defunct>` zombies (the -J helper ssh) pile up under it. They are
  not leaks; leftovers() ignores zombies.
- New namespaces inherit ip_forward=1 here, so it is set explicitly per node (also with
  routes=False, which only leaves out the static routes).

Owner records live in /run/smolcluster-rehearsal/<prefix>.json (pid and start time of the
process that made them), so cleanup_stale() can remove what crashed runs left behind without
touching runs that are still alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import yaml

from smolcluster.core.training.config import read_yaml
from smolcluster.testbed.linkemu.netem import NETEM, TBF, shaping_commands
from smolcluster.testbed.profiles import LinkProfile
from smolcluster.testbed.topology import Node, Topology, load_topology

SSHD = "/usr/sbin/sshd"
HOSTINIT = Path(__file__).with_name("hostinit.py")
STATE_DIR = Path("/run/smolcluster-rehearsal")
PREFIX_RE = re.compile(r"^smr[0-9a-f]{4}$")
NETNS_RE = re.compile(r"^(smr[0-9a-f]{4})[-_]")  # smrXXXX-<node>, smrXXXX_switch
LINK_RE = re.compile(r"^(smr[0-9a-f]{4})\d")  # smrXXXX<i>c in the root namespace
MGMT_SPACE = IPv4Network("100.64.0.0/10")
IFNAMSIZ = 15  # Linux interface names: at most 15 characters
SUN_PATH_MAX = 107  # a unix socket path (tmux's) must fit sockaddr_un.sun_path
SSH_PORT = 22


class RehearsalError(RuntimeError):
    """A step of building, using or tearing down the rehearsal failed; says which node and command."""


# --------------------------------------------------------------------------- small helpers


def run(argv: Sequence[str], *, what: str, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """subprocess.run with output captured; a failure names `what`, the command and its stderr."""
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        raise RehearsalError(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:g}s "
                             f"(stderr: {_text(e.stderr).strip() or '-'})") from None
    if check and proc.returncode != 0:
        raise RehearsalError(f"{what}: `{shlex.join(argv)}` failed with exit {proc.returncode}: "
                             f"{proc.stderr.strip() or proc.stdout.strip() or '(no output)'}")
    return proc


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, detail: Callable[[], str] = lambda: "") -> None:
    """Poll `condition` every 20 ms until it holds; RehearsalError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            extra = detail()
            raise RehearsalError(f"timed out after {timeout:g}s waiting for {what}" + (f": {extra}" if extra else ""))
        time.sleep(0.02)


def is_pi(node: Node) -> bool:
    return node.device.name.startswith("raspberry")


def _proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (pid reuse check), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])  # field 22; fields after "(comm)" start at 3


def _alive(pid: int) -> bool:
    """Running, i.e. it exists and is not a zombie (this machine's PID 1 never reaps orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _listening(pid: int, port: int) -> bool:
    """Whether the network namespace of `pid` has a TCP socket listening on `port` (any address).
    /proc/<pid>/net/tcp shows that process's namespace: no subprocess needed to look inside."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        local, _remote, state = line.split()[1:4]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def netns_list() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], what="list network namespaces").stdout.strip()
    return [e["name"] for e in json.loads(out or "[]")]


def root_links() -> list[str]:
    out = run(["ip", "-j", "link", "show"], what="list the root namespace's interfaces").stdout
    return [e["ifname"] for e in json.loads(out or "[]")]


def netns_pids(ns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", ns], what=f"list the processes of netns {ns}", check=False)
    return [int(p) for p in proc.stdout.split()]


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop(find: Callable[[], list[int]], what: str, grace: float = 3.0) -> None:
    """SIGTERM the live processes `find` returns, again for newcomers, until none is left;
    SIGKILL after `grace` s. RehearsalError if some survive even that."""
    deadline = time.monotonic() + grace
    while pids := find():
        late = time.monotonic() > deadline
        _signal_all(pids, signal.SIGKILL if late else signal.SIGTERM)

        def gone() -> bool:
            return not any(_alive(p) for p in pids)

        with contextlib.suppress(RehearsalError):
            wait_for(gone, timeout=2.0 if late else 0.5, what=what)
        if late and not gone():
            raise RehearsalError(f"{what} survive SIGKILL: " + "; ".join(f"{p} {_cmdline(p)}" for p in pids if _alive(p)))


def stop_netns_processes(namespaces: Sequence[str], *, is_init: Callable[[int], bool]) -> None:
    """Kill every process in the namespaces: first all but the hosts' inits (so the inits reap
    them: this machine's PID 1 does not), then the inits."""
    existing = set(netns_list())
    namespaces = [ns for ns in namespaces if ns in existing]

    def inside() -> list[int]:
        return [p for ns in namespaces for p in netns_pids(ns)]

    _stop(lambda: [p for p in inside() if not is_init(p)], f"processes in {', '.join(namespaces)}")
    _stop(inside, f"the hosts' inits in {', '.join(namespaces)}")


def _remove_sockets(root: Path) -> None:
    """tmux (and ssh ControlMaster) sockets the hosts left under `root`."""
    if not root.is_dir():
        return
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def _sockets(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [str(p) for p in root.rglob("*") if p.is_socket()]


def _owned_paths(root: Path) -> tuple[str, ...]:
    """Paths only this rehearsal's processes mention: sshds (-f hosts/N/sshd_config), every ssh
    session and tmux server (TMUX_TMPDIR=hosts/N/tmux), ssh clients (-F client/ssh_config).
    Not the bare root: that could be a directory other processes use too."""
    return f"{root}/hosts/", f"{root}/client/"


def pids_mentioning(*texts: str) -> list[int]:
    """Live processes (but this one) whose command line or environment contains one of `texts`."""
    needles = [t.encode() for t in texts]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(n in blob for n in needles) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------- owner records, stale runs


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """One rehearsal at a time claims a prefix/subnet or cleans up (flock, released on exit)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _state_file(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def _read_state(prefix: str) -> dict | None:
    try:
        return json.loads(_state_file(prefix).read_text())
    except (OSError, ValueError):
        return None


def _owner_alive(prefix: str) -> bool:
    state = _read_state(prefix)
    if state is None:  # the record is written before anything else: no record = a crashed cleanup
        return False
    return _alive(state["pid"]) and _proc_start_time(state["pid"]) == state["start_time"]


def _known_prefixes() -> set[str]:
    found = {m.group(1) for ns in netns_list() if (m := NETNS_RE.match(ns))}
    found |= {m.group(1) for link in root_links() if (m := LINK_RE.match(link))}
    if STATE_DIR.is_dir():
        found |= {p.stem for p in STATE_DIR.glob("*.json") if PREFIX_RE.match(p.stem)}
    return found


def leftovers(prefix: str, root: Path | None = None) -> dict[str, list[str]]:
    """What of a rehearsal still exists: netns, root-namespace interfaces, its owner record,
    processes in its namespaces or mentioning its root dir, sockets under the root dir."""
    spaces = [ns for ns in netns_list() if ns.startswith(prefix)]
    pids = {p for ns in spaces for p in netns_pids(ns)} | set(pids_mentioning(*_owned_paths(root)) if root is not None else ())
    return {
        "netns": spaces,
        "links": [link for link in root_links() if link.startswith(prefix)],
        "state": [str(_state_file(prefix))] if _state_file(prefix).exists() else [],
        "processes": [f"{p} {_cmdline(p)}" for p in sorted(pids)],
        "sockets": _sockets(root) if root is not None else [],
    }


def _remove_everything(prefix: str, namespaces: Sequence[str], root: Path | None,
                       is_init: Callable[[int], bool]) -> None:
    """Processes, then root-namespace veths, then namespaces, sockets and the owner record."""
    stop_netns_processes(namespaces, is_init=is_init)
    if root is not None:  # the controller's side: ssh clients, ControlMasters, a launcher still running
        _stop(lambda: pids_mentioning(*_owned_paths(root)), f"processes using {root}")
    for link in root_links():
        if link.startswith(prefix):  # deleting one end of a veth deletes both, synchronously
            run(["ip", "link", "del", link], what=f"delete interface {link}", check=False)
    for ns in namespaces:
        if ns in netns_list():
            run(["ip", "netns", "del", ns], what=f"delete netns {ns}")
    if root is not None:
        _remove_sockets(root)
    _state_file(prefix).unlink(missing_ok=True)


def _is_hostinit(pid: int) -> bool:
    return HOSTINIT.name in _cmdline(pid)  # by name: a stale run may come from another checkout


def cleanup_stale() -> list[str]:
    """Remove what rehearsals whose owner process is dead left behind (netns, processes, root-
    namespace interfaces, sockets, owner records). Live runs are left alone. Returns the prefixes."""
    with _state_lock():
        stale = sorted(p for p in _known_prefixes() if not _owner_alive(p))
        for prefix in stale:
            state = _read_state(prefix) or {}
            spaces = [ns for ns in netns_list() if ns.startswith(prefix)]
            _remove_everything(prefix, spaces, Path(state["root"]) if "root" in state else None, _is_hostinit)
    return stale


def _used_ipv4() -> list[IPv4Network]:
    """Subnets the root namespace routes or has addresses in, and other rehearsals' management subnets."""
    used: list[IPv4Network] = []
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"], what="list routes").stdout or "[]")
    used += [IPv4Network(r["dst"], strict=False) for r in routes if r.get("dst", "default") != "default"]
    for link in json.loads(run(["ip", "-j", "-4", "addr", "show"], what="list addresses").stdout or "[]"):
        used += [IPv4Interface(f"{a['local']}/{a['prefixlen']}").network for a in link.get("addr_info", [])]
    for f in STATE_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.append(IPv4Network(json.loads(f.read_text())["mgmt_subnet"]))
    return used


def _claim(root: Path) -> tuple[str, IPv4Network]:
    """A fresh prefix and management /24, recorded (owner pid first) before anything is created."""
    with _state_lock():
        taken = _known_prefixes()
        prefix = next(p for p in (f"smr{secrets.token_hex(2)}" for _ in range(1000)) if p not in taken)
        used = _used_ipv4()
        rng = random.Random(secrets.randbits(64))
        candidates = (IPv4Network((int(MGMT_SPACE.network_address) + 256 * rng.randrange(MGMT_SPACE.num_addresses // 256), 24))
                      for _ in range(1000))
        subnet = next(s for s in candidates if not any(s.overlaps(u) for u in used))
        record = {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid()), "root": str(root), "mgmt_subnet": str(subnet)}
        _state_file(prefix).write_text(json.dumps(record))
    return prefix, subnet


# --------------------------------------------------------------------------- the rehearsal


@dataclass(frozen=True)
class Attachment:
    """A node's address on a topology network: a veth, `dev` in the node, `peer` on the bridge."""
    node: str
    network: str
    address: IPv4Interface
    dev: str
    peer: str


@dataclass(frozen=True)
class Management:
    """The controller's point-to-point link to a direct node: `root_dev` here, `dev` in the node."""
    node: str
    dev: str
    root_dev: str
    address: IPv4Interface  # the node's end
    root_address: IPv4Interface


class Rehearsal:
    """The nodes of a topology file as network namespaces with real sshds (see the module doc).

    `root` is a fresh directory the rehearsal owns (keys, configs, the hosts' dirs).
    `routes=False` starts the nodes with only their connected subnets (for testing a tool that
    adds the routes). `direct` names the nodes the controller reaches without a jump (default:
    every node whose device is not a Raspberry Pi)."""

    def __init__(self, topology_path: str | Path, root: Path, *, routes: bool = True,
                 direct: Iterable[str] | None = None):
        self.topology_path = Path(topology_path).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        self.root = Path(root).resolve()
        self.routes = routes
        names = list(self.topology.nodes)
        self.direct = frozenset(direct) if direct is not None else frozenset(
            n for n in names if not is_pi(self.topology.nodes[n]))
        self._check_names()
        self.jumps = {n: self._jump_host(n) for n in names if n not in self.direct}
        self.prefix = ""  # set by start()
        self.attachments: list[Attachment] = []
        self.management: dict[str, Management] = {}
        self._inits: dict[str, subprocess.Popen] = {}
        self._spawned: list[subprocess.Popen] = []
        self._started = False

    # ------------------------------------------------------------------ naming and paths

    def _check_names(self) -> None:
        unknown = sorted(self.direct - set(self.topology.nodes))
        if unknown:
            raise RehearsalError(f"direct= names nodes not in {self.topology_path}: {', '.join(unknown)}")
        for name in self.topology.nodes:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise RehearsalError(f"node name {name!r} cannot be a netns/host name; use letters, digits, . _ -")
        if (self.root / "hosts").exists() or (self.root / "client").exists():
            raise RehearsalError(f"{self.root} already holds a rehearsal (hosts/, client/); give each one a fresh directory")
        if re.search(r"\s", str(self.root)):
            raise RehearsalError(f"root {self.root} contains whitespace, which sshd_config/ssh_config values cannot carry")
        sock = self.tmux_dir(max(self.topology.nodes, key=len)) / "tmux-0" / "default"
        if len(str(sock)) > SUN_PATH_MAX:
            raise RehearsalError(f"root {self.root} is too long: tmux's socket {sock} exceeds {SUN_PATH_MAX} bytes")

    def _jump_host(self, node: str) -> str:
        """The direct node that forwards on one of `node`'s networks (a Pi's Mac)."""
        nets = self.topology.nodes[node].addresses
        for other in self.topology.nodes.values():
            if other.name in self.direct and other.forwarding and set(other.addresses) & set(nets):
                return other.name
        raise RehearsalError(f"{node} has no management address and no forwarding direct node shares a network "
                             f"with it ({', '.join(nets)}): the controller could not reach it; add it to direct=")

    def netns(self, node: str) -> str:
        self._node(node)
        return f"{self.prefix}-{node}"

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}_switch"

    def host_dir(self, node: str) -> Path:
        return self.root / "hosts" / node

    def tmux_dir(self, node: str) -> Path:
        return self.host_dir(node) / "tmux"

    def home(self, node: str) -> Path:
        return self.host_dir(node) / "home"

    @property
    def ssh_config(self) -> Path:
        return self.root / "client" / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.root / "client" / "known_hosts"

    @property
    def identity(self) -> Path:
        return self.root / "client" / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    def _ifname(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        if len(name) > IFNAMSIZ:
            raise RehearsalError(f"interface name {name} is longer than {IFNAMSIZ} characters (too many nodes/networks)")
        return name

    def _node(self, node: str) -> Node:
        if node not in self.topology.nodes:
            raise RehearsalError(f"no node {node!r} in {self.topology_path}; nodes: {', '.join(self.topology.nodes)}")
        return self.topology.nodes[node]

    def attachment(self, node: str, network: str) -> Attachment:
        for a in self.attachments:
            if a.node == node and a.network == network:
                return a
        raise RehearsalError(f"{node} has no address on network {network!r}; it is on {', '.join(self._node(node).addresses)}")

    def hostname(self, node: str) -> str:
        """The address ssh dials: the management address of a direct node, else the topology's
        first address (reached from the jump host, which shares that network)."""
        if node in self.management:
            return str(self.management[node].address.ip)
        shared = next(net for net in self._node(node).addresses if net in self._node(self.jumps[node]).addresses)
        return str(self._node(node).addresses[shared])

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Rehearsal":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Rehearsal":
        """Build every namespace, link, route and sshd; on any failure tear down what exists and raise."""
        if self._started:
            raise RehearsalError("this Rehearsal was already started; make a new one")
        self._started = True
        cleanup_stale()
        self.prefix, mgmt_subnet = _claim(self.root)
        try:
            self._make_namespaces()
            self._make_networks()
            self._make_management(mgmt_subnet)
            self._write_ssh_files()
            for node in self.topology.nodes:
                self._start_host(node)
            for node in self.topology.nodes:
                self._wait_sshd(node)
        except BaseException:
            self.close()
            raise
        return self

    def _ip(self, ns: str, *args: str, what: str) -> None:
        run(["ip", "-n", ns, *args], what=what)

    def _make_namespaces(self) -> None:
        for ns in (self.switch_netns, *(self.netns(n) for n in self.topology.nodes)):
            run(["ip", "netns", "add", ns], what=f"create netns {ns}")
            self._ip(ns, "link", "set", "lo", "up", what=f"bring up lo in {ns}")
        for node in self.topology.nodes.values():
            # Set both ways: a new namespace here inherits ip_forward=1 from the root namespace.
            value = "1" if node.forwarding else "0"
            run(["ip", "netns", "exec", self.netns(node.name), "sysctl", "-qw", f"net.ipv4.ip_forward={value}"],
                what=f"{node.name}: set ip_forward={value}")

    def _make_networks(self) -> None:
        sw = self.switch_netns
        index = {net: j for j, net in enumerate(self.topology.networks)}  # names: <prefix>br<j>, <prefix><i>e<j>
        bridges = {}
        for net, j in index.items():
            bridges[net] = self._ifname(f"br{j}")
            self._ip(sw, "link", "add", bridges[net], "type", "bridge", what=f"create bridge for network {net}")
            self._ip(sw, "link", "set", bridges[net], "alias", net, "up", what=f"bring up bridge for network {net}")
        for i, node in enumerate(self.topology.nodes.values()):
            for net, addr in node.addresses.items():
                ns = self.netns(node.name)
                subnet = self.topology.networks[net].subnet
                a = Attachment(node.name, net, IPv4Interface(f"{addr}/{subnet.prefixlen}"),
                               self._ifname(f"{i}e{index[net]}"), self._ifname(f"{i}p{index[net]}"))
                what = f"{node.name}: attach {a.address} on network {net}"
                # Both ends are created directly in their namespaces: nothing passes through the root namespace.
                run(["ip", "link", "add", a.dev, "netns", ns, "type", "veth", "peer", "name", a.peer, "netns", sw], what=what)
                self._ip(ns, "link", "set", a.dev, "alias", net, "up", what=what)
                self._ip(ns, "addr", "add", str(a.address), "dev", a.dev, what=what)
                self._ip(sw, "link", "set", a.peer, "master", bridges[net], "alias", f"{node.name} {net}", "up", what=what)
                self.attachments.append(a)
        if self.routes:
            for node in self.topology.nodes.values():
                for r in node.routes:
                    self.add_route(node.name, str(r.dest), str(r.via))

    def _make_management(self, subnet: IPv4Network) -> None:
        """A /30 of `subnet` per direct node: .1 in the root namespace, .2 in the node."""
        links = list(subnet.subnets(new_prefix=30))
        direct = [n for n in self.topology.nodes if n in self.direct]
        if len(direct) > len(links):
            raise RehearsalError(f"{len(direct)} direct nodes do not fit into {subnet} as /30s")
        for node, link in zip(direct, links):
            i = list(self.topology.nodes).index(node)
            near, far = list(link.hosts())
            m = Management(node, self._ifname(f"{i}m"), self._ifname(f"{i}c"),
                           IPv4Interface(f"{far}/30"), IPv4Interface(f"{near}/30"))
            what = f"{node}: management link {m.root_address.ip} <-> {m.address.ip}"
            run(["ip", "link", "add", m.root_dev, "type", "veth", "peer", "name", m.dev, "netns", self.netns(node)], what=what)
            self.management[node] = m
            run(["ip", "link", "set", m.root_dev, "alias", f"rehearsal {self.prefix} {node}", "up"], what=what)
            run(["ip", "addr", "add", str(m.root_address), "dev", m.root_dev], what=what)
            self._ip(self.netns(node), "link", "set", m.dev, "alias", "management", "up", what=what)
            self._ip(self.netns(node), "addr", "add", str(m.address), "dev", m.dev, what=what)

    def _write_ssh_files(self) -> None:
        client = self.identity.parent
        client.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"rehearsal-{self.prefix}", "-f", self.identity],
            what="generate the client key")
        self.authorized_keys.write_text(self.identity.with_suffix(".pub").read_text())
        known, config = [], []
        for node in self.topology.nodes:
            hd = self.host_dir(node)
            self.tmux_dir(node).mkdir(parents=True, exist_ok=True)
            self.home(node).mkdir()
            (hd / "smolcluster").mkdir(exist_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node}-{self.prefix}", "-f", hd / "ssh_host_ed25519_key"],
                what=f"{node}: generate the host key")
            key_type, key = (hd / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            known.append(f"{node} {key_type} {key}\n")
            (hd / "sshd_config").write_text(self._sshd_config(node))
            config.append(self._ssh_config_block(node))
        self.known_hosts.write_text("".join(known))
        self.ssh_config.write_text("\n".join(config))

    def _sshd_config(self, node: str) -> str:
        hd = self.host_dir(node)
        return "\n".join([
            f"# sshd of rehearsal host {node} ({self.prefix})",
            f"ListenAddress 0.0.0.0:{SSH_PORT}",
            f"HostKey {hd / 'ssh_host_ed25519_key'}",
            f"PidFile {hd / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key files live in temp dirs with loose permissions
            f"AuthorizedKeysFile {self.authorized_keys}",
            # Every host shares one filesystem and uid: without its own TMUX_TMPDIR, the first
            # host's tmux server would run every other host's sessions in ITS network namespace.
            # HOME too: each host has its own ~ (as real hosts do). The machine's /root/.bashrc
            # (pyenv init + rehash here) would run in every ssh session otherwise, and a session
            # killed at teardown mid-rehash leaves pyenv's lock behind: every later root shell
            # then hangs for a minute.
            f"SetEnv TMUX_TMPDIR={self.tmux_dir(node)} HOME={self.home(node)}",
            "Subsystem sftp internal-sftp",  # scp uses sftp since OpenSSH 9
            "PrintMotd no",
            "PrintLastLog no",
            "",
        ])

    def _ssh_config_block(self, node: str) -> str:
        return "\n".join([
            f"Host {node}",
            f"    HostName {self.hostname(node)}",
            "    User root",
            f"    Port {SSH_PORT}",
            f"    IdentityFile {self.identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            f"    HostKeyAlias {node}",  # verified by name whether reached directly or through a jump
            "    BatchMode yes",
            "    ConnectTimeout 5",
            "    LogLevel ERROR",
            "",
        ])

    def _start_host(self, node: str) -> None:
        """hostinit (own hostname, reaper) with a daemonizing sshd under it, in the node's netns."""
        hd = self.host_dir(node)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        argv = ["ip", "netns", "exec", self.netns(node), sys.executable, str(HOSTINIT), node, "--",
                SSHD, "-f", str(hd / "sshd_config"), "-E", str(hd / "sshd.log")]
        with open(hd / "hostinit.log", "ab") as log:
            self._inits[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _sshd_pid(self, node: str) -> int | None:
        try:
            pid = int((self.host_dir(node) / "sshd.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _wait_sshd(self, node: str, timeout: float = 10.0) -> None:
        init = self._inits[node]

        def up() -> bool:
            if init.poll() is not None:
                raise RehearsalError(f"{node}: hostinit/sshd exited with {init.returncode}: {self._host_logs(node)}")
            return self._sshd_pid(node) is not None and _listening(init.pid, SSH_PORT)

        wait_for(up, timeout=timeout, what=f"{node}: sshd to listen on port {SSH_PORT}", detail=lambda: self._host_logs(node))

    def _host_logs(self, node: str) -> str:
        hd = self.host_dir(node)
        logs = [f"{p.name}: {p.read_text().strip()}" for p in (hd / "hostinit.log", hd / "sshd.log")
                if p.exists() and p.read_text().strip()]
        return "; ".join(logs) or "(no log output)"

    def close(self) -> None:
        """Kill every process in every namespace (sshds, sessions, tmux servers), delete the
        namespaces and management veths, remove sockets and the owner record. Idempotent.
        Raises RehearsalError if anything is left behind."""
        if not self.prefix:
            return
        spaces = [self.switch_netns, *(self.netns(n) for n in self.topology.nodes)]
        init_pids = {p.pid for p in self._inits.values()}
        try:
            _remove_everything(self.prefix, spaces, self.root, init_pids.__contains__)
        finally:
            for proc in [*self._inits.values(), *self._spawned]:  # our children: reap them
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        left = {k: v for k, v in self.leftovers().items() if v}
        if left:
            raise RehearsalError(f"teardown of rehearsal {self.prefix} left behind: {left}")

    def leftovers(self) -> dict[str, list[str]]:
        return leftovers(self.prefix, self.root)

    # ------------------------------------------------------------------ using the hosts

    def exec(self, node: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in the node's network namespace (as the test process, not through ssh)."""
        return run(["ip", "netns", "exec", self.netns(node), *argv], what=f"{node}: exec", check=check,
                   timeout=timeout, input=input)

    def spawn(self, node: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv in the node's namespace in the background; killed and reaped at teardown."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns(node), *map(str, argv)], **popen_kwargs)
        self._spawned.append(proc)
        return proc

    def ssh_argv(self, node: str) -> list[str]:
        """`ssh -F <ssh_config> [-J <jump>] <node>`: append a remote command."""
        self._node(node)
        jump = ["-J", self.jumps[node]] if node in self.jumps else []
        return ["ssh", "-F", str(self.ssh_config), *jump, node]

    def ssh(self, node: str, command: str | Sequence[str], *, check: bool = True, timeout: float = 30.0,
            options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """Run a remote command over real ssh (a string goes to the remote shell as is)."""
        cmd = command if isinstance(command, str) else shlex.join(command)
        argv = self.ssh_argv(node)
        argv[-1:-1] = list(options)
        return run([*argv, cmd], what=f"{node}: ssh", check=check, timeout=timeout)

    def pids(self, node: str) -> list[int]:
        return netns_pids(self.netns(node))

    def add_route(self, node: str, dest: str, via: str) -> None:
        self._ip(self.netns(node), "route", "add", dest, "via", via, what=f"{node}: add route {dest} via {via}")

    def remove_route(self, node: str, dest: str) -> None:
        self._ip(self.netns(node), "route", "del", dest, what=f"{node}: remove route {dest}")

    def stop_sshd(self, node: str) -> None:
        """The host stops answering ssh (its sshd exits; sessions already open stay, as on a real host)."""
        pid = self._sshd_pid(node)
        if pid is None:
            raise RehearsalError(f"{node}: sshd is not running")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid) and not _listening(self._inits[node].pid, SSH_PORT), timeout=5.0,
                 what=f"{node}: sshd (pid {pid}) to exit")
        (self.host_dir(node) / "sshd.pid").unlink(missing_ok=True)

    def start_sshd(self, node: str) -> None:
        """Start the node's sshd again after stop_sshd (hostinit runs it again on SIGUSR1)."""
        if self._sshd_pid(node) is not None:
            raise RehearsalError(f"{node}: sshd is already running")
        os.kill(self._inits[node].pid, signal.SIGUSR1)
        self._wait_sshd(node)

    def shape(self, node: str, network: str, rate_mbit: float, delay_ms: float | None = None) -> None:
        """Limit the node's link to `network` to rate_mbit (TCP goodput) both ways: tbf on the
        node's veth (egress) and on its bridge-side peer (traffic towards the node). A delay needs
        netem, which not every kernel has (this CI kernel has not): then RehearsalError says so."""
        a = self.attachment(node, network)
        mechanism = TBF if delay_ms is None else NETEM
        profile = LinkProfile(name=f"rehearsal-{node}-{network}", delay_ms=delay_ms or 0.0, jitter_ms=0.0,
                              loss_pct=0.0, rate_mbit=rate_mbit)
        for ns, dev in ((self.netns(node), a.dev), (self.switch_netns, a.peer)):
            for cmd in shaping_commands(profile, mechanism, dev):
                proc = run(["ip", "netns", "exec", ns, *cmd], what=f"{node}: shape {network}", check=False)
                if proc.returncode != 0 and "qdisc kind is unknown" in proc.stderr:
                    raise RehearsalError(f"{node}: shape {network} with delay_ms={delay_ms}: this kernel has no "
                                         f"{mechanism} qdisc (tbf, which shapes only the rate, is there)")
                if proc.returncode != 0:
                    raise RehearsalError(f"{node}: shape {network}: `{shlex.join(cmd)}` in {ns} failed: {proc.stderr.strip()}")

    def unshape(self, node: str, network: str) -> None:
        """Remove shape()'s qdiscs (back to the veth's default, no queue)."""
        a = self.attachment(node, network)
        for ns, dev in ((self.netns(node), a.dev), (self.switch_netns, a.peer)):
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], what=f"{node}: unshape {network}")

    # ------------------------------------------------------------------ the topology for the launcher

    def host_block(self, node: str) -> dict:
        """The `host:` entry of `node` in write_topology()'s file (schema of the launcher)."""
        block: dict = {"ssh": node, "user": "root", "port": SSH_PORT}
        if node in self.jumps:
            block["jump"] = self.jumps[node]
        block.update(os="linux", python=sys.executable, workdir=str(self.host_dir(node) / "smolcluster"))
        return block

    def write_topology(self, out_path: str | Path) -> Path:
        """A copy of the topology file with a `host:` block added to every node; everything else
        as it was (a relative `profiles:` path is made absolute so the copy still finds it)."""
        raw = read_yaml(self.topology_path, what="topology file")
        if isinstance(raw.get("profiles"), str):
            raw["profiles"] = str((self.topology_path.parent / raw["profiles"]).resolve())
        for name, body in raw["nodes"].items():
            body["host"] = self.host_block(str(name))
        out = Path(out_path)
        out.write_text(yaml.safe_dump(raw, sort_keys=False))
        return out
