"""DDP: PyTorch DistributedDataParallel over gloo, the baseline every practitioner knows.

Every worker node is one DDP rank (smolcluster rank r is DDP rank r - 1, one process each) training its own
shard with the same model, optimizer, batch and clipping as the parameter-server workers; every step
all-reduces the gradients of all ranks, so every step waits for the slowest.

The smolcluster server does not train. It hosts the rendezvous (a torch TCPStore), tells each joiner its
DDP rank and the store's port, and evaluates the model that DDP rank 0 sends it every `eval_steps` steps
over the normal smolcluster connection, writing the same metrics, checkpoints and summary as the other
servers. Its reply comes after the evaluation, so an evaluation pauses training as it does on a parameter
server (rank 0 waits for it, the others at the next all-reduce).

Device speed: a rank's forward and backward are stretched like any worker's compute (ctx.stretch), in a
DDP communication hook that runs before the gradients are all-reduced, so the slow rank delays every step.

Routed gloo (`ddp_routes: true`, set by the local sim): gloo connects every pair of ranks directly, to the
addresses they publish in the store. With routes each rank publishes its gloo address under
`smolcluster/listen/<rank>` and, before gloo reads a peer's address, swaps it for the one the store holds
under `smolcluster/route/<rank>/<peer>` (the testbed's hop proxies between the two nodes).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import time
from typing import Any

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from smolcluster.common.errors import BadField, ConfigError, SmolclusterError, TransportError
from smolcluster.common.fields import shown
from smolcluster.common.files import write_atomic
from smolcluster.core.algorithms.base import Peer, ServerBase, WorkerBase, WorkerInterrupted
from smolcluster.core.training.checkpoint import CheckpointError
from smolcluster.core.training.config import cluster_config_file
from smolcluster.core.training.optim import train_step
from smolcluster.core.net import messages
from smolcluster.core.net.wire import Message, MessageKind

LISTEN_KEY = "smolcluster/listen/{rank}"  # a rank's gloo address, "ip:port"
ROUTE_KEY = "smolcluster/route/{src}/{dst}"  # where rank src connects to reach rank dst instead, "ip:port"
SETUP = "ddp_setup"  # the field that marks the server's rendezvous message
RENDEZVOUS_FILE = "rendezvous.json"  # in the server's run dir: {"store_port": N}, for whoever routes gloo (the sim)


def _store_timeout(cluster: Any) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(60.0, 2 * cluster.idle_timeout))


class Server(ServerBase):
    algorithm = "ddp"

    def __init__(self, ctx, *, bind: str, port: int, resume: bool):
        file = cluster_config_file(ctx.cfg.config_dir, "ddp")
        if resume:
            raise CheckpointError("DDP cannot resume: its optimizer state lives in the ranks, and a DDP group cannot "
                                  "rejoin a run; start a new run instead of --resume")
        if ctx.cfg.cluster.server_trains:
            raise ConfigError(file, "server_trains", "DDP's server does not train (it hosts the rendezvous and evaluates)",
                              "remove server_trains, or use edp or syncps")
        super().__init__(ctx, bind=bind, port=port, resume=False)
        self.store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                                   timeout=_store_timeout(self.cluster))
        self.world = self.cluster.num_workers
        write_atomic(ctx.run_dir / RENDEZVOUS_FILE, json.dumps({"store_port": self.store.port}))

    def loop(self) -> None:
        while not (self.ever_joined and all(s.finished for s in self.stats.values())):
            self.next_event(timeout=0.5)
            if self.idle_too_long():
                self.stop_reason = self.idle_stop_reason()
                self.log.warning(f"stopping: {self.stop_reason}")
                return
        if self.cluster.max_steps and self.version >= self.cluster.max_steps:
            self.stop_reason = f"max_steps {self.cluster.max_steps} reached"

    def on_join(self, peer: Peer) -> None:
        peer.send(Message(MessageKind.WEIGHTS, {"version": self.version, "step": self.step, SETUP: True,
                                                "store_port": self.store.port, "world_size": self.world,
                                                "ddp_rank": peer.rank - 1, "routes": self.cluster.ddp_routes}))

    def on_push(self, peer: Peer, push: messages.Push, msg: Message) -> None:
        st = self.stats[peer.rank]
        try:
            if peer.rank != 1:
                raise BadField("PUSH", "rank", "only DDP rank 0 (smolcluster rank 1) pushes its weights")
            if push.worker_step < self.version:
                raise BadField("PUSH", "worker_step", f"is {push.worker_step}, before the last evaluated step {self.version}")
            # rank 0 pushes every eval_steps steps: at most that many steps' samples
            self.check_push(push, max_samples=self.nn.batch_size * self.nn.eval_steps, max_worker_step=self.max_worker_step)
            weights = self.decode_push(msg)
        except BadField as e:
            self.reject(peer.rank, e.reason, e.problem)
            return self.reply_rejected(peer, e.problem)
        self.flat.load(weights)  # rank 0's model, as one buffer
        self.version = self.step = push.worker_step
        self.count_applied(peer.rank)
        st.record_push(push.samples, staleness=0, now=self.clock.monotonic())
        st.reported_steps = push.worker_step
        self.after_update(source=peer.rank, staleness=0, loss=push.loss)  # evaluates every eval_steps
        peer.send(Message(MessageKind.ACK, {"status": "applied", "version": self.version}))

    def reply_rejected(self, peer: Peer, reason: str) -> None:
        peer.send(Message(MessageKind.ACK, {"status": "rejected", "version": self.version, "reason": reason[:200]}))

    def summary_fields(self) -> dict[str, Any]:
        return {"ddp": {"backend": "gloo", "world_size": self.world, "routes": self.cluster.ddp_routes}}


class Worker(WorkerBase):
    algorithm = "ddp"

    def __init__(self, ctx, *, host: str, port: int):
        super().__init__(ctx, host=host, port=port)
        self.started_ddp = False
        self.server_version = 0  # the server's version when it last answered rank 0's push

    def train(self, welcome: Message) -> None:
        if self.started_ddp:  # a reconnect after DDP began: the group cannot take a rank back
            raise SmolclusterError("lost the server during DDP training; a DDP group cannot rejoin a run")
        setup = self.conn.recv(timeout=self.ctx.transport.io_timeout, schema=self.recv_schema)
        if setup.kind == MessageKind.BYE:
            return
        if not setup.fields.get(SETUP):
            raise SmolclusterError(f"expected the DDP rendezvous from the server, got {setup.kind.name}")
        f = setup.fields
        world, rank, port, routes = f.get("world_size"), f.get("ddp_rank"), f.get("store_port"), f.get("routes", False)
        if not (type(world) is int and 1 <= world <= 1 << 16 and type(rank) is int and 0 <= rank < world
                and type(port) is int and 0 < port < 65536 and type(routes) is bool):
            raise SmolclusterError(f"the server's DDP rendezvous is malformed: world_size {shown(world)}, ddp_rank "
                                   f"{shown(rank)}, store_port {shown(port)}, routes {shown(routes)}")
        self.started_ddp = True
        try:
            self._train_ddp(rank, world, port, routes)
        except TransportError as e:
            raise SmolclusterError(f"lost the server during DDP training ({e}); a DDP group cannot rejoin a run") from e

    def _train_ddp(self, rank: int, world: int, store_port: int, routes: bool) -> None:
        timeout = _store_timeout(self.cluster)
        store: Any = dist.TCPStore(self.host, store_port, is_master=False, timeout=timeout)
        ip = _local_address(self.host, self.port)
        _bind_gloo_to(ip)
        if routes:
            store = RoutedStore(store, rank, world, ip)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            model = DistributedDataParallel(self.model)
            hook = StretchedAllReduce(self.ctx.stretch)
            model.register_comm_hook(dist.group.WORLD, hook.allreduce)
            routed = len(store.routed) if routes else 0
            self.log.info(f"DDP rank {rank} of {world} (gloo on {ip}"
                          + (f", {routed} peers through the sim's links)" if routes else ", direct links)"))
            self.ctx.metrics.write("ddp_ready", ddp_rank=rank, world_size=world, gloo_address=ip,
                                   routes=routes, routed_peers=routed)
            total = min(self.total_steps, self.cluster.max_steps) if self.cluster.max_steps else self.total_steps
            samples_since_push = 0
            for step in range(total):
                if self.interrupted:
                    raise WorkerInterrupted
                x, y = self.loader.batch_at(step)
                t0 = time.perf_counter()
                hook.start(t0)
                loss = train_step(model, self.optimizer, x, y, self.nn.gradient_clipping)
                self.comm_s += hook.comm_s
                self.compute_s += time.perf_counter() - t0 - hook.comm_s
                self.steps_done += 1
                self.samples_done += int(y.shape[0])
                samples_since_push += int(y.shape[0])
                self.version = step + 1
                if rank == 0 and (self.version % self.nn.eval_steps == 0 or self.version == total):
                    self.push_weights(loss, samples_since_push)
                    samples_since_push = 0
                self.record(step, loss)
        finally:
            dist.destroy_process_group()

    def push_weights(self, loss: float, samples: int) -> None:
        """Rank 0: the model after this step to the server, which evaluates it before replying."""
        push = Message(MessageKind.PUSH, {"base_version": self.server_version, "worker_step": self.version, "samples": samples,
                                          "loss": loss, "mode": "weights"}, flat=self.flat.snapshot(), layout=self.flat.layout)
        _, typed = self.exchange(push, timeout=self.reconnect_deadline())
        if isinstance(typed, messages.Ack):
            self.server_version = typed.version


class StretchedAllReduce:
    """DDP's all-reduce as a communication hook, after stretching this rank's compute to its device: the
    time since start() (forward and backward up to this bucket) is slowed by ctx.stretch. comm_s is the
    all-reduce's time in the step (transfer plus waiting for the slowest rank)."""

    def __init__(self, stretch):
        self.stretch = stretch
        self.mark = 0.0
        self.comm_s = 0.0

    def start(self, now: float) -> None:
        self.mark, self.comm_s = now, 0.0

    def allreduce(self, process_group, bucket):  # no annotations: DDP compares them with its own types
        self.stretch(time.perf_counter() - self.mark)
        launched = time.perf_counter()

        def done(fut):
            now = time.perf_counter()
            self.comm_s += now - launched
            self.mark = now  # the next bucket's compute counts from here
            return fut.value()

        return allreduce_hook(process_group, bucket).then(done)


