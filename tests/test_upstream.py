"""`UpstreamPool` on a `task.Clock` with a fake connector: connection reuse,
the connection limit, broken idle connections, the timeout, the retry
backoff, pipelining and the tag checks; and `TCPConnector`'s ClientCreator chain."""

from __future__ import annotations

import pytest
from helpers import T0, TS, FakeConnector, Peer, answer, request_frame
from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_cacheproxy.proxy.failures import UpstreamError
from twisted_cacheproxy.proxy.upstream import PIPELINE_PAUSE, UpstreamPool
from twisted_cacheproxy.transport import wire

pytestmark = pytest.mark.usefixtures("proxy_log")

EPS = 2.0**-10


class Result:
    """What one fetch came to: ``value`` (header, data, sent) or ``error``."""

    def __init__(self, d: defer.Deferred) -> None:
        self.value = self.failure = None
        self.done = False
        d.addCallbacks(self._ok, self._failed)

    def _ok(self, value) -> None:
        self.done, self.value = True, value

    def _failed(self, failure) -> None:
        self.done, self.failure = True, failure

    @property
    def error(self) -> str:
        assert self.done and self.failure is not None, self.value
        assert self.failure.check(UpstreamError), self.failure
        return str(self.failure.value)


class Pool:
    """An `UpstreamPool` on a `task.Clock`, its connections made by a `FakeConnector`."""

    def __init__(self, **options) -> None:
        self.reactor = task.Clock()
        self.reactor.advance(T0)
        self.connector = FakeConnector(self.reactor)
        self.pool = UpstreamPool(self.connector, self.reactor, **options)
        self.accept = self.connector.accept
        self.refuse = self.connector.refuse

    def fetch(self, frame: bytes) -> Result:
        return Result(self.pool.fetch(frame))

    @property
    def attempts(self) -> int:
        return len(self.connector.attempts)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)


@pytest.fixture
def p() -> Pool:
    return Pool()


# --- one fetch -------------------------------------------------------------------


def test_fetch_sends_the_frame_and_fires_with_the_answer_and_the_send_time(p):
    """The send time is what the proxy measures an answer's age from."""
    r = p.fetch(request_frame(b"1 + 2", ts=TS))
    assert p.attempts == 1
    p.advance(2)  # the connection opens 2 s later: that is when the request leaves
    conn = p.accept()
    assert conn.take() == request_frame(b"1 + 2", ts=TS)
    p.advance(3)
    assert not r.done
    reply = answer(3, max_age=60)
    conn.reply(reply)
    header, data, sent = r.value
    assert header == wire.decode_header(reply)._replace(ext=wire.EXT_FRAMED | 1 << 3)
    assert data == reply[12:]
    assert sent == T0 + 2
    assert p.reactor.getDelayedCalls() == []


def test_answer_split_across_reads_is_reassembled(p):
    r = p.fetch(request_frame(b"1 + 2", ts=TS))
    conn = p.accept()
    reply = answer(3, max_age=60)
    for i in range(len(reply) - 1):
        conn.reply(reply[i : i + 1])
        assert not r.done
    conn.reply(reply[-1:])
    assert r.value[1] == reply[12:]


# --- reuse and the connection limit ------------------------------------------------


def test_one_connection_is_reused_request_after_request(p):
    conn = None
    for n in range(4):
        r = p.fetch(request_frame(b"%d" % n, ts=TS))
        if conn is None:
            conn = p.accept()
        assert conn.take() == request_frame(b"%d" % n, ts=TS)
        conn.reply(answer(n, max_age=60))
        assert r.value[1] == answer(n, max_age=60)[12:]
        assert (p.pool.connections, p.pool.idle) == (1, 1)
    assert p.attempts == 1


def test_concurrent_fetches_use_separate_connections(p):
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    assert p.attempts == 2
    c1, c2 = p.accept(0), p.accept(1)
    assert c1.take() == request_frame(b"1", ts=TS)
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    c1.reply(answer(1, max_age=60))
    assert r1.value[1] == answer(1, max_age=60)[12:]
    assert r2.value[1] == answer(2, max_age=60)[12:]
    assert (p.pool.connections, p.pool.idle) == (2, 2)


def test_fetches_over_the_connection_limit_wait_for_a_free_connection():
    p = Pool(max_connections=2)
    r1, r2, r3 = (p.fetch(request_frame(b"%d" % n, ts=TS)) for n in (1, 2, 3))
    assert p.attempts == 2
    c1, c2 = p.accept(0), p.accept(1)
    assert c1.take() == request_frame(b"1", ts=TS)
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    # The waiting request goes out on the connection that just became free.
    assert c2.take() == request_frame(b"3", ts=TS)
    assert c1.take() == b""
    assert p.attempts == 2
    c2.reply(answer(3, max_age=60))
    c1.reply(answer(1, max_age=60))
    assert [r.value[1] for r in (r1, r2, r3)] == [answer(n, max_age=60)[12:] for n in (1, 2, 3)]
    assert (p.pool.connections, p.pool.idle) == (2, 2)


