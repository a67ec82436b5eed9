"""One impairing TCP proxy (a link): listen address -> upstream address, with toxics per direction.

Threads: one accept thread per proxy; per connection, a reader and a writer for each direction
(upstream = client -> server, downstream = server -> client). The reader receives large chunks,
runs them through the direction's toxics (pure time arithmetic, see toxics.py) and queues them
with their delivery time; the writer waits for each item's time, paces it through bandwidth
toxics and sends it. With no toxic active and nothing queued, the reader sends straight through.

Disabling a proxy closes its listener and every open connection (new ones are refused);
deleting it does the same for good.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Optional

from smolcluster.common.errors import ProxyError
from smolcluster.testbed.linkemu.toxics import EOF, RESET, STREAMS, Item, Payload, Toxic, ToxicState

CHUNK = 128 * 1024  # bytes per recv: big enough that Python's per-call cost stays small
QUEUE_LIMIT = 16 * 1024 * 1024  # queued bytes per direction before the reader stops reading (backpressure)
QUEUE_SLACK_S = 0.1  # on a rate-limited link, queue at most this much link time beyond the latency
DIAL_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = 5.0


def split_hostport(addr: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port). Raises ProxyError(400)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ProxyError(f"bad address {addr!r}: expected HOST:PORT", 400)
    return host.strip("[]"), int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Pipe:
    """One direction of one connection: reader thread, queue of timed items, writer thread."""

    def __init__(self, conn: "_Connection", stream: str):
        self.conn = conn
        self.stream = stream
        self.cond = threading.Condition()
        self.queue: deque[Item] = deque()
        self.queued_bytes = 0
        self.pending = 0  # items queued or being written
        self.last_t = 0.0  # delivery times never go backwards (TCP keeps order)
        self.finished = False  # EOF delivered to the far side
        self.bytes = 0  # delivered to the far side
        self.rng = random.Random(conn.proxy.rng.random())
        self._chain: tuple[Toxic, ...] = ()
        self._states: dict[str, ToxicState] = {}
        self.active: list[tuple[Toxic, ToxicState]] = []

    # ------------------------------------------------------------------ toxics

    def sync(self, now: float) -> list[tuple[Toxic, ToxicState]]:
        """Pick up toxic changes of the proxy; call with self.cond held."""
        chain = self.conn.proxy.chain(self.stream)
        if chain is self._chain:
            return self.active
        states: dict[str, ToxicState] = {}
        for toxic in chain:
            st = self._states.get(toxic.name)
            if st is None or st.toxic is not toxic:
                # New or updated toxic: (re)roll toxicity and restart its timers, like Toxiproxy
                # restarting the toxic's pipe; counters survive an update of the same type.
                if st is None or type(st.toxic) is not type(toxic):
                    st = ToxicState(toxic, self.rng)
                st.toxic = toxic
                st.active = self.rng.random() < toxic.toxicity
                st.deadline = None
                toxic.attach(st, now)
            states[toxic.name] = st
        self._chain, self._states = chain, states
        self.active = [(st.toxic, st) for st in states.values() if st.active]
        return self.active

    @staticmethod
    def queue_limit(active: list[tuple[Toxic, ToxicState]]) -> float:
        """Bytes the pipe may hold. Enough for latency x rate (so latency does not cap throughput),
        but on a rate-limited link only ~100 ms more than that: a bigger queue would only add delay
        (bufferbloat), and backpressure to the sender's TCP is what a real bottleneck gives."""
        rates = [r for r in (toxic.rate() for toxic, _ in active) if r]
        if not rates:
            return QUEUE_LIMIT
        delay = sum(toxic.delay_s() for toxic, _ in active)
        return min(QUEUE_LIMIT, max(64 * 1024, min(rates) * (delay + QUEUE_SLACK_S)))

    def _deadline(self) -> Optional[tuple[float, str]]:
        deadlines = [st.deadline for _, st in self.active if st.deadline is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ reader

    def read_loop(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        conn = self.conn
        while not conn.closed:
            try:
                n = src.recv_into(buf)
            except OSError:
                conn.abort(reset=False)
                return
            now = time.monotonic()
            payload: Payload = bytes(view[:n]) if n else EOF
            with self.cond:
                while self.queued_bytes > self.queue_limit(self.active) and not conn.closed:
                    self.cond.wait()
                if conn.closed:
                    return
                active = self.sync(now)
                fast = not active and self.pending == 0
                if not fast:
                    items = [(now, payload)]
                    for toxic, st in active:
                        items = [out for t, p in items for out in toxic.process(t, p, st)]
                    for t, p in items:
                        self.last_t = max(t, self.last_t)
                        self.queue.append((self.last_t, p))
                        self.pending += 1
                        self.queued_bytes += len(p) if isinstance(p, bytes) else 0
                    self.cond.notify_all()
            if fast:
                if not n:
                    self._deliver_eof(dst)
                    return
                try:
                    dst.sendall(view[:n])
                except OSError:
                    conn.abort(reset=False)
                    return
                self.bytes += n
            elif not n:
                return

    # ------------------------------------------------------------------ writer

    def write_loop(self, dst: socket.socket) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            (_, payload), counted = job
            if isinstance(payload, bytes):
                if not self._send(dst, payload):
                    self.conn.abort(reset=False)
            elif payload == EOF:
                self._deliver_eof(dst)
            else:
                self.conn.abort(reset=payload == RESET)
            if counted:
                with self.cond:
                    self.pending -= 1
                    self.queued_bytes -= len(payload) if isinstance(payload, bytes) else 0
                    self.cond.notify_all()

    def _next_job(self) -> Optional[tuple[Item, bool]]:
        """Block until an item is due or a toxic timer fires; None when the pipe is done."""
        with self.cond:
            while True:
                if self.conn.closed or (self.finished and not self.queue):
                    return None
                now = time.monotonic()
                deadline = self._deadline()
                if deadline is not None and deadline[0] <= now:
                    return deadline, False
                if self.queue and self.queue[0][0] <= now:
                    return self.queue.popleft(), True
                wake = min(self.queue[0][0] if self.queue else float("inf"), deadline[0] if deadline else float("inf"))
                self.cond.wait(None if wake == float("inf") else wake - now)

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        pacers = [toxic for toxic, _ in self.active if toxic.paces]
        try:
            if not pacers:
                dst.sendall(data)
                self.bytes += len(data)
                return True
            view = memoryview(data)
            step = min(toxic.piece_size() for toxic in pacers)
            for off in range(0, len(data), step):
                part = view[off : off + step]
                for toxic in pacers:
                    if not self._sleep_until(toxic.reserve(len(part), time.monotonic())):
                        return True  # connection closed meanwhile; nothing to report
                dst.sendall(part)
                self.bytes += len(part)
            return True
        except OSError:
            return False

    def _sleep_until(self, when: float) -> bool:
        with self.cond:
            while not self.conn.closed:
                left = when - time.monotonic()
                if left <= 0:
                    return True
                self.cond.wait(left)
        return False

    def _deliver_eof(self, dst: socket.socket) -> None:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self.cond:
            self.finished = True
            self.cond.notify_all()
        self.conn.pipe_finished()

    def wake(self) -> None:
        with self.cond:
            self.sync(time.monotonic())
            self.cond.notify_all()


class _Connection:
    """A client connection and its upstream connection, with a pipe per direction."""

    def __init__(self, proxy: "Proxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.server: Optional[socket.socket] = None
        self.closed = False
        self._lock = threading.Lock()
        self.pipes = {stream: _Pipe(self, stream) for stream in STREAMS}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        t = threading.Thread(target=self._run, name=f"linkemu-{self.proxy.name}-up-read", daemon=True)
        self.threads.append(t)
        t.start()

    def _run(self) -> None:
        host, port = split_hostport(self.proxy.upstream)
        try:
            server = socket.create_connection((host, port), timeout=DIAL_TIMEOUT_S)
            server.settimeout(None)
        except OSError:
            self.abort(reset=False)
            return
        with self._lock:
            if self.closed:
                server.close()
                return
            self.server = server
        for sock in (self.client, server):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        up, down = self.pipes["upstream"], self.pipes["downstream"]
        now = time.monotonic()
        for pipe in (up, down):
            with pipe.cond:
                pipe.sync(now)  # start toxic timers (timeout) even before any data flows
        name = f"linkemu-{self.proxy.name}"
        extra = [
            threading.Thread(target=up.write_loop, args=(server,), name=f"{name}-up-write", daemon=True),
            threading.Thread(target=down.read_loop, args=(server, self.client), name=f"{name}-down-read", daemon=True),
            threading.Thread(target=down.write_loop, args=(self.client,), name=f"{name}-down-write", daemon=True),
        ]
        self.threads.extend(extra)
        for t in extra:
            t.start()
        up.read_loop(self.client, server)

    def pipe_finished(self) -> None:
        if all(p.finished for p in self.pipes.values()):
            self.abort(reset=False)

    def abort(self, reset: bool) -> None:
        """Close both sides: FIN, or RST when `reset`. Wakes every thread of the connection."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            socks = [s for s in (self.client, self.server) if s is not None]
        for sock in socks:
            try:
                if reset:
                    # SHUT_RD wakes a blocked recv without sending anything; close with linger 0 sends RST.
                    sock.shutdown(socket.SHUT_RD)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for pipe in self.pipes.values():
            with pipe.cond:
                pipe.cond.notify_all()
        self.proxy._connection_closed(self)

    def wake(self) -> None:
        for pipe in self.pipes.values():
            pipe.wake()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        joined: set[threading.Thread] = set()
        while True:  # the first thread starts the others, so look again after joining it
            todo = [t for t in self.threads if t not in joined and t is not threading.current_thread()]
            if not todo or time.monotonic() > end:
                return
            for t in todo:
                t.join(max(0.0, end - time.monotonic()))
                joined.add(t)


class Proxy:
    """A named link: listens on `listen`, forwards to `upstream`, applies toxics per direction."""

    def __init__(self, name: str, listen: str, upstream: str, seed: Optional[int] = None):
        split_hostport(listen)
        split_hostport(upstream)
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.rng = random.Random(seed)
        self._lock = threading.RLock()  # configuration: listener, toxics
        self._conns_lock = threading.Lock()  # live connections and counters (taken by connection threads)
        self._accepting: Optional[socket.socket] = None  # the listener new connections may come from
        self._toxics: dict[str, Toxic] = {}
        self._chains: dict[str, tuple[Toxic, ...]] = {s: () for s in STREAMS}
        self._conns: set[_Connection] = set()
        self._finished: list[_Connection] = []  # closed, threads maybe still exiting
        self._listener: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._totals = {"upstream": 0, "downstream": 0}
        self._connections_total = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def enabled(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen (no-op when already listening). Raises ProxyError(500) when the address is taken."""
        with self._lock:
            if self._listener is not None:
                return
            host, port = split_hostport(self.listen)
            try:
                infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                infos.sort(key=lambda info: info[0] != socket.AF_INET)  # "localhost" means 127.0.0.1 first
                family, kind, proto, _, sockaddr = infos[0]
                lsock = socket.socket(family, kind, proto)
            except OSError as e:
                raise ProxyError(f"proxy {self.name}: cannot listen on {self.listen}: {e}", 500) from None
            try:
                if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind right after disable
                lsock.bind(sockaddr)
                lsock.listen(128)
            except OSError as e:
                lsock.close()
                raise ProxyError(f"proxy {self.name}: cannot listen on {self.listen}: {e.strerror or e}", 500) from None
            bound = lsock.getsockname()
            self.listen = join_hostport(bound[0], bound[1])  # report the real port, as Toxiproxy does
            self._listener = lsock
            with self._conns_lock:
                self._accepting = lsock
            self._wake_r, self._wake_w = socket.socketpair()
            self._accept_thread = threading.Thread(target=self._accept_loop, args=(lsock, self._wake_r), name=f"linkemu-{self.name}-accept", daemon=True)
            self._accept_thread.start()

    def stop(self) -> None:
        """Stop listening and close every connection; joins the threads."""
        with self._lock:
            lsock, wake_r, wake_w, thread = self._listener, self._wake_r, self._wake_w, self._accept_thread
            self._listener = self._wake_r = self._wake_w = self._accept_thread = None
        with self._conns_lock:
            self._accepting = None
            conns = list(self._conns)
        if wake_w is not None:
            wake_w.send(b"x")
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
        for sock in (lsock, wake_r, wake_w):
            if sock is not None:
                sock.close()
        for conn in conns:
            conn.abort(reset=False)
        with self._conns_lock:
            finished, self._finished = self._finished, []
        for conn in finished:
            conn.join(JOIN_TIMEOUT_S)

    def _accept_loop(self, lsock: socket.socket, wake: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([lsock, wake], [], [])
            if wake in ready:
                return
            try:
                client, _ = lsock.accept()
            except OSError:
                continue
            conn = _Connection(self, client)
            with self._conns_lock:
                if self._accepting is not lsock:
                    client.close()
                    return
                self._conns.add(conn)
                self._connections_total += 1
            conn.start()

    def _connection_closed(self, conn: _Connection) -> None:
        with self._conns_lock:
            if conn in self._conns:
                self._conns.discard(conn)
                for stream, pipe in conn.pipes.items():
                    self._totals[stream] += pipe.bytes
            self._finished.append(conn)
            # Keep the list short on long runs: forget connections whose threads are gone.
            if len(self._finished) > 64:
                self._finished = [c for c in self._finished if any(t.is_alive() for t in c.threads)]

    def update(self, listen: Optional[str] = None, upstream: Optional[str] = None, enabled: Optional[bool] = None) -> None:
        """Toxiproxy's proxy update: a new listen or upstream restarts the proxy (drops connections)."""
        with self._lock:
            if listen is not None:
                split_hostport(listen)
            if upstream is not None:
                split_hostport(upstream)
            moved = (listen is not None and listen != self.listen) or (upstream is not None and upstream != self.upstream)
            want = self.enabled if enabled is None else enabled
            if moved or not want:
                self.stop()
            self.listen = listen if listen is not None else self.listen
            self.upstream = upstream if upstream is not None else self.upstream
            if want:
                self.start()

    # ------------------------------------------------------------------ toxics

    def chain(self, stream: str) -> tuple[Toxic, ...]:
        return self._chains[stream]

    def toxics(self) -> list[Toxic]:
        """Upstream toxics first, then downstream, each in the order added (Toxiproxy's listing order)."""
        return [t for s in STREAMS for t in self._chains[s]]

    def get_toxic(self, name: str) -> Toxic:
        toxic = self._toxics.get(name)
        if toxic is None:
            raise ProxyError(f"toxic not found: {name!r} on proxy {self.name!r}", 404)
        return toxic

    def add_toxic(self, toxic: Toxic) -> Toxic:
        with self._lock:
            if toxic.name in self._toxics:
                raise ProxyError(f"toxic already exists: {toxic.name!r} on proxy {self.name!r}", 409)
            self._toxics[toxic.name] = toxic
            self._rebuild()
        return toxic

    def update_toxic(self, name: str, body: dict[str, Any]) -> Toxic:
        with self._lock:
            toxic = self.get_toxic(name).updated(body)
            self._toxics[name] = toxic
            self._rebuild()
        return toxic

    def remove_toxic(self, name: str) -> None:
        with self._lock:
            self.get_toxic(name)
            del self._toxics[name]
            self._rebuild()

    def reset_toxics(self) -> None:
        with self._lock:
            self._toxics.clear()
            self._rebuild()

    def _rebuild(self) -> None:
        self._chains = {s: tuple(t for t in self._toxics.values() if t.stream == s) for s in STREAMS}
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.wake()

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, int]:
        """Bytes delivered per direction and connections, since the proxy was created."""
        with self._conns_lock:
            up, down = self._totals["upstream"], self._totals["downstream"]
            for conn in self._conns:
                up += conn.pipes["upstream"].bytes
                down += conn.pipes["downstream"].bytes
            return {"upstream_bytes": up, "downstream_bytes": down, "connections_total": self._connections_total, "connections_active": len(self._conns)}

    def to_json(self) -> dict[str, Any]:
        """Toxiproxy's proxy JSON, plus `stats` (real clients ignore unknown fields)."""
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics()],
            "stats": self.stats(),
        }
