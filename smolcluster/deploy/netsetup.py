"""`smolcluster topology netsetup FILE [--node N] [--apply]`: each node's addresses, routes and
forwarding as the commands of its OS, printed (default) or run over ssh (--apply, sudo where not root).

Interfaces come from `host.interfaces` (network -> name); where the topology does not say, the
printed commands carry a placeholder and --apply leaves an address alone that the host already has
(and fails, naming the key to set, for one it lacks). Every command is safe to run twice.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Callable

from smolcluster.deploy.hosts import hosts_of
from smolcluster.deploy.runner import Runner
from smolcluster.testbed.topology import Node, Topology


@dataclass(frozen=True)
class Step:
    what: str  # address | forwarding | route
    command: str  # for the node's OS; POSIX sh on linux/macos, PowerShell/cmd on windows


def _iface(node: Node, net: str) -> str | None:
    return node.host_spec.interfaces.get(net)


def linux_steps(topo: Topology, node: Node) -> list[Step]:
    out = []
    for net, addr in node.addresses.items():
        prefix = topo.networks[net].subnet.prefixlen
        dev = _iface(node, net)
        have = f"ip -o addr show | grep -q ' {addr}/{prefix} '"
        add = f"ip addr add {addr}/{prefix} dev {dev} && ip link set {dev} up" if dev else \
              f"echo 'set nodes.{node.name}.host.interfaces.{net} to the interface for {addr}/{prefix}' >&2; exit 1"
        out.append(Step("address", f"{have} || {{ {add}; }}"))
    if node.forwarding:
        out.append(Step("forwarding", "sysctl -w net.ipv4.ip_forward=1"))
    out += [Step("route", f"ip route replace {r.dest} via {r.via}") for r in node.routes]
    return out


def macos_steps(topo: Topology, node: Node) -> list[Step]:
    out = []
    for net, addr in node.addresses.items():
        mask = topo.networks[net].subnet.netmask
        dev = _iface(node, net) or f"<interface for {net}: bridge0 for a Thunderbolt Bridge, enN for USB Ethernet>"
        # ifconfig alias is immediate but lost on reboot; `networksetup -setmanual SERVICE ADDR MASK` persists.
        out.append(Step("address", f"ifconfig {shlex.quote(dev)} | grep -q 'inet {addr} ' || ifconfig {shlex.quote(dev)} inet {addr} netmask {mask} alias"))
    if node.forwarding:
        out.append(Step("forwarding", "sysctl -w net.inet.ip.forwarding=1"))
    out += [Step("route", f"route -n delete -net {r.dest} >/dev/null 2>&1; route -n add -net {r.dest} {r.via}") for r in node.routes]
    return out


def windows_steps(topo: Topology, node: Node) -> list[Step]:
    out = []
    for net, addr in node.addresses.items():
        mask = topo.networks[net].subnet.netmask
        dev = _iface(node, net) or f"<interface for {net}, e.g. Ethernet 2>"
        out.append(Step("address", f'netsh interface ipv4 add address "{dev}" {addr} {mask}'))
    if node.forwarding:
        out.append(Step("forwarding", "Set-NetIPInterface -Forwarding Enabled  # or: netsh interface ipv4 set interface \"<if>\" forwarding=enabled"))
    out += [Step("route", f"route -p ADD {r.dest.network_address} MASK {r.dest.netmask} {r.via}") for r in node.routes]
    return out


STEPS = {"linux": linux_steps, "macos": macos_steps, "windows": windows_steps}


def steps_for(topo: Topology, node: Node) -> list[Step]:
    return STEPS[node.host_spec.os](topo, node)


def format_steps(topo: Topology, names: list[str]) -> str:
    lines = []
    for name in names:
        node = topo.nodes[name]
        spec = node.host_spec
        lines.append(f"# {name} ({spec.os}; run as root/Administrator" + (", e.g. with sudo" if spec.os != "windows" else "") + ")")
        lines += [s.command for s in steps_for(topo, node)]
        lines.append("")
    return "\n".join(lines)


def apply(topo: Topology, names: list[str], runner: Runner, echo: Callable[[str], None]) -> bool:
    """Run each node's steps on its host over ssh, with `sudo -n` where the login is not root."""
    hosts = hosts_of(topo)
    ok = True
    for name in names:
        node, host = topo.nodes[name], hosts[name]
        if node.host_spec.os == "windows":
            echo(f"netsetup   {name:<10} SKIP  Windows needs an elevated PowerShell; run the printed commands there")
            ok = False
            continue
        for step in steps_for(topo, node):
            script = f'if [ "$(id -u)" = 0 ]; then sh -c {shlex.quote(step.command)}; else sudo -n sh -c {shlex.quote(step.command)}; fi'
            res = runner.ssh(host, script)
            level = "ok" if res.ok else "FAIL"
            echo(f"netsetup   {name:<10} {step.what:<10} {level:<4}  {step.command}" + ("" if res.ok else f"  ({res.reason()})"))
            ok &= res.ok
    return ok