def test_a_waiting_fetch_connects_when_a_busy_connection_is_lost():
    p = Pool(max_connections=1)
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    c1 = p.accept()
    c1.close()
    assert r1.error == "calculator server 127.0.0.1:9999 closed the connection before answering"
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r2.value[1] == answer(2, max_age=60)[12:]


def test_a_waiting_fetch_connects_after_the_busy_connection_times_out():
    p = Pool(max_connections=1, timeout=5)
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    p.advance(1)
    r2 = p.fetch(request_frame(b"2", ts=TS))
    p.advance(4)  # T0 + 5: the first times out and its connection is closed
    assert r1.error == "calculator server 127.0.0.1:9999 did not answer within 5 s"
    assert c1.transport.disconnecting
    assert p.attempts == 1
    c1.close(error.ConnectionAborted)
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r2.value[1] == answer(2, max_age=60)[12:]
    assert c1.take() == request_frame(b"1", ts=TS)


def test_a_cancelled_waiting_fetch_is_never_sent():
    p = Pool(max_connections=1)
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    d2 = p.pool.fetch(request_frame(b"2", ts=TS))
    d2.addErrback(lambda f: f.trap(defer.CancelledError))
    d2.cancel()
    c1.reply(answer(1, max_age=60))
    assert r1.done
    assert c1.take() == request_frame(b"1", ts=TS)
    assert (p.pool.connections, p.pool.idle) == (1, 1)
    assert p.reactor.getDelayedCalls() == []


# --- broken idle connections --------------------------------------------------------


def test_idle_connection_closed_by_the_server_is_discarded(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60))
    assert r.done
    c1.close()
    assert (p.pool.connections, p.pool.idle) == (0, 0)
    r2 = p.fetch(request_frame(b"2", ts=TS))
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    assert c1.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r2.value[1] == answer(2, max_age=60)[12:]


def test_idle_connection_already_closing_is_skipped(p):
    p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60))
    c1.take()
    c1.transport.loseConnection()  # closing, its connectionLost not yet delivered
    r2 = p.fetch(request_frame(b"2", ts=TS))
    assert c1.take() == b""
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r2.value[1] == answer(2, max_age=60)[12:]


def test_unrequested_bytes_on_an_idle_connection_drop_it(p):
    """Bytes nobody asked for put the connection out of step with its requests."""
    p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60))
    c1.reply(answer(99, max_age=60))
    assert c1.transport.disconnecting
    c1.close(error.ConnectionAborted)
    assert (p.pool.connections, p.pool.idle) == (0, 0)


@pytest.mark.parametrize("reason", [error.ConnectionDone, error.ConnectionLost])
def test_request_on_a_broken_pooled_connection_is_retried_on_a_fresh_one(p, reason):
    p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60))
    c1.take()
    r = p.fetch(request_frame(b"2", ts=TS))
    assert c1.take() == request_frame(b"2", ts=TS)
    c1.close(reason)
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r.value[1] == answer(2, max_age=60)[12:]


def test_every_broken_idle_connection_is_tried_then_a_fresh_one(p):
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    c1, c2 = p.accept(0), p.accept(1)
    c1.reply(answer(1, max_age=60))
    c2.reply(answer(2, max_age=60))
    assert r1.done and r2.done
    c1.take(), c2.take()
    r = p.fetch(request_frame(b"3", ts=TS))
    # The server closed both while they were idle; we learn it one at a time.
    first = c2 if c2.transport.value() else c1
    second = c1 if first is c2 else c2
    assert first.take() == request_frame(b"3", ts=TS)
    first.close()
    assert second.take() == request_frame(b"3", ts=TS)
    second.close()
    assert p.attempts == 3
    c3 = p.accept()
    assert c3.take() == request_frame(b"3", ts=TS)
    c3.reply(answer(3, max_age=60))
    assert r.value[1] == answer(3, max_age=60)[12:]
    assert (p.pool.connections, p.pool.idle) == (1, 1)


def test_a_new_connection_closed_before_answering_is_an_error_not_a_retry(p):
    """Only a reused connection can be closed idle as a request leaves; a new one is a failure."""
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.close()
    assert r.error == "calculator server 127.0.0.1:9999 closed the connection before answering"
    assert p.attempts == 1
    assert (p.pool.connections, p.pool.idle) == (0, 0)


def test_bytes_after_a_tagged_answer_close_the_connection_once_it_is_delivered(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60) + b"\x00")
    assert r.value[1] == answer(1, max_age=60)[12:]
    assert c1.transport.disconnecting and not c1.protocol.usable


def test_a_second_message_after_an_untagged_answer_sends_the_request_again(p):
    """A course server that read the request in two pieces sends two errors:
    neither can be trusted as the answer."""
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60) + answer(1, max_age=60), framed=False)
    assert not r.done and c1.transport.disconnected
    c1.close(error.ConnectionAborted)
    c2 = p.accept()
    assert c2.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(1, max_age=60), framed=False)
    assert r.value[1] == answer(1, max_age=60)[12:]


