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
from helpers import T0, TS, answer, error_answer, request_frame, with_max_age
from proxyharness import Harness, X, Y, Z
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, formatEvent

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.proxy.cache import ENTRY_OVERHEAD
from twisted_cacheproxy.proxy.events import CACHE_STATUSES
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.wire import FOREVER

pytestmark = pytest.mark.usefixtures("proxy_log")

#: A step small enough not to matter and exact in binary floating point.
EPS = 2.0**-10
HOUR = 3600
TEXT, LEGACY = codec.TEXT, codec.LEGACY

RAND = b"rand(0, 1)"


# --- frames -------------------------------------------------------------------


def proxy_error(message: str, ts: int, encoding=TEXT) -> bytes:
    """The proxy's own 500: C=0, cache control 0, the message in the request's encoding."""
    if encoding == TEXT:
        payload = json.dumps({"error": message, "type": "ConnectionError"}).encode()
    else:
        payload = codec.encode_error(LEGACY, "ConnectionError", message)
    return wire.encode(ts, wire.make_flags(request=False, status=wire.SERVER_ERROR), 0, payload)


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


# --- the harness ------------------------------------------------------------------


@pytest.fixture(params=["pool", "balancer"])
def h(request) -> Harness:
    """The cache rules hold whatever the way to the server: the behaviour
    tests run once over one server's pool, once through a balancer (the
    proxy's two setups, as memcache.py's tests run one suite twice)."""
    return Harness(balanced=request.param == "balancer")


#: For the tests of how the pool itself retries and times out, as a client
#: sees it (the balancer's own are in test_balancer.py).
pool_only = pytest.mark.parametrize("h", ["pool"], indirect=True)


# --- 1. a fresh stored answer is served without contacting the server -----------


