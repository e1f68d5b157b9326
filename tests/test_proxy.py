"""The caching proxy's rules, driven entirely by fakes: clients and
upstream connections are `StringTransport`s, the pool's connections come
from a `FakeConnector`, and a `task.Clock` keeps the time.

Every test asserts on the exact bytes sent upstream and to each client. How
the pool reuses connections, retries, times out and pipelines is tested in
test_upstream.py; here it is seen only through what the proxy answers.
"""

from __future__ import annotations

import json
import pickle

import pytest
from helpers import FakeConnector, Peer, headers, request_frame, untagged
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.operations.metrics import ProxyMetrics
from twisted_cacheproxy.proxy.cache import ENTRY_OVERHEAD, MemoryCache
from twisted_cacheproxy.proxy.events import CACHE_STATUSES
from twisted_cacheproxy.proxy.factory import CacheProxyFactory, CacheProxyProtocol
from twisted_cacheproxy.proxy.upstream import UpstreamPool
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.wire import FOREVER

pytestmark = pytest.mark.usefixtures("proxy_log")

T0 = 1_700_000_000.0
TS = int(T0)
#: A step small enough not to matter and exact in binary floating point.
EPS = 2.0**-10
HOUR = 3600
TEXT, LEGACY = codec.TEXT, codec.LEGACY

X = b"1 + 2"
Y = b"2 * 3"
Z = b"max(2, 3) + 3"
RAND = b"rand(0, 1)"


# --- frames -------------------------------------------------------------------


def request(data: bytes, *, cache=True, steps=False, max_age=FOREVER, ts=TS) -> bytes:
    return request_frame(data, cache=cache, steps=steps, max_age=max_age, ts=ts)


def answer(
    result, *, steps=(), cache=True, max_age=FOREVER, ts=TS, status=wire.OK, encoding=TEXT
) -> bytes:
    """A server's success answer."""
    payload = codec.encode_result(encoding, result, list(steps))
    flags = wire.make_flags(request=False, status=status, cache=cache, steps=bool(steps))
    return wire.encode(ts, flags, max_age, payload)


def error_answer(
    kind, message, *, status=wire.BAD_REQUEST, cache=False, max_age=0, ts=TS, encoding=TEXT
) -> bytes:
    """A server's error answer."""
    payload = codec.encode_error(encoding, kind, message)
    return wire.encode(
        ts, wire.make_flags(request=False, status=status, cache=cache), max_age, payload
    )


def proxy_error(message: str, ts: int, encoding=TEXT) -> bytes:
    """The proxy's own 500: C=0, cache control 0, the message in the request's encoding."""
    if encoding == TEXT:
        payload = json.dumps({"error": message, "type": "ConnectionError"}).encode()
    else:
        payload = codec.encode_error(LEGACY, "ConnectionError", message)
    return wire.encode(ts, wire.make_flags(request=False, status=wire.SERVER_ERROR), 0, payload)


def with_max_age(frame: bytes, max_age: int) -> bytes:
    """``frame`` with another cache-control field (what a hit carries)."""
    return frame[:8] + max_age.to_bytes(2, "big") + frame[10:]


def as_stale(frame: bytes) -> bytes:
    """``frame`` with C=0 and cache control 0 (what a stale-if-error answer carries)."""
    flags = int.from_bytes(frame[6:8], "big") & ~wire.FLAG_CACHE
    return frame[:6] + flags.to_bytes(2, "big") + b"\x00\x00" + frame[10:]


def unreachable(attempts: int, port: int = 9999) -> str:
    plural = "s" if attempts > 1 else ""
    return (
        f"calculator server 127.0.0.1:{port} unreachable after {attempts} attempt{plural}: "
        "Connection refused"
    )


def entry_bytes(data: bytes, stored_answer: bytes) -> int:
    """What one stored answer counts in the ``bytes`` counter: key (S flag
    byte + request data), answer and bookkeeping."""
    return 1 + len(data) + len(stored_answer) + ENTRY_OVERHEAD


def counters(**values) -> dict[str, int]:
    """What `Harness.counters` gives: answers by cache status (as the proxy's
    metrics count them), failed upstream attempts, and the cache's figures."""
    base = dict.fromkeys((*CACHE_STATUSES, "failures", "evictions", "entries", "bytes"), 0)
    base.update(values)
    return base


# --- fakes --------------------------------------------------------------------


class Client:
    """One client connection to the proxy."""

    def __init__(self, factory: CacheProxyFactory, n: int) -> None:
        self.wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + n))
        assert isinstance(self.wrapper, CacheProxyProtocol)
        self.transport = StringTransport()
        self.wrapper.makeConnection(self.transport)
        self.marks: list[int] = []
        self.tags: list[int] = []

    def send(self, *frames: bytes) -> None:
        self.wrapper.dataReceived(b"".join(frames))

    def take(self) -> bytes:
        """Everything written to this client since the last take, with the
        extension words zeroed: each must carry L, and its cache marks (H,
        G) and tag are kept in `marks` and `tags`."""
        value = self.transport.value()
        self.transport.clear()
        for header in headers(value):
            assert header.framed, header
            self.marks.append(header.ext & (wire.EXT_FROM_CACHE | wire.EXT_GRACE))
            self.tags.append(header.tag)
        return untagged(value, keep=0)

    def disconnect(self) -> None:
        self.wrapper.connectionLost(Failure(error.ConnectionDone()))