def test_a_request_instead_of_an_answer_is_an_invalid_answer(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(request_frame(b"2", ts=TS))
    assert r.error == (
        "calculator server 127.0.0.1:9999 sent an invalid answer: "
        "peer sent a request (T=1) instead of an answer"
    )
    assert c1.transport.disconnecting


def test_an_impossible_length_is_an_invalid_answer(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(wire.HEADER.pack(TS, 5, 200, 0, 0))
    assert r.error == (
        "calculator server 127.0.0.1:9999 sent an invalid answer: peer sent an impossible "
        "message length 5 (must be 12..65535); closing the connection"
    )
    assert c1.transport.disconnecting


# --- the timeout ---------------------------------------------------------------------


def test_timeout_cancels_a_sent_request_and_closes_its_connection(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    assert c1.take() == request_frame(b"1", ts=TS)
    p.advance(10 - EPS)
    assert not r.done
    assert not c1.transport.disconnecting
    p.advance(EPS)
    assert r.error == "calculator server 127.0.0.1:9999 did not answer within 10 s"
    assert c1.transport.disconnecting
    c1.close(error.ConnectionAborted)
    assert (p.pool.connections, p.pool.idle) == (0, 0)
    p.advance(100)
    assert p.attempts == 1
    assert c1.take() == b""
    assert p.reactor.getDelayedCalls() == []


def test_timeout_cancels_a_connection_attempt():
    p = Pool(timeout=4)
    r = p.fetch(request_frame(b"1", ts=TS))
    p.advance(4)
    assert r.error == "calculator server 127.0.0.1:9999 did not answer within 4 s"
    assert p.connector.cancelled(0)
    assert p.pool.connections == 0
    p.advance(100)
    assert p.attempts == 1
    assert p.reactor.getDelayedCalls() == []


def test_timeout_cancels_a_waiting_retry():
    p = Pool(timeout=1, retry_delay=0.75)
    r = p.fetch(request_frame(b"1", ts=TS))
    p.refuse()
    p.advance(0.75)
    p.refuse()  # the next attempt would be at T0 + 2.25
    p.advance(0.25)
    assert r.error == (
        "calculator server 127.0.0.1:9999 unreachable within 1 s (2 attempts): Connection refused"
    )
    p.advance(100)
    assert p.attempts == 2
    assert p.pool.connections == 0
    assert p.reactor.getDelayedCalls() == []


def test_an_answer_before_the_timeout_cancels_the_timer(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    p.advance(9)
    c1.reply(answer(1, max_age=60))
    assert r.value is not None
    assert p.reactor.getDelayedCalls() == []
    p.advance(100)
    assert r.failure is None
    assert not c1.transport.disconnecting


def test_each_fetch_times_out_at_its_own_deadline_on_one_timer():
    p = Pool(pipeline=8, timeout=10)
    c1 = framed(p)
    rs = []
    for n in range(4):
        rs.append(p.fetch(request_frame(b"%d" % n, ts=TS)))
        p.advance(1)
    assert len(p.reactor.getDelayedCalls()) == 1  # one timer, not one per request
    p.advance(10 - 4 - EPS)  # the first is due 10 s after it left
    assert not any(r.done for r in rs)
    p.advance(EPS)
    assert [r.done for r in rs] == [True, False, False, False]
    assert rs[0].error == "calculator server 127.0.0.1:9999 did not answer within 10 s"
    c1.close(error.ConnectionAborted)  # closed for it: the others go again elsewhere
    c2 = p.accept(1)
    assert c2.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(1, max_age=60))
    assert rs[1].value is not None
    p.advance(2 - EPS)  # each of the others at its own deadline
    assert [r.done for r in rs] == [True, True, False, False]
    p.advance(EPS)
    assert [r.done for r in rs] == [True, True, True, False]
    assert rs[2].error.endswith("did not answer within 10 s")
    p.advance(1)
    assert rs[3].error.endswith("did not answer within 10 s")
    (pause,) = p.reactor.getDelayedCalls()  # no timer left but the pipelining pause
    assert pause.func == p.pool._resumePipelining


def test_a_fetch_made_while_one_times_out_keeps_the_others_on_time():
    """A fetch made from a timed-out request's errback must not put the next deadline off."""
    p = Pool(timeout=10)
    first = p.pool.fetch(request_frame(b"1", ts=TS))
    p.accept()
    p.advance(5)
    second = p.fetch(request_frame(b"2", ts=TS))
    p.accept()
    again = []
    first.addErrback(lambda _: again.append(p.fetch(request_frame(b"3", ts=TS))))
    p.advance(5)
    assert again and not second.done
    p.advance(5 - EPS)
    assert not second.done
    p.advance(EPS)
    assert second.error.endswith("did not answer within 10 s")
    p.advance(5)
    assert again[0].error.endswith("did not answer within 10 s")


def test_requests_answered_behind_a_slow_one_are_not_kept_for_its_timeout():
    p = Pool(timeout=10)
    slow = p.fetch(request_frame(b"slow", ts=TS))
    c1 = p.accept()
    c2 = None
    for n in range(500):
        r = p.fetch(request_frame(b"%d" % n, ts=TS))
        if c2 is None:
            c2 = p.accept()
        c2.reply(answer(n, max_age=60))
        assert r.value is not None
    assert p.pool.outstanding == 1 and len(p.pool._watched) <= 66
    p.advance(10)
    assert slow.error.endswith("did not answer within 10 s")
    c1.close(error.ConnectionAborted)
    assert p.reactor.getDelayedCalls() == [] and not p.pool._watched


def test_cancelling_a_sent_request_closes_its_connection(p):
    """Its answer would still come on that connection, and be read as the next request's."""
    d = p.pool.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    d.cancel()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError)
    assert c1.transport.disconnecting


# --- retries -------------------------------------------------------------------------


def test_retry_backoff_is_half_a_second_doubling(p):
    r = p.fetch(request_frame(b"1", ts=TS))
    started = []
    for n in range(5):
        assert p.attempts == n + 1
        started.append(p.reactor.seconds() - T0)
        p.refuse()
        if n < 4:
            p.advance(0.5 * 2**n - EPS)
            assert p.attempts == n + 1
            p.advance(EPS)
    assert started == [0, 0.5, 1.5, 3.5, 7.5]
    assert r.error == (
        "calculator server 127.0.0.1:9999 unreachable after 5 attempts: Connection refused"
    )
    p.advance(100)
    assert p.attempts == 5
    assert p.pool.connections == 0
    assert p.reactor.getDelayedCalls() == []


def test_retry_delay_and_count_are_configurable():
    p = Pool(retries=4, retry_delay=0.125)
    r = p.fetch(request_frame(b"1", ts=TS))
    started = []
    while not r.done:
        if p.attempts > len(started):
            started.append(p.reactor.seconds() - T0)
            p.refuse()
        else:
            p.advance(EPS)
    assert started == [0, 0.125, 0.375, 0.875]
    assert r.error == (
        "calculator server 127.0.0.1:9999 unreachable after 4 attempts: Connection refused"
    )


def test_one_attempt_is_named_in_the_singular():
    p = Pool(retries=1)
    r = p.fetch(request_frame(b"1", ts=TS))
    p.refuse()
    assert r.error == (
        "calculator server 127.0.0.1:9999 unreachable after 1 attempt: Connection refused"
    )
    assert p.attempts == 1


@pytest.mark.parametrize(
    ("reason", "why"),
    [
        (error.ConnectionRefusedError(), "Connection refused"),
        (error.TimeoutError(), "connection timed out"),
        (error.ConnectError("No route to host"), "No route to host"),
        (error.DNSLookupError("nowhere.invalid"), "DNS lookup failed: nowhere.invalid"),
    ],
    ids=["refused", "timeout", "oserror", "dns"],
)
def test_the_last_failure_is_named_in_the_error(reason, why):
    p = Pool(retries=2, retry_delay=1)
    r = p.fetch(request_frame(b"1", ts=TS))
    p.refuse()
    p.advance(1)
    p.refuse(reason=reason)
    assert r.error == f"calculator server 127.0.0.1:9999 unreachable after 2 attempts: {why}"


def test_a_retry_uses_a_connection_that_became_idle_meanwhile():
    p = Pool(retry_delay=1)
    busy = p.fetch(request_frame(b"1", ts=TS))
    r = p.fetch(request_frame(b"2", ts=TS))
    c1 = p.accept(0)
    p.refuse(1)
    c1.reply(answer(1, max_age=60))
    assert busy.done
    c1.take()
    p.advance(1)
    # The retry finds the now idle connection instead of dialling again.
    assert p.attempts == 2
    assert c1.take() == request_frame(b"2", ts=TS)
    c1.reply(answer(2, max_age=60))
    assert r.value[1] == answer(2, max_age=60)[12:]


def test_close_closes_the_idle_connections(p):
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    c1, c2 = p.accept(0), p.accept(1)
    c1.reply(answer(1, max_age=60))
    assert r1.done and not r2.done
    p.pool.close()
    assert c1.transport.disconnecting
    assert not c2.transport.disconnecting  # busy: its answer is still awaited
    assert p.pool.idle == 0


# --- pipelining (--upstream-pipeline) ------------------------------------------------


def test_without_pipelining_a_busy_connection_never_takes_a_second_request(p):
    p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    p.fetch(request_frame(b"2", ts=TS))
    assert c1.take() == request_frame(b"1", ts=TS)
    assert p.attempts == 2


def framed(p: Pool) -> Peer:
    """A connection of ``p`` that has brought an answer with L and our tag
    (so it may be pipelined), idle again."""
    r = p.fetch(request_frame(b"0", ts=TS))
    conn = p.accept()
    conn.reply(answer(0, max_age=60))
    assert r.value[1] == answer(0, max_age=60)[12:]
    conn.take()
    return conn


def test_pipelined_requests_share_one_connection_and_fire_in_order():
    p = Pool(pipeline=3)
    c1 = framed(p)
    r1, r2, r3 = (
        p.fetch(request_frame(b"1", ts=TS)),
        p.fetch(request_frame(b"2", ts=TS)),
        p.fetch(request_frame(b"3", ts=TS)),
    )
    assert p.attempts == 1
    assert c1.take() == request_frame(b"1", ts=TS) + request_frame(b"2", ts=TS) + request_frame(
        b"3", ts=TS
    )
    # All three answers in one read.
    c1.reply(answer(1, max_age=60), answer(2, max_age=60), answer(3, max_age=60))
    assert [r.value[1] for r in (r1, r2, r3)] == [answer(n, max_age=60)[12:] for n in (1, 2, 3)]
    assert (p.pool.connections, p.pool.idle) == (1, 1)


def test_a_new_connection_takes_one_request_until_it_has_answered_with_l():
    """Only a server that sets L (ours) can be pipelined to; a course server reads one recv."""
    p = Pool(pipeline=3)
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    r2 = p.fetch(request_frame(b"2", ts=TS))
    assert p.attempts == 2  # not pipelined behind the first: c1 has not said L yet
    c2 = p.accept()
    assert (c1.take(), c2.take()) == (request_frame(b"1", ts=TS), request_frame(b"2", ts=TS))
    c1.reply(answer(1, max_age=60))
    c2.reply(answer(2, max_age=60))
    r3, r4 = p.fetch(request_frame(b"3", ts=TS)), p.fetch(request_frame(b"4", ts=TS))
    # Both have said L now: the second request goes behind the first.
    assert sorted([c1.take(), c2.take()]) == [
        b"",
        request_frame(b"3", ts=TS) + request_frame(b"4", ts=TS),
    ]
    assert p.attempts == 2 and r1.done and r2.done and not (r3.done or r4.done)


def test_a_server_without_l_gets_one_request_per_connection_whatever_the_pipeline():
    p = Pool(pipeline=8)
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in range(3)]
    conns = [p.accept(n) for n in range(3)]
    assert p.attempts == 3
    for n, conn in enumerate(conns):
        assert conn.take() == request_frame(b"%d" % n, ts=TS)
        conn.reply(answer(n, max_age=60), framed=False)
        assert conn.transport.disconnecting  # its one answer delivered, then closed
    assert [r.value[1] for r in rs] == [answer(n, max_age=60)[12:] for n in range(3)]
    assert p.pool.idle == 0
    for conn in conns:
        conn.close()
    r = p.fetch(request_frame(b"9", ts=TS))
    assert p.attempts == 4  # never reused
    p.accept().reply(answer(9, max_age=60), framed=False)
    assert r.value[1] == answer(9, max_age=60)[12:]


def two_framed(p: Pool) -> tuple[Peer, Peer]:
    """Two connections of ``p`` that have said L, both idle."""
    p.fetch(request_frame(b"0", ts=TS))
    a = p.accept()
    p.fetch(request_frame(b"0", ts=TS))
    b = p.accept()
    a.reply(answer(0, max_age=60))
    b.reply(answer(0, max_age=60))
    a.take(), b.take()
    return a, b


def test_a_request_goes_on_the_busiest_connection_with_room_before_an_idle_one():
    p = Pool(pipeline=3)
    a, b = two_framed(p)
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in range(1, 6)]
    first, second = sorted((a, b), key=lambda c: -len(c.transport.value()))
    # Three on one (its depth), then the idle one takes the rest.
    assert first.take() == request_frame(b"1", ts=TS) + request_frame(b"2", ts=TS) + request_frame(
        b"3", ts=TS
    )
    assert second.take() == request_frame(b"4", ts=TS) + request_frame(b"5", ts=TS)
    first.reply(answer(1, max_age=60), answer(2, max_age=60))
    r6, r7 = p.fetch(request_frame(b"6", ts=TS)), p.fetch(request_frame(b"7", ts=TS))
    # ``second`` is the busier (2 in flight against 1): it takes 6, then is full.
    assert second.take() == request_frame(b"6", ts=TS)
    assert first.take() == request_frame(b"7", ts=TS)
    assert p.attempts == 2 and not (r6.done or r7.done)
    assert [r.done for r in rs] == [True, True, False, False, False]