def test_miss_forwards_the_request_unchanged_and_relays_the_answer(h):
    """On a miss the proxy is transparent: the server gets the client's bytes and vice versa."""
    c = h.client()
    frame = request_frame(X, ts=TS)
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
    up = h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(100)
    c.send(request_frame(X, ts=TS + 100))
    # Forever-cacheable: the very bytes the server sent, timestamp included.
    assert c.take() == reply
    other = h.client()
    other.send(request_frame(X, ts=TS + 100))
    assert other.take() == reply
    assert h.attempts == 1
    assert up.take() == b""
    assert h.counters() == counters(miss=1, hit=2, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


def test_hits_carry_the_remaining_lifetime_as_cache_control(h):
    c = h.client()
    reply = answer(3, max_age=100)
    h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(30)
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(reply, 70)
    h.advance(29.5)  # age 59.5: 40.5 s left, never announced as more
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(reply, 40)
    assert h.attempts == 1
    assert h.counters()["hit"] == 2


def test_forever_answers_never_go_stale(h):
    c = h.client()
    reply = answer(3, max_age=FOREVER)
    h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(10 * 365 * 86400)
    c.send(request_frame(X, ts=TS))
    assert c.take() == reply
    assert h.attempts == 1


# --- 2. freshness: the response's max-age and the request's max-age ---------------


def test_answer_is_served_only_while_younger_than_its_max_age(h):
    c = h.client()
    reply = answer(3, max_age=10)
    up = h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(10 - EPS)
    c.send(request_frame(X, ts=TS))
    # Less than a second left: announced as 1 s (or 0, "do not keep it").
    assert c.take() in (with_max_age(reply, 1), with_max_age(reply, 0))
    h.advance(EPS)  # age 10: expired
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    # Asked again, on the pooled connection.
    assert h.attempts == 1
    assert up.take() == request_frame(X, ts=TS)
    fresh = answer(3, max_age=10, ts=TS + 10)
    up.reply(fresh)
    assert c.take() == fresh
    assert h.counters() == counters(miss=2, hit=1, entries=1, bytes=entry_bytes(X, fresh))


def test_request_max_age_limits_the_age_it_accepts(h):
    c = h.client()
    reply = answer(3, max_age=FOREVER)
    up = h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(5 - EPS)
    c.send(request_frame(X, max_age=5, ts=TS))
    assert c.take() == reply
    h.advance(EPS)  # age 5: too old for max-age 5, though fresh
    c.send(request_frame(X, max_age=5, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, max_age=5, ts=TS)
    newer = answer(4, max_age=FOREVER, ts=TS + 5)
    up.reply(newer)
    assert c.take() == newer
    # The newer answer replaced the older one.
    c.send(request_frame(X, max_age=1, ts=TS))
    assert c.take() == newer
    c.send(request_frame(X, ts=TS))
    assert c.take() == newer
    assert h.counters() == counters(miss=2, hit=3, entries=1, bytes=entry_bytes(X, newer))


def test_the_smaller_of_both_max_ages_wins(h):
    c = h.client()
    reply = answer(3, max_age=10)
    up = h.miss(c, request_frame(X, ts=TS), reply)
    h.advance(12)
    # The client would accept 20 s, but the answer's lifetime is 10 s.
    c.send(request_frame(X, max_age=20, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, max_age=20, ts=TS)


@pytest.mark.parametrize("request_max_age", [1, 100, FOREVER])
def test_any_request_max_age_above_zero_accepts_a_new_answer(h, request_max_age):
    c = h.client()
    reply = answer(3, max_age=50)
    h.miss(c, request_frame(X, ts=TS), reply)
    c.send(request_frame(X, max_age=request_max_age, ts=TS))
    assert c.take() == with_max_age(reply, 50)
    assert h.attempts == 1


# --- 3. age on the proxy's own clock, from when the request was sent --------------


@pytest.mark.parametrize("server_offset", [-HOUR, 0, HOUR], ids=["server-behind", "same", "ahead"])
def test_age_is_measured_on_the_proxy_clock_from_sending(h, server_offset):
    c = h.client()
    c.send(request_frame(X, ts=TS))
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
    h.advance(4)  # the answer takes 4 s
    reply = answer(3, max_age=10, ts=TS + 4 + server_offset)
    up.reply(reply)
    assert c.take() == reply
    h.advance(1)  # age 5, counted from sending
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(reply, 5)
    h.advance(5 - EPS)
    c.send(request_frame(X, ts=TS))
    # Less than a second left: announced as 1 s (or 0, "do not keep it").
    assert c.take() in (with_max_age(reply, 1), with_max_age(reply, 0))
    h.advance(EPS)
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)
    assert h.counters()["hit"] == 2


def test_age_counts_from_when_the_request_left_not_when_the_miss_began(h):
    c = h.client()
    c.send(request_frame(X, ts=TS))
    h.advance(2)  # the connection takes 2 s to open; the request leaves at T0 + 2
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
    h.advance(1)
    reply = answer(3, max_age=10, ts=TS + 3)
    up.reply(reply)
    assert c.take() == reply
    h.advance(8)  # T0 + 11: age 9
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(reply, 1)
    h.advance(1)  # age 10
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)


# --- 4. reload -----------------------------------------------------------------


def test_reload_fetches_and_replaces_the_stored_answer(h):
    c = h.client()
    old = answer(3)
    up = h.miss(c, request_frame(X, ts=TS), old)
    h.advance(1)
    reload = request_frame(X, max_age=0, ts=TS + 1)
    c.send(reload)
    assert c.take() == b""
    assert up.take() == reload
    new = answer(30, ts=TS + 1)
    up.reply(new)
    assert c.take() == new
    c.send(request_frame(X, ts=TS))
    assert c.take() == new
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, reload=1, hit=1, entries=1, bytes=entry_bytes(X, new))


def test_reload_restarts_the_lifetime(h):
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3, max_age=10))
    h.advance(8)
    c.send(request_frame(X, max_age=0, ts=TS))
    assert up.take() == request_frame(X, max_age=0, ts=TS)
    new = answer(3, max_age=10, ts=TS + 8)
    up.reply(new)
    assert c.take() == new
    h.advance(9)  # 17 s after the first fetch, 9 s after the reload
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(new, 1)
    assert up.take() == b""


