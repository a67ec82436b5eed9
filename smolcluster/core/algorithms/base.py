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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from smolcluster.common.errors import (AuthError, BadField, ConnectFailed, QuantizationError, ServerFailed,
                                       SmolclusterError, TransportError, WireError)
from smolcluster.common.ratelimit import LogThrottle
from smolcluster.core.net import messages
from smolcluster.core.net.transport import Connection, Listener, RetryPolicy, connect
from smolcluster.core.net.wire import Message, MessageKind, Schema, WireLimits, schema_of
from smolcluster.core.training import checkpoint as ckpt
from smolcluster.core.training.config import rank_of, to_dict
from smolcluster.core.training.context import NodeContext
from smolcluster.core.training.models import loss_fn
from smolcluster.core.training.flat import FlatModel, layer_norms, total_norm
from smolcluster.core.training.optim import clip_
from smolcluster.core.training.quantization import QuantizedLayout, dequantize_state, quantized_schema
from smolcluster.core.training.robust import NormFilter
from smolcluster.core.training.tasks import Batches
from smolcluster.core.training.telemetry import jsonable
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


def wire_layouts(flat: FlatModel, quantized: QuantizedLayout | None) -> tuple[Any, ...]:
    """The flat layouts a connection agrees on: the model's and, with use_quantization, its int8 form."""
    return (flat.layout,) if quantized is None else (flat.layout, quantized)

# A HELLO is a few short fields: before a peer has joined it cannot make the server allocate more.
HELLO_LIMITS = WireLimits(max_header_bytes=4096, max_payload_bytes=0, max_tensors=0)
IN_FLIGHT = 2  # frames a connection may have queued for the main thread; then its reader waits (TCP backpressure)
HANDLER_ERRORS_TOLERATED = 20  # unexpected exceptions handling peers' messages before the server calls it a bug


@dataclass
class Join:
    conn: Connection
    rank: int
    hostname: str


@dataclass
class Incoming:
    conn: Connection
    rank: int
    msg: Message
    typed: Any = None  # the message's fields as parsed by messages.parse
    problem: BadField | None = None  # why they did not parse
    done: Callable[[], None] = lambda: None  # frees the reader for the connection's next frame


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
    applied: int = 0
    late: int = 0
    rejected: int = 0
    samples: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    joins: int = 0
    reported_steps: int = 0
    reported_samples_per_s: float | None = None
    first_push: float | None = None  # monotonic
    last_push: float | None = None
    finished: bool = False

    def record_push(self, samples: int, staleness: int, now: float) -> None:
        """A push that will be applied (EDP: now; SyncPS: when its step closes)."""
        self.samples += samples
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self.first_push = self.first_push if self.first_push is not None else now
        self.last_push = now

    @property
    def pushes(self) -> int:
        """Every push the server received from this worker: applied, late or rejected."""
        return self.applied + self.late + self.rejected

    def summary(self) -> dict[str, Any]:
        span = (self.last_push - self.first_push) if self.first_push is not None and self.last_push is not None else 0.0
        sps = self.reported_samples_per_s if self.reported_samples_per_s is not None else (self.samples / span if span > 0 else 0.0)
        return {
            "rank": self.rank,
            "hostname": self.hostname,
            "steps": self.reported_steps,
            "pushes": self.pushes,
            "applied": self.applied,
            "samples_per_s": round(sps, 2),
            "mean_staleness": round(self.staleness_sum / self.applied, 3) if self.applied else 0.0,
            "max_staleness": self.staleness_max,
            "late": self.late,
            "rejected": self.rejected,
            "joins": self.joins,
            "finished": self.finished,
        }


def message_bytes(msg: Message) -> int:
    flat = msg.flat.nbytes if msg.flat is not None else 0
    return flat + sum(t.nbytes for t in msg.tensors.values()) + 256  # + header, roughly


class Peer:
    """A joined worker: its connection and an outbox drained by the peer's own sender thread.

    Nothing here blocks the caller (the server's main thread): send() sends at once what the socket takes
    without waiting (when nothing is queued) and queues the rest, close() asks the sender thread to send
    what is queued and then close gracefully, off the main thread. The outbox is bounded
    in bytes; a peer that lets it fill (it stopped reading) is dropped instead of growing the server."""

    def __init__(self, conn: Connection, rank: int, hostname: str, events: queue.SimpleQueue, *, io_timeout: float,
                 max_outbox_bytes: int, on_closed: Callable[[Connection], None]):
        self.conn, self.rank, self.hostname = conn, rank, hostname
        self.max_outbox_bytes = max_outbox_bytes
        self.bytes_queued = 0  # every byte ever queued (the reply budget counts these)
        self.last_pull_step: int | None = None  # EDP: worker_step of the last pull answered with weights
        self._outbox: queue.SimpleQueue[tuple[Message, int] | None] = queue.SimpleQueue()
        self._in_outbox = 0
        self._lock = threading.Lock()
        self._closing = ""
        self._events = events
        self._io_timeout = io_timeout
        self._on_closed = on_closed
        self._thread = threading.Thread(target=self._drain, name=f"send-{hostname}", daemon=True)
        self._thread.start()

    def send(self, msg: Message) -> None:
        size = message_bytes(msg)
        with self._lock:
            if self._closing:
                return
            idle = self._in_outbox == 0
        if idle and self._send_now(msg, size):
            return
        with self._lock:
            if self._closing:
                return
            full = self._in_outbox + size > self.max_outbox_bytes and self._in_outbox > 0
            if not full:
                self._in_outbox += size
                self.bytes_queued += size
        if full:
            self._events.put(Left(self.conn, self.rank, f"not reading: {self._in_outbox} bytes queued for it"))
            self.close("not reading")
            self.conn.interrupt()  # its sender thread is stuck in a send it will never finish
            return
        self._outbox.put((msg, size))

    def _send_now(self, msg: Message, size: int) -> bool:
        """Nothing queued: send from the caller's thread what the socket takes at once (waking no thread, which
        on a busy machine costs more than the send); the sender thread finishes a frame the socket could not
        take whole. False: it goes through the outbox."""
        try:
            left = self.conn.send_now(msg)
        except SmolclusterError as e:
            self._events.put(Left(self.conn, self.rank, f"send failed: {e}", e))
            self.close(f"send failed: {e}")
            return True
        if left is None:
            return False
        with self._lock:
            self.bytes_queued += size
            if left:
                self._in_outbox += left
        if left:
            self._outbox.put((None, left))  # the sender thread flushes the rest of the frame
        return True

    def _drain(self) -> None:
        try:
            while (item := self._outbox.get()) is not None:
                msg, size = item
                try:
                    if msg is None:
                        self.conn.flush(timeout=self._io_timeout)
                    else:
                        self.conn.send(msg, timeout=self._io_timeout)
                except SmolclusterError as e:
                    self._events.put(Left(self.conn, self.rank, f"send failed: {e}", e))
                    return
                finally:
                    with self._lock:
                        self._in_outbox -= size
        finally:
            self.conn.close(self._closing or "closed", graceful=True)
            self._on_closed(self.conn)

    def close(self, reason: str = "") -> None:
        """Send what is queued (a BYE, say), then close without losing it to a reset. Returns at once."""
        with self._lock:
            if self._closing:
                return
            self._closing = reason or "closed"
        self._outbox.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        """Still sending what was queued before its close."""
        return self._thread.is_alive()