def test_no_connection_ever_has_more_than_the_pipeline_depth_in_flight():
    p = Pool(pipeline=2, max_connections=2)
    a, b = two_framed(p)
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in range(1, 7)]
    assert (a.protocol.pending, b.protocol.pending) == (2, 2)
    assert p.attempts == 2  # the rest wait for room
    (a if a.transport.value() else b).reply(answer(1, max_age=60))
    assert sorted([a.protocol.pending, b.protocol.pending]) == [2, 2]
    assert sum(r.done for r in rs) == 1


def test_a_connection_that_has_not_said_l_never_takes_a_second_request_beside_a_busy_one():
    p = Pool(pipeline=8)
    c1 = framed(p)
    p.fetch(request_frame(b"1", ts=TS))
    p.fetch(request_frame(b"2", ts=TS))
    c1.protocol.transport.loseConnection()  # c1 closing: not usable
    p.fetch(request_frame(b"3", ts=TS))
    c2 = p.accept()
    p.fetch(request_frame(b"4", ts=TS))
    # c2 has one request in flight and has not said L: 4 gets a connection of its own.
    assert c2.take() == request_frame(b"3", ts=TS)
    assert p.attempts == 3
    assert p.accept().take() == request_frame(b"4", ts=TS)


def test_a_full_connection_makes_the_pool_open_another():
    p = Pool(pipeline=2)
    c1 = framed(p)
    p.fetch(request_frame(b"1", ts=TS))
    p.fetch(request_frame(b"2", ts=TS))
    assert p.attempts == 1
    p.fetch(request_frame(b"3", ts=TS))
    assert p.attempts == 2
    c2 = p.accept()
    p.fetch(request_frame(b"4", ts=TS))  # c2 has not said L yet: c1 would, but it is full
    assert p.attempts == 3
    assert c1.take() == request_frame(b"1", ts=TS) + request_frame(b"2", ts=TS)
    assert c2.take() == request_frame(b"3", ts=TS)


