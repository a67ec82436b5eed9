"""What each fault action does to a running cluster, and how it is undone.

Only the ClusterControl protocol is used: process faults through kill/pause/resume/restart (signals
on the local backend, docker on compose), network faults through the Toxiproxy API of the link
proxies (embedded proxy or a real Toxiproxy alike). Toxics a fault adds are named
"fault:<fault name>:<stream>" so healing removes exactly those and never a link profile's own toxics.
"""

from __future__ import annotations

from smolcluster.common.errors import ProxyError
from smolcluster.testbed.faults.schedule import Fault
from smolcluster.testbed.control import ClusterControl, LinkHandle

TOXIC_PREFIX = "fault:"

# action -> (Toxiproxy toxic type, {toxic attribute: fault parameter})
TOXICS: dict[str, tuple[str, dict[str, str]]] = {
    "latency_spike": ("latency", {"latency": "latency_ms", "jitter": "jitter_ms"}),
    "bandwidth_collapse": ("bandwidth", {"rate": "rate_kbps"}),
    "connection_reset": ("reset_peer", {"timeout": "timeout_ms"}),
    "slow_close": ("slow_close", {"delay": "delay_ms"}),
    "data_limit": ("limit_data", {"bytes": "bytes"}),
}


def links_for(fault: Fault, cluster: ClusterControl) -> list[LinkHandle]:
    """The proxies a network fault acts on: one link (either direction's name), or every link of a node."""
    if fault.target_kind == "node":
        return cluster.links_of(fault.target)
    src, _, dst = fault.target.partition("->")
    return [h for h in cluster.links() if h.name == fault.target or {h.src, h.dst} == {src, dst}]


def _streams(fault: Fault) -> list[str]:
    stream = fault.params.get("stream", "both")
    return ["upstream", "downstream"] if stream == "both" else [stream]


def toxic_name(fault: Fault, stream: str) -> str:
    return f"{TOXIC_PREFIX}{fault.name}:{stream}"


def fire(fault: Fault, cluster: ClusterControl) -> list[str]:
    """Apply the fault. Returns what it touched (node or proxy names) for the log."""
    a, node = fault.action, fault.target
    if a == "kill" or a == "server_crash":
        cluster.kill(node)
    elif a == "pause":
        cluster.pause(node)
    elif a == "resume":
        cluster.resume(node)
    elif a == "restart":
        cluster.restart(node)
    else:
        links = links_for(fault, cluster)
        if not links:
            raise ProxyError(f"fault {fault.name}: no link proxy matches {fault.target_kind} {fault.target}", 404)
        for link in links:
            if a == "partition":
                cluster.toxiproxy.disable(link.name)
            elif a == "heal":
                heal_link(cluster, link)
            else:
                toxic_type, attrs = TOXICS[a]
                for stream in _streams(fault):
                    cluster.toxiproxy.add_toxic(link.name, toxic_type, {k: fault.params[p] for k, p in attrs.items()},
                                                stream=stream, name=toxic_name(fault, stream))
        return [link.name for link in links]
    return [node]


def heal(fault: Fault, cluster: ClusterControl) -> None:
    """Undo a fault that lasts (kill, pause, server crash, partition, toxics). Safe to call twice."""
    a, node = fault.action, fault.target
    if a in ("kill", "server_crash"):
        if not cluster.alive(node):
            cluster.restart(node)  # a worker rejoins; the server comes back with --resume
    elif a == "pause":
        cluster.resume(node)
    elif a == "partition":
        for link in links_for(fault, cluster):
            cluster.toxiproxy.enable(link.name)
    elif a in TOXICS:
        for link in links_for(fault, cluster):
            for stream in _streams(fault):
                _remove_toxic(cluster, link.name, toxic_name(fault, stream))


def heal_link(cluster: ClusterControl, link: LinkHandle) -> None:
    """Enable the proxy and remove every toxic a fault added (the link profile's toxics stay)."""
    cluster.toxiproxy.enable(link.name)
    for toxic in cluster.toxiproxy.toxics(link.name):
        if str(toxic.get("name", "")).startswith(TOXIC_PREFIX):
            _remove_toxic(cluster, link.name, toxic["name"])


def _remove_toxic(cluster: ClusterControl, proxy: str, name: str) -> None:
    try:
        cluster.toxiproxy.remove_toxic(proxy, name)
    except ProxyError as e:
        if e.status != 404:  # already gone (healed by a `heal` entry): nothing to undo
            raise


def undoes(undo: Fault, active: Fault) -> bool:
    """Whether the explicit action `undo` (resume, heal, restart) ends the active fault `active`."""
    if undo.action == "resume":
        return active.action == "pause" and active.target == undo.target
    if undo.action == "restart":
        return active.action in ("kill", "pause", "server_crash") and active.target == undo.target
    if undo.action == "heal" and (active.action in TOXICS or active.action == "partition"):
        if undo.target_kind == "node":
            return undo.target == active.target or (active.target_kind == "link" and undo.target in active.target.split("->"))
        return active.target_kind == "link" and active.target == undo.target
    return False