class Harness:
    """A proxy factory on a fake reactor, its clients and its upstream connections."""

    def __init__(
        self, *, cache_size: int = 64 << 20, stale_if_error: float = 0.0, **options
    ) -> None:
        self.reactor = task.Clock()
        self.reactor.advance(T0)
        self.connector = FakeConnector(self.reactor)
        self.accept = self.connector.accept
        self.refuse = self.connector.refuse
        cache = MemoryCache(cache_size, self.reactor, grace=stale_if_error)
        # The proxy's options as tap.py shares them out: the upstream ones to the pool.
        pool_options = {
            name: options.pop(name)
            for name in ("retries", "retry_delay", "timeout")
            if name in options
        }
        if "upstream_connections" in options:
            pool_options["max_connections"] = options.pop("upstream_connections")
        if "upstream_pipeline" in options:
            pool_options["pipeline"] = options.pop("upstream_pipeline")
        pool = UpstreamPool(self.connector, self.reactor, **pool_options)
        options.setdefault("idle_timeout", None)
        self.factory = CacheProxyFactory(cache, pool, clock=self.reactor, **options)
        self.metrics = ProxyMetrics(self.factory)
        self.factory.observer = self.metrics
        self._clients = 0

    def client(self) -> Client:
        self._clients += 1
        return Client(self.factory, self._clients)

    @property
    def attempts(self) -> int:
        """Connection attempts made to the server so far."""
        return len(self.connector.attempts)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def now(self) -> float:
        return self.reactor.seconds()

    def counters(self) -> dict[str, int]:
        """Answers by cache status, failed upstream attempts, and the cache's figures."""
        cache = self.factory.cache
        failures = sum(sum(s.tally.failures.values()) for s in self.factory.pool.servers)
        return {
            **self.metrics.requests,
            "failures": failures,
            "evictions": cache.evictions,
            "entries": cache.entries,
            "bytes": cache.bytes,
        }

    def assert_quiet(self) -> None:
        """No timer is left behind (retry, timeout) once everything is answered."""
        assert self.reactor.getDelayedCalls() == []

    def miss(self, client: Client, frame: bytes, reply: bytes, upstream: Peer | None = None):
        """Send ``frame`` as a miss, check it went upstream unchanged, answer it."""
        client.send(frame)
        if upstream is None:
            upstream = self.accept()
        assert upstream.take() == frame
        assert client.take() == b""
        upstream.reply(reply)
        assert client.take() == reply
        return upstream


@pytest.fixture
def h() -> Harness:
    return Harness()


# --- 1. a fresh stored answer is served without contacting the server -----------


def test_miss_forwards_the_request_unchanged_and_relays_the_answer(h):
    c = h.client()
    frame = request(X)
    c.send(frame)
    assert h.attempts == 1
    up = h.accept()
    assert up.take() == frame
    assert c.take() == b""
    reply = answer(3, ts=TS + 7)
    up.reply(reply)
    assert c.take() == reply
    assert h.counters() == counters(miss=1, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


def test_fresh_answer_is_served_without_contacting_the_server(h):
    c = h.client()
    reply = answer(3)
    up = h.miss(c, request(X), reply)
    h.advance(100)
    c.send(request(X, ts=TS + 100))
    # Forever-cacheable: the very bytes the server sent, timestamp included.
    assert c.take() == reply
    other = h.client()
    other.send(request(X, ts=TS + 100))
    assert other.take() == reply
    assert h.attempts == 1
    assert up.take() == b""
    assert h.counters() == counters(miss=1, hit=2, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


def test_hits_carry_the_remaining_lifetime_as_cache_control(h):
    c = h.client()
    reply = answer(3, max_age=100)
    h.miss(c, request(X), reply)
    h.advance(30)
    c.send(request(X))
    assert c.take() == with_max_age(reply, 70)
    h.advance(29.5)  # age 59.5: 40.5 s left, never announced as more
    c.send(request(X))
    assert c.take() == with_max_age(reply, 40)
    assert h.attempts == 1
    assert h.counters()["hit"] == 2


def test_forever_answers_never_go_stale(h):
    c = h.client()
    reply = answer(3, max_age=FOREVER)
    h.miss(c, request(X), reply)
    h.advance(10 * 365 * 86400)
    c.send(request(X))
    assert c.take() == reply
    assert h.attempts == 1


# --- 2. freshness: the response's max-age and the request's max-age ---------------


def test_answer_is_served_only_while_younger_than_its_max_age(h):
    c = h.client()
    reply = answer(3, max_age=10)
    up = h.miss(c, request(X), reply)
    h.advance(10 - EPS)
    c.send(request(X))
    # Less than a second left: announced as 1 s (or 0, "do not keep it").
    assert c.take() in (with_max_age(reply, 1), with_max_age(reply, 0))
    h.advance(EPS)  # age 10: expired
    c.send(request(X))
    assert c.take() == b""
    # Asked again, on the pooled connection.
    assert h.attempts == 1
    assert up.take() == request(X)
    fresh = answer(3, max_age=10, ts=TS + 10)
    up.reply(fresh)
    assert c.take() == fresh
    assert h.counters() == counters(miss=2, hit=1, entries=1, bytes=entry_bytes(X, fresh))


def test_request_max_age_limits_the_age_it_accepts(h):
    c = h.client()
    reply = answer(3, max_age=FOREVER)
    up = h.miss(c, request(X), reply)
    h.advance(5 - EPS)
    c.send(request(X, max_age=5))
    assert c.take() == reply
    h.advance(EPS)  # age 5: too old for max-age 5, though fresh
    c.send(request(X, max_age=5))
    assert c.take() == b""
    assert up.take() == request(X, max_age=5)
    newer = answer(4, max_age=FOREVER, ts=TS + 5)
    up.reply(newer)
    assert c.take() == newer
    # The newer answer replaced the older one.
    c.send(request(X, max_age=1))
    assert c.take() == newer
    c.send(request(X))
    assert c.take() == newer
    assert h.counters() == counters(miss=2, hit=3, entries=1, bytes=entry_bytes(X, newer))


def test_the_smaller_of_both_max_ages_wins(h):
    c = h.client()
    reply = answer(3, max_age=10)
    up = h.miss(c, request(X), reply)
    h.advance(12)
    # The client would accept 20 s, but the answer's lifetime is 10 s.
    c.send(request(X, max_age=20))
    assert c.take() == b""
    assert up.take() == request(X, max_age=20)


@pytest.mark.parametrize("request_max_age", [1, 100, FOREVER])
def test_any_request_max_age_above_zero_accepts_a_new_answer(h, request_max_age):
    c = h.client()
    reply = answer(3, max_age=50)
    h.miss(c, request(X), reply)
    c.send(request(X, max_age=request_max_age))
    assert c.take() == with_max_age(reply, 50)
    assert h.attempts == 1


# --- 3. age on the proxy's own clock, from when the request was sent --------------


@pytest.mark.parametrize("server_offset", [-HOUR, 0, HOUR], ids=["server-behind", "same", "ahead"])
def test_age_is_measured_on_the_proxy_clock_from_sending(h, server_offset):
    c = h.client()
    c.send(request(X))
    up = h.accept()
    assert up.take() == request(X)
    h.advance(4)  # the answer takes 4 s
    reply = answer(3, max_age=10, ts=TS + 4 + server_offset)
    up.reply(reply)
    assert c.take() == reply
    h.advance(1)  # age 5, counted from sending
    c.send(request(X))
    assert c.take() == with_max_age(reply, 5)
    h.advance(5 - EPS)
    c.send(request(X))
    # Less than a second left: announced as 1 s (or 0, "do not keep it").
    assert c.take() in (with_max_age(reply, 1), with_max_age(reply, 0))
    h.advance(EPS)
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)
    assert h.counters()["hit"] == 2


def test_age_counts_from_when_the_request_left_not_when_the_miss_began(h):
    c = h.client()
    c.send(request(X))
    h.advance(2)  # the connection takes 2 s to open; the request leaves at T0 + 2
    up = h.accept()
    assert up.take() == request(X)
    h.advance(1)
    reply = answer(3, max_age=10, ts=TS + 3)
    up.reply(reply)
    assert c.take() == reply
    h.advance(8)  # T0 + 11: age 9
    c.send(request(X))
    assert c.take() == with_max_age(reply, 1)
    h.advance(1)  # age 10
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)