def test_at_the_connection_limit_a_waiting_request_takes_the_first_free_place():
    p = Pool(pipeline=2, max_connections=1)
    c1 = framed(p)
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in (1, 2, 3)]
    assert c1.take() == request_frame(b"1", ts=TS) + request_frame(b"2", ts=TS)
    c1.reply(answer(1, max_age=60))
    assert c1.take() == request_frame(b"3", ts=TS)
    c1.reply(answer(2, max_age=60), answer(3, max_age=60))
    assert [r.value[1] for r in rs] == [answer(n, max_age=60)[12:] for n in (1, 2, 3)]
    assert p.attempts == 1
    assert p.pool.idle == 1


def test_a_timed_out_pipelined_request_closes_its_connection_and_pauses_pipelining():
    p = Pool(pipeline=4, timeout=5)
    c1 = framed(p)
    slow = p.fetch(request_frame(b"slow", ts=TS))
    p.advance(1)
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in (1, 2)]
    assert c1.take() == request_frame(b"slow", ts=TS) + request_frame(b"1", ts=TS) + request_frame(
        b"2", ts=TS
    )
    p.advance(4)
    assert slow.error == "calculator server 127.0.0.1:9999 did not answer within 5 s"
    assert c1.transport.disconnecting
    assert not p.pool.pipelining
    c1.close(error.ConnectionAborted)
    # Sent again, one request per connection for the pause.
    assert p.attempts == 3
    c2, c3 = p.accept(1), p.accept(2)
    assert (c2.take(), c3.take()) == (request_frame(b"1", ts=TS), request_frame(b"2", ts=TS))
    c2.reply(answer(1, max_age=60))
    c3.reply(answer(2, max_age=60))
    assert [r.value[1] for r in rs] == [answer(1, max_age=60)[12:], answer(2, max_age=60)[12:]]
    p.fetch(request_frame(b"3", ts=TS))
    p.fetch(request_frame(b"4", ts=TS))
    assert sorted([c2.take(), c3.take()]) == [
        request_frame(b"3", ts=TS),
        request_frame(b"4", ts=TS),
    ]
    c2.reply(answer(3, max_age=60))
    c3.reply(answer(4, max_age=60))
    # The server may only have been slow: after the pause, pipelining again.
    p.advance(PIPELINE_PAUSE)
    assert p.pool.pipelining
    p.fetch(request_frame(b"5", ts=TS))
    p.fetch(request_frame(b"6", ts=TS))
    assert sorted([c2.take(), c3.take()]) == [
        b"",
        request_frame(b"5", ts=TS) + request_frame(b"6", ts=TS),
    ]


