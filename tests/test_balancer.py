"""The balancer over fake servers: one `FakeConnector` per server, a
`task.Clock`, no sockets. Choice by outstanding requests, failover,
ejection and its doubling, the probes, the timeout rules."""

from __future__ import annotations

import pytest
from helpers import failure_of, success_of
from proxyharness import REQUEST, Fleet

from twisted_cacheproxy.proxy.balancer import EJECT_FIRST, MAX_FAILS
from twisted_cacheproxy.proxy.failures import UpstreamError
from twisted_cacheproxy.transport import wire


def test_ties_go_round_robin():
    fleet = Fleet(3)
    chosen = []
    for _ in range(6):
        d = fleet.balancer.fetch(REQUEST)
        chosen += [i for i in range(3) if fleet.answer(i)]
        success_of(d)
    assert chosen == [0, 1, 2, 0, 1, 2]


def test_least_outstanding_wins():
    """A slow server has more requests outstanding, so it gets fewer new ones."""
    fleet = Fleet(2)
    first = fleet.balancer.fetch(REQUEST)  # to server 0
    second = fleet.balancer.fetch(REQUEST)  # server 0 is busy: server 1
    assert fleet.attempts() == [1, 1]
    fleet.answer(1)
    success_of(second)
    # Server 0 still has one outstanding: the next two go to server 1 first.
    third = fleet.balancer.fetch(REQUEST)
    assert fleet.attempts() == [1, 1]  # on server 1's idle connection
    assert fleet.pools[1].outstanding == 1 and fleet.pools[0].outstanding == 1
    fleet.answer(0)
    success_of(first)
    assert not third.called


def test_unreachable_server_fails_over_at_once():
    fleet = Fleet(2)
    d = fleet.balancer.fetch(REQUEST)
    fleet.connectors[0].refuse()
    assert fleet.attempts() == [1, 1]  # no clock advanced: no backoff
    fleet.answer(1)
    _header, data, _sent = success_of(d)
    assert data == b'{"result": 2}'


def test_closed_before_answering_fails_over():
    """A server killed with a request on it: the request goes to another."""
    fleet = Fleet(2)
    d = fleet.balancer.fetch(REQUEST)
    peer = fleet.connectors[0].accept()
    peer.close()
    assert fleet.attempts() == [1, 1]
    fleet.answer(1)
    success_of(d)


def test_every_server_failing_gives_one_error_naming_them():
    fleet = Fleet(2, rounds=2)
    d = fleet.balancer.fetch(REQUEST)
    fleet.refuse(0)
    fleet.refuse(1)
    assert not d.called
    fleet.clock.advance(0.5)  # the backoff, then a second round
    fleet.refuse(0)
    assert fleet.attempts() == [2, 2]
    fleet.refuse(1)
    message = str(failure_of(d, UpstreamError).value)
    assert "127.0.0.1:9001" in message and "127.0.0.1:9002" in message
    assert message.startswith("no server could answer")


def test_ejection_after_consecutive_failures_then_probe():
    fleet = Fleet(2)
    for _ in range(MAX_FAILS):
        d = fleet.balancer.fetch(REQUEST)
        fleet.refuse(0)
        fleet.answer(1)
        success_of(d)
    server0 = fleet.balancer.servers[0]
    assert not server0.healthy
    count = fleet.attempts()[0]
    for _ in range(4):
        d = fleet.balancer.fetch(REQUEST)
        fleet.answer(1)
        success_of(d)
    assert fleet.attempts()[0] == count  # out: nothing sent to it
    fleet.clock.advance(EJECT_FIRST)  # time is up: one probe
    assert fleet.attempts()[0] == count + 1
    fleet.answer(0)
    assert server0.healthy


def test_ejection_doubles_on_a_failed_probe():
    fleet = Fleet(2, max_fails=1)
    server0 = fleet.balancer.servers[0]
    d = fleet.balancer.fetch(REQUEST)
    fleet.connectors[0].refuse()
    fleet.answer(1)
    success_of(d)
    assert server0.out_until == EJECT_FIRST
    fleet.clock.advance(EJECT_FIRST)
    fleet.connectors[0].refuse()  # the probe fails
    assert server0.out_until == fleet.clock.seconds() + 2 * EJECT_FIRST
    fleet.clock.advance(2 * EJECT_FIRST)
    fleet.answer(0)  # the second probe succeeds
    assert server0.healthy