def test_reload_answered_uncacheable_is_not_stored(h):
    c = h.client()
    old = answer(3)
    up = h.miss(c, request_frame(X, ts=TS), old)
    c.send(request_frame(X, max_age=0, ts=TS))
    assert up.take() == request_frame(X, max_age=0, ts=TS)
    uncacheable = answer(4, cache=False, max_age=0)
    up.reply(uncacheable)
    assert c.take() == uncacheable
    # Only a cacheable answer replaces the stored one.
    c.send(request_frame(X, ts=TS))
    assert c.take() == old
    assert up.take() == b""
    assert h.counters() == counters(miss=1, reload=1, hit=1, entries=1, bytes=entry_bytes(X, old))


# --- 5. request C=0 ------------------------------------------------------------------


def test_c0_request_is_not_served_from_the_cache(h):
    c = h.client()
    stored = answer(3)
    up = h.miss(c, request_frame(X, ts=TS), stored)
    nocache = request_frame(X, cache=False, max_age=0, ts=TS)
    c.send(nocache)
    assert c.take() == b""
    assert up.take() == nocache
    fresh = answer(3, ts=TS + 1)  # cacheable, yet asked for with C=0
    up.reply(fresh)
    assert c.take() == fresh
    c.send(request_frame(X, ts=TS))
    assert c.take() == stored
    stored_bytes = entry_bytes(X, stored)
    assert h.counters() == counters(miss=1, bypass=1, hit=1, entries=1, bytes=stored_bytes)


def test_c0_request_answer_is_not_stored(h):
    c = h.client()
    nocache = request_frame(X, cache=False, max_age=FOREVER, ts=TS)
    reply = answer(3)
    up = h.miss(c, nocache, reply)
    assert h.counters()["entries"] == 0
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)


def test_c0_requests_are_not_coalesced(h):
    """C=0 asks for a computation of its own: two of them are two upstream requests."""
    a, b = h.client(), h.client()
    nocache = request_frame(X, cache=False, max_age=0, ts=TS)
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
    up = h.miss(c, request_frame(X, ts=TS), reply)
    assert h.counters() == counters(miss=1)
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)
    up.reply(reply)
    assert c.take() == reply
    assert h.counters() == counters(miss=2)


def test_cacheable_400_is_stored_like_a_200(h):
    """A calculation error is as repeatable as a result: the server marks it cacheable."""
    c = h.client()
    request_data = b"1 / 0"
    reply = error_answer("ZeroDivisionError", "division by zero", cache=True, max_age=FOREVER)
    up = h.miss(c, request_frame(request_data, ts=TS), reply)
    c.send(request_frame(request_data, ts=TS))
    assert c.take() == reply
    assert up.take() == b""
    assert h.counters() == counters(
        miss=1, hit=1, entries=1, bytes=entry_bytes(request_data, reply)
    )


