"""Connection-level behaviour over real TCP on 127.0.0.1 (issue: hostile input).

What lives in the kernel (accepting, closing, send buffers, resets) is tested
here with the real reactor; bounded counts, every test stops by itself.
"""

from __future__ import annotations

import socket

import processes
import pytest
import pytest_twisted
from helpers import proxy_factory, request_frame
from processes import within
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ConnectionDone

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.framing import FrameReceiver

pytestmark = pytest.mark.integration


class Collector(FrameReceiver):
    """A raw client: records every answer; `closed` fires on disconnection."""

    def __init__(self) -> None:
        self.answers: list[tuple[wire.Header, bytes]] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.arrived: defer.Deferred | None = None
        self.want = 0

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        self.answers.append((header, data))
        if self.arrived is not None and len(self.answers) >= self.want:
            d, self.arrived = self.arrived, None
            d.callback(self.answers)

    def waitFor(self, count: int) -> defer.Deferred:
        self.want = count
        if len(self.answers) >= count:
            return defer.succeed(self.answers)
        self.arrived = defer.Deferred()
        return self.arrived

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.closed.callback(reason.value)


def connect(port: int) -> defer.Deferred:
    return processes.connect(port, Collector)


def listen(factory) -> tuple:
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, port.getHost().port


@pytest_twisted.inlineCallbacks
def test_connections_over_the_limit_are_closed_and_the_others_keep_serving(proxy_log):
    listening, port = listen(CalculatorServerFactory(max_connections=2))
    try:
        first = yield connect(port)
        second = yield connect(port)
        third = yield connect(port)
        reason = yield within(third.closed)
        assert isinstance(reason, ConnectionDone)
        assert third.answers == []
        for client in (first, second):
            client.transport.write(request_frame("6 * 7", ts=0))
            answers = yield within(client.waitFor(1))
            assert answers[0][0].status == wire.OK
            assert codec.decode_response(answers[0][1]) == (42, [])
        # A closed connection frees its place.
        first.transport.loseConnection()
        yield within(first.closed)
        yield task.deferLater(reactor, 0.05)
        fourth = yield connect(port)
        fourth.transport.write(request_frame("1 + 1", ts=0))
        answers = yield within(fourth.waitFor(1))
        assert codec.decode_response(answers[0][1]) == (2, [])
        for client in (second, fourth):
            client.transport.loseConnection()
    finally:
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_idle_timeout_closes_a_connection_with_a_half_sent_frame(proxy_log):
    """A client that stops in the middle of a message must not hold a connection for ever."""
    listening, port = listen(CalculatorServerFactory(idle_timeout=0.3))
    try:
        client = yield connect(port)
        frame = request_frame("2 + 2", ts=0)
        client.transport.write(frame[:7])  # header and length, never finished
        started = reactor.seconds()
        yield within(client.closed, 5)
        waited = reactor.seconds() - started
        assert 0.25 <= waited < 3, waited
        assert client.answers == []
    finally:
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_complete_requests_keep_a_connection_alive(proxy_log):
    # Each pause is well under the idle timeout, so that a loaded machine
    # running this process late cannot make one of them reach it.
    listening, port = listen(CalculatorServerFactory(idle_timeout=1.0))
    try:
        client = yield connect(port)
        for i in range(4):
            client.transport.write(request_frame(f"{i} + 1", ts=0))
            yield within(client.waitFor(i + 1))
            yield task.deferLater(reactor, 0.3)
        assert not client.closed.called  # 1.2 s in all, never 1 s idle
        assert [codec.decode_response(d)[0] for _, d in client.answers] == [1, 2, 3, 4]
        client.transport.loseConnection()
    finally:
        yield listening.stopListening()


class Hoarder(Collector):
    """Pipelines requests and does not read its answers until told."""

    def connectionMade(self) -> None:
        super().connectionMade()
        # A small receive window (no autotuning), then stop reading.
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.transport.pauseProducing()