def test_ejection_is_capped():
    fleet = Fleet(2, max_fails=1, eject_max=3.0)
    server0 = fleet.balancer.servers[0]
    fleet.balancer.failed(server0, "unreachable")
    waits = []
    for _ in range(4):
        waits.append(server0.out_until - fleet.clock.seconds())
        fleet.clock.advance(waits[-1])
        fleet.connectors[0].refuse()
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_all_out_still_tries_them_and_a_return_is_used():
    """With every server out a miss still tries them all, so the first one back serves at once."""
    fleet = Fleet(2, max_fails=1, rounds=1)
    d = fleet.balancer.fetch(REQUEST)
    fleet.connectors[0].refuse()
    fleet.connectors[1].refuse()
    failure_of(d, UpstreamError)
    assert not any(s.healthy for s in fleet.balancer.servers)
    d = fleet.balancer.fetch(REQUEST)  # still tried, without waiting for the probe
    fleet.answer(fleet.attempts().index(max(fleet.attempts())))
    success_of(d)
    assert sum(s.healthy for s in fleet.balancer.servers) == 1


def test_timeout_is_not_sent_elsewhere_by_default():
    """A calculation that timed out may be costly: by default it is not sent to another server."""
    fleet = Fleet(2)
    d = fleet.balancer.fetch(REQUEST)
    fleet.connectors[0].accept()  # accepted, never answered
    fleet.clock.advance(10.0)
    message = str(failure_of(d, UpstreamError).value)
    assert "127.0.0.1:9001" in message
    assert fleet.attempts() == [1, 0]
    assert fleet.balancer.servers[0].fails == 1


def test_retry_timeouts_gives_each_server_half():
    """With retry_timeouts a miss may go on to another server: each try has half the timeout."""
    fleet = Fleet(2, retry_timeouts=True)
    d = fleet.balancer.fetch(REQUEST)
    fleet.connectors[0].accept()
    fleet.clock.advance(5.0)
    assert fleet.attempts() == [1, 1]
    fleet.answer(1)
    success_of(d)


def test_active_probe_brings_a_server_back():
    fleet = Fleet(2, max_fails=1, interval=2.0)
    server0 = fleet.balancer.servers[0]
    fleet.balancer.failed(server0, "unreachable")  # out for 1 s
    fleet.clock.advance(EJECT_FIRST)
    fleet.connectors[0].refuse()  # the passive probe fails: out for 2 s more
    fleet.clock.advance(1.0)  # t=2: the active probes go to both
    assert fleet.attempts() == [2, 1]
    fleet.answer(0)
    fleet.answer(1)
    assert server0.healthy


def test_a_course_server_400_proves_it_alive():
    """A course server cannot read the text probe: its 400 is a well-formed answer all the same."""
    fleet = Fleet(2, max_fails=1, interval=1.0)
    server0 = fleet.balancer.servers[0]
    fleet.balancer.failed(server0, "unreachable")
    fleet.clock.advance(1.0)
    peer = fleet.connectors[0].accept(framed=False)
    error = wire.encode(0, wire.make_flags(request=False, status=wire.BAD_REQUEST), 0, b"x")
    peer.reply(error)
    assert server0.healthy


def test_close_stops_the_probes():
    fleet = Fleet(2, interval=1.0)
    fleet.balancer.close()
    fleet.clock.advance(5.0)
    assert fleet.attempts() == [0, 0]


@pytest.mark.parametrize("kind", ["unreachable", "closed", "invalid", "timeout"])
def test_each_failure_kind_counts(kind):
    """Not only refusals: every kind of failure counts toward taking a server out."""
    fleet = Fleet(2)
    server = fleet.balancer.servers[1]
    for _ in range(MAX_FAILS):
        fleet.balancer.failed(server, kind)
    assert not server.healthy


