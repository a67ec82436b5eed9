"""TCP transport: connect with retry, listen, authenticated framed connections, heartbeats, deadlines.

Every wait has its own deadline, so a send in one thread and a recv in another never fight over one
shared socket timeout and no wait is unbounded: where the kernel has per-direction socket timeouts
(SO_RCVTIMEO / SO_SNDTIMEO: Linux, macOS) the socket blocks in each syscall under its direction's timeout;
elsewhere it is non-blocking and every wait goes through poll() (select() on Windows, which has no poll;
no ceiling on descriptor numbers where poll exists: select() fails past 1024). Every deadline is on the
monotonic clock.

The listener bounds what strangers can cost: at most `max_connections` at once, at most `max_pending`
that have not been admitted yet (handshake or HELLO still to come; the oldest is closed to make room,
like sshd's MaxStartups), and an address whose handshakes keep failing is refused for a while.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from smolcluster.common.ratelimit import LogThrottle, TokenBuckets
from smolcluster.core.net import auth
from smolcluster.common.errors import (
    AuthError,
    ConnectFailed,
    ConnectionClosed,
    MissingKey,
    PeerTimeout,
    RecvTimeout,
    RemoteError,
    SmolclusterError,
    TransportError,
    WireError,
)
from smolcluster.core.net.wire import (FlatBuffer, LayoutCache, Message, MessageKind, Schema, WireLimits, byte_views,
                                      encode_frame, frame_mac, read_frame, send_frame, unsent)

# Large kernel buffers let a whole chunk of a model move per syscall; the kernel caps them at its maximum.
SOCKET_BUFFER_BYTES = 4 << 20
_CLOSED_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 0.2
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    deadline: float | None = 60.0  # total time budget; None = forever

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1.0 + rng.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True)
class TransportConfig:
    connect_timeout: float = 10.0
    io_timeout: float = 60.0  # a send, or one frame once its first byte arrived, must finish within this
    handshake_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    limits: WireLimits = field(default_factory=WireLimits)
    max_connections: int = 256  # a listener's connections at once, admitted or not
    max_pending: int = 32  # connections not admitted yet (in the handshake, or before their HELLO)
    failed_handshake_burst: int = 10  # failed handshakes an address may have at once ...
    failed_handshakes_per_s: float = 1.0  # ... and then on average; beyond that it is refused
    auth_attempts: int = 3  # connect() gives up after this many authentication failures in a row


def _ready(sock: socket.socket, readable: bool, timeout: float | None, poller: Any = None) -> bool:
    """Wait until `sock` is readable (or writable), at most `timeout` s (None: no limit). `poller` is a
    poll object with `sock` registered for that direction (made here when not given). Raises OSError or
    ValueError when the socket was closed by another thread."""
    if hasattr(select, "poll"):
        if poller is None:
            poller = select.poll()
            poller.register(sock, select.POLLIN if readable else select.POLLOUT)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
    r, w, _ = select.select([sock] if readable else [], [] if readable else [sock], [], timeout)
    return bool(r or w)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass  # the platform default still works, only slower
    sock.setblocking(False)


def _peer_name(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO; 0 is no limit, so a positive wait is at least 1 us."""
    if seconds == float("inf"):
        return struct.pack("ll", 0, 0)
    usec = max(1, int(seconds * 1e6 + 0.999))
    return struct.pack("ll", usec // 1_000_000, usec % 1_000_000)


def _kernel_timeouts(sock: socket.socket) -> bool:
    """Put `sock` in blocking mode with kernel timeouts per direction (SO_RCVTIMEO / SO_SNDTIMEO), when the
    platform takes and reports back a struct timeval as packed here; else leave it non-blocking (poll)."""
    if not hasattr(select, "poll") or not hasattr(socket, "SO_RCVTIMEO"):
        return False
    probe = _timeval(1.5)
    try:
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            sock.setsockopt(socket.SOL_SOCKET, opt, probe)
            if sock.getsockopt(socket.SOL_SOCKET, opt, len(probe)) != probe:
                return False
    except (OSError, struct.error):
        return False
    sock.setblocking(True)
    return True


TIMEOUT_SLACK = 0.002  # s: a kernel timeout within this of a deadline counts as reaching it


class _Stream:
    """recv_into / sendmsg / sendall over a socket, with deadlines chosen by the caller.

    Receive rules (set by Connection.recv): until the first byte of a frame arrives, wait at most `rx_gap`
    (silence -> PeerTimeout) and at most until `rx_deadline` (-> RecvTimeout, stream still in sync);
    once a frame started, it must finish within `rx_frame_timeout` and never pause longer than `rx_gap`.

    Where the platform has them, each direction waits inside its own syscall, bounded by its own kernel
    timeout (SO_RCVTIMEO for the reader, SO_SNDTIMEO for the sender, re-set only when the wait allowed
    changes), so a frame costs no poll() and no exception per chunk; elsewhere the socket is
    non-blocking and every wait is a poll().
    """

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rx_gap = 10.0
        self.rx_deadline: float | None = None
        self.rx_frame_timeout = 60.0
        self.rx_frame_deadline: float | None = None  # set when a frame's first byte arrives
        self.tx_deadline: float | None = None
        self.tx_timeout = 60.0
        self._pollers: dict[bool, Any] = {}  # readable -> poll object, made once (a send and a recv may wait at once)
        self.kernel_timeouts = _kernel_timeouts(sock)
        self._armed = {True: 1.5, False: 1.5}  # readable -> the kernel timeout set now (as _kernel_timeouts left it)

    def _poller(self, readable: bool) -> Any:
        if not hasattr(select, "poll"):
            return None
        poller = self._pollers.get(readable)
        if poller is None:
            poller = self._pollers[readable] = select.poll()
            poller.register(self.sock, select.POLLIN if readable else select.POLLOUT)
        return poller

    def start_frame(self) -> None:
        self.rx_frame_deadline = None

    def _allowed(self, readable: bool, now: float) -> float:
        """How long this direction may wait for the socket now (inf: no limit)."""
        if readable:
            limit = self.rx_frame_deadline if self.rx_frame_deadline is not None else self.rx_deadline
            return self.rx_gap if limit is None else min(self.rx_gap, limit - now)
        return float("inf") if self.tx_deadline is None else self.tx_deadline - now

    def _arm(self, readable: bool) -> int:
        """Kernel timeouts: set this direction's to the wait allowed now. Returns the flags for the call
        (MSG_DONTWAIT when no wait is left: the call takes what is there, then the deadline is reported)."""
        wait = self._allowed(readable, time.monotonic())
        if wait <= 0:
            return socket.MSG_DONTWAIT
        armed = self._armed[readable]
        if abs(wait - armed) > TIMEOUT_SLACK and not (wait == armed == float("inf")):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO if readable else socket.SO_SNDTIMEO, _timeval(wait))
            except (OSError, ValueError):  # closed by another thread
                raise ConnectionClosed("connection was closed", peer=self.peer) from None
            self._armed[readable] = wait
        return 0

    def _wait(self, readable: bool) -> None:
        """The socket was not ready. Kernel timeouts: the call already waited its armed timeout, so report
        the deadline it reached (or return to try again). Polling: wait for readiness, then the same."""
        now = time.monotonic()
        if self.kernel_timeouts:
            waited = self._armed[readable]
        else:
            wait = self._allowed(readable, now)
            if wait > 0:
                if self.sock.fileno() < 0:
                    raise ConnectionClosed("connection was closed", peer=self.peer)
                try:
                    if _ready(self.sock, readable, None if wait == float("inf") else wait, self._poller(readable)):
                        return
                except (OSError, ValueError):  # closed by another thread
                    raise ConnectionClosed("connection was closed", peer=self.peer) from None
            waited = wait
            now = time.monotonic()
        if not readable:
            if self.tx_deadline is not None and now >= self.tx_deadline - TIMEOUT_SLACK:
                raise PeerTimeout(f"peer did not accept our data for {self.tx_timeout:.1f}s (it stopped reading)", peer=self.peer)
            return
        if self.rx_frame_deadline is not None:
            if now >= self.rx_frame_deadline - TIMEOUT_SLACK:
                raise RecvTimeout(f"a frame took longer than io_timeout={self.rx_frame_timeout:.1f}s to arrive", peer=self.peer)
            if waited >= self.rx_gap - TIMEOUT_SLACK:
                raise PeerTimeout(f"peer went silent for {self.rx_gap:.1f}s in the middle of a frame", peer=self.peer)
            return
        if self.rx_deadline is not None and now >= self.rx_deadline - TIMEOUT_SLACK:
            raise RecvTimeout("no message within the timeout (the peer is alive but sent nothing)", peer=self.peer)
        if waited >= self.rx_gap - TIMEOUT_SLACK:
            raise PeerTimeout(f"nothing received for {self.rx_gap:.1f}s, not even a heartbeat (peer dead, paused or partitioned)",
                              peer=self.peer)

    def recv_into(self, buf: memoryview, nbytes: int = 0) -> int:
        while True:
            try:
                flags = self._arm(True) if self.kernel_timeouts else 0
                n = self.sock.recv_into(buf, nbytes, flags)
            except (BlockingIOError, InterruptedError):
                self._wait(readable=True)
                continue
            except _CLOSED_ERRORS as e:
                raise ConnectionClosed(f"connection reset ({e})", peer=self.peer) from None
            except OSError as e:
                raise ConnectionClosed(f"connection closed ({e})", peer=self.peer) from None
            if n and self.rx_frame_deadline is None:
                self.rx_frame_deadline = time.monotonic() + self.rx_frame_timeout
            self.bytes_received += n
            return n

    def _send_with(self, fn: Callable[..., int], arg: Any, *extra: Any) -> int:
        while True:
            try:
                flags = self._arm(False) if self.kernel_timeouts else 0
                n = fn(arg, *extra, flags)
            except (BlockingIOError, InterruptedError):
                self._wait(readable=False)
                continue
            except _CLOSED_ERRORS as e:
                raise ConnectionClosed(f"connection closed by peer while sending ({e})", peer=self.peer) from None
            except OSError as e:
                raise ConnectionClosed(f"connection closed while sending ({e})", peer=self.peer) from None
            self.bytes_sent += n
            return n

    def sendmsg(self, buffers: list[memoryview]) -> int:
        return self._send_with(self.sock.sendmsg, buffers, ())

    def sendall(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[self._send_with(self.sock.send, view):]


if not hasattr(socket.socket, "sendmsg"):  # Windows: send_frame falls back to sendall per buffer
    del _Stream.sendmsg


class Connection:
    """One framed (and, with a key, authenticated) TCP connection. send and recv may run in two threads."""

    def __init__(self, sock: socket.socket, peer: str, *, config: TransportConfig = TransportConfig(),
                 keys: auth.SessionKeys | None = None):
        self.peer = peer
        self.config = config
        self._sock = sock
        self._stream = _Stream(sock, peer)
        self._keys = keys
        self._send_lock = threading.RLock()
        self._recv_lock = threading.RLock()
        self._send_seq = 0
        self._recv_seq = 0
        self._send_layouts = LayoutCache()  # one per direction: tables repeat frame after frame
        self._recv_layouts = LayoutCache()
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._close_reason = ""
        self._close_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_lock = threading.Lock()  # a close never joins a heartbeat thread that has not started
        self.on_admit: Callable[[], None] | None = None  # set by a Listener: see admit()
        self.authenticated = keys is not None
        self.layouts: tuple[Any, ...] = ()  # the flat layouts agreed with the peer (see agree())
        self._ring: list[Any] = []  # preallocated receive buffers for flat frames, used in turn
        self._ring_next = 0
        self._tail: list[memoryview | bytes] = []  # the unsent rest of a frame send_now began: goes first

    def agree(self, *layouts: Any, buffers: int = 3) -> None:
        """Both ends use these flat layouts from now on (a model's, and its quantized form): flat messages go
        as one buffer, and flat frames are read into `buffers` preallocated buffers in turn, so a received
        message's buffer stays valid until `buffers - 1` more flat frames arrived (the server holds at most
        IN_FLIGHT frames per peer)."""
        with self._recv_lock:
            self.layouts = layouts
            largest = max(a.nbytes for a in layouts)
            self._ring = [FlatBuffer(largest) for _ in range(buffers)]

    def _flat_buffer(self) -> Any:
        buf = self._ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % len(self._ring)
        return buf

    def admit(self) -> None:
        """The handler accepted this peer (e.g. a valid HELLO): it no longer counts against the listener's
        limit on connections that have not been admitted."""
        if self.on_admit is not None:
            self.on_admit()
            self.on_admit = None

    @property
    def bytes_sent(self) -> int:
        return self._stream.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._stream.bytes_received

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ConnectionClosed(f"connection is closed ({self._close_reason or 'closed locally'})", peer=self.peer)

    # ------------------------------------------------------------------ send

    def send(self, msg: Message, *, timeout: float | None = None) -> int:
        """Send one message; the whole send must finish within `timeout` (default io_timeout). Returns bytes sent."""
        with self._send_lock:
            return self._send_locked(msg, timeout)

    def _encode(self, msg: Message, defer_mac: bool) -> list[memoryview | bytes]:
        if msg.flat is not None and all(msg.layout.digest != a.digest for a in self.layouts):
            # this peer agreed no layout (or another): it gets the tensors by name
            msg = Message(msg.kind, msg.fields, tensors=msg.named(), quant=msg.quant)
        return encode_frame(msg, seq=self._send_seq, mac_key=self._keys.send if self._keys else None,
                            limits=self.config.limits, cache=self._send_layouts, defer_mac=defer_mac)

    def _arm_send(self, timeout: float | None) -> _Stream:
        """The stream, with this send's deadline set (default io_timeout). Call with the send lock held.
        (A plain method, not a context manager: this is on every frame's path.)"""
        self._check_open()
        s = self._stream
        s.tx_timeout = self.config.io_timeout if timeout is None else timeout
        s.tx_deadline = time.monotonic() + s.tx_timeout
        return s

    def _send_failed(self, e: TransportError) -> None:
        self.close(f"send failed: {e.problem}")  # a partly sent frame leaves the stream unusable

    def _send_locked(self, msg: Message, timeout: float | None) -> int:
        key = self._keys.send if self._keys else None
        s = self._arm_send(timeout)
        try:
            if self._tail:  # the rest of a frame send_now began goes first
                tail, self._tail = self._tail, []
                send_frame(s, tail)
            buffers = self._encode(msg, defer_mac=True)
            n = send_frame(s, buffers)
            if key is not None:  # hashed after sending: the peer receives (and hashes) meanwhile
                n += send_frame(s, [frame_mac(key, buffers)])
        except TransportError as e:
            self._send_failed(e)
            raise
        self._send_seq += 1
        self._last_send = time.monotonic()
        return n

    def send_now(self, msg: Message) -> int | None:
        """Send `msg` from this thread only as far as that cannot block it: None (nothing sent, send it the
        usual way) when another send holds the connection, a frame is still unfinished, or the peer is keyed
        (its MAC is best hashed off the caller's thread). Otherwise the frame is this connection's next one:
        returns how many of its bytes the socket could not take at once (usually 0); those go before any
        other frame, and flush() sends them (the caller's sender thread must call it soon)."""
        if self._keys is not None or not hasattr(self._sock, "sendmsg") or not self._send_lock.acquire(blocking=False):
            return None
        try:
            if self._tail:
                return None
            self._check_open()
            buffers = byte_views(self._encode(msg, defer_mac=False))
            try:
                sent = self._sock.sendmsg(buffers, (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.close(f"send failed: {e}")
                raise ConnectionClosed(f"connection closed while sending ({e})", peer=self.peer) from None
            self._stream.bytes_sent += sent
            self._tail = unsent(buffers, sent)
            self._send_seq += 1
            self._last_send = time.monotonic()
            return sum(len(b) for b in self._tail)
        finally:
            self._send_lock.release()

    def flush(self, *, timeout: float | None = None) -> None:
        """Send what is left of a frame send_now began (nothing when none is), within `timeout` (default io_timeout)."""
        with self._send_lock:
            if not self._tail:
                return
            s = self._arm_send(timeout)
            tail, self._tail = self._tail, []
            try:
                send_frame(s, tail)
            except TransportError as e:
                self._send_failed(e)
                raise

    # ------------------------------------------------------------------ recv

    def recv(self, *, timeout: float | None = None, schema: Schema | None = None, reject_nonfinite: bool = False,
             limits: WireLimits | None = None) -> Message:
        """Next non-heartbeat message. RecvTimeout leaves the connection usable; every other error closes it.
        `limits` tightens the connection's limits for this message (a HELLO is tiny)."""
        with self._recv_lock:
            self._check_open()
            s = self._stream
            s.rx_gap = self.config.heartbeat_timeout
            s.rx_frame_timeout = self.config.io_timeout
            s.rx_deadline = None if timeout is None else time.monotonic() + timeout
            key = self._keys.recv if self._keys else None
            while True:
                s.start_frame()
                try:
                    msg = read_frame(s, limits=limits or self.config.limits, schema=schema, reject_nonfinite=reject_nonfinite,
                                     mac_key=key, expected_seq=self._recv_seq if key else None, peer=self.peer,
                                     cache=self._recv_layouts, layout=self.layouts or None,
                                     flat_buffer=self._flat_buffer if self._ring else None)
                except RecvTimeout:
                    if s.rx_frame_deadline is None:
                        raise  # nothing of a frame was read: still in sync
                    self.close("receive timed out mid-frame")
                    raise
                except WireError as e:
                    self._reject(e)
                    raise
                except TransportError as e:
                    self.close(e.problem)
                    raise
                self._recv_seq += 1
                if msg.kind == MessageKind.HEARTBEAT:
                    continue
                if key is None and msg.kind in (MessageKind.AUTH_CHALLENGE, MessageKind.AUTH_RESPONSE, MessageKind.AUTH_OK):
                    e = MissingKey(f"peer sent {msg.kind.name}: it requires a cluster key but this node has none; "
                                   f"set the same {auth.KEY_ENV} (or key file) on every node", peer=self.peer)
                    self._reject(e)
                    raise e
                if msg.kind == MessageKind.ERROR:
                    self.close("peer sent an error")
                    raise RemoteError(str(msg.fields.get("error", "Error")), str(msg.fields.get("message", "")), peer=self.peer)
                return msg

    def _reject(self, e: SmolclusterError) -> None:
        """Tell the peer why (best effort, short timeout), then close: the stream may be out of sync."""
        self.send_error(e)
        if not self._closed.is_set():
            _linger(self._sock)
        self.close(f"{type(e).__name__}: {e}")

    def send_error(self, e: BaseException) -> None:
        """Send an ERROR frame naming the problem, without blocking for long. Never raises."""
        problem = getattr(e, "problem", str(e))
        if self._closed.is_set() or not self._send_lock.acquire(timeout=1.0):
            return
        try:
            self._send_locked(Message(MessageKind.ERROR, {"error": type(e).__name__, "message": problem}), 1.0)
        except SmolclusterError:
            pass
        finally:
            self._send_lock.release()

    # ------------------------------------------------------------------ heartbeats, close

    def start_heartbeats(self) -> None:
        """Send HEARTBEAT whenever nothing was sent for heartbeat_interval, until the connection closes."""
        with self._heartbeat_lock:
            if self._heartbeat is not None or self._closed.is_set():
                return
            thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.peer}", daemon=True)
            thread.start()
            self._heartbeat = thread

    def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while not self._closed.wait(min(interval / 2, 0.5)):
            if time.monotonic() - self._last_send < interval:
                continue
            # A send in progress is itself proof of life; never queue behind it.
            if not self._send_lock.acquire(blocking=False):
                continue
            try:
                self._send_locked(Message(MessageKind.HEARTBEAT), self.config.io_timeout)
            except SmolclusterError:
                return  # _send_locked closed the connection
            finally:
                self._send_lock.release()

    def interrupt(self) -> None:
        """Wake a send or recv blocked on this connection (it fails as closed), from any thread, without
        waiting for anything; its owner then closes it."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self, reason: str = "", *, graceful: bool = False, linger: float = 1.0) -> None:
        """Close once; later calls do nothing. Wakes a recv or send blocked in another thread.

        graceful: half-close first and wait up to `linger` s for the peer to close too (a reader thread sees
        its EOF, or we drain). Closing with unread data makes the kernel send a reset, which can destroy
        the last frame we sent (a BYE) before the peer reads it.
        """
        with self._close_lock:
            if self._closed.is_set():
                return
            self._close_reason = reason
            self._closed.set()
        if graceful:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self._recv_lock.acquire(timeout=linger):  # no reader, or it saw EOF: drain ourselves
                try:
                    _linger(self._sock, seconds=linger)
                finally:
                    self._recv_lock.release()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Wait (briefly) for a blocked send/recv to notice, so the fd is not closed under it.
        got_recv = self._recv_lock.acquire(timeout=2.0)
        got_send = self._send_lock.acquire(timeout=2.0)
        try:
            self._sock.close()
        finally:
            if got_send:
                self._send_lock.release()
            if got_recv:
                self._recv_lock.release()
        with self._heartbeat_lock:
            hb = self._heartbeat
        if hb is not None and hb is not threading.current_thread():
            hb.join(timeout=2.0)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close("context exited")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.peer} {state} {'keyed' if self._keys else 'keyless'}>"


def _linger(sock: socket.socket, seconds: float = 0.5, max_bytes: int = 1 << 20) -> None:
    """Half-close and discard what the peer still sends, briefly: closing with unread data makes the kernel
    send a reset, which can destroy the ERROR frame we just sent before the peer reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        scratch = bytearray(65536)
        while max_bytes > 0:
            wait = deadline - time.monotonic()
            if wait <= 0 or not _ready(sock, True, wait):
                return
            n = sock.recv_into(scratch)
            if not n:
                return
            max_bytes -= n
    except (OSError, ValueError):
        pass


def _handshake(sock: socket.socket, peer: str, key: bytes, role: str, config: TransportConfig) -> auth.SessionKeys:
    """Run the handshake under one deadline; silence or a slow peer becomes AuthFailed, not a hang."""
    stream = _Stream(sock, peer)
    stream.rx_gap = stream.rx_frame_timeout = stream.tx_timeout = config.handshake_timeout
    stream.rx_deadline = stream.tx_deadline = time.monotonic() + config.handshake_timeout
    try:
        if role == "client":
            return auth.client_handshake(stream, key, peer=peer)
        return auth.server_handshake(stream, key, peer=peer)
    except (PeerTimeout, RecvTimeout):
        raise auth.AuthFailed(f"no complete handshake within handshake_timeout={config.handshake_timeout:.1f}s "
                              "(does the peer have a cluster key? is it a smolcluster node?)", peer=peer) from None


def connect(host: str, port: int, *, key: bytes | None, config: TransportConfig = TransportConfig(),
            retry: RetryPolicy | None = RetryPolicy(),
            on_retry: Callable[[int, float, Exception], None] | None = None) -> Connection:
    """Connect (retrying with exponential backoff and jitter), then authenticate when `key` is set.

    An authentication failure is retried too, a bounded number of times (`config.auth_attempts` in a
    row): one spoofed or corrupted handshake frame must not end a worker, while a wrong key fails the
    same way every time and is reported as such."""
    peer = _peer_name((host, port))
    start = time.monotonic()
    rng = random.Random()
    attempt = 0
    auth_failures = 0
    while True:
        attempt += 1
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=config.connect_timeout)
            _tune(sock)
            keys = _handshake(sock, peer, key, "client", config) if key is not None else None
            return Connection(sock, peer, config=config, keys=keys)
        except AuthError as e:
            if sock is not None:
                sock.close()
            auth_failures += 1
            if retry is None:
                raise
            if auth_failures >= config.auth_attempts:
                raise type(e)(f"{e.problem} ({auth_failures} attempts in a row failed the same way: not a "
                              "corrupted frame but a key mismatch)", peer=e.peer) from None
            last = e
        except (OSError, TransportError, WireError) as e:
            if sock is not None:
                sock.close()
            auth_failures = 0
            last = e
        elapsed = time.monotonic() - start
        delay = retry.delay(attempt, rng) if retry is not None else 0.0
        if retry is None or (retry.deadline is not None and elapsed + delay > retry.deadline):
            budget = "" if retry is None else f" within {retry.deadline:.1f}s"
            raise ConnectFailed(f"could not connect after {attempt} attempt(s){budget}: {last} "
                                "(is the server running and reachable at this address?)", peer=peer) from None
        if on_retry is not None:
            on_retry(attempt, delay, last)
        time.sleep(delay)


class Listener:
    """Accepts connections in a thread; each one handshakes and is handled in its own thread.

    A connection is *pending* from its accept until the handler calls `conn.admit()` (a server does at a
    valid HELLO). Pending connections are capped (`max_pending`; the oldest is closed to make room, so a
    crowd of idle connections cannot keep a worker out), all connections too (`max_connections`; beyond
    it new ones are closed at once), and an address whose handshakes fail too often is refused for a
    while. Each of these is logged once per 10 s, not once per connection."""

    def __init__(self, host: str, port: int, *, key: bytes | None, on_connection: Callable[[Connection], None],
                 config: TransportConfig = TransportConfig(), on_reject: Callable[[str, Exception], None] | None = None,
                 logger: logging.Logger | None = None):
        self.key = key
        self.on_connection = on_connection
        self.on_reject = on_reject
        self.config = config
        self.log = logger or logging.getLogger("smolcluster.core.net.transport")
        self.say = LogThrottle(self.log)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # not on Windows
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise ConnectFailed(f"cannot listen on this address ({e}); is another server using the port?",
                                peer=_peer_name((host, port))) from None
        self._sock.listen(128)
        self._sock.settimeout(0.2)  # lets the accept loop notice close()
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._conns: set[Connection] = set()
        self._socks: set[socket.socket] = set()
        self._pending: dict[socket.socket, float] = {}  # not admitted yet, oldest first
        self._failures = TokenBuckets(config.failed_handshake_burst, config.failed_handshakes_per_s)
        self.refused = 0  # connections closed at accept: over a limit, or from a throttled address
        self._accept_thread: threading.Thread | None = None

    def start(self) -> None:
        if self.key is None and not _is_loopback(self.address[0]):
            self.log.warning("listening on %s:%d WITHOUT a cluster key: any host that can reach this port can join "
                             "and send tensors; set %s or a key file (smolcluster keygen PATH)",
                             self.address[0], self.address[1], auth.KEY_ENV)
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"accept-{self.address[1]}", daemon=True)
        self._accept_thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._socks)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: back off, keep serving
                continue
            if not self._admit_new(sock, addr[0]):
                continue
            t = threading.Thread(target=self._serve, args=(sock, _peer_name(addr)), name=f"conn-{addr[1]}", daemon=True)
            with self._lock:
                if self._closed.is_set():
                    sock.close()
                    return
                self._threads.add(t)
            t.start()

    def _admit_new(self, sock: socket.socket, host: str) -> bool:
        """Take a new connection in, within the limits; closes it and returns False when it may not."""
        refuse = ""
        oldest: socket.socket | None = None
        with self._lock:
            if not self._failures.allows(host):
                refuse = f"refusing connections from {host} for a while: too many failed handshakes"
            elif len(self._socks) >= self.config.max_connections:
                refuse = f"refusing new connections: {len(self._socks)} open, the limit is {self.config.max_connections}"
            else:
                if len(self._pending) >= self.config.max_pending:
                    oldest = next(iter(self._pending))
                    del self._pending[oldest]
                self._socks.add(sock)
                self._pending[sock] = time.monotonic()
        if refuse:
            self.refused += 1
            self.say.warning(refuse.split(":")[0], refuse)
            _abort(sock)
            return False
        if oldest is not None:
            self.refused += 1
            self.say.warning("pending", f"{self.config.max_pending} connections have not finished their handshake or "
                                        "HELLO: closing the oldest to make room (a slow or hostile peer?)")
            try:
                oldest.shutdown(socket.SHUT_RDWR)  # its thread sees the connection close and ends
            except OSError:
                pass
        return True

    def _admitted(self, sock: socket.socket) -> None:
        with self._lock:
            self._pending.pop(sock, None)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn: Connection | None = None
        try:
            conn = self._authenticate(sock, peer)
            if conn is None:
                return
            conn.on_admit = lambda: self._admitted(sock)
            with self._lock:
                if self._closed.is_set():
                    return
                self._conns.add(conn)
            try:
                # The handler owns the connection; if it returns normally it may have handed it on.
                self.on_connection(conn)
            except ConnectionClosed as e:
                self.log.info("%s disconnected: %s", peer, e.problem)
                conn.close(e.problem)
            except (WireError, TransportError) as e:
                conn.send_error(e)
                conn.close(e.problem)
                self._rejected(peer, e)
            except Exception as e:  # a bug in the handler must not take the server down
                self.log.exception("handler for %s crashed", peer)
                conn.send_error(e)
                conn.close(f"handler crashed: {e}")
                if self.on_reject is not None:
                    self.on_reject(peer, e)
        finally:
            with self._lock:
                if conn is not None:
                    self._conns.discard(conn)
                self._socks.discard(sock)
                self._pending.pop(sock, None)
                self._threads.discard(threading.current_thread())
            if conn is None:
                sock.close()
            elif self._closed.is_set():
                conn.close("server shutting down")

    def _authenticate(self, sock: socket.socket, peer: str) -> Connection | None:
        """Handshake (with a key) under handshake_timeout; on failure tell the peer why and return None."""
        _tune(sock)
        if self.key is None:
            return Connection(sock, peer, config=self.config)
        try:
            keys = _handshake(sock, peer, self.key, "server", self.config)
        except (WireError, TransportError) as e:
            if isinstance(e, WireError):
                try:  # unauthenticated ERROR frame: there is no session key
                    stream = _Stream(sock, peer)
                    stream.tx_deadline = time.monotonic() + 1.0
                    send_frame(stream, encode_frame(Message(MessageKind.ERROR, {"error": type(e).__name__, "message": e.problem})))
                    _linger(sock)
                except SmolclusterError:
                    pass
            if isinstance(e, AuthError):
                self._failures.take(peer.rsplit(":", 1)[0].strip("[]"))
            self._rejected(peer, e)
            return None
        return Connection(sock, peer, config=self.config, keys=keys)

    def _rejected(self, peer: str, e: Exception) -> None:
        problem = getattr(e, "problem", str(e))
        self.say.warning(type(e).__name__, f"rejected {peer}: {type(e).__name__}: {problem}")
        if self.on_reject is not None:
            self.on_reject(peer, e)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection this listener accepted, and join its threads (all of
        them within `timeout` s together, not each)."""
        if self._closed.is_set():
            return
        self._closed.set()
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        self._sock.close()
        with self._lock:
            conns, socks, threads = list(self._conns), list(self._socks), list(self._threads)
        for s in socks:  # first wake every blocked reader, then close: closes wait for their readers
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for c in conns:
            c.close("server shutting down")
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.say.flush()

    def __enter__(self) -> "Listener":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _abort(sock: socket.socket) -> None:
    """Close without lingering (a reset): a refused connection costs no thread and no wait."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