def test_uncacheable_400_is_not_stored(h):
    c = h.client()
    reply = error_answer("SyntaxError", "unexpected end", cache=False, max_age=0)
    up = h.miss(c, request_frame(b"1 +", ts=TS), reply)
    c.send(request_frame(b"1 +", ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(b"1 +", ts=TS)


# --- 7. the S flag is part of the key -------------------------------------------------


def test_answer_without_steps_never_serves_a_request_for_steps(h):
    c = h.client()
    plain = answer(6)
    up = h.miss(c, request_frame(Z, ts=TS), plain)
    c.send(request_frame(Z, steps=True, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(Z, steps=True, ts=TS)
    stepped = answer(6, steps=["max(2, 3) + 3", "3 + 3", "6"])
    up.reply(stepped)
    assert c.take() == stepped
    # Both are stored, each under its own key.
    c.send(request_frame(Z, steps=True, ts=TS), request_frame(Z, ts=TS))
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
    up = h.miss(c, request_frame(Z, steps=True, ts=TS), stepped)
    c.send(request_frame(Z, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(Z, ts=TS)


def test_text_and_legacy_requests_are_different_keys(h):
    """A legacy client must get a pickle and a text client JSON for the same expression."""
    c = h.client()
    legacy = codec.encode_request(parse("1 + 2"), LEGACY)
    text_reply = answer(3)
    up = h.miss(c, request_frame(X, ts=TS), text_reply)
    c.send(request_frame(legacy, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(legacy, ts=TS)
    legacy_reply = answer(3, encoding=LEGACY)
    up.reply(legacy_reply)
    assert c.take() == legacy_reply
    c.send(request_frame(legacy, ts=TS), request_frame(X, ts=TS))
    assert c.take() == legacy_reply + text_reply


# --- coalescing ---------------------------------------------------------------------


def test_identical_requests_during_a_miss_share_one_upstream_request(h):
    clients = [h.client() for _ in range(5)]
    for c in clients:
        c.send(request_frame(X, ts=TS))
    assert h.attempts == 1
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
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
    first.send(request_frame(X, ts=TS))
    h.advance(1)
    later = h.client()
    later.send(request_frame(X, ts=TS + 1))
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
    reply = answer(3, ts=TS + 1)
    up.reply(reply)
    assert first.take() == reply
    assert later.take() == reply
    assert h.attempts == 1


def test_one_client_pipelining_the_same_request_twice_gets_two_answers(h):
    c = h.client()
    c.send(request_frame(X, ts=TS), request_frame(X, ts=TS))
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
    reply = answer(3)
    up.reply(reply)
    assert c.take() == reply + reply
    assert h.counters()["coalesced"] == 1


def test_different_steps_flags_are_not_coalesced(h):
    a, b = h.client(), h.client()
    a.send(request_frame(Z, ts=TS))
    b.send(request_frame(Z, steps=True, ts=TS))
    assert h.attempts == 2
    up_a, up_b = h.accept(0), h.accept(1)
    assert up_a.take() == request_frame(Z, ts=TS)
    assert up_b.take() == request_frame(Z, steps=True, ts=TS)


def test_waiter_that_disconnected_is_dropped_cleanly(h, proxy_log):
    a, b, c = h.client(), h.client(), h.client()
    for client in (a, b, c):
        client.send(request_frame(X, ts=TS))
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
    a.send(request_frame(X, ts=TS))
    b.send(request_frame(X, ts=TS))
    up = h.accept()
    a.disconnect()
    reply = answer(3)
    up.reply(reply)
    assert a.take() == b""
    assert b.take() == reply
    later = h.client()
    later.send(request_frame(X, ts=TS))
    assert later.take() == reply
    assert h.attempts == 1


def test_failed_shared_fetch_answers_every_waiter_with_the_error():
    h = Harness(retries=1)
    clients = [h.client() for _ in range(3)]
    for c in clients:
        c.send(request_frame(X, ts=TS))
    h.refuse()
    for c in clients:
        assert c.take() == proxy_error(unreachable(1), TS)
    assert h.attempts == 1
    assert h.counters() == counters(miss=1, coalesced=2, failures=1)
    h.assert_quiet()


def test_failed_shared_fetch_skips_a_waiter_that_disconnected():
    h = Harness(retries=1)
    a, b = h.client(), h.client()
    a.send(request_frame(X, ts=TS))
    b.send(request_frame(X, ts=TS))
    b.disconnect()
    h.refuse()
    assert a.take() == proxy_error(unreachable(1), TS)
    assert b.take() == b""


def test_uncacheable_shared_answer_gives_each_waiter_its_own_request():
    """An uncacheable answer (rand) is for one request only: each waiter gets its own."""
    h = Harness(upstream_connections=1)
    clients = [h.client() for _ in range(3)]
    rand = request_frame(RAND, ts=TS)
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
        c.send(request_frame(X, ts=TS))
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
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
    rand = request_frame(RAND, ts=TS)
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


@pool_only
@pytest.mark.parametrize("encoding", [TEXT, LEGACY])
def test_unreachable_server_is_retried_with_backoff_then_500(h, encoding, proxy_log):
    data = X if encoding == TEXT else codec.encode_request(parse("1 + 2"), LEGACY)
    c = h.client()
    c.send(request_frame(data, ts=TS))
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
    c.send(request_frame(X, ts=TS))
    h.refuse()
    h.advance(0.5)
    h.refuse()
    h.advance(1)
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
    reply = answer(3, ts=TS + 2)
    up.reply(reply)
    assert c.take() == reply
    assert h.attempts == 3
    assert h.counters() == counters(miss=1, entries=1, bytes=entry_bytes(X, reply))
    h.assert_quiet()


# --- the upstream timeout --------------------------------------------------------------


@pool_only
def test_timeout_bounds_a_silent_server_and_it_is_not_asked_again(h):
    c = h.client()
    c.send(request_frame(X, ts=TS))
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)
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
    c.send(request_frame(X, ts=TS))
    assert h.attempts == 2
    assert h.accept().take() == request_frame(X, ts=TS)


def test_timeout_includes_the_connection_retries():
    h = Harness(retries=5, retry_delay=0.5, timeout=2)
    c = h.client()
    c.send(request_frame(X, ts=TS))
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


@pool_only
def test_late_answer_after_the_timeout_is_not_stored(h):
    c = h.client()
    c.send(request_frame(X, ts=TS))
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
    a.send(request_frame(X, ts=TS))
    up_x = h.accept()
    h.advance(9)
    b.send(request_frame(Y, ts=TS + 9))
    up_y = h.accept()
    assert up_y.take() == request_frame(Y, ts=TS + 9)
    h.advance(1)
    assert a.take() == proxy_error(
        "calculator server 127.0.0.1:9999 did not answer within 10 s", TS + 10
    )
    up_x.close(error.ConnectionAborted)
    reply = answer(6, ts=TS + 10)
    up_y.reply(reply)
    assert b.take() == reply


# --- server down, recovery, stale-if-error -----------------------------------------------


@pool_only
def test_server_down_fresh_answers_still_served_then_recovery(h):
    c = h.client()
    cached = answer(3)
    up = h.miss(c, request_frame(X, ts=TS), cached)
    up.close()  # the server goes away
    c.send(request_frame(X, ts=TS))
    assert c.take() == cached
    # A new request cannot be answered.
    c.send(request_frame(Y, ts=TS))
    for delay in (0.5, 1, 2, 4):
        h.refuse()
        h.advance(delay)
    h.refuse()
    assert h.attempts == 6
    assert c.take() == proxy_error(unreachable(5), int(h.now()))
    c.send(request_frame(X, ts=TS))
    assert c.take() == cached
    # The server is back: the proxy connects again by itself.
    c.send(request_frame(Y, ts=TS))
    assert h.attempts == 7
    up2 = h.accept()
    assert up2.take() == request_frame(Y, ts=TS)
    reply = answer(6, ts=int(h.now()))
    up2.reply(reply)
    assert c.take() == reply
    c.send(request_frame(Y, ts=TS))
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
    up = h.miss(c, request_frame(X, ts=TS), cached)
    up.close()
    h.advance(15)
    c.send(request_frame(X, ts=TS))
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
    up = h.miss(c, request_frame(X, ts=TS), cached)
    up.close()
    h.advance(40 - EPS)
    c.send(request_frame(X, ts=TS))
    h.refuse()
    assert c.take() == as_stale(cached)
    h.advance(EPS)  # 10 + 30 s after the answer was asked for
    c.send(request_frame(X, ts=TS))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), int(h.now()))
    assert h.counters()["stale"] == 1
    assert h.counters()["entries"] == 0


def test_stale_if_error_still_honours_the_request_max_age():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request_frame(X, ts=TS), cached)
    up.close()
    h.advance(15)
    c.send(request_frame(X, max_age=20, ts=TS))
    h.refuse()
    assert c.take() == as_stale(cached)
    c.send(request_frame(X, max_age=12, ts=TS))  # 15 s old is too old for this client
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)
    c.send(request_frame(X, max_age=0, ts=TS))  # a reload is never answered from the cache
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)
    assert h.counters()["stale"] == 1


def test_stale_if_error_is_off_by_default():
    h = Harness(retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    up = h.miss(c, request_frame(X, ts=TS), cached)
    up.close()
    h.advance(11)
    c.send(request_frame(X, ts=TS))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 11)
    assert h.counters()["stale"] == 0


def test_stale_if_error_does_not_serve_c0_requests():
    """C=0 asks for a fresh computation, which a stale answer is not."""
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3, max_age=10))
    up.close()
    h.advance(15)
    c.send(request_frame(X, cache=False, max_age=0, ts=TS))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS + 15)