def test_mixed_fleet_course_and_ours():
    """A course server (no L) and ours behind one balancer: both answer."""
    fleet = Fleet(2)
    answered = [0, 0]
    for _ in range(4):
        d = fleet.balancer.fetch(REQUEST)
        answered[0] += fleet.answer(0, framed=False)
        answered[1] += fleet.answer(1)
        success_of(d)
    assert answered == [2, 2]
    assert not fleet.pools[0].framed and fleet.pools[1].framed


def test_the_proxy_takes_a_balancer_as_it_takes_a_pool():
    """Misses through `CacheProxyFactory` go to the servers in turn; a hit
    reaches none; with every server refusing, the 500 names both."""
    from twisted_cacheproxy.proxy.cache import MemoryCache
    from twisted_cacheproxy.proxy.factory import CacheProxyFactory

    fleet = Fleet(2, rounds=1)
    factory = CacheProxyFactory(
        MemoryCache(1 << 20, fleet.clock), fleet.balancer, clock=fleet.clock
    )
    answered = []
    for text in (b"1+1", b"2+2"):
        frame = wire.encode(0, wire.make_flags(request=True, cache=True), wire.FOREVER, text)
        header = wire.decode_header(frame)
        d = factory.answer(header, text, None)
        answered.append([fleet.answer(0), fleet.answer(1)])
        assert wire.decode_header(success_of(d)).status == wire.OK
    assert answered == [[1, 0], [0, 1]]
    header = wire.decode_header(
        wire.encode(0, wire.make_flags(request=True, cache=True), wire.FOREVER, b"1+1")
    )
    assert isinstance(factory.answer(header, b"1+1", None), bytes)  # a hit
    for peers in fleet.peers:  # both servers go away
        for peer in peers:
            peer.close()
    header = wire.decode_header(wire.encode(0, wire.make_flags(request=True), 0, b"3+3"))
    d = factory.answer(header, b"3+3", None)
    fleet.refuse(0)
    fleet.refuse(1)
    answer = success_of(d)
    assert wire.decode_header(answer).status == wire.SERVER_ERROR
    assert b"127.0.0.1:9001" in answer and b"127.0.0.1:9002" in answer


def test_figures_over_every_server():
    """What a status page reads of a pool, summed over the servers."""
    fleet = Fleet(2)
    d = fleet.balancer.fetch(REQUEST)
    assert (fleet.balancer.connections, fleet.balancer.outstanding) == (1, 1)
    fleet.answer(0)
    success_of(d)
    balancer = fleet.balancer
    assert (balancer.idle, balancer.connections, balancer.outstanding) == (1, 1, 0)
    assert not balancer.framed  # server 1 has not answered yet
    assert not balancer.pipelining
    assert [server.address for server in balancer.servers] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert [server.tally.answers for server in balancer.servers] == [1, 0]


def test_the_overall_timeout_is_a_timeout():
    """With servers that never answer, the miss fails as a timeout (what the
    metrics count it under), and each server's tally says so."""
    fleet = Fleet(2, timeout=10.0)
    d = fleet.balancer.fetch(REQUEST)
    for server in (0, 1):
        for i, attempt in enumerate(fleet.connectors[server].attempts):
            if not attempt.called:
                fleet.connectors[server].accept(i)
    fleet.clock.advance(10.0)
    error = failure_of(d).value
    assert isinstance(error, UpstreamError) and error.kind == "timeout"
    failures = [server.tally.failures["timeout"] for server in fleet.balancer.servers]
    assert sum(failures) == 1


def test_a_miss_that_fails_everywhere_has_the_kind_of_its_last_failure():
    fleet = Fleet(2, rounds=1)
    d = fleet.balancer.fetch(REQUEST)
    for connector in fleet.connectors:
        if connector.attempts:
            connector.refuse()
    error = failure_of(d).value
    assert error.kind == "unreachable"
    assert [s.tally.failures["unreachable"] for s in fleet.balancer.servers] == [1, 1]