def test_bytes_beyond_the_last_pipelined_answer_close_the_connection():
    p = Pool(pipeline=2)
    c1 = framed(p)
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    c1.reply(answer(1, max_age=60), answer(2, max_age=60), b"\x00")
    assert (r1.value[1], r2.value[1]) == (answer(1, max_age=60)[12:], answer(2, max_age=60)[12:])
    assert c1.transport.disconnecting and not c1.protocol.usable


def test_requests_wait_for_the_connection_being_opened_to_a_server_known_to_frame():
    p = Pool(pipeline=4)
    c0 = framed(p)
    c0.close()
    rs = [p.fetch(request_frame(b"%d" % n, ts=TS)) for n in range(1, 7)]
    assert p.attempts == 2  # one dial, not six
    c1 = p.accept()
    assert c1.take() == request_frame(b"1", ts=TS)  # alone until it says L
    assert p.attempts == 3  # meanwhile one more connection for those waiting
    c1.reply(answer(1, max_age=60))
    assert c1.take() == b"".join(request_frame(b"%d" % n, ts=TS) for n in range(3, 7))
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c1.reply(*(answer(n, max_age=60) for n in range(3, 7)))
    c2.reply(answer(2, max_age=60))
    assert [r.value[1] for r in rs] == [answer(n, max_age=60)[12:] for n in range(1, 7)]