def test_stale_if_error_answers_coalesced_waiters_too():
    h = Harness(stale_if_error=30, retries=1)
    a, b = h.client(), h.client()
    cached = answer(3, max_age=10)
    up = h.miss(a, request_frame(X, ts=TS), cached)
    up.close()
    h.advance(15)
    a.send(request_frame(X, ts=TS))
    b.send(request_frame(X, ts=TS))
    h.refuse()
    assert a.take() == as_stale(cached)
    assert b.take() == as_stale(cached)
    assert h.counters()["stale"] == 2


def test_stale_entry_is_not_served_while_the_server_answers():
    h = Harness(stale_if_error=30)
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3, max_age=10))
    h.advance(15)
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)
    fresh = answer(4, max_age=10, ts=TS + 15)
    up.reply(fresh)
    assert c.take() == fresh
    assert h.counters()["stale"] == 0


# --- a slow miss delays nothing else -----------------------------------------------------


def test_slow_miss_does_not_delay_hits_or_other_misses(h):
    warm = h.client()
    cached = answer(6)
    h.miss(warm, request_frame(Z, ts=TS), cached)
    slow, hitter, other = h.client(), h.client(), h.client()
    slow.send(request_frame(X, ts=TS))  # goes out on the pooled connection and hangs there
    hitter.send(request_frame(Z, ts=TS))
    assert hitter.take() == cached
    other.send(request_frame(Y, ts=TS))
    assert h.attempts == 2  # the busy connection is not shared: a second one opens
    up_y = h.accept()
    assert up_y.take() == request_frame(Y, ts=TS)
    reply_y = answer(6, ts=TS + 1)
    up_y.reply(reply_y)
    assert other.take() == reply_y
    assert slow.take() == b""


