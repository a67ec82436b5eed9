"""The nodes of a virtual run: the registry's own Server and Worker classes, with only their I/O and clock
swapped. A virtual server is `type("VirtualServer", (VirtualServerIO, Algorithm.Server), ...)`: the
mixin overrides the three I/O hooks of ServerBase (listen, new_peer, _on_connection) and WorkerBase
(dial); every decision (on a push, a pull, a deadline) is the algorithm's code, unchanged.

Compute takes modelled time, never measured time (so the machine's load cannot change a result): a
training step costs ms_per_sample x samples (the device's own ms_per_sample when its profile has one,
else the reference device's x the node's slowdown, as the local backend stretches), an evaluation
EVAL_COST x ms_per_sample per test sample, on the evaluating node's clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from smolcluster.common.errors import ConnectFailed, TransportError
from smolcluster.core.algorithms.base import Join, Left, message_bytes, wire_layouts
from smolcluster.core.net.transport import RetryPolicy
from smolcluster.core.net.wire import Message, MessageKind
from smolcluster.core.training.context import NodeContext
from smolcluster.core.training.data import ImageSet, ShardLoader, load_mnist, shard_indices
from smolcluster.core.training.tasks import MnistTask
from smolcluster.testbed.sim.virtual.network import Endpoint, VirtualListener, VirtualNetwork

# What one evaluation sample costs relative to one training sample (forward only, in batches of 1000):
# measured here for SimpleNN, 0.0092 vs 0.0388 ms per sample.
EVAL_COST = 0.24


@dataclass
class VirtualContext(NodeContext):
    """A node's context whose compute advances its virtual clock by the modelled duration."""

    ms_per_sample: float = 0.0  # this node's training step, per sample (slowdown included)

    def stretch(self, compute_seconds: float, samples: int = 0) -> None:
        self.clock.sleep(samples * self.ms_per_sample / 1000.0)

    def peak_rss_mb(self) -> float | None:
        return None  # every node shares one process: RUN_DIR/virtual.json has the run's peak


class SharedTask:
    """One task for every node of a virtual run: MNIST is read once, each rank still trains on its own
    disjoint shard (MnistTask.batches, without re-reading the files); evaluation costs modelled time."""

    def __init__(self, task: Any, eval_samples: int = 10_000):
        self.task = task
        self.eval_samples = eval_samples
        self._train: ImageSet | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def batches(self, shard: int) -> Any:
        if not isinstance(self.task, MnistTask):
            return self.task.batches(shard)
        t = self.task
        if self._train is None:
            self._train = load_mnist("train", t.data_dir)
        idx = shard_indices(len(self._train.labels), t.num_shards, shard, t.seed)
        part = ImageSet(images=self._train.images[idx], labels=self._train.labels[idx])
        return ShardLoader(part, torch.arange(len(idx)), t.batch_size, seed=t.seed + shard + 1)

    def evaluate_on(self, ctx: VirtualContext, model: torch.nn.Module) -> tuple[float, float]:
        result = self.task.evaluate(model)
        ctx.clock.sleep(self.eval_samples * EVAL_COST * ctx.ms_per_sample / 1000.0)
        return result


class NodeTask:
    """The shared task as one node sees it (its evaluations take its own virtual time)."""

    def __init__(self, shared: SharedTask, ctx: VirtualContext):
        self.shared, self.ctx = shared, ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shared, name)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        return self.shared.evaluate_on(self.ctx, model)


class VirtualPeer:
    """A joined worker on the server (Peer's interface): sends go straight onto the simulated link."""

    def __init__(self, conn: Endpoint, rank: int, hostname: str, on_closed: Callable[[Endpoint], None]):
        self.conn, self.rank, self.hostname = conn, rank, hostname
        self.bytes_queued = 0
        self.last_pull_step: int | None = None
        self.closing = False
        self._on_closed = on_closed
        self._closed = False

    def send(self, msg: Message) -> None:
        self.bytes_queued += message_bytes(msg)
        try:
            self.conn.send(msg)
        except TransportError:
            pass  # already closed: its Left event is on its way (or handled)

    def close(self, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self.conn.close(reason, graceful=True)
        self._on_closed(self.conn)

    def join(self, timeout: float) -> None: ...


class VirtualServerIO:
    """Mixed in before an algorithm's Server: its I/O on the virtual network."""

    network: VirtualNetwork
    address: tuple[str, int] = ("virtual", 0)

    def listen(self) -> VirtualListener:
        return VirtualListener(self.network, self.ctx.hostname, self.address, self._on_connection)

    def new_peer(self, conn: Endpoint, rank: int, hostname: str) -> VirtualPeer:
        return VirtualPeer(conn, rank, hostname, self._closed_connection)

    def _on_connection(self, conn: Endpoint) -> None:
        """ServerBase._on_connection's job without a reader thread: the HELLO checked, then every frame
        parsed into the event queue as it arrives, and a lost connection as a Left."""
        conn.on_message = lambda msg: self._virtual_frame(conn, msg)
        conn.on_close = lambda reason: self._virtual_closed(conn, reason)

    def _virtual_frame(self, conn: Endpoint, msg: Message) -> None:
        if conn.hello is False:  # said BYE: its reader would have stopped reading
            return
        if conn.hello is None:
            problem, hello = self._check_hello(msg)
            if problem:
                self.messages_rejected["bad-hello"] += 1
                self.say.warning("bad-hello", f"dropping {conn.peer}: {problem}")
                conn.send(Message(MessageKind.ERROR, {"error": problem}))
                conn.close(problem)
                return
            conn.hello = hello
            if hello.layout:  # as ServerBase._on_connection: pushes and weights as one flat buffer from now on
                conn.agree(*wire_layouts(self.flat, self.quantized))
            self.events.put(Join(conn, hello.rank, hello.hostname))
            return
        self.events.put(self.incoming(conn, conn.hello.rank, msg))
        if msg.kind == MessageKind.BYE:
            conn.hello = False

    def _virtual_closed(self, conn: Endpoint, reason: str) -> None:
        if conn.hello:
            self.events.put(Left(conn, conn.hello.rank, reason, TransportError(reason, peer=conn.peer)))


class VirtualWorkerIO:
    """Mixed in before an algorithm's Worker: it dials the virtual network."""

    network: VirtualNetwork

    def dial(self, retry: RetryPolicy, on_retry: Callable[[int, float, Exception], None]) -> Endpoint:
        """connect()'s retries with backoff, in virtual time (seeded: the same delays every run)."""
        rng = random.Random(f"{self.cluster.seed}:dial:{self.rank}")
        started, attempt = self.clock.monotonic(), 0
        while True:
            try:
                return self.network.connect(self.ctx.hostname)
            except TransportError as e:
                attempt += 1
                delay = retry.delay(attempt, rng)
                if retry.deadline is not None and self.clock.monotonic() - started + delay > retry.deadline:
                    raise ConnectFailed(f"gave up after {attempt} attempts: {e}", peer=self.network.server) from None
                on_retry(attempt, delay, e)
                self.clock.sleep(delay)


def virtual_class(base: type, io: type, network: VirtualNetwork, **attrs: Any) -> type:
    """`base` (a registry algorithm's Server or Worker) with the virtual I/O mixed in."""
    return type(f"Virtual{base.__module__.rsplit('.', 1)[-1].capitalize()}{base.__name__}", (io, base),
                {"network": network, **attrs})