class ServerBase:
    """Owns the model. Subclasses implement loop() and on_push()."""

    algorithm: str = ""

    def __init__(self, ctx: NodeContext, *, bind: str, port: int, resume: bool):
        self.ctx = ctx
        self.clock = ctx.clock
        self.cfg, self.nn, self.cluster = ctx.cfg, ctx.cfg.nn, ctx.cfg.cluster
        self.log = ctx.log
        self.say = LogThrottle(self.log)  # problems a peer can repeat at will are logged once per 10 s
        self.bind, self.port = bind, port
        self.events: queue.SimpleQueue = self.clock.queue()
        self.peers: dict[int, Peer] = {}
        self.retiring: list[Peer] = []  # peers closing in their own threads
        self.stats: dict[int, WorkerStats] = {
            r: WorkerStats(r, h) for r, h in enumerate(self.cluster.workers, start=1)
        }
        self.applied = self.late = self.rejected = 0  # pushes
        self.rejected_reasons: Counter[str] = Counter()
        self.messages_rejected: Counter[str] = Counter()  # other messages (PULL, BYE, HELLO) with bad fields
        self.handler_errors = 0
        self.checkpoint_failures = 0
        self.connections_rejected = 0
        self.listener: Listener | None = None
        self._bytes_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.bytes_sent = self.bytes_received = 0  # of connections already closed
        self.ever_joined = False
        self.last_peer_seen = self.clock.monotonic()
        self.stop_reason = ""
        self.stop_status = "finished"  # finished | stopped (interrupted, idle) | error: what the BYE tells workers
        self.interrupted = False  # set by SIGINT/SIGTERM; next_event turns it into KeyboardInterrupt

        torch.manual_seed(self.cluster.seed)
        self.model = ctx.build_model()
        self.optimizer = ctx.build_optimizer(self.model)
        self.flat = FlatModel(self.model)  # weights and gradients in one buffer each
        self.quantized = QuantizedLayout(self.flat.layout) if self.cluster.use_quantization else None
        self.schema: Schema = schema_of(self.model)
        self.push_schema: Schema = {**self.schema, **quantized_schema(self.schema)} if self.cluster.use_quantization else self.schema
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        self.robust = NormFilter(k=self.cluster.robust_k) if self.cluster.robust_aggregation else None
        self.max_worker_step = self.nn.num_epochs * ctx.steps_per_epoch()
        # Replies to an unauthenticated peer stay within this multiple of what it sent (plus a WELCOME):
        # enough for an honest worker that pulls more often than it pushes, never a 4000x amplifier.
        self.reply_factor = 4 * max(1, math.ceil(self.cluster.push_interval / self.cluster.worker_update_interval))
        self.version = 0
        self.step = 0
        self.server_data_step = 0
        self.worker_progress: dict[str, int] = {}
        self.own_loader: Batches | None = None
        if self.cluster.server_trains:
            self.own_loader = ctx.batches(rank=0)
        self._snapshot: tuple[int, torch.Tensor, Any] | None = None  # (version, flat buffer, its layout)
        self.checkpoint_dir = Path(self.cluster.checkpoint_dir) if self.cluster.checkpoint_dir else ctx.run_dir / "checkpoints"
        self.started = self.clock.monotonic()
        self.training_started: float | None = None
        self.last_eval: tuple[float, float] | None = None
        stale = ckpt.remove_stale_temp_files(self.checkpoint_dir)
        if stale:
            self.log.info(f"removed {len(stale)} temp file(s) left by checkpoint writes that were killed: "
                          f"{', '.join(p.name for p in stale[:3])}")
        if resume:
            self._resume()

    # ------------------------------------------------------------------ lifecycle

    def serve(self) -> dict[str, Any]:
        """Run until the algorithm's loop ends, then tell the workers why, and write the summary and a final
        checkpoint. However the loop ends (done, interrupted, an internal error) this happens; an internal
        error then raises (ServerFailed, or the SmolclusterError that stopped it) after the summary is written."""
        listener = self.listen()
        self.listener = listener
        listener.start()
        host, port = listener.address
        write_atomic(self.ctx.run_dir / "server.json", json.dumps({"host": host, "port": port, "pid": os.getpid()}))
        if self.version == 0:
            self.save()  # so a crash at any point can --resume, even before the first periodic checkpoint
        self.log.info(f"{self.algorithm} server listening on {host}:{port}, waiting for {self.cluster.num_workers} workers")
        self.ctx.metrics.write("start", algorithm=self.algorithm, version=self.version, step=self.step, port=port)
        failure: BaseException | None = None
        try:
            with _signals_set_flag(self):
                # Evaluate the starting model first: unreadable evaluation data fails now, not after the
                # workers trained for a while, and the accuracy curve gets its first point.
                self.run_eval()
                self.loop()
        except KeyboardInterrupt:
            self.stop_reason, self.stop_status = "interrupted", "stopped"
            self.log.warning("interrupted: writing a final checkpoint and summary")
        except Exception as e:  # a bug, or a resource gone (data, disk): stop with that reason, never "finished"
            failure = e
            self.stop_status = "error"
            self.stop_reason = f"error: {e}" if isinstance(e, SmolclusterError) else f"internal error: {type(e).__name__}: {e}"
            self.log.exception(f"stopping: {self.stop_reason}")
        finally:
            self._account_pending_events()
            # BYE first: closing the listener closes every accepted connection, and a worker that
            # loses its connection without a BYE keeps reconnecting instead of finishing.
            for peer in list(self.peers.values()):
                peer.send(Message(MessageKind.BYE, {"reason": self.stop_reason or "finished", "status": self.stop_status}))
                self._retire(peer, "server finished")
            self.peers.clear()
            self._join_retiring(timeout=5.0)
            listener.close()
            self.say.flush()
        summary = self.finish()
        if failure is not None:
            if isinstance(failure, SmolclusterError):
                raise failure
            raise ServerFailed(f"the server stopped: {self.stop_reason} (summary and final checkpoint written; "
                               f"traceback in {self.ctx.run_dir / 'server.log'})") from failure
        return summary

    def loop(self) -> None:
        raise NotImplementedError

    def listen(self) -> Listener:
        """The listener serve() accepts workers on (the virtual sim backend's server overrides this)."""
        return Listener(self.bind, self.port, key=self.ctx.key, on_connection=self._on_connection,
                        config=self.ctx.transport, on_reject=self._on_reject, logger=self.log)

    def new_peer(self, conn: Connection, rank: int, hostname: str) -> Peer:
        """A joined worker's outbox (the virtual sim backend's server sends without a thread)."""
        return Peer(conn, rank, hostname, self.events, io_timeout=self.ctx.transport.io_timeout,
                    max_outbox_bytes=4 * self.model_bytes + (1 << 20), on_closed=self._closed_connection)

    def _account_pending_events(self) -> None:
        """At the end: connections that already failed (e.g. a bad frame) but were still queued, and pushes
        that arrived after the loop ended (late: the run was over)."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, Left):
                self._left(ev)
            elif isinstance(ev, Incoming):
                if ev.msg.kind == MessageKind.PUSH and ev.rank in self.stats:
                    self.count_late(ev.rank, "the run was over")
                ev.done()

    def _join_retiring(self, timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        for peer in self.retiring:
            peer.join(max(0.0, deadline - self.clock.monotonic()))
        self.retiring = [p for p in self.retiring if p.closing]

    # ------------------------------------------------------------------ connection threads

    def _on_reject(self, peer: str, error: Exception) -> None:
        with self._count_lock:  # from the listener's threads
            self.connections_rejected += 1

    def _on_connection(self, conn: Connection) -> None:
        """Runs in the listener's per-connection thread: hello, then read frames until the peer goes.
        Frames are parsed here (messages.parse is a pure function); the main thread gets typed messages."""
        try:
            hello_msg = conn.recv(timeout=self.ctx.transport.handshake_timeout, limits=HELLO_LIMITS)
        except SmolclusterError as e:
            self.say.warning("no-hello", f"dropping {conn.peer}: no valid HELLO ({e})")
            conn.close(str(e))
            return
        problem, hello = self._check_hello(hello_msg)
        if problem:
            with self._count_lock:  # a connection thread, not the main one
                self.messages_rejected["bad-hello"] += 1
            self.say.warning("bad-hello", f"dropping {conn.peer}: {problem}")
            try:
                conn.send(Message(MessageKind.ERROR, {"error": problem}), timeout=5)
            except SmolclusterError:
                pass
            conn.close(problem)
            return
        conn.admit()
        if hello.layout:  # the schema, agreed once: pushes and weights travel as one flat buffer
            conn.agree(*wire_layouts(self.flat, self.quantized), buffers=IN_FLIGHT + 1)
        slots = threading.BoundedSemaphore(IN_FLIGHT)
        self.events.put(Join(conn, hello.rank, hello.hostname))
        conn.start_heartbeats()
        while True:
            while not slots.acquire(timeout=0.5):
                if conn.closed:
                    return
            try:
                msg = conn.recv(timeout=None, schema=self.push_schema)
            except SmolclusterError as e:
                slots.release()
                self.events.put(Left(conn, hello.rank, str(e), e))
                return
            self.events.put(self.incoming(conn, hello.rank, msg, slots.release))
            if msg.kind == MessageKind.BYE:
                return

    @staticmethod
    def incoming(conn: Connection, rank: int, msg: Message, done: Callable[[], None] = lambda: None) -> Incoming:
        """A frame as the main thread gets it: its typed fields, or why they did not parse."""
        try:
            return Incoming(conn, rank, msg, messages.parse(msg.kind, msg.fields), None, done)
        except BadField as e:
            return Incoming(conn, rank, msg, None, e, done)

    def _check_hello(self, msg: Message) -> tuple[str, messages.Hello | None]:
        if msg.kind != MessageKind.HELLO:
            return f"expected HELLO, got {msg.kind.name}", None
        try:
            hello = messages.parse(MessageKind.HELLO, msg.fields)
        except BadField as e:
            return str(e), None
        if hello.algorithm != self.algorithm:
            return f"worker runs {hello.algorithm!r} but this server runs {self.algorithm!r} (start both with the same --algo)", None
        if not 1 <= hello.rank <= self.cluster.num_workers:
            return f"rank {hello.rank!r} is not a worker rank (1..{self.cluster.num_workers})", None
        if hello.hostname not in self.cluster.workers or rank_of(self.cluster, hello.hostname) != hello.rank:
            return f"hostname {hello.hostname!r} with rank {hello.rank} does not match 'workers' in the cluster config", None
        if hello.layout and hello.layout != self.flat.layout.digest.hex():
            return f"SchemaMismatch: {self.flat.layout.mismatch(hello.layout)}", None
        return "", hello

    # ------------------------------------------------------------------ events

    def next_event(self, timeout: float) -> Any:
        """Handle the next event (or return None after `timeout`). Each event is isolated: a peer whose
        message cannot be handled is dropped and counted; only a run of such failures (a bug, not one
        peer's input) stops the server."""
        if self.interrupted:
            raise KeyboardInterrupt  # here, in plain code: see _signals_set_flag
        try:
            ev = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        try:
            self._dispatch(ev)
        except Exception as e:
            self._handler_failed(ev, e)
        finally:
            if isinstance(ev, Incoming):
                ev.done()
        return ev

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, Join):
            self._join(ev)
        elif isinstance(ev, Left):
            self._left(ev)
        elif isinstance(ev, Incoming):
            peer = self.peers.get(ev.rank)
            if peer is None or peer.conn is not ev.conn:
                if ev.msg.kind == MessageKind.PUSH:  # from a connection already replaced: never applied
                    self.count_late(ev.rank, "its connection was replaced")
                return
            self.last_peer_seen = self.clock.monotonic()
            kind = ev.msg.kind
            if ev.problem is not None:
                self.bad_message(peer, ev.msg, ev.problem)
            elif kind == MessageKind.BYE:
                self._bye(peer, ev.typed)
            elif kind == MessageKind.PUSH:
                self.on_push(peer, ev.typed, ev.msg)
            elif kind == MessageKind.PULL:
                try:
                    messages.check_pull(ev.typed, max_worker_step=self.max_worker_step)
                except BadField as e:
                    return self.bad_message(peer, ev.msg, e)
                self.on_pull(peer, ev.typed)
            else:
                self.messages_rejected["unexpected-kind"] += 1
                self.say.warning(f"unexpected-{kind.name}", f"ignoring unexpected {kind.name} from {peer.hostname}")

    def _handler_failed(self, ev: Any, e: Exception) -> None:
        self.handler_errors += 1
        rank = getattr(ev, "rank", None)
        if self.handler_errors == 1:
            self.log.exception(f"could not handle a {type(ev).__name__} event from rank {rank}: dropping that connection")
        else:
            self.say.warning("handler-error", f"could not handle a {type(ev).__name__} event from rank {rank}: "
                                              f"{type(e).__name__}: {e}; dropping that connection")
        peer = self.peers.get(rank) if rank is not None else None
        if peer is not None and peer.conn is getattr(ev, "conn", None):
            del self.peers[rank]
            self._retire(peer, f"server could not handle its message ({type(e).__name__})")
            self.on_leave(peer)
        if self.handler_errors > HANDLER_ERRORS_TOLERATED:
            raise e  # not one peer's input any more: a bug; serve() stops with this as the reason

    def bad_message(self, peer: Peer, msg: Message, problem: BadField) -> None:
        """A well-framed message with a bad field: rejected and counted, the connection kept."""
        if msg.kind == MessageKind.PUSH:
            self.reject(peer.rank, problem.reason, problem.problem)
            self.reply_rejected(peer, problem.reason)
        elif msg.kind == MessageKind.BYE:
            self.messages_rejected[problem.reason] += 1
            self._bye(peer, messages.Bye(reason="(bad BYE fields)"))
        else:
            self.messages_rejected[problem.reason] += 1
            self.say.warning(problem.reason, f"rejected a {msg.kind.name} from {peer.hostname}: {problem}")
            if msg.kind == MessageKind.PULL:
                peer.send(Message(MessageKind.WEIGHTS, {"version": self.version, "step": self.step}))

    def _join(self, ev: Join) -> None:
        old = self.peers.pop(ev.rank, None)
        if old is not None:
            self.log.info(f"{ev.hostname} reconnected; closing its previous connection")
            self._retire(old, "replaced by a new connection")
        peer = self.new_peer(ev.conn, ev.rank, ev.hostname)
        self.peers[ev.rank] = peer
        st = self.stats[ev.rank]
        st.joins += 1
        st.finished = False
        self.ever_joined = True
        self.last_peer_seen = self.clock.monotonic()
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
        self.last_peer_seen = self.clock.monotonic()
        if isinstance(ev.error, WireError):
            self.reject(ev.rank, f"{type(ev.error).__name__}", str(ev.error))
        self.say.warning(f"left-{ev.rank}", f"{peer.hostname} (rank {ev.rank}) left: {ev.reason}")
        self.ctx.metrics.write("leave", rank=ev.rank, host=peer.hostname, reason=ev.reason, version=self.version, step=self.step)
        self.on_leave(peer)

    def _bye(self, peer: Peer, bye: messages.Bye) -> None:
        del self.peers[peer.rank]
        st = self.stats[peer.rank]
        st.finished = bye.finished
        if bye.steps is not None:
            st.reported_steps = bye.steps
        if bye.samples_per_s is not None:
            st.reported_samples_per_s = bye.samples_per_s
        self._retire(peer, "worker said bye")
        self.log.info(f"{peer.hostname} (rank {peer.rank}) {'finished' if st.finished else 'left'}: {bye.reason}")
        self.ctx.metrics.write("bye", rank=peer.rank, host=peer.hostname, finished=st.finished, reason=bye.reason,
                               version=self.version)
        self.on_leave(peer)

    def _retire(self, peer: Peer, reason: str) -> None:
        """Close a peer in its own thread (never waiting for it here); its bytes are counted once it is closed."""
        peer.close(reason)
        self.retiring.append(peer)
        if len(self.retiring) > 64:
            self.retiring = [p for p in self.retiring if p.closing]

    def _closed_connection(self, conn: Connection) -> None:
        with self._bytes_lock:  # from the peer's sender thread
            self.bytes_sent += conn.bytes_sent
            self.bytes_received += conn.bytes_received

    # hooks for the algorithms
    def on_join(self, peer: Peer) -> None: ...

    def on_leave(self, peer: Peer) -> None: ...

    def on_push(self, peer: Peer, push: messages.Push, msg: Message) -> None:
        raise NotImplementedError

    def reply_rejected(self, peer: Peer, reason: str) -> None:
        """Answer a push rejected for its fields (no weights: a rejected push costs its sender, not us)."""
        raise NotImplementedError

    def on_pull(self, peer: Peer, pull: messages.Pull) -> None:
        fields = {"version": self.version, "step": self.step}
        if self.pull_due(peer, pull.worker_step):
            peer.send(self.weights_for(peer, MessageKind.WEIGHTS, fields))
        else:
            peer.send(Message(MessageKind.WEIGHTS, fields))

    def pull_due(self, peer: Peer, worker_step: int) -> bool:
        """Weights go to a worker at its own cadence: every worker_update_interval of its steps, not whenever
        it asks (a tiny PULL answered with the whole model is an amplifier)."""
        last = peer.last_pull_step
        if last is not None and worker_step < last + self.cluster.worker_update_interval:
            self.messages_rejected["pull-too-early"] += 1
            self.say.warning("pull-too-early", f"{peer.hostname} asks for weights at step {worker_step}, "
                                               f"{worker_step - last} steps after its last pull; replying without them")
            return False
        peer.last_pull_step = worker_step
        return True

    # ------------------------------------------------------------------ model helpers

    def weights_message(self, kind: MessageKind, fields: dict[str, Any]) -> Message:
        """Current weights, snapshotted once per version (quantized when configured)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            flat = self.flat.snapshot()  # one copy; the wire is CPU and the model goes on changing
            if self.quantized is not None:
                self._snapshot = (self.version, self.quantized.quantize(flat), self.quantized)
            else:
                self._snapshot = (self.version, flat, self.flat.layout)
        return Message(kind, fields, flat=self._snapshot[1], layout=self._snapshot[2])

    def weights_for(self, peer: Peer, kind: MessageKind, fields: dict[str, Any]) -> Message:
        """A reply with the current weights, when this peer may have them: an authenticated worker always
        (its cadence is checked where it asks), an unauthenticated one while what we sent it stays within
        reply_factor times what it sent us, plus one model. Otherwise the reply goes without weights."""
        msg = self.weights_message(kind, fields)
        budget = self.reply_factor * peer.conn.bytes_received + 2 * self.model_bytes
        if peer.conn.authenticated or peer.bytes_queued + message_bytes(msg) <= budget:
            return msg
        self.messages_rejected["reply-budget"] += 1
        self.say.warning("reply-budget", f"{peer.hostname} asks for more weights than it sends; replying without them")
        return Message(kind, fields)

    def decode_push(self, msg: Message) -> torch.Tensor:
        """The pushed tensors as one flat buffer in the model's layout; BadField when they are not all there
        in the model's dtypes and shapes. A flat push was checked against the layout by the wire."""
        if msg.flat is not None and msg.layout is self.quantized:
            try:
                return self.quantized.dequantize(msg.flat)
            except QuantizationError as e:
                raise BadField("PUSH", "quant", str(e)) from None
        if msg.flat is not None:
            return msg.flat
        if msg.quant and not self.cluster.use_quantization:
            raise BadField("PUSH", "quant", "quantized tensors, but this server does not use quantization")
        try:
            tensors = dequantize_state(msg.tensors, msg.quant) if msg.quant else msg.tensors
        except QuantizationError as e:
            raise BadField("PUSH", "quant", str(e)) from None
        missing = set(self.schema) - set(tensors)
        if missing:
            raise BadField("PUSH", "tensors", f"lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[:3]}")
        for name, spec in self.schema.items():
            if tensors[name].dtype != spec.dtype or tuple(tensors[name].shape) != spec.shape:
                raise BadField("PUSH", "tensors", f"tensor {name!r} is {tensors[name].dtype}{list(tensors[name].shape)}, "
                                                   f"the model has {spec.dtype}{list(spec.shape)}")
        return self.flat.layout.pack(tensors)

    def check_push(self, push: messages.Push, max_samples: int, max_worker_step: int) -> None:
        messages.check_push(push, version=self.version, max_samples=max_samples, max_worker_step=max_worker_step,
                            layers=self.schema)

    def norm_prior(self, weights_mode: bool) -> float | None:
        """The most one update can honestly move, whatever the history: a weights push stays within the
        weights' own norm of them; a gradient within 1000x the clipping norm."""
        if weights_mode:
            return total_norm(self.flat.weights()) + 1.0
        return 1000.0 * self.nn.gradient_clipping if self.nn.gradient_clipping else None

    def robust_problem(self, rank: int, norm: float, weights_mode: bool) -> str:
        """Why an update of this norm from `rank` must not be applied ("" when it may)."""
        if not math.isfinite(norm):
            return "non-finite"
        if self.robust is None:
            return ""
        return self.robust.check(rank, norm, self.norm_prior(weights_mode))

    def reject(self, rank: int, reason: str, detail: str = "") -> None:
        self.rejected += 1
        self.rejected_reasons[reason] += 1
        if rank in self.stats:
            self.stats[rank].rejected += 1
        if reason.startswith("outlier") and self.robust is not None:
            self.robust.rejected += 1
        host = self.stats[rank].hostname if rank in self.stats else f"rank {rank}"
        self.say.warning(f"reject-{reason}", f"rejected push from {host}: {reason}{': ' + detail if detail else ''}")
        self.ctx.metrics.write("reject", rank=rank, reason=reason, detail=detail[:200], version=self.version)

    def count_late(self, rank: int, why: str, step: int | None = None) -> None:
        self.late += 1
        if rank in self.stats:
            self.stats[rank].late += 1
        self.ctx.metrics.write("late", rank=rank, step=step, current_step=self.step, version=self.version, why=why)

    def count_applied(self, rank: int) -> None:
        if rank in self.stats:
            self.applied += 1
            self.stats[rank].applied += 1

    def apply_gradients(self, grads: torch.Tensor, lr_scale: float = 1.0,
                        norms: dict[str, float] | None = None) -> dict[str, float]:
        """Take a flat gradient buffer as the model's gradients, clip, step the optimizer once. Returns
        per-layer gradient norms (when tracked). `norms`, when the caller already computed them, are reused."""
        if grads is not self.flat.grad:
            self.flat.grad.copy_(grads)  # one copy (pushes arrive on the CPU; the model may not be there)
        if norms is None:
            tracked = self.nn.track_gradients
            norms = layer_norms(self.flat.layout, self.flat.grad) if tracked else {"all": total_norm(self.flat.grads())}
        if self.nn.gradient_clipping:
            clip_(self.flat.grads(), norms, self.nn.gradient_clipping)
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * lr_scale
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, base_lrs):
            g["lr"] = lr
        return norms if self.nn.track_gradients else {}

    def own_gradients(self) -> tuple[torch.Tensor, int, float]:
        """The server's own contribution (server_trains): gradients on its shard at the next batch, as the
        model's flat gradient buffer (valid until the next update: fold or apply it at once)."""
        assert self.own_loader is not None
        x, y = self.own_loader.batch_at(self.server_data_step)
        self.server_data_step += 1
        t0 = self.clock.perf_counter()
        self.flat.zero_grad()
        loss = loss_fn(self.model, x, y)
        loss.backward()
        self.ctx.stretch(self.clock.perf_counter() - t0, samples=int(y.shape[0]))
        return self.flat.grad, int(y.shape[0]), float(loss)

    def after_update(self, **fields: Any) -> None:
        """Bookkeeping after every model update: metrics, periodic eval and checkpoint."""
        if self.training_started is None:
            self.training_started = self.clock.monotonic()
            self.ctx.metrics.write("training_start", version=self.version)
        self.ctx.metrics.write("update", version=self.version, step=self.step, **fields)
        if self.version % self.nn.eval_steps == 0:
            self.run_eval()
        if self.cluster.checkpoint_interval and self.version % self.cluster.checkpoint_interval == 0:
            self.save()

    def run_eval(self) -> tuple[float, float]:
        t0 = self.clock.perf_counter()
        loss, acc = self.ctx.task.evaluate(self.model)
        self.last_eval = (loss, acc)
        self.ctx.metrics.write("eval", version=self.version, step=self.step, test_loss=loss, test_accuracy=acc,
                               seconds=round(self.clock.perf_counter() - t0, 4))
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

    def save(self) -> Path | None:
        """Write a checkpoint. A write that fails (a full disk) is one log line: the previous checkpoint is
        intact, training goes on and the next interval tries again."""
        try:
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.state())
        except ckpt.CheckpointError as e:
            self.checkpoint_failures += 1
            self.log.warning(f"checkpoint at version {self.version} not written: {e}; the previous checkpoint is intact "
                             "and training goes on (the next checkpoint is tried at the next interval)")
            self.ctx.metrics.write("checkpoint_failed", version=self.version, step=self.step, error=str(e))
            return None
        self.ctx.metrics.write("checkpoint", version=self.version, step=self.step, path=str(path))
        return path

    def _resume(self) -> None:
        state = ckpt.load_checkpoint(self.checkpoint_dir)
        where = self.checkpoint_dir / ckpt.CHECKPOINT_NAME
        if state.algorithm != self.algorithm:
            raise ckpt.CheckpointError(f"checkpoint {where} is from {state.algorithm}, not {self.algorithm}")
        try:
            self.model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this model and optimizer ({type(e).__name__}: "
                                       f"{str(e)[:300]}); was it written with another nn_config?") from None
        self.version, self.step = state.version, state.step
        self.worker_progress = dict(state.worker_progress)
        self.server_data_step = state.server_data_step
        c = state.counters
        self.applied, self.late, self.rejected = (int(c.get(k, 0)) for k in ("applied", "late", "rejected"))
        self.rejected_reasons.update({str(k): int(v) for k, v in dict(c.get("rejected_reasons", {})).items()})
        digest = ckpt.state_digest(self.model.state_dict())
        older = " (an older checkpoint: its digest covers only the model)" if state.legacy else ""
        self.log.info(f"resumed from {self.checkpoint_dir} at version {self.version}, step {self.step} (model {digest[:12]}){older}")
        self.ctx.metrics.write("resume", version=self.version, step=self.step, model_digest=digest)

    def finish(self) -> dict[str, Any]:
        try:
            loss, acc = self.run_eval()
        except Exception as e:  # a failed run must still leave its summary
            self.log.warning(f"final evaluation failed: {type(e).__name__}: {e}")
            loss, acc = (self.last_eval if self.last_eval is not None else (float("nan"), float("nan")))
        saved = self.save()
        summary = {
            "algorithm": self.algorithm,
            "workers": self.cluster.num_workers,
            "epochs": self.nn.num_epochs,
            "steps": self.version,
            "wall_time_s": round(self.clock.monotonic() - self.started, 3),
            "final_test_accuracy": acc,
            "final_test_loss": loss,
            "model_sha256": ckpt.state_digest(self.model.state_dict()),  # equal digests: bit-identical final models
            "pushes_applied": self.applied,
            "pushes_late": self.late,
            "pushes_rejected": self.rejected,
            "rejected_reasons": dict(self.rejected_reasons),
            "messages_rejected": dict(self.messages_rejected),
            "handler_errors": self.handler_errors,
            "robust_aggregation": self.robust.summary() if self.robust is not None else {"enabled": False},
            "connections_rejected": self.connections_rejected,
            "connections_refused": self.listener.refused if self.listener is not None else 0,
            "checkpoint_failures": self.checkpoint_failures,
            "final_checkpoint": str(saved) if saved is not None else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "stop_reason": self.stop_reason or "finished",
            "stop_status": self.stop_status,
            "per_worker": [s.summary() for s in self.stats.values()],
            "torch": self.ctx.torch,
            "config": to_dict(self.cfg.cluster) | {"nn": to_dict(self.cfg.nn)},
        }
        summary |= self.summary_fields()
        about = getattr(self.ctx.task, "about", None)
        if about:  # a GPT on wikitext-2: which splits (train on valid offline) and which tokenizer
            perplexity = math.exp(loss) if loss < 700 else math.inf  # a diverged run must still write its summary
            summary |= about | {"final_test_perplexity": perplexity, "gpt": self.cfg.gpt.resolved() if self.cfg.gpt else None}
        write_atomic(self.ctx.run_dir / "summary.json", json.dumps(jsonable(summary), indent=2))
        self.ctx.metrics.write("end", version=self.version, test_accuracy=acc, test_loss=loss, peak_rss_mb=self.ctx.peak_rss_mb(),
                               stop_reason=summary["stop_reason"])
        self.log.info(f"done: {self.version} updates, test accuracy {acc:.4f}, wall {summary['wall_time_s']} s")
        return summary

    def summary_fields(self) -> dict[str, Any]:
        """What an algorithm adds to its summary (SyncPS: the deadline it used)."""
        return {}

    def idle_too_long(self) -> bool:
        """No worker connected for idle_timeout seconds (after at least one joined)."""
        if self.peers or not self.ever_joined:
            return False
        return self.clock.monotonic() - self.last_peer_seen > self.cluster.idle_timeout

    def stop_idle(self) -> None:
        """Stop because idle_too_long()."""
        self.stop_reason = f"no worker connected for {self.cluster.idle_timeout:.0f}s"
        self.stop_status = "stopped"


