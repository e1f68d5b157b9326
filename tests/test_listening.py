"""Listening without processes: the endpoint descriptions of ``--listen``
(``tcp:`` mapped onto the send-at-once endpoint, the other kinds left to
Twisted), the listening service's start-up lines, and its drain on stop
(every connection answered, the factory kept started until then, a grace
that ends it), with the half-close a draining connection ends with."""

from __future__ import annotations

import pytest
from helpers import TS, request_frame
from twisted.internet import defer, task
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted_cacheproxy.application.startup import ListeningService, listening_at
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.addresses import in_words
from twisted_cacheproxy.transport.endpoint import (
    TCPServerEndpoint,
    adopted_endpoint,
    kind,
    server_endpoint,
)

pytestmark = pytest.mark.usefixtures("proxy_log")

# --- the endpoint descriptions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "port", "interface", "backlog"),
    [
        ("tcp:9998", 9998, "", 511),
        ("tcp:9998:interface=127.0.0.1", 9998, "127.0.0.1", 511),
        ("tcp:port=9998:backlog=64:interface=10.0.0.1", 9998, "10.0.0.1", 64),
        ("tcp6:9998", 9998, "::", 511),
        (r"tcp6:9998:interface=\:\:1", 9998, "::1", 511),
        ("sendatonce:0:interface=127.0.0.1:backlog=7", 0, "127.0.0.1", 7),
    ],
)
def test_tcp_descriptions_get_the_send_at_once_endpoint(text, port, interface, backlog):
    from twisted.internet import reactor

    endpoint = server_endpoint(reactor, text)
    assert isinstance(endpoint, TCPServerEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (port, interface, backlog)


def test_other_descriptions_are_twisteds_own(tmp_path):
    from twisted.internet import reactor

    assert isinstance(server_endpoint(reactor, f"unix:{tmp_path}/s.sock"), UNIXServerEndpoint)
    cert = tmp_path / "cert.pem"
    _self_signed(cert)
    ssl = server_endpoint(reactor, f"ssl:9443:privateKey={cert}:certKey={cert}")
    assert isinstance(ssl, SSL4ServerEndpoint)
    assert kind("systemd:domain=INET:index=0") == "systemd"


@pytest.mark.parametrize(
    ("text", "error"),
    [("nonsense:1", ValueError), ("tcp:9998:colour=red", TypeError), ("tcp:x", ValueError)],
)
def test_what_twisted_cannot_read_raises(text, error):
    from twisted.internet import reactor

    with pytest.raises(error):
        server_endpoint(reactor, text)


def test_a_systemd_description_adopts_the_socket_systemd_passed(monkeypatch):
    from twisted.internet import endpoints, reactor
    from twisted.python.systemd import ListenFDs

    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([3], ("calc",)))
    endpoint = server_endpoint(reactor, "systemd:domain=INET:index=0")
    assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    assert endpoint.fileno == 3


@pytest.mark.parametrize("tls", [False, True])
def test_a_worker_adopts_a_tcp_socket_over_tls_when_its_description_says_ssl(tmp_path, tls):
    """The parent bound a plain TCP socket; the worker's port accepts from it,
    each connection in TLS made from the description's own files."""
    import socket

    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    cert = tmp_path / "cert.pem"
    _self_signed(cert)
    skt = socket.socket()
    skt.bind(("127.0.0.1", 0))
    skt.listen()
    number = skt.getsockname()[1]
    keys = f":privateKey={cert}:certKey={cert}" if tls else ""
    text = f"{'ssl' if tls else 'tcp'}:{number}:interface=127.0.0.1{keys}"
    factory = CalculatorServerFactory()
    port = adopted_endpoint(reactor, text, skt).listen(factory).result
    try:
        assert port.getHost().port == number
        if tls:
            assert isinstance(port.factory, TLSMemoryBIOFactory)
            assert port.factory.wrappedFactory is factory
        else:
            assert port.factory is factory
    finally:
        port.stopListening()
        skt.close()


def test_a_worker_reads_the_tls_key_itself(tmp_path):
    """A key file gone since the parent started is the worker's error, as
    ``server_endpoint``'s (its command line never holds a key)."""
    import socket

    from twisted.internet import reactor

    with socket.socket() as skt, pytest.raises(OSError):
        adopted_endpoint(reactor, f"ssl:0:privateKey={tmp_path}/gone.pem", skt)


def _self_signed(path) -> None:
    """A key and a self-signed certificate in one PEM file (``cryptography``)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem + cert.public_bytes(serialization.Encoding.PEM))


# --- the listening service ---------------------------------------------------------------


class FakePort:
    """A listening port: where it listens, and it stops its factory on
    stopping, as a real one does."""

    def __init__(self, factory, host) -> None:
        self.factory = factory
        self.host = host
        self.stopped = False

    def getHost(self):
        return self.host

    def stopListening(self):
        self.stopped = True
        self.factory.doStop()
        return defer.succeed(None)


class FakeEndpoint:
    def __init__(self, host) -> None:
        self.host = host
        self.ports: list[FakePort] = []

    def listen(self, factory):
        factory.doStart()
        self.ports.append(FakePort(factory, self.host))
        return defer.succeed(self.ports[-1])


@implementer(IHalfCloseableDescriptor)
class HalfCloseable(StringTransport):
    """A TCP-like transport that can send an end-of-file alone."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