# --- 4. reload -----------------------------------------------------------------


def test_reload_fetches_and_replaces_the_stored_answer(h):
    c = h.client()
    old = answer(3)
    up = h.miss(c, request(X), old)
    h.advance(1)
    reload = request(X, max_age=0, ts=TS + 1)
    c.send(reload)
    assert c.take() == b""
    assert up.take() == reload
    new = answer(30, ts=TS + 1)
    up.reply(new)
    assert c.take() == new
    c.send(request(X))
    assert c.take() == new
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, reload=1, hit=1, entries=1, bytes=entry_bytes(X, new))


def test_reload_restarts_the_lifetime(h):
    c = h.client()
    up = h.miss(c, request(X), answer(3, max_age=10))
    h.advance(8)
    c.send(request(X, max_age=0))
    assert up.take() == request(X, max_age=0)
    new = answer(3, max_age=10, ts=TS + 8)
    up.reply(new)
    assert c.take() == new
    h.advance(9)  # 17 s after the first fetch, 9 s after the reload
    c.send(request(X))
    assert c.take() == with_max_age(new, 1)
    assert up.take() == b""


def test_reload_answered_uncacheable_is_not_stored(h):
    c = h.client()
    old = answer(3)
    up = h.miss(c, request(X), old)
    c.send(request(X, max_age=0))
    assert up.take() == request(X, max_age=0)
    uncacheable = answer(4, cache=False, max_age=0)
    up.reply(uncacheable)
    assert c.take() == uncacheable
    # Only a cacheable answer replaces the stored one.
    c.send(request(X))
    assert c.take() == old
    assert up.take() == b""
    assert h.counters() == counters(miss=1, reload=1, hit=1, entries=1, bytes=entry_bytes(X, old))


# --- 5. request C=0 ------------------------------------------------------------------


def test_c0_request_is_not_served_from_the_cache(h):
    c = h.client()
    stored = answer(3)
    up = h.miss(c, request(X), stored)
    nocache = request(X, cache=False, max_age=0)
    c.send(nocache)
    assert c.take() == b""
    assert up.take() == nocache
    fresh = answer(3, ts=TS + 1)  # cacheable, yet asked for with C=0
    up.reply(fresh)
    assert c.take() == fresh
    c.send(request(X))
    assert c.take() == stored
    stored_bytes = entry_bytes(X, stored)
    assert h.counters() == counters(miss=1, bypass=1, hit=1, entries=1, bytes=stored_bytes)


def test_c0_request_answer_is_not_stored(h):
    c = h.client()
    nocache = request(X, cache=False, max_age=FOREVER)
    reply = answer(3)
    up = h.miss(c, nocache, reply)
    assert h.counters()["entries"] == 0
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)


def test_c0_requests_are_not_coalesced(h):
    a, b = h.client(), h.client()
    nocache = request(X, cache=False, max_age=0)
    a.send(nocache)
    b.send(nocache)
    assert h.attempts == 2
    up_a, up_b = h.accept(0), h.accept(1)
    assert up_a.take() == nocache
    assert up_b.take() == nocache
    up_b.reply(answer(1, cache=False, max_age=0))
    up_a.reply(answer(2, cache=False, max_age=0))
    assert a.take() == answer(2, cache=False, max_age=0)
    assert b.take() == answer(1, cache=False, max_age=0)
    assert h.counters() == counters(bypass=2)


# --- 6. which answers are stored ------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        answer(3, cache=False, max_age=60),
        answer(3, cache=True, max_age=0),
        answer(3, cache=False, max_age=0),
        error_answer("RuntimeError", "internal server error", status=500, cache=True, max_age=60),
    ],
    ids=["C0", "max-age-0", "C0-max-age-0", "500-cacheable"],
)
def test_uncacheable_answers_are_relayed_but_not_stored(h, reply):
    c = h.client()
    up = h.miss(c, request(X), reply)
    assert h.counters() == counters(miss=1)
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)
    up.reply(reply)
    assert c.take() == reply
    assert h.counters() == counters(miss=2)


def test_cacheable_400_is_stored_like_a_200(h):
    c = h.client()
    request_data = b"1 / 0"
    reply = error_answer("ZeroDivisionError", "division by zero", cache=True, max_age=FOREVER)
    up = h.miss(c, request(request_data), reply)
    c.send(request(request_data))
    assert c.take() == reply
    assert up.take() == b""
    assert h.counters() == counters(
        miss=1, hit=1, entries=1, bytes=entry_bytes(request_data, reply)
    )


