"""`endpoint.TCPServerEndpoint` over real TCP on 127.0.0.1: writes reach the
socket at once, what the socket refuses is queued in order, Nagle is off, and
a close with nothing queued happens at once."""

from __future__ import annotations

import socket
import struct
import threading
from unittest import mock

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, task, tcp

from twisted_cacheproxy.transport.endpoint import SendAtOnceServer, TCPServerEndpoint

pytestmark = pytest.mark.integration


class Recording(protocol.Protocol):
    """Notes why its connection was lost."""

    lost = None

    def connectionLost(self, reason):
        self.lost = reason


class Accepted(protocol.Factory):
    """Keeps the protocol of each accepted connection."""

    def __init__(self) -> None:
        self.protocols: list[Recording] = []

    def buildProtocol(self, addr):
        p = Recording()
        self.protocols.append(p)
        return p


@defer.inlineCallbacks
def accepted_pair():
    """A listening endpoint, a blocking client socket and the server's protocol."""
    from twisted.internet import reactor

    factory = Accepted()
    port = yield TCPServerEndpoint(reactor, 0, "127.0.0.1").listen(factory)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    for _ in range(500):
        if factory.protocols:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    return port, client, factory.protocols[0]


def receive(client: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = client.recv(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@pytest.fixture
def pair():
    """A listening endpoint's port, a blocking client and the server's protocol."""
    port, client, server = pytest_twisted.blockon(accepted_pair())
    yield client, server
    client.close()
    pytest_twisted.blockon(port.stopListening())


def test_a_write_reaches_the_socket_before_the_reactor_turns(pair):
    """Sending at once saves each answer a reactor turn and half its system calls."""
    client, server = pair
    server.transport.write(b"at once")
    # The reactor cannot run while this blocks: a queued write would never come.
    client.settimeout(2)
    assert client.recv(100) == b"at once"


#: 16 MB: more than the socket buffers hold.
BIG = bytes(range(256)) * (16 * 4096)


@defer.inlineCallbacks
def received_meanwhile(client: socket.socket, size: int):
    """Up to ``size`` bytes read by a thread while the reactor runs."""
    from twisted.internet import reactor

    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(receive(client, size)))
    reader.start()
    for _ in range(1000):
        if not reader.is_alive():
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    reader.join(5)
    return received[0]


@pytest_twisted.inlineCallbacks
def test_what_the_socket_refuses_is_queued_and_follows_in_order(pair):
    client, server = pair
    server.transport.write(BIG)
    server.transport.write(b"tail")
    assert (yield received_meanwhile(client, len(BIG) + 4)) == BIG + b"tail"


@pytest_twisted.inlineCallbacks
def test_a_write_the_socket_fails_loses_the_connection_through_twisted(pair):
    """The at-once send goes straight to the socket: when the peer has reset
    the connection, the write is queued and Twisted's own write finds the loss."""
    from twisted.internet import reactor

    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset, not an end-of-file
    server.transport.stopReading()  # so that only the write can find out
    for _ in range(500):
        server.transport.write(b"answer")
        if server.lost is not None:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    assert server.lost is not None and server.lost.check(error.ConnectionLost)


def test_a_connection_holds_twisteds_defaults_itself(pair):
    """What each write and read looks at is set on the connection, with the
    values Twisted's classes give: a release that renamed one or changed its
    default would show here."""
    _client, server = pair
    names = ("TLS", "disconnecting", "_aborting", "_writeDisconnected", "dataBuffer", "offset")
    for name in (*names, "bufferSize"):
        assert name in vars(server.transport)
        assert getattr(server.transport, name) == getattr(tcp.Server, name)


def test_accepted_connections_do_not_wait_for_nagle(pair):
    """Small answers written at once must not wait for Nagle's algorithm to join them."""
    _client, server = pair
    assert server.transport.getTcpNoDelay()


def test_nothing_is_sent_once_the_connection_is_aborted(pair):
    client, server = pair
    server.transport.abortConnection()
    server.transport.write(b"late")
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(100)


def test_a_close_with_nothing_queued_happens_before_the_reactor_turns(pair):
    client, server = pair
    server.transport.write(b"answer")
    server.transport.loseConnection()
    assert server.lost is not None and server.lost.check(error.ConnectionDone)
    client.settimeout(2)
    assert receive(client, 100) == b"answer"  # then the end of the stream


@pytest_twisted.inlineCallbacks
def test_a_close_waits_for_what_the_socket_refused(pair):
    client, server = pair
    server.transport.write(BIG)
    server.transport.loseConnection()
    assert server.lost is None  # queued bytes go first
    assert (yield received_meanwhile(client, len(BIG) + 1)) == BIG  # then the end
    assert server.lost is not None and server.lost.check(error.ConnectionDone)


def test_after_starttls_writes_and_closes_go_through_twisted(pair):
    """TLS is a layer of its own over the socket: the fast paths step aside for Twisted's."""
    _client, server = pair

    def inherited(name):
        return next(c for c in SendAtOnceServer.__mro__[1:] if name in vars(c))

    calls = []
    server.transport.TLS = True
    with (
        mock.patch.object(inherited("write"), "write", lambda _, data: calls.append(data)),
        mock.patch.object(
            inherited("loseConnection"), "loseConnection", lambda _: calls.append("close")
        ),
    ):
        server.transport.write(b"secret")
        server.transport.loseConnection()
    server.transport.TLS = False
    assert calls == [b"secret", "close"] and server.lost is None
