"""Machinery both algorithms share: the server's connection handling, accounting, evaluation,
checkpoints and summary, and the worker's connect / compute / reconnect loop.

Threads on the server: the Listener accepts and authenticates; one reader thread per worker turns
frames into events on a single queue; one sender thread per worker drains its outbox. Only the
main thread touches the model, so the algorithm code in syncps.py / edp.py reads like a loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.config import rank_of, to_dict
from smolcluster.common.errors import ConnectFailed, SmolclusterError, TransportError, TruncatedFrame, WireError
from smolcluster.core.training.models import loss_fn
from smolcluster.core.training.context import NodeContext
from smolcluster.core.training.optim import clip_, clip_grads_, tensor_norms
from smolcluster.core.training.tasks import Batches
from smolcluster.core.training.quantization import dequantize_state, quantize_state, quantized_schema
from smolcluster.core.training.telemetry import peak_rss_mb
from smolcluster.core.net.transport import Connection, Listener, RetryPolicy, connect
from smolcluster.core.net.wire import Message, MessageKind, Schema, schema_of
from smolcluster.common.files import write_atomic

# --------------------------------------------------------------------------- signals (server and worker)


@contextlib.contextmanager
def _signals_set_flag(node: Any, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """While a node's loop runs, these signals only set `node.interrupted`; the loop checks the flag at a
    point where stopping is clean (the server in next_event, within half a second; a worker at its next
    step). A KeyboardInterrupt raised by the default handler can land in a weakref callback or a __del__,
    where Python prints "Exception ignored" and drops it (a server then never stopped), or in the middle
    of sending a frame. A second signal while stopping interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if node.interrupted:
            raise KeyboardInterrupt
        node.interrupted = True

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


# --------------------------------------------------------------------------- server side


@dataclass
class Join:
    conn: Connection
    rank: int
    hostname: str
    fields: dict[str, Any]


@dataclass
class Incoming:
    conn: Connection
    rank: int
    msg: Message


@dataclass
class Left:
    conn: Connection
    rank: int
    reason: str
    error: Exception | None = None


@dataclass
class WorkerStats:
    rank: int
    hostname: str
    pushes: int = 0
    samples: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    late: int = 0
    rejected: int = 0
    joins: int = 0
    reported_steps: int = 0
    reported_samples_per_s: float | None = None
    first_push: float | None = None
    last_push: float | None = None
    finished: bool = False

    def record_push(self, samples: int, staleness: int, now: float) -> None:
        self.pushes += 1
        self.samples += samples
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self.first_push = self.first_push if self.first_push is not None else now
        self.last_push = now

    def summary(self) -> dict[str, Any]:
        span = (self.last_push - self.first_push) if self.first_push is not None and self.last_push is not None else 0.0
        sps = self.reported_samples_per_s if self.reported_samples_per_s is not None else (self.samples / span if span > 0 else 0.0)
        return {
            "rank": self.rank,
            "hostname": self.hostname,
            "steps": self.reported_steps,
            "pushes": self.pushes,
            "samples_per_s": round(sps, 2),
            "mean_staleness": round(self.staleness_sum / self.pushes, 3) if self.pushes else 0.0,
            "max_staleness": self.staleness_max,
            "late": self.late,
            "rejected": self.rejected,
            "joins": self.joins,
            "finished": self.finished,
        }