# --------------------------------------------------------------------------- worker side


class WorkerInterrupted(Exception):
    """Ctrl-C arrived; raised where the worker can still leave cleanly (at a step boundary)."""


class ServerFinished(Exception):
    """The server said the run is over; `status` says how: finished, stopped (interrupted, idle) or error."""

    def __init__(self, reason: str, status: str = "finished"):
        self.reason, self.status = reason, status
        super().__init__(reason)


class WorkerBase:
    """A worker's connection to the server, its model, data shard and local optimizer."""

    algorithm: str = ""

    def __init__(self, ctx: NodeContext, *, host: str, port: int):
        self.ctx = ctx
        self.clock = ctx.clock
        self.cfg, self.nn, self.cluster = ctx.cfg, ctx.cfg.nn, ctx.cfg.cluster
        self.log = ctx.log
        self.host, self.port = host, port
        self.rank = ctx.rank
        torch.manual_seed(self.cluster.seed + self.rank)
        self.model = ctx.build_model()
        self.optimizer = ctx.build_optimizer(self.model)
        self.flat = FlatModel(self.model)  # weights and gradients in one buffer each
        self.quantized = QuantizedLayout(self.flat.layout) if self.cluster.use_quantization else None
        self.schema = schema_of(self.model)
        self.recv_schema = {**self.schema, **quantized_schema(self.schema)} if self.cluster.use_quantization else self.schema
        self.loader = ctx.batches(rank=self.rank)
        self.total_steps = self.nn.num_epochs * ctx.steps_per_epoch()
        self.conn: Connection | None = None
        self.version = 0
        self.steps_done = 0
        self.samples_done = 0
        self.pushes_sent = self.pushes_answered = 0
        self.grad_norms: dict[str, float] = {}  # per-layer norms of the last local step, before clipping
        self._prefetched: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # (step, batch)
        self.compute_s = self.comm_s = self.wait_s = 0.0
        self._since_record = (self.clock.perf_counter(), 0, 0)  # (time, steps, samples) at the last record(): W&B rates
        self.last_loss = float("nan")
        self.started = self.clock.monotonic()
        self.interrupted = False  # set by Ctrl-C (SIGINT); the next step says BYE and stops

    def connect(self) -> Message:
        """Dial (with backoff), say hello, load the weights the server welcomes us with."""
        def on_retry(attempt: int, delay: float, err: Exception) -> None:
            if self.interrupted:
                raise WorkerInterrupted
            self.log.info(f"server {self.host}:{self.port} not reachable ({err}); retry {attempt} in {delay:.1f}s")

        retry = RetryPolicy(deadline=self.reconnect_deadline())
        try:
            self.conn = self.dial(retry, on_retry)
        except AuthError as e:  # connect() retried: the same failure every time is a key mismatch, not a bad frame
            raise ConnectFailed(f"authentication keeps failing: {e.problem}", peer=f"{self.host}:{self.port}") from None
        self.conn.agree(*wire_layouts(self.flat, self.quantized))  # offered in the HELLO; a server with another model says so
        self.conn.send(Message(MessageKind.HELLO, {"rank": self.rank, "hostname": self.ctx.hostname, "algorithm": self.algorithm,
                                                   "layout": self.flat.layout.digest.hex()}))
        welcome, typed = self.receive(self.ctx.transport.io_timeout)
        if welcome.kind == MessageKind.BYE:
            raise ServerFinished(typed.reason, typed.status)
        if welcome.kind != MessageKind.WELCOME:
            raise BadField(welcome.kind.name, "kind", "expected WELCOME from the server")
        self.conn.start_heartbeats()
        self.load_weights(welcome, alpha=1.0, version=typed.version)
        self.log.info(f"joined {self.host}:{self.port} at version {self.version}, step {typed.step}")
        self.ctx.metrics.write("join", version=self.version, step=typed.step)
        return welcome

    def dial(self, retry: RetryPolicy, on_retry: Callable[[int, float, Exception], None]) -> Connection:
        """A connection to the server (the virtual sim backend's worker dials its simulated network)."""
        return connect(self.host, self.port, key=self.ctx.key, config=self.ctx.transport, retry=retry, on_retry=on_retry)

    def receive(self, timeout: float) -> tuple[Message, Any]:
        """The server's next message and its typed fields (BadField when they do not parse)."""
        assert self.conn is not None
        msg = self.conn.recv(timeout=timeout, schema=self.recv_schema)
        return msg, messages.parse(msg.kind, msg.fields)

    def reconnect_deadline(self) -> float:
        """How long the server may stay unreachable before this worker gives up."""
        return max(60.0, self.cluster.idle_timeout * 2)

    def load_weights(self, msg: Message, alpha: float, version: int | None = None) -> None:
        """Take the server weights: w = alpha * server + (1 - alpha) * local. `version` is theirs: it becomes
        this worker's base version when weights came (a reply may come without them)."""
        if msg.flat is not None:
            try:
                flat = msg.layout.dequantize(msg.flat) if isinstance(msg.layout, QuantizedLayout) else msg.flat
            except QuantizationError as e:
                raise BadField(msg.kind.name, "quant", str(e)) from None
            self.flat.load(flat, alpha)
            if version is not None:
                self.version = version
            return
        if not msg.tensors:
            return
        try:
            state = dequantize_state(msg.tensors, msg.quant) if msg.quant else msg.tensors
            missing = set(self.schema) - set(state)
        except QuantizationError as e:
            raise BadField(msg.kind.name, "quant", str(e)) from None
        if missing:
            raise BadField(msg.kind.name, "tensors", f"lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                t.mul_(1.0 - alpha).add_(state[name].to(t.device, t.dtype), alpha=alpha) if alpha < 1.0 else t.copy_(state[name])
        if version is not None:
            self.version = version

    def compute_gradients(self, step: int) -> tuple[float, int]:
        """Forward/backward on the batch for `step`; leaves grads in .grad. Compute stretched to the device."""
        if self.interrupted:
            raise WorkerInterrupted
        ready, self._prefetched = self._prefetched, None
        x, y = ready[1] if ready is not None and ready[0] == step else self.loader.batch_at(step)
        t0 = self.clock.perf_counter()
        self.flat.zero_grad()
        loss = loss_fn(self.model, x, y)
        loss.backward()
        elapsed = self.clock.perf_counter() - t0
        self.ctx.stretch(elapsed, samples=int(y.shape[0]))
        self.compute_s += self.clock.perf_counter() - t0
        return float(loss), int(y.shape[0])

    def gradients(self) -> torch.Tensor:
        """The flat gradient buffer as the wire takes it (the buffer itself on the CPU: send it before the
        local step changes it)."""
        return self.flat.grad if self.flat.grad.is_cpu else self.flat.grad.cpu()

    def prefetch(self, step: int) -> None:
        """Load the batch for `step` now (while the server works), for the next compute_gradients."""
        if step < self.total_steps:
            self._prefetched = (step, self.loader.batch_at(step))

    def local_step(self) -> None:
        """Clip (as the server does) and step the local optimizer; keeps the per-layer norms from before clipping."""
        self.grad_norms = layer_norms(self.flat.layout, self.flat.grad)
        if self.nn.gradient_clipping:
            clip_(self.flat.grads(), self.grad_norms, self.nn.gradient_clipping)
        self.optimizer.step()

    def exchange(self, msg: Message, timeout: float, meanwhile: Callable[[], None] | None = None) -> tuple[Message, Any]:
        """Send one request and wait for its reply; reply time counts as communication + waiting.
        `meanwhile` runs after the send, while the server works on the request (e.g. the local step)."""
        assert self.conn is not None
        t0 = self.clock.perf_counter()
        if self.ctx.device.type != "cpu":  # the wire carries CPU tensors
            msg = Message(msg.kind, msg.fields, tensors={k: v.cpu() for k, v in msg.tensors.items()}, quant=msg.quant,
                          flat=msg.flat.cpu() if msg.flat is not None else None, layout=msg.layout)
        self.conn.send(msg, timeout=self.ctx.transport.io_timeout)
        if msg.kind == MessageKind.PUSH:
            self.pushes_sent += 1
        if meanwhile is not None:
            t = self.clock.perf_counter()
            meanwhile()
            t0 += self.clock.perf_counter() - t  # not communication
        t1 = self.clock.perf_counter()
        reply, typed = self.receive(timeout)
        t2 = self.clock.perf_counter()
        held = typed.held_s if isinstance(typed, messages.StepDone) else 0.0
        self.comm_s += (t1 - t0) + max(0.0, (t2 - t1) - held)
        self.wait_s += min(held, t2 - t1)
        if reply.kind == MessageKind.BYE:
            raise ServerFinished(typed.reason, typed.status)
        if msg.kind == MessageKind.PUSH and reply.kind in (MessageKind.ACK, MessageKind.STEP_DONE):
            self.pushes_answered += 1
        return reply, typed

    def record(self, step: int, loss: float, **fields: Any) -> None:
        """One metrics line per exchange with the server, carrying the time split since the last one."""
        self.ctx.metrics.write("step", step=step, loss=loss, version=self.version,
                               compute_s=round(self.compute_s, 6), comm_s=round(self.comm_s, 6),
                               wait_s=round(self.wait_s, 6), **fields)
        now, (t, steps, samples) = self.clock.perf_counter(), self._since_record
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
        lost_since: float | None = None
        while True:
            try:
                welcome = self.connect()
                lost_since = None
                self.train(welcome)
                break
            except ServerFinished as e:
                return self._server_ended(e)
            except ConnectFailed:
                raise  # retried until the deadline already: the server is not coming back
            except (TransportError, WireError, BadField) as e:
                # A lost connection, or one bad frame from the server (corrupted, spoofed, cut off): both
                # pass with a new connection. Through a proxy the TCP connect always succeeds and the
                # handshake fails instead, so connect()'s own deadline never trips: bound the outage here.
                lost_since = lost_since or self.clock.monotonic()
                outage = self.clock.monotonic() - lost_since
                if outage > self.reconnect_deadline():
                    raise ConnectFailed(f"server {self.host}:{self.port} unreachable for {outage:.0f}s "
                                        f"(last error: {e})", peer=f"{self.host}:{self.port}") from None
                what = "lost the server" if isinstance(e, TransportError) else "bad frame from the server"
                self.log.warning(f"{what} ({e}); reconnecting")
                self.ctx.metrics.write("disconnect", reason=str(e))
                if self.conn is not None:
                    self.conn.close(str(e))
                self.clock.sleep(0.5)
                if self.interrupted:
                    raise WorkerInterrupted from None
        self.say_bye(finished=True)

    def _server_ended(self, e: ServerFinished) -> None:
        """The server's BYE: a finished run ends this worker cleanly; a failed one is not reported as finished."""
        if e.status == "error":
            self.log.error(f"the server stopped with an error ({e.reason}); this run did not finish")
            self.say_bye(finished=False, server_ended=True, end_reason=f"server failed: {e.reason}")
            raise SmolclusterError(f"the server stopped with an error: {e.reason}")
        if e.status == "stopped":
            self.log.warning(f"the server stopped the run ({e.reason})")
            self.say_bye(finished=False, server_ended=True, end_reason=f"server stopped: {e.reason}")
            return
        self.log.info(f"server ended the run ({e.reason})")
        self.say_bye(finished=True, server_ended=True, end_reason="server finished")

    def train(self, welcome: Message) -> None:
        raise NotImplementedError

    def say_bye(self, *, finished: bool, server_ended: bool = False, reason: str = "epochs done",
                end_reason: str | None = None) -> None:
        elapsed = max(1e-9, self.clock.monotonic() - self.started)
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
                               pushes_sent=self.pushes_sent, pushes_answered=self.pushes_answered,
                               peak_rss_mb=self.ctx.peak_rss_mb(), stop_reason=end_reason or reason)
        self.log.info(f"{'finished' if finished else 'stopped'}: {self.steps_done} steps, {sps:.1f} samples/s, "
                      f"last loss {self.last_loss:.4f}")