def test_uncacheable_400_is_not_stored(h):
    c = h.client()
    reply = error_answer("SyntaxError", "unexpected end", cache=False, max_age=0)
    up = h.miss(c, request(b"1 +"), reply)
    c.send(request(b"1 +"))
    assert c.take() == b""
    assert up.take() == request(b"1 +")


# --- 7. the S flag is part of the key -------------------------------------------------


def test_answer_without_steps_never_serves_a_request_for_steps(h):
    c = h.client()
    plain = answer(6)
    up = h.miss(c, request(Z), plain)
    c.send(request(Z, steps=True))
    assert c.take() == b""
    assert up.take() == request(Z, steps=True)
    stepped = answer(6, steps=["max(2, 3) + 3", "3 + 3", "6"])
    up.reply(stepped)
    assert c.take() == stepped
    # Both are stored, each under its own key.
    c.send(request(Z, steps=True), request(Z))
    assert c.take() == stepped + plain
    assert h.counters() == counters(
        miss=2,
        hit=2,
        entries=2,
        bytes=entry_bytes(Z, plain) + entry_bytes(Z, stepped),
    )


def test_answer_with_steps_does_not_serve_a_request_without(h):
    c = h.client()
    stepped = answer(6, steps=["max(2, 3) + 3", "3 + 3", "6"])
    up = h.miss(c, request(Z, steps=True), stepped)
    c.send(request(Z))
    assert c.take() == b""
    assert up.take() == request(Z)


def test_text_and_legacy_requests_are_different_keys(h):
    c = h.client()
    legacy = codec.encode_request(parse("1 + 2"), LEGACY)
    text_reply = answer(3)
    up = h.miss(c, request(X), text_reply)
    c.send(request(legacy))
    assert c.take() == b""
    assert up.take() == request(legacy)
    legacy_reply = answer(3, encoding=LEGACY)
    up.reply(legacy_reply)
    assert c.take() == legacy_reply
    c.send(request(legacy), request(X))
    assert c.take() == legacy_reply + text_reply


# --- coalescing ---------------------------------------------------------------------


def test_identical_requests_during_a_miss_share_one_upstream_request(h):
    clients = [h.client() for _ in range(5)]
    for c in clients:
        c.send(request(X))
    assert h.attempts == 1
    up = h.accept()
    assert up.take() == request(X)
    for c in clients:
        assert c.take() == b""
    reply = answer(3)
    up.reply(reply)
    for c in clients:
        assert c.take() == reply
    assert up.take() == b""
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, coalesced=4, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


def test_requests_arriving_while_connecting_also_coalesce(h):
    first = h.client()
    first.send(request(X))
    h.advance(1)
    later = h.client()
    later.send(request(X, ts=TS + 1))
    up = h.accept()
    assert up.take() == request(X)
    reply = answer(3, ts=TS + 1)
    up.reply(reply)
    assert first.take() == reply
    assert later.take() == reply
    assert h.attempts == 1


def test_one_client_pipelining_the_same_request_twice_gets_two_answers(h):
    c = h.client()
    c.send(request(X), request(X))
    up = h.accept()
    assert up.take() == request(X)
    reply = answer(3)
    up.reply(reply)
    assert c.take() == reply + reply
    assert h.counters()["coalesced"] == 1


def test_different_steps_flags_are_not_coalesced(h):
    a, b = h.client(), h.client()
    a.send(request(Z))
    b.send(request(Z, steps=True))
    assert h.attempts == 2
    up_a, up_b = h.accept(0), h.accept(1)
    assert up_a.take() == request(Z)
    assert up_b.take() == request(Z, steps=True)


def test_waiter_that_disconnected_is_dropped_cleanly(h, proxy_log):
    a, b, c = h.client(), h.client(), h.client()
    for client in (a, b, c):
        client.send(request(X))
    up = h.accept()
    b.disconnect()
    reply = answer(3)
    up.reply(reply)
    assert a.take() == reply
    assert b.take() == b""
    assert c.take() == reply
    # The one who left is never answered, so never counted.
    assert h.counters() == counters(miss=1, coalesced=1, entries=1, bytes=entry_bytes(X, reply))


def test_requester_that_disconnected_still_fills_the_cache_for_waiters(h):
    a, b = h.client(), h.client()
    a.send(request(X))
    b.send(request(X))
    up = h.accept()
    a.disconnect()
    reply = answer(3)
    up.reply(reply)
    assert a.take() == b""
    assert b.take() == reply
    later = h.client()
    later.send(request(X))
    assert later.take() == reply
    assert h.attempts == 1


def test_failed_shared_fetch_answers_every_waiter_with_the_error():
    h = Harness(retries=1)
    clients = [h.client() for _ in range(3)]
    for c in clients:
        c.send(request(X))
    h.refuse()
    for c in clients:
        assert c.take() == proxy_error(unreachable(1), TS)
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, coalesced=2, failures=1)
    h.assert_quiet()


def test_failed_shared_fetch_skips_a_waiter_that_disconnected():
    h = Harness(retries=1)
    a, b = h.client(), h.client()
    a.send(request(X))
    b.send(request(X))
    b.disconnect()
    h.refuse()
    assert a.take() == proxy_error(unreachable(1), TS)
    assert b.take() == b""


def test_uncacheable_shared_answer_gives_each_waiter_its_own_request():
    h = Harness(upstream_connections=1)
    clients = [h.client() for _ in range(3)]
    rand = request(RAND)
    for c in clients:
        c.send(rand)
    up = h.accept()
    assert up.take() == rand
    replies = [answer(0.25 * (i + 1), cache=False, max_age=0) for i in range(3)]
    up.reply(replies[0])
    assert clients[0].take() == replies[0]
    # Each waiter now asks for its own answer, one after another on the one connection.
    assert up.take() == rand
    assert clients[1].take() == b""
    up.reply(replies[1])
    assert clients[1].take() == replies[1]
    assert up.take() == rand
    up.reply(replies[2])
    assert clients[2].take() == replies[2]
    assert clients[0].take() == b""
    assert up.take() == b""
    assert h.attempts == 1
    assert h.counters()["entries"] == 0
    # The waiters asked the server themselves: misses, not answers coalesced.
    assert (h.counters()["miss"], h.counters()["coalesced"]) == (3, 0)


