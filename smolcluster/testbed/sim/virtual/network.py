"""The virtual backend's network: every hop of every worker's path as two link directions (up towards the
server, down away from it), messages delivered in virtual time, and the Toxiproxy API's faults on them.

A message crosses its path hop by hop, cut-through like the local backend's streaming proxies: at each
hop it waits until the hop's direction is free (hops are shared: pi4's traffic and mini3's own cross
mini3->mini1 one after the other), takes size / rate to send, and its bytes arrive delay ± jitter later
(jitter seeded per hop and direction, uniform like the embedded proxy's latency toxic). A connection
never reorders (TCP): a message is delivered no earlier than the one before it.

Not modelled: packet loss (as on the local backend: TCP would retransmit), TCP slow start and windows,
per-byte proxy overhead, heartbeats (a paused peer is not timed out; a partition resets connections,
as a disabled Toxiproxy proxy does).
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from smolcluster.common.errors import ConnectionClosed, ProxyError, RecvTimeout
from smolcluster.core.algorithms.base import message_bytes
from smolcluster.core.net.wire import Message
from smolcluster.testbed.profiles import LinkProfile
from smolcluster.testbed.sim.hops import HopPlan
from smolcluster.testbed.sim.virtual.scheduler import Scheduler, Waitable

STREAMS = ("upstream", "downstream")  # Toxiproxy's names: upstream = towards the server


@dataclass
class Direction:
    """One direction of one hop: its rate, delay and jitter (plus fault toxics), and when it is next free."""

    name: str  # "pi4->mini3 upstream"
    rate_mbit: float
    delay_ms: float
    jitter_ms: float
    rng: random.Random
    busy_until: float = 0.0
    toxics: dict[str, dict[str, Any]] = field(default_factory=dict)  # fault toxics, by name
    bytes: int = 0

    def bytes_per_s(self) -> float:
        rate = self.rate_mbit * 1e6 / 8
        for t in self.toxics.values():
            if t["type"] == "bandwidth":
                rate = min(rate, max(1, t["attributes"]["rate"]) * 1000.0)  # KB/s, 1 KB = 1000 bytes
        return rate

    def delay_s(self) -> float:
        delay, jitters = self.delay_ms, [self.jitter_ms]
        for t in self.toxics.values():
            if t["type"] == "latency":
                delay += t["attributes"].get("latency", 0)
                jitters.append(t["attributes"].get("jitter", 0))
        for jitter in jitters:  # one draw per jitter source, in a fixed order: seeded and repeatable
            if jitter:
                delay += self.rng.uniform(-jitter, jitter)
        return max(0.0, delay) / 1000.0


class Hop:
    """A hop of the local backend's plan (the same names: 'pi4->mini3'), both directions."""

    def __init__(self, plan: HopPlan, seed: int):
        self.plan, self.name = plan, plan.name
        p: LinkProfile = plan.profile
        self.up = Direction(f"{plan.name} upstream", p.up_mbit, p.delay_ms, p.jitter_ms, random.Random(f"{seed}:{plan.name}:up"))
        self.down = Direction(f"{plan.name} downstream", p.down_mbit, p.delay_ms, p.jitter_ms,
                              random.Random(f"{seed}:{plan.name}:down"))
        self.enabled = True
        self.connections_total = 0

    def stream(self, name: str) -> Direction:
        return self.up if name == "upstream" else self.down


def transmit(path: list[Direction], size: int, now: float) -> float:
    """When the last byte of `size` bytes sent at `now` arrives at the end of `path` (cut-through)."""
    head = tail = now
    for d in path:
        start = max(head, d.busy_until)
        end = max(start + size / d.bytes_per_s(), tail)  # the last byte cannot leave before it arrived
        d.busy_until = end
        d.bytes += size
        delay = d.delay_s()
        head, tail = start + delay, end + delay
    return tail


