"""While the slowest request the limits allow is computed, another client
still gets its answer quickly: over real TCP on 127.0.0.1, with the real
reactor. The requests are the ones benchmarks/worst_case.py finds; the
latencies are printed (``pytest -s``), and only a generous bound is checked.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.framing import FrameReceiver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import worst_case

pytestmark = pytest.mark.integration

GENEROUS = 1.0  # seconds; the worst request takes some 10 ms of CPU


class Client(FrameReceiver):
    """Sends requests and fires one Deferred per answer, with its arrival time."""

    maxMessageSize = wire.LENGTH_LIMIT

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []

    def ask(self, data: bytes, *, steps: bool = False) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        self.transport.write(wire.encode(0, wire.make_flags(request=True, steps=steps), 0, data))
        return d

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        self.waiting.pop(0).callback((time.perf_counter(), header.status, data))


def worst_requests() -> list[tuple[str, bytes, bool]]:
    """The heaviest request of a few kinds, as the benchmark's search finds it."""
    timer = worst_case.Timer(wire.LENGTH_LIMIT, 1)
    wanted = ("legacy: everything at once", "most tokens", "integer powers", "legacy: most nodes")
    found = []
    for kind, _, make, sizes in worst_case.FAMILIES:
        if kind in wanted:
            found.append((kind, make(timer.largest(make, sizes)), True))
    return found


@pytest_twisted.inlineCallbacks
def test_a_trivial_request_is_answered_while_the_worst_one_runs():
    factory = CalculatorServerFactory(max_message_size=wire.LENGTH_LIMIT)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    creator = protocol.ClientCreator(reactor, Client)
    heavy = light = None
    try:
        heavy = yield creator.connectTCP("127.0.0.1", port.getHost().port, timeout=5)
        light = yield creator.connectTCP("127.0.0.1", port.getHost().port, timeout=5)
        for kind, data, steps in worst_requests():
            started = time.perf_counter()
            slow = heavy.ask(data, steps=steps)
            quick = light.ask(b"1 + 1")
            (answered, status, payload) = yield quick.addTimeout(10, reactor)
            (done, slow_status, _) = yield slow.addTimeout(10, reactor)
            latency, busy = answered - started, done - started
            print(
                f"\n{kind}: {len(data)} bytes, answered {slow_status} in {busy * 1000:.1f} ms; "
                f"meanwhile '1 + 1' took {latency * 1000:.1f} ms"
            )
            assert (status, codec.decode_response(payload)) == (200, (2, []))
            assert slow_status in (200, 400)
            assert latency < GENEROUS
    finally:
        for client in (heavy, light):
            if client is not None:
                client.transport.loseConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_pipelined_heavy_requests_do_not_hold_other_clients_for_the_whole_batch():
    """A batch of heavy requests pipelined in one read is answered in 5 ms
    turns, so another client's ``1 + 1`` is answered before the batch ends."""
    factory = CalculatorServerFactory(max_message_size=wire.LENGTH_LIMIT)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    creator = protocol.ClientCreator(reactor, Client)
    heavy = light = None
    try:
        heavy = yield creator.connectTCP("127.0.0.1", port.getHost().port, timeout=5)
        light = yield creator.connectTCP("127.0.0.1", port.getHost().port, timeout=5)
        kind, _, make, sizes = next(f for f in worst_case.FAMILIES if f[0] == "integer remainders")
        data = make(worst_case.Timer(wire.LENGTH_LIMIT, 1).largest(make, sizes))
        count = 60_000 // (len(data) + wire.HEADER_SIZE)  # one read's worth
        started = time.perf_counter()
        pipelined = [heavy.ask(data) for _ in range(count)]
        quick = light.ask(b"1 + 1")
        (answered, status, _) = yield quick.addTimeout(30, reactor)
        batch = yield defer.gatherResults(pipelined)
        latency = (answered - started) * 1000
        whole = (max(t for t, _, _ in batch) - started) * 1000
        print(
            f"\n{count} pipelined '{kind}' requests ({whole:.1f} ms): '1 + 1' took {latency:.1f} ms"
        )
        assert status == 200
        assert count >= 10
        assert answered < max(t for t, _, _ in batch), "1 + 1 waited for the whole batch"
        assert answered - started < 30 * GENEROUS
    finally:
        for client in (heavy, light):
            if client is not None:
                client.transport.loseConnection()
        yield port.stopListening()