def test_pipelined_requests_waiting_for_a_refused_dial_try_in_turn():
    p = Pool(pipeline=4, retries=1)
    framed(p).close()
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    p.refuse(1)
    assert (
        r1.error
        == "calculator server 127.0.0.1:9999 unreachable after 1 attempt: Connection refused"
    )
    assert p.attempts == 3 and not r2.done
    p.refuse(2)
    assert r2.error == r1.error
    assert p.pool.connections == 0


def test_pipelined_requests_on_a_connection_the_server_closes_go_to_a_fresh_one():
    p = Pool(pipeline=4)
    c1 = framed(p)
    r1, r2, r3 = (p.fetch(request_frame(b"%d" % n, ts=TS)) for n in (1, 2, 3))
    assert c1.take() == request_frame(b"1", ts=TS) + request_frame(b"2", ts=TS) + request_frame(
        b"3", ts=TS
    )
    # As over real TCP: the loss arrives without the transport closing first.
    c1.close()
    assert [r.done for r in (r1, r2, r3)] == [False] * 3  # all sent on a reused connection
    c2 = p.accept(1)
    assert c2.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(1, max_age=60))
    assert c2.take() == request_frame(b"3", ts=TS)  # pipelined now that c2 has said L
    c3 = p.accept(2)  # dialed for those waiting while c2 had not said L
    assert c3.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(3, max_age=60))
    c3.reply(answer(2, max_age=60))
    assert [r.value[1] for r in (r1, r2, r3)] == [answer(n, max_age=60)[12:] for n in (1, 2, 3)]
    assert c1.take() == b"" and p.attempts == 3


def test_a_connection_aborted_for_a_timeout_takes_no_new_request_before_it_closes():
    p = Pool(pipeline=4, timeout=5)
    slow = p.fetch(request_frame(b"slow", ts=TS))
    c1 = p.accept()
    c1.transport.abortConnection = lambda: None  # as over real TCP: it closes a turn later
    p.advance(5)
    assert slow.error == "calculator server 127.0.0.1:9999 did not answer within 5 s"
    r = p.fetch(request_frame(b"new", ts=TS))
    assert c1.take() == request_frame(b"slow", ts=TS)
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"new", ts=TS)
    c2.reply(answer(1, max_age=60))
    assert r.value[1] == answer(1, max_age=60)[12:]


def test_a_request_whose_connection_we_aborted_for_another_is_sent_again():
    p = Pool()
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.close(error.ConnectionAborted)  # closed by us, for a neighbour's timeout
    assert p.attempts == 2
    c2 = p.accept()
    assert c2.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(1, max_age=60))
    assert r.value[1] == answer(1, max_age=60)[12:]


# --- tags: a wrong match is detected, never delivered ---------------------------------


def test_every_request_carries_a_tag_of_its_own(p):
    """The tag is how an answer is matched to its request on a pipelined connection."""
    c1 = framed(p)
    for n in (1, 2):
        p.fetch(request_frame(b"%d" % n, ts=TS))
        c1.reply(answer(n, max_age=60))
    assert c1.seen == [1, 2, 3]


def test_an_answer_out_of_order_is_not_delivered_and_both_are_sent_again():
    p = Pool(pipeline=4)
    c1 = framed(p)
    r1, r2 = p.fetch(request_frame(b"1", ts=TS)), p.fetch(request_frame(b"2", ts=TS))
    c1.take()
    c1.tags.reverse()  # the server answers the second request first
    c1.reply(answer(2, max_age=60))
    assert c1.transport.disconnected and not (r1.done or r2.done)
    c1.close(error.ConnectionAborted)
    assert not p.pool.pipelining  # pipelined requests went out of step
    for n in (1, 2):
        conn = p.accept(n)
        sent = conn.take()
        conn.reply(answer(int(sent[12:]), max_age=60))
    assert (r1.value[1], r2.value[1]) == (answer(1, max_age=60)[12:], answer(2, max_age=60)[12:])


def test_a_duplicated_answer_never_answers_the_next_request():
    """The server answers request 1 twice: the copy arrives while request 2
    waits on the same connection, and is recognised by its tag."""
    p = Pool()
    c1 = framed(p)
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1.take()
    (tag1,) = c1.tags
    c1.reply(answer(1, max_age=60))
    r2 = p.fetch(request_frame(b"2", ts=TS))
    assert c1.take() == request_frame(b"2", ts=TS)
    duplicate = (
        answer(1, max_age=60)[:10]
        + (wire.EXT_FRAMED | tag1 << 3).to_bytes(2, "big")
        + answer(1, max_age=60)[12:]
    )
    c1.reply(duplicate, framed=False)
    assert r1.value[1] == answer(1, max_age=60)[12:]
    assert not r2.done and c1.transport.disconnected
    c1.close(error.ConnectionAborted)
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60))
    assert r2.value[1] == answer(2, max_age=60)[12:]