def test_server_error_answer_is_shared_by_the_waiters_and_not_stored(h):
    clients = [h.client() for _ in range(3)]
    for c in clients:
        c.send(request(X))
    up = h.accept()
    assert up.take() == request(X)
    reply = error_answer("RuntimeError", "internal server error", status=500)
    up.reply(reply)
    # A 500 is the shared fetch failing: every waiter gets it, nobody asks again.
    for c in clients:
        assert c.take() == reply
    assert up.take() == b""
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, coalesced=2)


def test_waiter_that_left_gets_no_upstream_request_of_its_own():
    h = Harness(upstream_connections=1)
    a, b, c = h.client(), h.client(), h.client()
    rand = request(RAND)
    for client in (a, b, c):
        client.send(rand)
    up = h.accept()
    assert up.take() == rand
    b.disconnect()
    first = answer(0.5, cache=False, max_age=0)
    up.reply(first)
    assert a.take() == first
    assert up.take() == rand  # for c only
    second = answer(0.75, cache=False, max_age=0)
    up.reply(second)
    assert c.take() == second
    assert b.take() == b""
    assert up.take() == b""
    assert h.attempts == 1
    h.assert_quiet()


# --- retries -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [TEXT, LEGACY])
def test_unreachable_server_is_retried_with_backoff_then_500(h, encoding, proxy_log):
    data = X if encoding == TEXT else codec.encode_request(parse("1 + 2"), LEGACY)
    c = h.client()
    c.send(request(data))
    started = []
    for n in range(5):
        assert h.attempts == n + 1
        started.append(h.now() - T0)
        assert c.take() == b""
        h.refuse()
        if n < 4:
            delay = 0.5 * 2**n
            h.advance(delay - EPS)
            assert h.attempts == n + 1
            h.advance(EPS)
    assert started == [0, 0.5, 1.5, 3.5, 7.5]
    message = unreachable(5)
    assert message == (
        "calculator server 127.0.0.1:9999 unreachable after 5 attempts: Connection refused"
    )
    got = c.take()
    assert got == proxy_error(message, TS + 7, encoding)
    if encoding == LEGACY:
        exc = pickle.loads(got[12:])
        assert type(exc) is ConnectionError
        assert exc.args == (message,)
        with pytest.raises(codec.RemoteError) as info:
            codec.decode_response(got[12:])
        assert (info.value.kind, info.value.message) == ("ConnectionError", message)
    h.advance(60)
    assert h.attempts == 5
    assert c.take() == b""
    assert h.counters() == counters(miss=1, failures=1)
    warnings = [formatEvent(e) for e in proxy_log if e.get("log_level") == LogLevel.warn]
    assert message in warnings
    h.assert_quiet()


def test_a_later_attempt_that_connects_is_answered():
    h = Harness(retries=5)
    c = h.client()
    c.send(request(X))
    h.refuse()
    h.advance(0.5)
    h.refuse()
    h.advance(1)
    up = h.accept()
    assert up.take() == request(X)
    reply = answer(3, ts=TS + 2)
    up.reply(reply)
    assert c.take() == reply
    assert h.attempts == 3
    assert h.counters() == counters(miss=1, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


# --- the upstream timeout --------------------------------------------------------------


def test_timeout_bounds_a_silent_server_and_it_is_not_asked_again(h):
    c = h.client()
    c.send(request(X))
    up = h.accept()
    assert up.take() == request(X)
    h.advance(10 - EPS)
    assert c.take() == b""
    h.advance(EPS)
    assert c.take() == proxy_error(
        "calculator server 127.0.0.1:9999 did not answer within 10 s", TS + 10
    )
    # The connection with the unanswered request is closed, not reused.
    assert up.transport.disconnecting
    up.close(error.ConnectionAborted)
    h.advance(60)
    assert h.attempts == 1
    assert up.take() == b""
    assert c.take() == b""
    assert h.counters() == counters(miss=1, failures=1)
    h.assert_quiet()
    # Nothing was stored: the next request is a miss on a new connection.
    c.send(request(X))
    assert h.attempts == 2
    assert h.accept().take() == request(X)


def test_timeout_includes_the_connection_retries():
    h = Harness(retries=5, retry_delay=0.5, timeout=2)
    c = h.client()
    c.send(request(X))
    h.refuse()  # T0
    h.advance(0.5)
    h.refuse()  # T0 + 0.5
    h.advance(1)
    h.refuse()  # T0 + 1.5; the next attempt would be at T0 + 3.5
    h.advance(0.5 - EPS)
    assert c.take() == b""
    h.advance(EPS)
    assert c.take() == proxy_error(
        "calculator server 127.0.0.1:9999 unreachable within 2 s (3 attempts): Connection refused",
        TS + 2,
    )
    h.advance(60)
    assert h.attempts == 3
    h.assert_quiet()


def test_late_answer_after_the_timeout_is_not_stored(h):
    c = h.client()
    c.send(request(X))
    up = h.accept()
    h.advance(10)
    assert c.take() == proxy_error(
        "calculator server 127.0.0.1:9999 did not answer within 10 s", TS + 10
    )
    up.reply(answer(3))
    up.close(error.ConnectionAborted)
    assert c.take() == b""
    assert h.counters()["entries"] == 0


def test_a_slow_miss_does_not_time_out_waiters_of_other_keys():
    h = Harness(timeout=10)
    a, b = h.client(), h.client()
    a.send(request(X))
    up_x = h.accept()
    h.advance(9)
    b.send(request(Y, ts=TS + 9))
    up_y = h.accept()
    assert up_y.take() == request(Y, ts=TS + 9)
    h.advance(1)
    assert a.take() == proxy_error(
        "calculator server 127.0.0.1:9999 did not answer within 10 s", TS + 10
    )
    up_x.close(error.ConnectionAborted)
    reply = answer(6, ts=TS + 10)
    up_y.reply(reply)
    assert b.take() == reply


# --- server down, recovery, stale-if-error -----------------------------------------------


def test_server_down_fresh_answers_still_served_then_recovery(h):
    c = h.client()
    cached = answer(3)
    up = h.miss(c, request(X), cached)
    up.close()  # the server goes away
    c.send(request(X))
    assert c.take() == cached
    # A new request cannot be answered.
    c.send(request(Y))
    for delay in (0.5, 1, 2, 4):
        h.refuse()
        h.advance(delay)
    h.refuse()
    assert h.attempts == 6
    assert c.take() == proxy_error(unreachable(5), int(h.now()))
    c.send(request(X))
    assert c.take() == cached
    # The server is back: the proxy connects again by itself.
    c.send(request(Y))
    assert h.attempts == 7
    up2 = h.accept()
    assert up2.take() == request(Y)
    reply = answer(6, ts=int(h.now()))
    up2.reply(reply)
    assert c.take() == reply
    c.send(request(Y))
    assert c.take() == reply
    assert h.counters() == counters(
        miss=3,
        hit=3,
        failures=1,
        entries=2,
        bytes=entry_bytes(X, cached) + entry_bytes(Y, reply),
    )


def test_stale_if_error_serves_an_expired_answer_while_the_server_is_unreachable():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request(X), cached)
    up.close()
    h.advance(15)
    c.send(request(X))
    assert c.take() == b""
    h.refuse()
    assert c.take() == as_stale(cached)
    assert as_stale(cached)[6:10] == wire.make_flags(request=False, status=200).to_bytes(
        2, "big"
    ) + bytes(2)
    assert h.counters() == counters(
        miss=1, stale=1, failures=1, entries=1, bytes=entry_bytes(X, cached)
    )