def test_pipelined_answers_stay_in_request_order(h):
    warm = h.client()
    cached = answer(6)
    up1 = h.miss(warm, request_frame(Z, ts=TS), cached)
    c = h.client()
    c.send(request_frame(X, ts=TS), request_frame(Z, ts=TS), request_frame(Y, ts=TS))
    # X went out on the pooled connection, Y on a new one.
    assert up1.take() == request_frame(X, ts=TS)
    up2 = h.accept()
    assert up2.take() == request_frame(Y, ts=TS)
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
    c.send(request_frame(X, ts=TS))
    up = h.accept()
    reply = answer(3)
    up.reply(reply)
    c.send(request_frame(X, ts=TS))
    assert c.take() == reply + reply


# --- counters, evictions --------------------------------------------------------------------


def test_counters_and_evictions():
    reply_x, reply_y = answer(3), answer(6)
    one = entry_bytes(X, reply_x)
    h = Harness(cache_size=one)  # room for exactly one of these answers
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), reply_x)
    assert h.counters() == counters(miss=1, entries=1, bytes=one)
    h.miss(c, request_frame(Y, ts=TS), reply_y, upstream=up)
    assert h.counters() == counters(miss=2, evictions=1, entries=1, bytes=entry_bytes(Y, reply_y))
    c.send(request_frame(Y, ts=TS))
    assert c.take() == reply_y
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    assert up.take() == request_frame(X, ts=TS)
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
    c.send(request_frame(X, ts=TS), wire.HEADER.pack(TS, 9000, wire.make_flags(request=True), 0, 0))
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
    assert up.take() == request_frame(X, ts=TS)
    # X's answer comes first: the client reads answers in request order.
    assert c.take() == b""
    reply = answer(3)
    up.reply(reply)
    assert c.take() == reply + bad
    assert c.transport.disconnecting