def service(clock, *hosts, grace=5.0):
    factory = CalculatorServerFactory(clock=clock)
    endpoints = [FakeEndpoint(h) for h in hosts]
    listening = ListeningService(
        [(e, "where") for e in endpoints], factory, "cacheserver", "settings", grace=grace
    )
    return listening, factory, endpoints


def connect(factory, transport=None):
    p = factory.buildProtocol(None)
    p.makeConnection(transport or StringTransport())
    return p


def test_each_listener_says_where_it_listens_once(proxy_log):
    clock = task.Clock()
    listening, _, _ = service(
        clock, IPv4Address("TCP", "127.0.0.1", 9998), UNIXAddress(b"/run/c.sock")
    )
    listening.privilegedStartService()
    lines = [e["address"] for e in proxy_log if e.get("log_format", "").startswith("listening")]
    assert lines == ["127.0.0.1:9998", "unix:/run/c.sock"]


def test_where_a_port_listens_in_words():
    port = FakePort(None, IPv4Address("TCP", "127.0.0.1", 9443))
    assert listening_at(port, "ssl:9443:privateKey=k") == "127.0.0.1:9443 over TLS"
    assert listening_at(port, "systemd:domain=INET:index=0") == (
        "127.0.0.1:9443 (a socket from systemd)"
    )


def test_stopping_waits_for_every_connection_with_the_factory_started():
    clock = task.Clock()
    listening, factory, endpoints = service(clock, IPv4Address("TCP", "127.0.0.1", 1))
    listening.privilegedStartService()
    listening.startService()
    busy = connect(factory)
    d = listening.stopService()
    assert endpoints[0].ports[0].stopped and factory.draining
    clock.advance(1)
    assert not d.called
    assert factory.numPorts == 1  # still started: a miss in flight still reaches the server
    assert busy.transport.disconnecting  # told to close once answered (nothing was asked)
    busy.connectionLost()  # the last one: the stop completes then, not at a later look
    assert d.called and factory.numPorts == 0
    assert clock.getDelayedCalls() == []  # the grace's timer is gone with it


def test_a_drain_fires_as_the_last_connection_closes_unless_cancelled():
    factory = CalculatorServerFactory(clock=task.Clock())
    first, second = connect(factory), connect(factory)
    emptied = factory.drain()
    first.connectionLost()
    assert not emptied.called
    second.connectionLost()
    assert emptied.called and factory.connectionCount == 0
    assert CalculatorServerFactory(clock=task.Clock()).drain().called  # none open: at once

    factory = CalculatorServerFactory(clock=task.Clock())
    left = connect(factory)
    given_up = factory.drain()
    given_up.cancel()
    failures: list = []
    given_up.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError)
    left.connectionLost()  # fires nothing a second time


def test_the_grace_ends_the_wait_and_closes_what_is_left(proxy_log):
    clock = task.Clock()
    listening, factory, _ = service(clock, IPv4Address("TCP", "127.0.0.1", 1), grace=3)
    listening.privilegedStartService()
    listening.startService()
    stuck = connect(factory)
    stuck.transport.disconnecting = False
    stuck.transport.loseConnection = lambda: None  # a client that never lets go
    d = listening.stopService()
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.2)
    assert d.called
    assert stuck.transport.disconnected  # aborted
    assert any("stopped after" in e.get("log_format", "") for e in proxy_log)
    stuck.connectionLost()  # as a real transport's abort ends in
    assert clock.getDelayedCalls() == []  # it stopped looking


def test_a_draining_connection_answers_what_it_read_then_sends_an_end_of_file():
    """Its answers, then our end-of-file, but no close while the client may
    still send: a close with its bytes unread would reset the connection."""
    clock = task.Clock()
    clock.advance(TS)
    factory = CalculatorServerFactory(clock=clock)
    transport = HalfCloseable()
    p = connect(factory, transport)
    p.dataReceived(request_frame("1 + 1")[:-2])  # not whole yet: never answered
    factory.drain()
    assert transport.writeClosed and not transport.disconnecting
    assert transport.value() == b""
    p.dataReceived(request_frame("2 + 2"))  # sent meanwhile: read and dropped
    assert transport.value() == b""
    p.readConnectionLost()  # the client closes too
    assert transport.disconnecting


def test_a_draining_connection_sends_its_answers_before_the_end_of_file():
    clock = task.Clock()
    factory = CalculatorServerFactory(clock=clock)
    transport = HalfCloseable()
    p = connect(factory, transport)
    transport.pauseProducing()  # what it read is still to be handled
    p.pauseProducing()
    p.dataReceived(request_frame("20 + 22"))
    factory.drain()
    assert not transport.writeClosed
    p.resumeProducing()
    header = wire.decode_header(transport.value())
    assert header.status == 200 and b'"result": 42' in transport.value()
    assert transport.writeClosed


@pytest.mark.parametrize(
    ("where", "words"),
    [
        (IPv4Address("TCP", "127.0.0.1", 9998), "127.0.0.1:9998"),
        (IPv6Address("TCP", "::1", 9998), "[::1]:9998"),
        (UNIXAddress(b"/run/cacheproxy.sock"), "unix:/run/cacheproxy.sock"),
        (UNIXAddress(None), "unix:?"),
        (HostnameAddress(b"example.org", 1), None),
    ],
)
def test_an_address_in_words(where, words):
    """The one way the start-up lines and the admin site name an address."""
    assert in_words(where) == words