@pytest.mark.parametrize("service", ["server", "proxy"])
@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_is_not_buffered_without_bound(service, proxy_log):
    """A client pipelines 3,000 requests with 5 KB answers and never reads: about 15 MB."""
    server_factory = CalculatorServerFactory()
    server_port, server_at = listen(server_factory)
    built = []
    factory = proxy_factory(server_at) if service == "proxy" else server_factory
    original = factory.buildProtocol

    def remember(addr):
        p = original(addr)
        built.append(p)
        return p

    factory.buildProtocol = remember
    listening, port = (server_port, server_at) if service == "server" else listen(factory)
    try:
        client = yield protocol.ClientCreator(reactor, Hoarder).connectTCP("127.0.0.1", port)
        # Each answer carries ~4.9 KB of steps: 3,000 of them are ~15 MB,
        # more than the kernel's socket buffers and Twisted's high-water mark.
        count = 3000
        frame = request_frame("+".join(["1"] * 40), steps=True, ts=0)
        for _ in range(count // 100):
            client.transport.write(frame * 100)
            yield task.deferLater(reactor, 0.01)
        # The service pauses once the kernel's buffers and then Twisted's
        # high-water mark are full: wait for that (bounded), then stay paused.
        service_side = built[-1]
        for _ in range(200):
            if service_side._paused:
                break
            yield task.deferLater(reactor, 0.05)
        assert service_side._paused, "the service kept reading from a client that never reads"
        yield task.deferLater(reactor, 0.3)
        assert service_side._paused, "the service resumed although nothing was read"
        unsent = len(service_side.transport.dataBuffer) + sum(
            map(len, service_side.transport._tempDataBuffer)
        )
        assert unsent < 1_000_000, unsent
        client.transport.resumeProducing()
        answers = yield within(client.waitFor(count), 20)
        assert len(answers) == count
        assert {codec.decode_response(d)[0] for _, d in answers} == {40}
        assert not service_side._paused
        client.transport.loseConnection()
    finally:
        if service == "proxy":
            yield listening.stopListening()
            factory.pool.close()
        yield server_port.stopListening()


class SlowServer(FrameReceiver):
    """Answers every request after ``delay`` seconds; counts requests."""

    delay = 0.3

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        self.factory.requests.append(data)
        payload = codec.encode_result(codec.TEXT, 7, [])
        answer = wire.encode(0, wire.make_flags(request=False, status=200, cache=True), 60, payload)
        self.factory.calls.append(reactor.callLater(self.delay, self.transport.write, answer))


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest_twisted.inlineCallbacks
def test_clients_leaving_during_a_miss_leave_no_error_and_others_get_answers(how, proxy_log):
    """Two of four clients coalesced on one slow miss close or reset before the answer comes."""
    slow = protocol.ServerFactory.forProtocol(SlowServer)
    slow.requests, slow.calls = [], []
    upstream, upstream_at = listen(slow)
    factory = proxy_factory(upstream_at)
    listening, port = listen(factory)
    try:
        clients = []
        for _ in range(4):
            clients.append((yield connect(port)))
        for client in clients:
            client.transport.write(request_frame("3 + 4", ts=0))
        yield task.deferLater(reactor, 0.1)
        leaving, staying = clients[:2], clients[2:]
        for client in leaving:
            if how == "close":
                client.transport.loseConnection()
            else:
                client.transport.abortConnection()  # RST
        for client in staying:
            answers = yield within(client.waitFor(1))
            assert codec.decode_response(answers[0][1]) == (7, [])
        assert len(slow.requests) == 1  # coalesced
        assert factory.inflight == {}
        # The first asker's miss is answered whatever it did. Of the three
        # who waited on it, one that closed (FIN) only shut its sending side
        # and still gets its answer (half-close); one reset is gone.
        requests = factory.observer.requests
        assert (requests["miss"], requests["coalesced"]) == (1, 3 if how == "close" else 2)
        for client in staying:
            client.transport.loseConnection()
    finally:
        yield listening.stopListening()
        factory.pool.close()
        yield upstream.stopListening()
        for call in slow.calls:
            if call.active():
                call.cancel()