def _local_address(host: str, port: int) -> str:
    """The address this node reaches the server from (no packet is sent): gloo listens there, so its peers,
    on the same routed networks, reach it as the server does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def _bind_gloo_to(ip: str) -> None:
    """Point gloo at the interface holding `ip` (unless GLOO_SOCKET_IFNAME already says where)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


class RoutedStore(dist.Store):
    """The rendezvous store as this rank's gloo sees it. Its own gloo address (an IPv4 sockaddr inside the
    value gloo sets: family, port, address) is published under LISTEN_KEY; in a value gloo reads, a peer's
    published address is replaced by the route to that peer (ROUTE_KEY), waited for until the testbed set it.
    gloo dials or waits by comparing the two addresses, so a route must keep that order (the testbed's does,
    and names the peer's own address for the pairs the peer dials)."""

    def __init__(self, inner: dist.Store, rank: int, world: int, ip: str):
        super().__init__()
        self.inner, self.rank, self.world = inner, rank, world
        self.ip = socket.inet_aton(ip)
        self.pattern = re.compile(b"\x02\x00.." + re.escape(self.ip), re.S)  # AF_INET, any port, this address
        self.own: bytes | None = None
        self.peers: dict[bytes, int] = {}  # a peer's sockaddr -> its rank
        self.routed: set[int] = set()

    def set(self, key, value):
        if self.own is None and (m := self.pattern.search(bytes(value))):
            self.own = m.group(0)
            self.inner.set(LISTEN_KEY.format(rank=self.rank), _address_text(self.own))
        return self.inner.set(key, value)

    def get(self, key):
        value = bytes(self.inner.get(key))
        for m in list(self.pattern.finditer(value)):
            peer = self._peer(m.group(0))
            if peer is not None:
                route = _sockaddr(self.inner.get(ROUTE_KEY.format(src=self.rank, dst=peer)).decode())
                value = value[:m.start()] + route + value[m.end():]  # same length: offsets stay
                if route != m.group(0):  # this rank dials that peer through the route
                    self.routed.add(peer)
        return value

    def _peer(self, addr: bytes) -> int | None:
        """The rank that published `addr` (None: this rank's own, or no rank's)."""
        if addr == self.own:
            return None
        if addr not in self.peers:
            for r in range(self.world):
                if r != self.rank:
                    self.peers[_sockaddr(self.inner.get(LISTEN_KEY.format(rank=r)).decode())] = r
        return self.peers.get(addr)

    def add(self, key, amount):
        return self.inner.add(key, amount)

    def compare_set(self, key, expected, desired):
        return self.inner.compare_set(key, expected, desired)

    def wait(self, keys, timeout=None):
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def check(self, keys):
        return self.inner.check(keys)

    def delete_key(self, key):
        return self.inner.delete_key(key)

    def num_keys(self):
        return self.inner.num_keys()

    def set_timeout(self, timeout):
        return self.inner.set_timeout(timeout)


def _sockaddr(address: str) -> bytes:
    """"127.0.0.1:4000" as the first 8 bytes of a sockaddr_in: family (AF_INET, little-endian), port, address."""
    host, _, port = address.rpartition(":")
    return b"\x02\x00" + int(port).to_bytes(2, "big") + socket.inet_aton(host)


def _address_text(sockaddr: bytes) -> str:
    return f"{socket.inet_ntoa(sockaddr[4:8])}:{int.from_bytes(sockaddr[2:4], 'big')}"