class Peer:
    """A connected worker: its connection and an outbox drained by a sender thread."""

    def __init__(self, conn: Connection, rank: int, hostname: str, events: queue.Queue, io_timeout: float):
        self.conn, self.rank, self.hostname = conn, rank, hostname
        self.joined_at = time.time()
        self._outbox: queue.Queue[Message | None] = queue.Queue()
        self._events = events
        self._io_timeout = io_timeout
        self._thread = threading.Thread(target=self._drain, name=f"send-{hostname}", daemon=True)
        self._thread.start()

    def send(self, msg: Message) -> None:
        self._outbox.put(msg)

    def _drain(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self.conn.send(msg, timeout=self._io_timeout)
            except SmolclusterError as e:
                self._events.put(Left(self.conn, self.rank, f"send failed: {e}", e))
                return

    def close(self, reason: str = "") -> None:
        """Send what is queued (a BYE, say), then close without losing it to a reset."""
        self._outbox.put(None)
        self._thread.join(timeout=self._io_timeout)
        self.conn.close(reason, graceful=True)


class ServerBase:
    """Owns the model. Subclasses implement loop() and on_push()."""

    algorithm: str = ""

    def __init__(self, ctx: NodeContext, *, bind: str, port: int, resume: bool):
        self.ctx = ctx
        self.cfg, self.nn, self.cluster = ctx.cfg, ctx.cfg.nn, ctx.cfg.cluster
        self.log = ctx.log
        self.bind, self.port = bind, port
        self.events: queue.Queue = queue.Queue()
        self.peers: dict[int, Peer] = {}
        self.stats: dict[int, WorkerStats] = {
            r: WorkerStats(r, h) for r, h in enumerate(self.cluster.workers, start=1)
        }
        self.applied = self.late = self.rejected = 0
        self.rejected_reasons: Counter[str] = Counter()
        self.connections_rejected = 0
        self.bytes_sent = self.bytes_received = 0  # of connections already closed
        self.ever_joined = False
        self.last_peer_seen = time.time()
        self.stop_reason = ""
        self.interrupted = False  # set by SIGINT/SIGTERM; next_event turns it into KeyboardInterrupt

        torch.manual_seed(self.cluster.seed)
        self.model = ctx.build_model()
        self.optimizer = ctx.build_optimizer(self.model)
        self.schema: Schema = schema_of(self.model)
        self.push_schema: Schema = {**self.schema, **quantized_schema(self.schema)} if self.cluster.use_quantization else self.schema
        self.version = 0
        self.step = 0
        self.server_data_step = 0
        self.worker_progress: dict[str, int] = {}
        self.own_loader: Batches | None = None
        if self.cluster.server_trains:
            self.own_loader = ctx.batches(rank=0)
        self._snapshot: tuple[int, dict[str, torch.Tensor], dict[str, dict]] | None = None
        self.checkpoint_dir = Path(self.cluster.checkpoint_dir) if self.cluster.checkpoint_dir else ctx.run_dir / "checkpoints"
        self.started = time.time()
        self.training_started: float | None = None
        self.last_eval: tuple[float, float] | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------ lifecycle

    def serve(self) -> dict[str, Any]:
        listener = Listener(self.bind, self.port, key=self.ctx.key, on_connection=self._on_connection,
                            config=self.ctx.transport, on_reject=self._on_reject, logger=self.log)
        listener.start()
        host, port = listener.address
        write_atomic(self.ctx.run_dir / "server.json", json.dumps({"host": host, "port": port, "pid": os.getpid()}))
        if self.version == 0:
            self.save()  # so a crash at any point can --resume, even before the first periodic checkpoint
        self.log.info(f"{self.algorithm} server listening on {host}:{port}, waiting for {self.cluster.num_workers} workers")
        self.ctx.metrics.write("start", algorithm=self.algorithm, version=self.version, step=self.step, port=port)
        try:
            with _signals_set_flag(self):
                # Evaluate the starting model first: unreadable evaluation data fails now, not after the
                # workers trained for a while, and the accuracy curve gets its first point.
                self.run_eval()
                self.loop()
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self.log.warning("interrupted: writing a final checkpoint and summary")
        finally:
            self._account_pending_leaves()
            # BYE first: closing the listener closes every accepted connection, and a worker that
            # loses its connection without a BYE keeps reconnecting instead of finishing.
            for peer in list(self.peers.values()):
                peer.send(Message(MessageKind.BYE, {"reason": self.stop_reason or "finished"}))
                self._retire(peer, "server finished")
            self.peers.clear()
            listener.close()
        return self.finish()

    def loop(self) -> None:
        raise NotImplementedError

    def _account_pending_leaves(self) -> None:
        """At the end, count connections that already failed (e.g. a bad frame) but were still queued."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, Left):
                self._left(ev)

    # ------------------------------------------------------------------ connection threads

    def _on_reject(self, peer: str, error: Exception) -> None:
        self.connections_rejected += 1  # counted from the listener thread; an int increment is atomic enough here

    def _on_connection(self, conn: Connection) -> None:
        """Runs in the listener's per-connection thread: hello, then read frames until the peer goes."""
        try:
            hello = conn.recv(timeout=self.ctx.transport.handshake_timeout)
        except SmolclusterError as e:
            self.log.warning(f"dropping {conn.peer}: no valid HELLO ({e})")
            conn.close(str(e))
            return
        problem = self._check_hello(hello)
        if problem:
            self.log.warning(f"dropping {conn.peer}: {problem}")
            try:
                conn.send(Message(MessageKind.ERROR, {"error": problem}), timeout=5)
            except SmolclusterError:
                pass
            conn.close(problem)
            return
        rank = int(hello.fields["rank"])
        self.events.put(Join(conn, rank, str(hello.fields["hostname"]), hello.fields))
        conn.start_heartbeats()
        while True:
            try:
                msg = conn.recv(timeout=None, schema=self.push_schema)
            except SmolclusterError as e:
                self.events.put(Left(conn, rank, str(e), e))
                return
            self.events.put(Incoming(conn, rank, msg))
            if msg.kind == MessageKind.BYE:
                return

    def _check_hello(self, hello: Message) -> str:
        f = hello.fields
        if hello.kind != MessageKind.HELLO:
            return f"expected HELLO, got {hello.kind.name}"
        if f.get("algorithm") != self.algorithm:
            return f"worker runs {f.get('algorithm')!r} but this server runs {self.algorithm!r} (start both with the same --algo)"
        rank, host = f.get("rank"), f.get("hostname")
        if not isinstance(rank, int) or not 1 <= rank <= self.cluster.num_workers:
            return f"rank {rank!r} is not a worker rank (1..{self.cluster.num_workers})"
        if host not in self.cluster.workers or rank_of(self.cluster, host) != rank:
            return f"hostname {host!r} with rank {rank} does not match 'workers' in the cluster config"
        return ""

    # ------------------------------------------------------------------ events

    def next_event(self, timeout: float) -> Any:
        if self.interrupted:
            raise KeyboardInterrupt  # here, in plain code: see _signals_set_flag
        try:
            ev = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(ev, Join):
            self._join(ev)
        elif isinstance(ev, Left):
            self._left(ev)
        elif isinstance(ev, Incoming):
            if self.peers.get(ev.rank) is None or self.peers[ev.rank].conn is not ev.conn:
                return None  # from a connection we already replaced
            self.last_peer_seen = time.time()
            if ev.msg.kind == MessageKind.BYE:
                self._bye(ev)
            elif ev.msg.kind == MessageKind.PUSH:
                self.on_push(self.peers[ev.rank], ev.msg)
            elif ev.msg.kind == MessageKind.PULL:
                self.on_pull(self.peers[ev.rank], ev.msg)
            else:
                self.log.warning(f"ignoring unexpected {ev.msg.kind.name} from {self.peers[ev.rank].hostname}")
        return ev

    def _join(self, ev: Join) -> None:
        old = self.peers.pop(ev.rank, None)
        if old is not None:
            self.log.info(f"{ev.hostname} reconnected; closing its previous connection")
            self._retire(old, "replaced by a new connection")
        peer = Peer(ev.conn, ev.rank, ev.hostname, self.events, self.ctx.transport.io_timeout)
        self.peers[ev.rank] = peer
        st = self.stats[ev.rank]
        st.joins += 1
        st.finished = False
        self.ever_joined = True
        self.last_peer_seen = time.time()
        fields = {"version": self.version, "step": self.step, "worker_step": self.worker_progress.get(str(ev.rank), 0)}
        peer.send(self.weights_message(MessageKind.WELCOME, fields))
        self.log.info(f"{ev.hostname} (rank {ev.rank}) joined at version {self.version}, step {self.step}")
        self.ctx.metrics.write("join", rank=ev.rank, host=ev.hostname, version=self.version, step=self.step)
        self.on_join(peer)

    def _left(self, ev: Left) -> None:
        peer = self.peers.get(ev.rank)
        if peer is None or peer.conn is not ev.conn:
            return
        del self.peers[ev.rank]
        self._retire(peer, ev.reason)
        self.last_peer_seen = time.time()
        if isinstance(ev.error, WireError):
            self.reject(ev.rank, f"{type(ev.error).__name__}", str(ev.error))
        self.log.warning(f"{peer.hostname} (rank {ev.rank}) left: {ev.reason}")
        self.ctx.metrics.write("leave", rank=ev.rank, host=peer.hostname, reason=ev.reason, version=self.version, step=self.step)
        self.on_leave(peer)

    def _bye(self, ev: Incoming) -> None:
        peer = self.peers.pop(ev.rank)
        st = self.stats[ev.rank]
        f = ev.msg.fields
        st.finished = bool(f.get("finished", False))
        st.reported_steps = int(f.get("steps", st.reported_steps))
        if f.get("samples_per_s") is not None:
            st.reported_samples_per_s = float(f["samples_per_s"])
        self._retire(peer, "worker said bye")
        self.log.info(f"{peer.hostname} (rank {ev.rank}) {'finished' if st.finished else 'left'}: {f.get('reason', '')}")
        self.ctx.metrics.write("bye", rank=ev.rank, host=peer.hostname, finished=st.finished, reason=str(f.get("reason", "")),
                               version=self.version)
        self.on_leave(peer)

    def _retire(self, peer: Peer, reason: str) -> None:
        peer.close(reason)
        self.bytes_sent += peer.conn.bytes_sent
        self.bytes_received += peer.conn.bytes_received

    # hooks for the algorithms
    def on_join(self, peer: Peer) -> None: ...

    def on_leave(self, peer: Peer) -> None: ...

    def on_push(self, peer: Peer, msg: Message) -> None:
        raise NotImplementedError

    def on_pull(self, peer: Peer, msg: Message) -> None:
        peer.send(self.weights_message(MessageKind.WEIGHTS, {"version": self.version, "step": self.step}))

    # ------------------------------------------------------------------ model helpers

    def weights_message(self, kind: MessageKind, fields: dict[str, Any]) -> Message:
        """Current weights, snapshotted once per version (quantized when configured)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}  # the wire is CPU
            quant: dict[str, dict] = {}
            if self.cluster.use_quantization:
                state, quant = quantize_state(state)
            self._snapshot = (self.version, state, quant)
        return Message(kind, fields, tensors=self._snapshot[1], quant=self._snapshot[2])

    def decode_push(self, msg: Message) -> dict[str, torch.Tensor]:
        tensors = dequantize_state(msg.tensors, msg.quant) if msg.quant else msg.tensors
        missing = set(self.schema) - set(tensors)
        if missing:
            raise ValueError(f"push lacks tensors {sorted(missing)[:3]}")
        return tensors

    def reject(self, rank: int, reason: str, detail: str = "") -> None:
        self.rejected += 1
        self.rejected_reasons[reason] += 1
        if rank in self.stats:
            self.stats[rank].rejected += 1
        host = self.stats[rank].hostname if rank in self.stats else f"rank {rank}"
        self.log.warning(f"rejected push from {host}: {reason}{': ' + detail if detail else ''}")
        self.ctx.metrics.write("reject", rank=rank, reason=reason, detail=detail[:200], version=self.version)

    def apply_gradients(self, grads: dict[str, torch.Tensor], lr_scale: float = 1.0,
                        norms: dict[str, float] | None = None) -> dict[str, float]:
        """Set .grad, clip, step the optimizer once. Returns per-layer gradient norms.

        `grads` become the parameters' .grad as they are (the caller hands over tensors it owns, e.g.
        views of a receive buffer); `norms`, when the caller already computed them, are reused."""
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            g = grads[name]
            g = g.to(p.device)  # pushes arrive on the CPU; a no-op when the model is there too
            p.grad = g.view(p.shape) if g.dtype == p.dtype and g.is_contiguous() else g.to(p.dtype).reshape(p.shape)
        if norms is None:
            norms = tensor_norms({n: p.grad for n, p in params.items()})
        if self.nn.gradient_clipping:
            clip_([p.grad for p in params.values()], norms, self.nn.gradient_clipping)
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * lr_scale
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, base_lrs):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        return norms if self.nn.track_gradients else {}

    def own_gradients(self) -> tuple[dict[str, torch.Tensor], int, float]:
        """The server's own contribution (server_trains): gradients on its shard at the next batch."""
        assert self.own_loader is not None
        x, y = self.own_loader.batch_at(self.server_data_step)
        self.server_data_step += 1
        t0 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, x, y)
        loss.backward()
        grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}  # beside the pushes
        self.model.zero_grad(set_to_none=True)
        self.ctx.stretch(time.perf_counter() - t0)
        return grads, int(y.shape[0]), float(loss)

    def after_update(self, **fields: Any) -> None:
        """Bookkeeping after every model update: metrics, periodic eval and checkpoint."""
        if self.training_started is None:
            self.training_started = time.time()
            self.ctx.metrics.write("training_start", version=self.version)
        self.applied += 1
        self.ctx.metrics.write("update", version=self.version, step=self.step, **fields)
        if self.version % self.nn.eval_steps == 0:
            self.run_eval()
        if self.cluster.checkpoint_interval and self.version % self.cluster.checkpoint_interval == 0:
            self.save()

    def run_eval(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss, acc = self.ctx.task.evaluate(self.model)
        self.last_eval = (loss, acc)
        self.ctx.metrics.write("eval", version=self.version, step=self.step, test_loss=loss, test_accuracy=acc,
                               seconds=round(time.perf_counter() - t0, 4))
        self.ctx.wandb.log({"val/loss": loss, "val/accuracy": acc, "version": self.version}, step=self.version)
        self.log.info(f"version {self.version}: test accuracy {acc:.4f}, loss {loss:.4f}")
        return loss, acc

    def done_training_data(self) -> bool:
        return self.own_loader is None or self.server_data_step >= self.nn.num_epochs * self.ctx.steps_per_epoch()

    # ------------------------------------------------------------------ checkpoints and summary

    def state(self) -> ckpt.ServerState:
        return ckpt.ServerState(
            algorithm=self.algorithm, version=self.version, step=self.step,
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            worker_progress=dict(self.worker_progress), server_data_step=self.server_data_step,
            counters={"applied": self.applied, "late": self.late, "rejected": self.rejected,
                      "rejected_reasons": dict(self.rejected_reasons)},
        )

    def save(self) -> Path:
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.state())
        self.ctx.metrics.write("checkpoint", version=self.version, step=self.step, path=str(path))
        return path

    def _resume(self) -> None:
        state = ckpt.load_checkpoint(self.checkpoint_dir)
        if state.algorithm != self.algorithm:
            raise ckpt.CheckpointError(f"checkpoint in {self.checkpoint_dir} is from {state.algorithm}, not {self.algorithm}")
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.version, self.step = state.version, state.step
        self.worker_progress = dict(state.worker_progress)
        self.server_data_step = state.server_data_step
        c = state.counters
        self.applied, self.late, self.rejected = c.get("applied", 0), c.get("late", 0), c.get("rejected", 0)
        self.rejected_reasons.update(c.get("rejected_reasons", {}))
        digest = ckpt.state_digest(self.model.state_dict())
        self.log.info(f"resumed from {self.checkpoint_dir} at version {self.version}, step {self.step} (model {digest[:12]})")
        self.ctx.metrics.write("resume", version=self.version, step=self.step, model_digest=digest)

    def finish(self) -> dict[str, Any]:
        loss, acc = self.run_eval()
        self.save()
        summary = {
            "algorithm": self.algorithm,
            "workers": self.cluster.num_workers,
            "epochs": self.nn.num_epochs,
            "steps": self.version,
            "wall_time_s": round(time.time() - self.started, 3),
            "final_test_accuracy": acc,
            "final_test_loss": loss,
            "pushes_applied": self.applied,
            "pushes_late": self.late,
            "pushes_rejected": self.rejected,
            "rejected_reasons": dict(self.rejected_reasons),
            "connections_rejected": self.connections_rejected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "stop_reason": self.stop_reason or "finished",
            "per_worker": [s.summary() for s in self.stats.values()],
            "torch": self.ctx.torch,
            "config": to_dict(self.cfg.cluster) | {"nn": to_dict(self.cfg.nn)},
        }
        summary |= self.summary_fields()
        about = getattr(self.ctx.task, "about", None)
        if about:  # a GPT on wikitext-2: which splits (train on valid offline) and which tokenizer
            summary |= about | {"final_test_perplexity": math.exp(loss), "gpt": self.cfg.gpt.resolved() if self.cfg.gpt else None}
        write_atomic(self.ctx.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.ctx.metrics.write("end", version=self.version, test_accuracy=acc, test_loss=loss, peak_rss_mb=peak_rss_mb())
        self.log.info(f"done: {self.version} updates, test accuracy {acc:.4f}, wall {summary['wall_time_s']} s")
        return summary

    def summary_fields(self) -> dict[str, Any]:
        """What an algorithm adds to its summary (SyncPS: the deadline it used)."""
        return {}

    def idle_too_long(self) -> bool:
        """No worker connected for idle_timeout seconds (after at least one joined)."""
        if self.peers or not self.ever_joined:
            return False
        return time.time() - self.last_peer_seen > self.cluster.idle_timeout

    def idle_stop_reason(self) -> str:
        """The stop_reason of a server that stops because idle_too_long()."""
        return f"no worker connected for {self.cluster.idle_timeout:.0f}s"


# --------------------------------------------------------------------------- worker side


class WorkerInterrupted(Exception):
    """Ctrl-C arrived; raised where the worker can still leave cleanly (at a step boundary)."""


class ServerFinished(Exception):
    """The server said the run is over."""


class WorkerBase:
    """A worker's connection to the server, its model, data shard and local optimizer."""

    algorithm: str = ""

    def __init__(self, ctx: NodeContext, *, host: str, port: int):
        self.ctx = ctx
        self.cfg, self.nn, self.cluster = ctx.cfg, ctx.cfg.nn, ctx.cfg.cluster
        self.log = ctx.log
        self.host, self.port = host, port
        self.rank = ctx.rank
        torch.manual_seed(self.cluster.seed + self.rank)
        self.model = ctx.build_model()
        self.optimizer = ctx.build_optimizer(self.model)
        self.schema = schema_of(self.model)
        self.recv_schema = {**self.schema, **quantized_schema(self.schema)} if self.cluster.use_quantization else self.schema
        self.loader = ctx.batches(rank=self.rank)
        self.total_steps = self.nn.num_epochs * ctx.steps_per_epoch()
        self.conn: Connection | None = None
        self.version = 0
        self.steps_done = 0
        self.samples_done = 0
        self.train_time = 0.0
        self.compute_s = self.comm_s = self.wait_s = 0.0
        self._since_record = (time.perf_counter(), 0, 0)  # (time, steps, samples) at the last record(): W&B rates
        self.last_loss = float("nan")
        self.started = time.time()
        self.interrupted = False  # set by Ctrl-C (SIGINT); the next step says BYE and stops

    def connect(self) -> Message:
        """Dial (with backoff), say hello, load the weights the server welcomes us with."""
        def on_retry(attempt: int, delay: float, err: Exception) -> None:
            if self.interrupted:
                raise WorkerInterrupted
            self.log.info(f"server {self.host}:{self.port} not reachable ({err}); retry {attempt} in {delay:.1f}s")

        retry = RetryPolicy(deadline=self.reconnect_deadline())
        self.conn = connect(self.host, self.port, key=self.ctx.key, config=self.ctx.transport, retry=retry, on_retry=on_retry)
        self.conn.send(Message(MessageKind.HELLO, {"rank": self.rank, "hostname": self.ctx.hostname, "algorithm": self.algorithm}))
        welcome = self.conn.recv(timeout=self.ctx.transport.io_timeout, schema=self.recv_schema)
        if welcome.kind == MessageKind.ERROR:
            raise SmolclusterError(f"server refused this worker: {welcome.fields.get('error')}")
        if welcome.kind == MessageKind.BYE:
            raise ServerFinished(welcome.fields.get("reason", ""))
        if welcome.kind != MessageKind.WELCOME:
            raise SmolclusterError(f"expected WELCOME from the server, got {welcome.kind.name}")
        self.conn.start_heartbeats()
        self.load_weights(welcome, alpha=1.0)
        self.log.info(f"joined {self.host}:{self.port} at version {self.version}, step {welcome.fields.get('step')}")
        self.ctx.metrics.write("join", version=self.version, step=welcome.fields.get("step"))
        return welcome

    def reconnect_deadline(self) -> float:
        """How long the server may stay unreachable before this worker gives up."""
        return max(60.0, self.cluster.idle_timeout * 2)

    def load_weights(self, msg: Message, alpha: float) -> None:
        """Take the server weights: w = alpha * server + (1 - alpha) * local."""
        if not msg.tensors:
            return
        state = dequantize_state(msg.tensors, msg.quant) if msg.quant else msg.tensors
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                t.mul_(1.0 - alpha).add_(state[name].to(t.device, t.dtype), alpha=alpha) if alpha < 1.0 else t.copy_(state[name])
        self.version = int(msg.fields.get("version", self.version))

    def compute_gradients(self, step: int) -> tuple[float, int]:
        """Forward/backward on the batch for `step`; leaves grads in .grad. Compute stretched to the device."""
        if self.interrupted:
            raise WorkerInterrupted
        x, y = self.loader.batch_at(step)
        t0 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, x, y)
        loss.backward()
        elapsed = time.perf_counter() - t0
        self.ctx.stretch(elapsed)
        self.compute_s += time.perf_counter() - t0
        return float(loss), int(y.shape[0])

    def gradients(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}

    def local_step(self) -> None:
        """Clip (as the server does) and step the local optimizer."""
        clip_grads_(self.model, self.nn.gradient_clipping)
        self.optimizer.step()

    def exchange(self, msg: Message, timeout: float) -> Message:
        """Send one request and wait for its reply; reply time counts as communication + waiting."""
        assert self.conn is not None
        t0 = time.perf_counter()
        if self.ctx.device.type != "cpu":  # the wire carries CPU tensors
            msg = Message(msg.kind, msg.fields, tensors={k: v.cpu() for k, v in msg.tensors.items()}, quant=msg.quant)
        self.conn.send(msg, timeout=self.ctx.transport.io_timeout)
        t1 = time.perf_counter()
        reply = self.conn.recv(timeout=timeout, schema=self.recv_schema)
        t2 = time.perf_counter()
        held = float(reply.fields.get("held_s", 0.0))
        self.comm_s += (t1 - t0) + max(0.0, (t2 - t1) - held)
        self.wait_s += min(held, t2 - t1)
        if reply.kind == MessageKind.BYE:
            raise ServerFinished(reply.fields.get("reason", ""))
        if reply.kind == MessageKind.ERROR:
            raise SmolclusterError(f"server error: {reply.fields.get('error')}")
        return reply

    def record(self, step: int, loss: float, **fields: Any) -> None:
        """One metrics line per exchange with the server, carrying the time split since the last one."""
        self.ctx.metrics.write("step", step=step, loss=loss, version=self.version,
                               compute_s=round(self.compute_s, 6), comm_s=round(self.comm_s, 6),
                               wait_s=round(self.wait_s, 6), **fields)
        now, (t, steps, samples) = time.perf_counter(), self._since_record
        span, steps = max(now - t, 1e-9), max(self.steps_done - steps, 1)
        self.ctx.wandb.log({"train/loss": loss, "version": self.version, "perf/samples_per_s": (self.samples_done - samples) / span,
                            "perf/step_time_s": span / steps, "perf/compute_s": self.compute_s / steps,
                            "perf/comm_s": self.comm_s / steps, "perf/wait_s": self.wait_s / steps}, step=step)
        self._since_record, self.last_loss = (now, self.steps_done, self.samples_done), loss
        if step // self.nn.eval_steps != (step - steps) // self.nn.eval_steps:  # a log line every eval_steps steps
            self.log.info(f"step {step}: loss {loss:.4f}, {(self.samples_done - samples) / span:.0f} samples/s")
        self.compute_s = self.comm_s = self.wait_s = 0.0

    def run(self) -> None:
        """Train until done, reconnecting when the server goes away. Ctrl-C leaves cleanly: the step in
        flight finishes, the server gets a BYE saying so, the metrics an "end" line (a second Ctrl-C stops
        at once). SIGTERM keeps its default, an immediate stop: supervisors and the sim send it."""
        try:
            with _signals_set_flag(self, (signal.SIGINT,)):
                self._run()
        except WorkerInterrupted:
            self.log.warning("interrupted: leaving the cluster")
            self.say_bye(finished=False, reason="interrupted")

    def _run(self) -> None:
        finished_by_server = False
        lost_since: float | None = None
        while True:
            try:
                welcome = self.connect()
                lost_since = None
                self.train(welcome)
                break
            except ServerFinished as e:
                finished_by_server = True
                self.log.info(f"server ended the run ({e})")
                break
            except ConnectFailed:
                raise  # retried until the deadline already: the server is not coming back
            except (TransportError, TruncatedFrame) as e:  # a frame cut off by a closing connection is a lost connection
                # Through a proxy the TCP connect always succeeds and the handshake fails instead, so
                # connect()'s own deadline never trips: bound the whole outage here.
                lost_since = lost_since or time.time()
                if time.time() - lost_since > self.reconnect_deadline():
                    raise ConnectFailed(f"server {self.host}:{self.port} unreachable for {time.time() - lost_since:.0f}s "
                                        f"(last error: {e})", peer=f"{self.host}:{self.port}") from None
                self.log.warning(f"lost the server ({e}); reconnecting")
                self.ctx.metrics.write("disconnect", reason=str(e))
                if self.conn is not None:
                    self.conn.close(str(e))
                time.sleep(0.5)
                if self.interrupted:
                    raise WorkerInterrupted from None
        self.say_bye(finished=True, server_ended=finished_by_server)

    def train(self, welcome: Message) -> None:
        raise NotImplementedError

    def say_bye(self, *, finished: bool, server_ended: bool = False, reason: str = "epochs done") -> None:
        elapsed = max(1e-9, time.time() - self.started)
        sps = self.samples_done / elapsed
        if self.conn is not None and not server_ended:
            try:
                self.conn.send(Message(MessageKind.BYE, {"finished": finished, "steps": self.steps_done,
                                                         "samples_per_s": sps, "reason": reason}), timeout=5)
            except SmolclusterError:
                pass
        if self.conn is not None:
            self.conn.close("bye")
        self.ctx.metrics.write("end", steps=self.steps_done, samples=self.samples_done, samples_per_s=sps,
                               peak_rss_mb=peak_rss_mb(), stop_reason=reason if not server_ended else "server finished")
        self.log.info(f"{'finished' if finished else 'stopped'}: {self.steps_done} steps, {sps:.1f} samples/s, "
                      f"last loss {self.last_loss:.4f}")