class Endpoint:
    """One end of a simulated TCP connection (the Connection interface the nodes use)."""

    def __init__(self, net: "VirtualNetwork", node: str, peer: str, out: list[Direction], hops: list[Hop]):
        self.net, self.node, self.peer = net, node, peer
        self.out, self.hops = out, hops
        self.other: Optional[Endpoint] = None
        self.inbox: deque[Message] = deque()
        self.changed = Waitable(net.sched)
        self.closed = False
        self.close_reason = ""
        self.authenticated = True  # in one process: nobody else can speak on it
        self.bytes_sent = self.bytes_received = 0
        self.last_arrival = 0.0  # at the other end: keeps the connection in order
        self.on_message: Optional[Callable[[Message], None]] = None  # the server's end: frames go to its events
        self.on_close: Optional[Callable[[str], None]] = None
        self.hello: Any = None  # the server's end: the peer's HELLO once it came
        self.layouts: tuple[Any, ...] = ()  # the flat layouts agreed with the peer (see agree())

    # what the nodes call
    def send(self, msg: Message, *, timeout: Optional[float] = None) -> int:
        if self.closed:
            raise ConnectionClosed(f"connection closed ({self.close_reason})", peer=self.peer)
        # the fields as the wire would carry them (JSON); named tensors are handed over (every sender builds
        # fresh ones), a flat buffer is copied (it may be the sender's live gradient buffer, as the socket
        # copies it out) and goes by name when this end agreed no such layout, as Connection sends it
        fields = json.loads(json.dumps(msg.fields))
        if msg.flat is not None and any(msg.layout.digest == a.digest for a in self.layouts):
            msg = Message(msg.kind, fields, flat=msg.flat.clone(), layout=msg.layout)
        else:
            msg = Message(msg.kind, fields, tensors=msg.named(), quant=msg.quant)
        size = message_bytes(msg)
        self.bytes_sent += size
        arrival = max(transmit(self.out, size, self.net.sched.now), self.last_arrival)
        self.last_arrival = arrival
        other = self.other
        self.net.sched.at(arrival, lambda: other._deliver(msg, size))
        return size

    def recv(self, *, timeout: Optional[float] = None, **_: Any) -> Message:
        self.net.sched.wait(lambda: bool(self.inbox) or self.closed, self.changed, timeout)
        if self.inbox:
            return self.inbox.popleft()
        if self.closed:
            raise ConnectionClosed(f"connection closed ({self.close_reason})", peer=self.peer)
        raise RecvTimeout("no message within the timeout (the peer is alive but sent nothing)", peer=self.peer)

    def close(self, reason: str = "", *, graceful: bool = False, linger: float = 1.0) -> None:
        """Close this end; the other end learns it after what was sent before has arrived."""
        if self.closed:
            return
        self._closed(reason or "closed")
        other = self.other
        arrival = max(transmit(self.out, 0, self.net.sched.now), self.last_arrival)
        self.net.sched.at(arrival, lambda: other._closed(f"peer closed: {reason or 'closed'}"))

    def reset(self, reason: str) -> None:
        """Both ends lose the connection now (a disabled proxy, a killed process)."""
        self._closed(reason)
        if self.other is not None:
            self.other._closed(reason)

    def interrupt(self) -> None:
        self.close("interrupted")

    def agree(self, *layouts: Any, buffers: int = 3) -> None:
        """Connection.agree: flat messages in these layouts go as one buffer from now on."""
        self.layouts = layouts

    def admit(self) -> None: ...

    def start_heartbeats(self) -> None: ...

    # the network's side
    def _deliver(self, msg: Message, size: int) -> None:
        if self.closed:
            return
        self.bytes_received += size
        if msg.flat is not None:  # read in this end's own layout object, as Connection.recv hands it out
            mine = [a for a in self.layouts if a.digest == msg.layout.digest]
            msg = Message(msg.kind, msg.fields, flat=msg.flat, layout=mine[0]) if mine else \
                Message(msg.kind, msg.fields, tensors=msg.named(), quant=msg.quant)
        if self.on_message is not None:
            self.on_message(msg)
        else:
            self.inbox.append(msg)
            self.changed.notify()

    def _closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        self.net.connections.pop(self, None)
        self.changed.notify()
        if self.on_close is not None:
            self.on_close(reason)


class VirtualListener:
    """The server's listener (Listener's interface): accepted connections go to `on_connection`."""

    def __init__(self, net: "VirtualNetwork", node: str, address: tuple[str, int], on_connection: Callable[[Endpoint], None]):
        self.net, self.node, self.address, self.on_connection = net, node, address, on_connection
        self.refused = 0

    def start(self) -> None:
        self.net.listeners[self.node] = self

    def close(self) -> None:
        if self.net.listeners.get(self.node) is self:
            del self.net.listeners[self.node]
        for ep in list(self.net.connections):
            if ep.node == self.node:
                ep.reset("server closed its listener")