def test_a_server_without_l_answering_twice_never_answers_another_request(p):
    """A course server's duplicated answer must not be read as the next request's answer."""
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.reply(answer(1, max_age=60), framed=False)
    r2 = p.fetch(request_frame(b"2", ts=TS))
    c1.reply(answer(1, max_age=60), framed=False)  # the stray second answer
    assert r1.value[1] == answer(1, max_age=60)[12:]
    assert not r2.done
    assert c1.take() == request_frame(b"1", ts=TS)  # request 2 never went on that connection
    c2 = p.accept()
    assert c2.take() == request_frame(b"2", ts=TS)
    c2.reply(answer(2, max_age=60), framed=False)
    assert r2.value[1] == answer(2, max_age=60)[12:]


def test_tags_start_at_random_on_every_connection():
    """Never 0, and not the same on every connection: an answer a server
    sends unasked cannot match by design."""
    from twisted_cacheproxy.proxy.upstream import UpstreamProtocol

    firsts = set()
    for _ in range(50):
        protocol = UpstreamProtocol()
        protocol.makeConnection(StringTransport())
        protocol.sendRequest(request_frame(b"1", ts=TS))
        firsts.add(wire.decode_header(protocol.transport.value()).tag)
    assert all(1 <= tag <= wire.MAX_TAG for tag in firsts)
    assert len(firsts) > 1


def test_an_answer_a_server_sends_as_the_connection_opens_is_never_delivered():
    """A server that speaks first, with an L answer tagged 1 (where every
    connection's tags used to start): out of step, so not delivered, and the
    request goes again on a new connection."""
    p = Pool()
    p.connector.first_tag = 100
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    stray = answer(999)[:10] + (wire.EXT_FRAMED | 1 << 3).to_bytes(2, "big") + answer(999)[12:]
    c1.reply(stray, framed=False)
    assert not r.done and c1.transport.disconnected
    c1.close(error.ConnectionAborted)
    c2 = p.accept()
    assert c2.take() == request_frame(b"1", ts=TS)
    c2.reply(answer(1))
    assert r.value[1] == answer(1)[12:]


@pytest.mark.parametrize("status", [0, 201, 503, 999])
def test_an_answer_with_a_status_other_than_200_400_500_is_invalid(p, status):
    """The course client loses any other code: the proxy must never relay one."""
    r = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    odd = wire.rewrite(answer(1), flags=wire.make_flags(request=False, status=status))
    c1.reply(odd)
    assert r.error == (
        f"calculator server 127.0.0.1:9999 sent an invalid answer: "
        f"status {status} is not 200, 400 or 500"
    )
    assert c1.transport.disconnected or c1.transport.disconnecting
    assert p.pool.tally.failures["invalid"] == 1


def test_an_l_answer_with_tag_0_is_taken_as_a_server_without_l(p):
    """A middlebox that zeroes the word in requests: tags do not get through."""
    r1 = p.fetch(request_frame(b"1", ts=TS))
    c1 = p.accept()
    c1.take()
    c1.tags[:] = [0]
    c1.reply(answer(1, max_age=60))
    assert r1.value[1] == answer(1, max_age=60)[12:]
    assert c1.transport.disconnecting and not p.pool.framed
    assert p.pool.idle == 0


def test_a_server_always_out_of_step_gets_a_500_after_the_attempts():
    p = Pool(retries=2)
    r = p.fetch(request_frame(b"1", ts=TS))
    for n in range(2):
        conn = p.accept(n)
        conn.take()
        conn.tags[:] = [4000]  # never our tag
        conn.reply(answer(1, max_age=60))
        conn.close(error.ConnectionAborted)
    assert r.error == (
        "calculator server 127.0.0.1:9999 answered out of step: "
        "answer tagged 4000 for the request tagged 1"
    )


def test_a_request_sent_again_after_an_out_of_step_answer_goes_on_a_new_connection():
    """An idle connection may still have a stray answer on its way."""
    p = Pool()
    c1 = framed(p)
    ra, rb = p.fetch(request_frame(b"a", ts=TS)), p.fetch(request_frame(b"b", ts=TS))
    c2 = p.accept()
    c2.reply(answer(0, max_age=60))
    assert rb.value[1] == answer(0, max_age=60)[12:]  # c2 is idle now
    c1.take()
    c1.tags[:] = [4000]
    c1.reply(answer(1, max_age=60))
    c1.close(error.ConnectionAborted)
    assert p.attempts == 3 and c2.take() == request_frame(b"b", ts=TS)
    p.accept().reply(answer(1, max_age=60))
    assert ra.value[1] == answer(1, max_age=60)[12:]


def test_the_tcp_connector_opens_connections_through_a_client_creator():
    from twisted_cacheproxy.proxy.upstream import TCPConnector, UpstreamProtocol

    reactor = MemoryReactorClock()
    connector = TCPConnector(reactor, "127.0.0.1", 9999, timeout=7.5)
    assert connector.address == "127.0.0.1:9999"
    d = connector.connect()
    host, port, factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9999, 7.5)
    from twisted.internet.address import IPv4Address

    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())
    reactor.advance(0)
    assert isinstance(defer_result(d), UpstreamProtocol)


def defer_result(d: defer.Deferred):
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]