def test_stale_if_error_window_ends_n_seconds_after_the_lifetime():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request(X), cached)
    up.close()
    h.advance(40 - EPS)
    c.send(request(X))
    h.refuse()
    assert c.take() == as_stale(cached)
    h.advance(EPS)  # 10 + 30 s after the answer was asked for
    c.send(request(X))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), int(h.now()))
    assert h.counters()["stale"] == 1
    assert h.counters()["entries"] == 0


def test_stale_if_error_still_honours_the_request_max_age():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request(X), cached)
    up.close()
    h.advance(15)
    c.send(request(X, max_age=20))
    h.refuse()
    assert c.take() == as_stale(cached)
    c.send(request(X, max_age=12))  # 15 s old is too old for this client
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)
    c.send(request(X, max_age=0))  # a reload is never answered from the cache
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)
    assert h.counters()["stale"] == 1


def test_stale_if_error_is_off_by_default():
    h = Harness(retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request(X), cached)
    up.close()
    h.advance(11)
    c.send(request(X))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 11)
    assert h.counters()["stale"] == 0


def test_stale_if_error_does_not_serve_c0_requests():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    up = h.miss(c, request(X), answer(3, max_age=10))
    up.close()
    h.advance(15)
    c.send(request(X, cache=False, max_age=0))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)


def test_stale_if_error_answers_coalesced_waiters_too():
    h = Harness(stale_if_error=30, retries=1)
    a, b = h.client(), h.client()
    cached = answer(3, max_age=10)
    up = h.miss(a, request(X), cached)
    up.close()
    h.advance(15)
    a.send(request(X))
    b.send(request(X))
    h.refuse()
    assert a.take() == as_stale(cached)
    assert b.take() == as_stale(cached)
    assert h.counters()["stale"] == 2


def test_stale_entry_is_not_served_while_the_server_answers():
    h = Harness(stale_if_error=30)
    c = h.client()
    up = h.miss(c, request(X), answer(3, max_age=10))
    h.advance(15)
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)
    fresh = answer(4, max_age=10, ts=TS + 15)
    up.reply(fresh)
    assert c.take() == fresh
    assert h.counters()["stale"] == 0


# --- a slow miss delays nothing else -----------------------------------------------------


def test_slow_miss_does_not_delay_hits_or_other_misses(h):
    warm = h.client()
    cached = answer(6)
    h.miss(warm, request(Z), cached)
    slow, hitter, other = h.client(), h.client(), h.client()
    slow.send(request(X))  # goes out on the pooled connection and hangs there
    hitter.send(request(Z))
    assert hitter.take() == cached
    other.send(request(Y))
    assert h.attempts == 2  # the busy connection is not shared: a second one opens
    up_y = h.accept()
    assert up_y.take() == request(Y)
    reply_y = answer(6, ts=TS + 1)
    up_y.reply(reply_y)
    assert other.take() == reply_y
    assert slow.take() == b""


def test_pipelined_answers_stay_in_request_order(h):
    warm = h.client()
    cached = answer(6)
    up1 = h.miss(warm, request(Z), cached)
    c = h.client()
    c.send(request(X), request(Z), request(Y))
    # X went out on the pooled connection, Y on a new one.
    assert up1.take() == request(X)
    up2 = h.accept()
    assert up2.take() == request(Y)
    reply_y = answer(6)
    up2.reply(reply_y)
    # The hit and Y's answer wait behind X's.
    assert c.take() == b""
    reply_x = answer(3)
    up1.reply(reply_x)
    assert c.take() == reply_x + cached + reply_y
    assert h.counters()["hit"] == 1


def test_a_hit_after_the_answered_pipeline_is_immediate(h):
    c = h.client()
    c.send(request(X))
    up = h.accept()
    reply = answer(3)
    up.reply(reply)
    c.send(request(X))
    assert c.take() == reply + reply


# --- counters, evictions --------------------------------------------------------------------


def test_counters_and_evictions():
    reply_x, reply_y = answer(3), answer(6)
    one = entry_bytes(X, reply_x)
    h = Harness(cache_size=one)  # room for exactly one of these answers
    c = h.client()
    up = h.miss(c, request(X), reply_x)
    assert h.counters() == counters(miss=1, entries=1, bytes=one)
    h.miss(c, request(Y), reply_y, upstream=up)
    assert h.counters() == counters(miss=2, evictions=1, entries=1, bytes=entry_bytes(Y, reply_y))
    c.send(request(Y))
    assert c.take() == reply_y
    c.send(request(X))
    assert c.take() == b""
    assert up.take() == request(X)
    up.reply(reply_x)
    assert c.take() == reply_x
    assert h.counters() == counters(miss=3, hit=1, evictions=2, entries=1, bytes=one)