def test_a_response_in_a_pipeline_is_answered_in_order(h):
    c = h.client()
    c.send(request_frame(X, ts=TS), answer(3), request_frame(Y, ts=TS))
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
    frames = request_frame(X, ts=TS) + request_frame(Y, ts=TS)
    for i in range(len(frames)):
        c.send(frames[i : i + 1])
    assert h.attempts == 2
    assert h.accept(0).take() == request_frame(X, ts=TS)
    assert h.accept(1).take() == request_frame(Y, ts=TS)


def test_reserved_flag_bits_are_not_forwarded(h):
    c = h.client()
    flags = wire.make_flags(request=True, cache=True) | 0xE000
    c.send(wire.encode(TS, flags, FOREVER, X))
    assert h.accept().take() == request_frame(X, ts=TS)


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_logs_each_request_at_debug_level(verbose, proxy_log):
    """``-v`` logs the access log's line of each request (client, cache
    status, times, the request); off, nothing is logged per request."""
    from twisted_cacheproxy.operations.accesslog import VerboseLog

    h = Harness()
    if verbose:
        h.metrics.request_logs.append(VerboseLog())
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3))
    h.advance(0.5)
    c.send(request_frame(X, ts=TS), request_frame(X, ts=TS))
    assert c.take() == answer(3) * 2
    assert up.take() == b""
    debug = [formatEvent(e) for e in proxy_log if e.get("log_level") == LogLevel.debug]
    namespaces = {e["log_namespace"] for e in proxy_log if e.get("log_level") == LogLevel.debug}
    assert namespaces <= {"cacheproxy.requests"}
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
    c.send(request_frame(X, ts=TS))  # a complete request resets the timer
    up = h.accept()
    up.reply(answer(3))
    h.advance(5 - EPS)
    assert not c.transport.disconnecting
    h.advance(EPS)
    assert c.transport.disconnecting


def test_a_client_awaiting_an_answer_is_not_idle():
    h = Harness(idle_timeout=5, timeout=30)
    c = h.client()
    c.send(request_frame(X, ts=TS))
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
    c.send(request_frame(X, ts=TS))
    assert h.attempts == 1
    assert h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49998)) is None


def test_queued_miss_also_gets_retries_when_the_server_is_down():
    h = Harness(upstream_connections=1, retries=2, retry_delay=0.5)
    a, b = h.client(), h.client()
    a.send(request_frame(X, ts=TS))
    b.send(request_frame(Y, ts=TS))
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
    c.send(*[request_frame(b"%d" % i, ts=TS) for i in range(MAX_AWAITED + 10)])
    assert h.attempts == MAX_AWAITED  # the rest stays unread in the buffer
    assert c.transport.producerState == "paused"
    peers = [h.accept(i) for i in range(MAX_AWAITED)]
    forwarded = [peer.take() for peer in peers]
    assert forwarded == [request_frame(b"%d" % i, ts=TS) for i in range(MAX_AWAITED)]
    peers[0].reply(answer(0))
    assert c.take() == answer(0)
    # One answer out: one more request read, sent on the connection just freed.
    assert peers[0].take() == request_frame(b"%d" % MAX_AWAITED, ts=TS)
    assert c.transport.producerState == "paused"  # at the cap again
    for i in range(1, 10):
        peers[i].reply(answer(i))
        assert peers[i].take() == request_frame(b"%d" % (MAX_AWAITED + i), ts=TS)
    assert c.transport.producerState == "paused"  # all read, and 64 awaited again
    peers[10].reply(answer(10))
    assert c.transport.producerState == "producing"  # below the cap
    assert h.attempts == MAX_AWAITED


