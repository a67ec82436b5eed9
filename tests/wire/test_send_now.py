"""Connection.send_now: the server's main thread sends a reply itself when the socket takes it at once,
and hands the rest of a frame the socket could not take to its sender thread (flush), which sends it before
any other frame. Real loopback TCP; the peer reads with an ordinary Connection."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from smolcluster.core.net import auth
from smolcluster.core.net.transport import Connection, TransportConfig
from smolcluster.core.net.wire import Message, MessageKind

CONFIG = TransportConfig(heartbeat_timeout=30.0, io_timeout=30.0)


@pytest.fixture
def pair():
    """(sender, receiver) Connections over loopback TCP; the sender's send buffer is small, so a large frame
    cannot go in one non-blocking call while the receiver is not reading."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    lst.close()
    for sock, opt in ((server, socket.SO_SNDBUF), (client, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 10)
    sender, receiver = Connection(server, "worker", config=CONFIG), Connection(client, "server", config=CONFIG)
    yield sender, receiver
    sender.close()
    receiver.close()


def big(value: float) -> Message:
    return Message(MessageKind.WEIGHTS, {"version": int(value)}, tensors={"w": torch.full((1 << 20,), value)})


def test_a_small_reply_goes_whole_from_the_callers_thread(pair):
    sender, receiver = pair
    assert sender.send_now(Message(MessageKind.ACK, {"status": "applied", "version": 3})) == 0
    got = receiver.recv(timeout=10)
    assert (got.kind, got.fields["version"]) == (MessageKind.ACK, 3)


def test_the_rest_of_a_frame_goes_first_and_nothing_is_lost(pair):
    sender, receiver = pair
    left = sender.send_now(big(1.0))  # 4 MB against a 16 KB buffer, nobody reading yet
    assert left and left < 4 << 20
    assert sender.send_now(big(2.0)) is None  # a frame is unfinished: this one must wait its turn
    received: list[Message] = []
    reader = threading.Thread(target=lambda: received.extend(receiver.recv(timeout=20) for _ in range(3)))
    reader.start()
    sender.flush()
    sender.send(big(2.0))  # the usual way, after the first frame's rest
    sender.send(Message(MessageKind.ACK, {"status": "applied", "version": 9}))
    reader.join(timeout=30)
    assert [m.fields["version"] for m in received] == [1, 2, 9]
    assert torch.equal(received[0].tensors["w"], torch.full((1 << 20,), 1.0))
    assert torch.equal(received[1].tensors["w"], torch.full((1 << 20,), 2.0))


def test_a_heartbeat_waits_for_an_unfinished_frame(pair):
    sender, receiver = pair
    assert sender.send_now(big(5.0))
    received: list[Message] = []
    reader = threading.Thread(target=lambda: received.append(receiver.recv(timeout=20)))
    reader.start()
    sender.send(Message(MessageKind.HEARTBEAT))  # sends the rest of the frame first, then itself
    reader.join(timeout=30)
    assert received and torch.equal(received[0].tensors["w"], torch.full((1 << 20,), 5.0))


def test_a_keyed_connection_never_sends_from_the_callers_thread():
    a, b = socket.socketpair()
    keys = auth.SessionKeys(send=b"k" * 32, recv=b"k" * 32)
    conn = Connection(a, "peer", config=CONFIG, keys=keys)
    try:
        assert conn.send_now(Message(MessageKind.ACK, {"status": "applied", "version": 1})) is None
    finally:
        conn.close()
        b.close()