class VirtualNetwork:
    """Every hop of the topology's worker paths (the local backend's hop plan), and the open connections."""

    def __init__(self, sched: Scheduler, plans: list[HopPlan], paths: dict[str, list[str]], server: str, seed: int):
        self.sched, self.server = sched, server
        self.hops = {p.name: Hop(p, seed) for p in plans}
        self.paths = paths  # worker -> hop names, first hop first
        self.listeners: dict[str, VirtualListener] = {}
        self.connections: dict[Endpoint, None] = {}  # insertion-ordered: resets happen in a fixed order

    def route(self, worker: str) -> list[Hop]:
        return [self.hops[name] for name in self.paths[worker]]

    def connect(self, worker: str) -> Endpoint:
        """Dial the server from `worker` (inside its process): one round trip, then a connection or an error."""
        hops = self.route(worker)
        up, down = [h.up for h in hops], [h.down for h in reversed(hops)]
        self.sched.sleep(transmit(up, 64, self.sched.now) - self.sched.now)  # SYN
        listener = self.listeners.get(self.server)
        cut = next((h.name for h in hops if not h.enabled), None)
        if cut is not None:
            raise ConnectionClosed(f"connection refused: link {cut} is down", peer=self.server)
        if listener is None:
            raise ConnectionClosed("connection refused: the server is not listening", peer=self.server)
        client, server_end = Endpoint(self, worker, self.server, up, hops), Endpoint(self, self.server, worker, down, hops)
        client.other, server_end.other = server_end, client
        self.connections.update({client: None, server_end: None})
        for h in hops:
            h.connections_total += 1
        listener.on_connection(server_end)
        self.sched.sleep(transmit(down, 64, self.sched.now) - self.sched.now)  # SYN-ACK
        if client.closed:
            raise ConnectionClosed(f"connection reset while connecting ({client.close_reason})", peer=self.server)
        return client

    def reset_node(self, node: str, reason: str) -> None:
        for ep in list(self.connections):
            if ep.node == node and not ep.closed:
                ep.reset(reason)

    def reset_hop(self, hop: Hop, reason: str) -> None:
        for ep in list(self.connections):
            if hop in ep.hops and not ep.closed:
                ep.reset(reason)


class VirtualToxiproxy:
    """The part of the Toxiproxy client API the fault actions use, acting on the virtual hops: partition
    (disable: resets the hop's connections and refuses new ones, as Toxiproxy does), latency and bandwidth
    toxics. Other toxics are not modelled: adding one fails, and the injector logs the fault as failed."""

    api_url = "virtual"

    def __init__(self, net: VirtualNetwork):
        self.net = net

    def _hop(self, proxy: str) -> Hop:
        hop = self.net.hops.get(proxy)
        if hop is None:
            raise ProxyError(f"proxy not found: {proxy}", 404)
        return hop

    def disable(self, proxy: str) -> None:
        hop = self._hop(proxy)
        hop.enabled = False
        self.net.reset_hop(hop, f"link {proxy} partitioned")

    def enable(self, proxy: str) -> None:
        self._hop(proxy).enabled = True

    def add_toxic(self, proxy: str, type: str, attributes: dict[str, Any], stream: str = "downstream",
                  name: Optional[str] = None, toxicity: float = 1.0) -> dict[str, Any]:
        if type not in ("latency", "bandwidth"):
            raise ProxyError(f"toxic {type!r} is not modelled by the virtual backend (latency and bandwidth are)", 400)
        name = name or f"{type}_{stream}"
        toxic = {"name": name, "type": type, "stream": stream, "toxicity": toxicity, "attributes": dict(attributes)}
        direction = self._hop(proxy).stream(stream)
        if name in direction.toxics:
            raise ProxyError(f"toxic already exists: {name}", 409)
        direction.toxics[name] = toxic
        return toxic

    def remove_toxic(self, proxy: str, name: str) -> None:
        hop = self._hop(proxy)
        for d in (hop.up, hop.down):
            if d.toxics.pop(name, None) is not None:
                return
        raise ProxyError(f"toxic not found: {name}", 404)

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        hop = self._hop(proxy)
        return [*hop.up.toxics.values(), *hop.down.toxics.values()]