def test_requests_past_the_upstream_queue_bound_get_an_overloaded_500():
    h = Harness(upstream_connections=1)
    h.factory.pool.max_queued = 2
    clients = [h.client() for _ in range(4)]
    for i, c in enumerate(clients):
        c.send(request_frame(b"%d" % i, ts=TS))
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
    up = h.miss(c, request_frame(X, ts=TS), reply)
    c.send(request_frame(X, ts=TS))
    assert c.take() == reply
    reply60 = answer(6, max_age=60)
    h.miss(c, request_frame(Y, ts=TS), reply60, up)
    c.send(request_frame(Y, ts=TS))
    assert c.take() == with_max_age(reply60, 60)
    assert c.marks == [0, H, 0, H]


def test_a_stale_answer_is_marked_from_the_cache_and_grace():
    h = Harness(stale_if_error=30, retries=1)
    c = h.client()
    cached = answer(3, max_age=10)
    h.miss(c, request_frame(X, ts=TS), cached).close()
    h.advance(15)
    c.send(request_frame(X, ts=TS))
    h.refuse()
    assert c.take() == as_stale(cached)
    assert c.marks == [0, H | G]


def test_an_upstreams_cache_mark_is_kept_and_its_l_replaced_by_ours(h):
    """Behind another proxy, its H and G marks say how the answer was served: they stay."""
    c = h.client()
    c.send(request_frame(X, ts=TS))
    up = h.accept()
    up.take()
    up.reply(answer(3)[:10] + (H | G).to_bytes(2, "big") + answer(3)[12:])
    assert c.take() == answer(3)
    assert c.marks == [H | G]  # and take() checked our own L


def test_every_answer_echoes_its_requests_tag(h):
    a, b = h.client(), h.client()
    a.send(tagged(request_frame(X, ts=TS), 11))
    b.send(tagged(request_frame(X, ts=TS), 22))  # coalesced behind a's miss
    up = h.accept()
    assert up.take() == request_frame(X, ts=TS)  # upstream, the pool's own tag, not the client's
    up.reply(answer(3))
    a.send(tagged(request_frame(X, ts=TS), 33))  # a hit
    a.send(tagged(request_frame(X, cache=False, max_age=FOREVER, ts=TS), 44))  # C=0: fetched again
    up.take()
    up.reply(answer(3))
    a.send(tagged(answer(1), 55))  # not a request: 400
    assert (a.take(), b.take()) != (b"", b"")
    assert (a.tags, b.tags) == ([11, 33, 44, 55], [22])
    assert a.marks == [0, H, 0, 0]


def test_the_500_for_an_unreachable_server_echoes_the_tag():
    h = Harness(retries=1)
    c = h.client()
    c.send(tagged(request_frame(X, ts=TS), 7))
    h.refuse()
    assert c.take() == proxy_error(unreachable(1), TS)
    assert c.tags == [7]


def test_a_stored_answer_is_served_with_each_clients_own_tag(h):
    c = h.client()
    c.send(tagged(request_frame(X, ts=TS), 1))
    up = h.accept()
    up.take()
    up.reply(answer(3))
    for tag in (2, 3, 0):
        c.send(tagged(request_frame(X, ts=TS), tag))
    assert c.take() == answer(3) * 4
    assert c.tags == [1, 2, 3, 0]


# --- half-close ---------------------------------------------------------------------


def test_a_half_closed_client_gets_its_pending_misses_then_a_close(h):
    c = h.client()
    up = h.miss(c, request_frame(Y, ts=TS), answer(6))  # stored: the next Y is a hit
    c.send(request_frame(X, ts=TS), request_frame(Y, ts=TS), request_frame(Z, ts=TS))
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