# --- what the proxy answers itself -------------------------------------------------------


def test_a_response_sent_to_the_proxy_is_a_400_and_not_forwarded(h):
    c = h.client()
    c.send(answer(3))
    assert c.take() == error_answer("ValueError", "not a request: the T flag is 0")
    assert h.attempts == 0
    assert not c.transport.disconnecting


def test_impossible_length_is_answered_400_then_closed(h):
    c = h.client()
    c.send(wire.HEADER.pack(TS, 9000, wire.make_flags(request=True), 0, 0) + b"1 + 2")
    payload = json.dumps(
        {
            "error": "impossible message length 9000 (must be 12..8192); closing the connection",
            "type": "ValueError",
        }
    ).encode()
    assert c.take() == wire.encode(
        TS, wire.make_flags(request=False, status=wire.BAD_REQUEST), 0, payload
    )
    assert c.transport.disconnecting
    assert h.attempts == 0


def test_impossible_length_after_a_pending_miss_is_answered_in_order(h):
    c = h.client()
    c.send(request(X), wire.HEADER.pack(TS, 9000, wire.make_flags(request=True), 0, 0))
    bad = wire.encode(
        TS,
        wire.make_flags(request=False, status=wire.BAD_REQUEST),
        0,
        json.dumps(
            {
                "error": "impossible message length 9000 (must be 12..8192); "
                "closing the connection",
                "type": "ValueError",
            }
        ).encode(),
    )
    up = h.accept()
    assert up.take() == request(X)
    # X's answer comes first: the client reads answers in request order.
    assert c.take() == b""
    reply = answer(3)
    up.reply(reply)
    assert c.take() == reply + bad
    assert c.transport.disconnecting


def test_a_response_in_a_pipeline_is_answered_in_order(h):
    c = h.client()
    c.send(request(X), answer(3), request(Y))
    up_x = h.accept(0)
    up_y = h.accept(1)
    assert c.take() == b""
    reply_y = answer(6)
    up_y.reply(reply_y)
    assert c.take() == b""
    reply_x = answer(3)
    up_x.reply(reply_x)
    not_a_request = error_answer("ValueError", "not a request: the T flag is 0")
    assert c.take() == reply_x + not_a_request + reply_y


def test_requests_split_across_reads_are_reassembled(h):
    c = h.client()
    frames = request(X) + request(Y)
    for i in range(len(frames)):
        c.send(frames[i : i + 1])
    assert h.attempts == 2
    assert h.accept(0).take() == request(X)
    assert h.accept(1).take() == request(Y)


def test_reserved_flag_bits_are_not_forwarded(h):
    c = h.client()
    flags = wire.make_flags(request=True, cache=True) | 0xE000
    c.send(wire.encode(TS, flags, FOREVER, X))
    assert h.accept().take() == request(X)


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_logs_each_request_at_debug_level(verbose, proxy_log):
    """``-v`` logs the access log's line of each request (client, cache
    status, times, the request); off, nothing is logged per request."""
    from twisted_cacheproxy.operations.accesslog import VerboseLog

    h = Harness()
    if verbose:
        h.metrics.request_logs.append(VerboseLog())
    c = h.client()
    up = h.miss(c, request(X), answer(3))
    h.advance(0.5)
    c.send(request(X), request(X))
    assert c.take() == answer(3) * 2
    assert up.take() == b""
    debug = [formatEvent(e) for e in proxy_log if e.get("log_level") == LogLevel.debug]
    if not verbose:
        assert debug == []
        return
    peer = c.transport.getPeer()
    size = len(answer(3))
    assert debug == [
        f'{peer.host}:{peer.port} text -C 65535 MISS 200 {size} 0.000 0.000 "1 + 2"',
        f'{peer.host}:{peer.port} text -C 65535 HIT 200 {size} 0.000 - "1 + 2"',
        f'{peer.host}:{peer.port} text -C 65535 HIT 200 {size} 0.000 - "1 + 2"',
    ]


def test_idle_client_connection_is_closed_after_the_idle_timeout():
    h = Harness(idle_timeout=5)
    c = h.client()
    h.advance(4)
    c.send(request(X))  # a complete request resets the timer
    up = h.accept()
    up.reply(answer(3))
    h.advance(5 - EPS)
    assert not c.transport.disconnecting
    h.advance(EPS)
    assert c.transport.disconnecting


def test_a_client_awaiting_an_answer_is_not_idle():
    h = Harness(idle_timeout=5, timeout=30)
    c = h.client()
    c.send(request(X))
    up = h.accept()
    h.advance(5)  # one idle period, still waiting for the server
    h.advance(2)
    assert not c.transport.disconnecting
    up.reply(answer(3))
    assert c.take() == answer(3)
    h.advance(5 - EPS)  # a whole period after its last answer, not after 5 s
    assert not c.transport.disconnecting
    h.advance(EPS)
    assert c.transport.disconnecting


def test_max_connections_refuses_clients_over_the_limit():
    h = Harness(max_connections=2)
    a, _b = h.client(), h.client()
    assert h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49999)) is None
    a.disconnect()
    # A place is free again.
    c = h.client()
    c.send(request(X))
    assert h.attempts == 1
    assert h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49998)) is None


def test_queued_miss_also_gets_retries_when_the_server_is_down():
    h = Harness(upstream_connections=1, retries=2, retry_delay=0.5)
    a, b = h.client(), h.client()
    a.send(request(X))
    b.send(request(Y))
    assert h.attempts == 1  # Y waits for the one connection slot
    refused = 0
    for _ in range(12):  # 3 s in steps of 0.25 s, refusing every attempt made
        while refused < h.attempts:
            h.refuse(refused)
            refused += 1
        h.advance(0.25)
    assert a.take() == proxy_error(unreachable(2), TS)
    # Y must get its own attempts and the same answer, not wait for the 10 s timeout.
    got = b.take()
    assert got[12:] == proxy_error(unreachable(2), TS)[12:]
    assert got[4:12] == proxy_error(unreachable(2), TS)[4:12]
    assert refused == 4


def test_a_client_pipelining_misses_is_held_at_the_cap_then_read_again():
    """Past MAX_AWAITED awaited answers the proxy stops reading that client,
    so a slow server cannot make it hold unbounded work; it reads again as
    answers go out."""
    from twisted_cacheproxy.proxy.factory import MAX_AWAITED

    h = Harness(upstream_connections=1000)
    c = h.client()
    c.send(*[request(b"%d" % i) for i in range(MAX_AWAITED + 10)])
    assert h.attempts == MAX_AWAITED  # the rest stays unread in the buffer
    assert c.transport.producerState == "paused"
    peers = [h.accept(i) for i in range(MAX_AWAITED)]
    forwarded = [peer.take() for peer in peers]
    assert forwarded == [request(b"%d" % i) for i in range(MAX_AWAITED)]
    peers[0].reply(answer(0))
    assert c.take() == answer(0)
    # One answer out: one more request read, sent on the connection just freed.
    assert peers[0].take() == request(b"%d" % MAX_AWAITED)
    assert c.transport.producerState == "paused"  # at the cap again
    for i in range(1, 10):
        peers[i].reply(answer(i))
        assert peers[i].take() == request(b"%d" % (MAX_AWAITED + i))
    assert c.transport.producerState == "paused"  # all read, and 64 awaited again
    peers[10].reply(answer(10))
    assert c.transport.producerState == "producing"  # below the cap
    assert h.attempts == MAX_AWAITED


def test_requests_past_the_upstream_queue_bound_get_an_overloaded_500():
    h = Harness(upstream_connections=1)
    h.factory.pool.max_queued = 2
    clients = [h.client() for _ in range(4)]
    for i, c in enumerate(clients):
        c.send(request(b"%d" % i))
    assert h.attempts == 1
    got = clients[3].take()
    assert wire.decode_header(got).status == wire.SERVER_ERROR
    assert b"proxy overloaded: 2 requests already wait for calculator server" in got
    assert [c.take() for c in clients[:3]] == [b"", b"", b""]


# --- the extension word: cache marks and tags --------------------------------------

H, G = wire.EXT_FROM_CACHE, wire.EXT_GRACE


def tagged(frame: bytes, tag: int) -> bytes:
    return frame[:10] + (tag << wire.TAG_SHIFT).to_bytes(2, "big") + frame[12:]


def test_a_hit_is_marked_from_the_cache_and_a_miss_is_not(h):
    c = h.client()
    reply = answer(3)
    up = h.miss(c, request(X), reply)
    c.send(request(X))
    assert c.take() == reply
    reply60 = answer(6, max_age=60)
    h.miss(c, request(Y), reply60, up)
    c.send(request(Y))
    assert c.take() == with_max_age(reply60, 60)
    assert c.marks == [0, H, 0, H]


def test_a_stale_answer_is_marked_from_the_cache_and_grace():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    h.miss(c, request(X), cached).close()
    h.advance(15)
    c.send(request(X))
    h.refuse()
    assert c.take() == as_stale(cached)
    assert c.marks == [0, H | G]


def test_an_upstreams_cache_mark_is_kept_and_its_l_replaced_by_ours(h):
    c = h.client()
    c.send(request(X))
    up = h.accept()
    up.take()
    up.reply(answer(3)[:10] + (H | G).to_bytes(2, "big") + answer(3)[12:])
    assert c.take() == answer(3)
    assert c.marks == [H | G]  # and take() checked our own L


def test_every_answer_echoes_its_requests_tag(h):
    a, b = h.client(), h.client()
    a.send(tagged(request(X), 11))
    b.send(tagged(request(X), 22))  # coalesced behind a's miss
    up = h.accept()
    assert up.take() == request(X)  # upstream, the pool's own tag, not the client's
    up.reply(answer(3))
    a.send(tagged(request(X), 33))  # a hit
    a.send(tagged(request(X, cache=False), 44))  # C=0: fetched again
    up.take()
    up.reply(answer(3))
    a.send(tagged(answer(1), 55))  # not a request: 400
    assert (a.take(), b.take()) != (b"", b"")
    assert (a.tags, b.tags) == ([11, 33, 44, 55], [22])
    assert a.marks == [0, H, 0, 0]


def test_the_500_for_an_unreachable_server_echoes_the_tag():
    h = Harness(retries=1)
    c = h.client()
    c.send(tagged(request(X), 7))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS)
    assert c.tags == [7]


def test_a_stored_answer_is_served_with_each_clients_own_tag(h):
    c = h.client()
    c.send(tagged(request(X), 1))
    up = h.accept()
    up.take()
    up.reply(answer(3))
    for tag in (2, 3, 0):
        c.send(tagged(request(X), tag))
    assert c.take() == answer(3) * 4
    assert c.tags == [1, 2, 3, 0]


# --- half-close ---------------------------------------------------------------------


def test_a_half_closed_client_gets_its_pending_misses_then_a_close(h):
    c = h.client()
    up = h.miss(c, request(Y), answer(6))  # stored: the next Y is a hit
    c.send(request(X), request(Y), request(Z))
    c.wrapper.readConnectionLost()
    assert c.take() == b"" and not c.transport.disconnecting
    up.take()
    up.reply(answer(3))
    assert c.take() == answer(3) + answer(6)
    assert not c.transport.disconnecting
    second = h.accept()
    second.take()
    second.reply(answer(6, steps=()))
    assert c.take() == answer(6)
    assert c.transport.disconnecting and not c.transport.disconnected


def test_a_half_closed_client_with_nothing_pending_is_closed_at_once(h):
    c = h.client()
    c.wrapper.readConnectionLost()
    assert c.transport.disconnecting and not c.transport.disconnected


def test_the_proxy_never_loads_the_calculator():
    """The proxy never reads payloads: importing every module of its layer
    loads nothing of the calculator's (import-linter checks the imports
    themselves; this checks what they bring in)."""
    import subprocess
    import sys

    code = (
        "import pkgutil, sys, twisted_cacheproxy.proxy as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    __import__(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('twisted_cacheproxy.calculator')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
