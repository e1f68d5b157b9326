"""The proxy over real TCP on 127.0.0.1: real ``twistd cacheserver`` and
``twistd cacheproxy`` processes, and small servers of our own in this process
that count what reaches them.

The twistd processes run the *installed* package: run ``pip install .`` first
so that they see the current code.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from helpers import VECTORS, proxy_factory, request_frame
from processes import (
    HOST,
    connect,
    deferLater,
    exchange,
    free_port,
    raw,
    script,
    start_proxy,
    within,
)
from standins import CountingServer
from twisted.internet import defer

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.transport import wire

pytestmark = pytest.mark.integration

#: How long any single exchange in these tests may take.
TIMEOUT = 10.0


@pytest.fixture
def calc_server(twistd):
    port = free_port()
    return twistd("cacheserver", "--port", str(port), port=port)


# --- clients and counting servers in this process --------------------------------------


@defer.inlineCallbacks
def ask(port: int, *frames: bytes):
    """Send ``frames`` pipelined on one new connection; the answers' bytes
    less the extension word, in order."""
    answers = yield exchange(port, *frames)
    return [raw(a) for a in answers]


def vector_payload(v: dict) -> bytes:
    value = int(v["result_repr"]) if v["result_type"] == "int" else float(v["result_repr"])
    return codec.encode_result(codec.TEXT, value, v["steps"])


def assert_answer(frame: bytes, payload: bytes, *, cache=True, max_age=wire.FOREVER) -> None:
    header = wire.decode_header(frame)
    assert abs(header.timestamp - time.time()) < 60
    assert header.length == len(frame)
    flags = wire.make_flags(request=False, status=wire.OK, cache=cache, steps=True)
    assert (header.flags, header.max_age) == (flags, max_age)
    assert frame[12:] == payload


# --- 3.1: client -> server ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_1_client_to_server(calc_server):
    """The exercise's scenario 3.1: a client asks the server directly, twice the same."""
    a, b = VECTORS[1], VECTORS[0]
    first = yield ask(calc_server.port, request_frame(a["text"], steps=True))
    second = yield ask(calc_server.port, request_frame(a["text"], steps=True))
    other = yield ask(calc_server.port, request_frame(b["text"], steps=True))
    for frame in (first[0], second[0]):
        assert_answer(frame, vector_payload(a))
    assert_answer(other[0], vector_payload(b))


# --- 3.2: the same through the proxy -----------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_2_through_the_proxy_hit_without_upstream_contact(twistd):
    """Scenario 3.2: the same through the proxy; the second ask never reaches the server."""
    server = CountingServer()
    server_port = server.listen()
    try:
        proxy = start_proxy(twistd, server_port)
        a, b = VECTORS[1], VECTORS[0]
        first = request_frame(a["text"], steps=True)
        (miss,) = yield ask(proxy.port, first)
        assert_answer(miss, vector_payload(a))
        assert server.requests == [first]  # forwarded unchanged
        assert server.sent == [miss]  # relayed unchanged
        assert server.connections == 1

        (hit,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
        assert hit == miss  # forever-cacheable: the stored bytes, as they were
        ((header, _),) = yield exchange(proxy.port, request_frame(a["text"], steps=True))
        assert (header.framed, header.from_cache, header.grace) == (True, True, False)
        assert len(server.requests) == 1
        assert server.connections == 1

        other = request_frame(b["text"], steps=True)
        (different,) = yield ask(proxy.port, other)
        assert_answer(different, vector_payload(b))
        assert server.requests == [first, other]
        assert server.sent[1] == different
        assert server.connections == 1  # the pooled connection was reused
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_scenario_3_2_with_the_real_server(calc_server, twistd):
    """Scenario 3.2 with our server, stopped after the miss so that it cannot make the hit."""
    proxy = start_proxy(twistd, calc_server.port)
    a = VECTORS[1]
    (miss,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
    assert_answer(miss, vector_payload(a))
    calc_server.stop()  # nothing upstream any more: the hit must come from the cache
    (hit,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
    assert hit == miss


# --- 3.3: the server stopped, then restarted --------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_3_server_down_then_back(calc_server, twistd):
    """Scenario 3.3: server stopped, hits served, a miss is a 500, then the server is back."""
    proxy = start_proxy(twistd, calc_server.port)
    a, b = VECTORS[1], VECTORS[4]
    (cached,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
    assert_answer(cached, vector_payload(a))

    calc_server.stop()
    (again,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
    assert again == cached

    started = time.monotonic()
    (failed,) = yield ask(proxy.port, request_frame(b["text"], steps=True))
    elapsed = time.monotonic() - started
    header = wire.decode_header(failed)
    assert (header.status, header.cache, header.steps, header.max_age) == (500, False, False, 0)
    message = (
        f"calculator server 127.0.0.1:{calc_server.port} unreachable after 5 attempts: "
        "Connection refused"
    )
    assert failed[12:] == json.dumps({"error": message, "type": "ConnectionError"}).encode()
    # Four waits of 0.05, 0.1, 0.2 and 0.4 s between the five attempts.
    assert 0.7 <= elapsed < 5

    calc_server.start()  # same port; the proxy was not restarted
    (recovered,) = yield ask(proxy.port, request_frame(b["text"], steps=True))
    assert_answer(recovered, vector_payload(b))
    (still,) = yield ask(proxy.port, request_frame(a["text"], steps=True))
    assert still == cached


@pytest_twisted.inlineCallbacks
def test_legacy_request_gets_a_pickled_500_when_the_server_is_down(twistd):
    from twisted_cacheproxy.calculator.parser import parse

    dead = free_port()  # nothing listens here
    proxy = start_proxy(twistd, dead, "--retries", "2")
    data = codec.encode_request(parse("1 + 2"), codec.LEGACY)
    frame = wire.encode(int(time.time()), wire.make_flags(request=True, cache=True), 60, data)
    (failed,) = yield ask(proxy.port, frame)
    header = wire.decode_header(failed)
    assert (header.status, header.cache, header.max_age) == (500, False, 0)
    message = f"calculator server 127.0.0.1:{dead} unreachable after 2 attempts: Connection refused"
    with pytest.raises(codec.RemoteError) as info:
        codec.decode_response(failed[12:])
    assert (info.value.kind, info.value.message) == ("ConnectionError", message)
    assert failed[12:] == codec.encode_error(codec.LEGACY, "ConnectionError", message)


# --- coalescing with a slow upstream -------------------------------------------------------


@defer.inlineCallbacks
def _many_identical_requests(proxy_port: int, server: CountingServer, n: int):
    conns = yield within(defer.gatherResults([connect(proxy_port) for _ in range(n)]))
    try:
        frame = request_frame("max(2, 3) + 3", steps=True)
        answers = yield within(defer.gatherResults([c.sendRequest(frame) for c in conns]))
        assert len(server.requests) == 1
        assert server.connections == 1
        assert server.requests[0][12:] == b"max(2, 3) + 3"
        assert [raw(a) for a in answers] == server.sent * n
        # And now they are all hits.
        answers = yield within(defer.gatherResults([c.sendRequest(frame) for c in conns]))
        assert [raw(a) for a in answers] == server.sent * n
        assert len(server.requests) == 1
    finally:
        for c in conns:
            c.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_many_concurrent_identical_requests_make_one_upstream_request_twistd(twistd):
    server = CountingServer(delay=1.0)
    server_port = server.listen()
    try:
        proxy = start_proxy(twistd, server_port)
        yield _many_identical_requests(proxy.port, server, 50)
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_many_concurrent_identical_requests_make_one_upstream_request_in_process():
    from twisted.internet import reactor

    server = CountingServer(delay=0.5)
    server_port = server.listen()
    factory = proxy_factory(server_port, retry_delay=0.05)
    listening = reactor.listenTCP(0, factory, interface=HOST)
    try:
        yield _many_identical_requests(listening.getHost().port, server, 50)
        requests = factory.observer.requests
        assert (requests["miss"], requests["coalesced"], requests["hit"]) == (1, 49, 50)
    finally:
        yield listening.stopListening()
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_a_slow_miss_does_not_delay_a_hit_over_tcp():
    from twisted.internet import reactor

    server = CountingServer()
    server_port = server.listen()
    factory = proxy_factory(server_port, retry_delay=0.05)
    listening = reactor.listenTCP(0, factory, interface=HOST)
    port = listening.getHost().port
    try:
        (cached,) = yield ask(port, request_frame("1 + 2", steps=True))
        server.delay = 2.0
        slow_conn = yield connect(port)
        slow = slow_conn.sendRequest(request_frame("2 + 3", steps=True))
        started = time.monotonic()
        (hit,) = yield ask(port, request_frame("1 + 2", steps=True))
        assert time.monotonic() - started < 1.0
        assert hit == cached
        assert not slow.called
        answer = yield within(slow)
        assert raw(answer) == server.sent[-1]
        slow_conn.transport.loseConnection()
    finally:
        yield listening.stopListening()
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_pooled_connection_closed_under_a_request_is_retried_over_tcp(twistd):
    server = CountingServer(answers_per_connection=1)
    server_port = server.listen()
    try:
        proxy = start_proxy(twistd, server_port)
        first, second = request_frame("1 + 2", steps=True), request_frame("2 + 3", steps=True)
        (a,) = yield ask(proxy.port, first)
        assert a == server.sent[0]
        (b,) = yield ask(proxy.port, second)
        assert wire.decode_header(b).status == wire.OK
        assert b == server.sent[1]
        # Sent on the pooled connection, lost there, sent again on a new one.
        assert server.requests == [first, second, second]
        assert server.connections == 2
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_idle_connection_closed_by_the_real_server_is_replaced(twistd):
    server_port = free_port()
    twistd("cacheserver", "--port", str(server_port), "--idle-timeout", "0.2", port=server_port)
    proxy = start_proxy(twistd, server_port)
    (a,) = yield ask(proxy.port, request_frame("1 + 2", steps=True))
    assert wire.decode_header(a).status == wire.OK
    yield deferLater(0.5)  # the server closes the pooled connection meanwhile
    (b,) = yield ask(proxy.port, request_frame("2 + 3", steps=True))
    assert_answer(b, codec.encode_result(codec.TEXT, 5, ["2 + 3", "5"]))


@pytest_twisted.inlineCallbacks
def test_pipelined_misses_reach_the_server_before_its_first_answer(twistd):
    """40 misses on the proxy's one upstream connection, to a server holding its answers."""
    server = CountingServer()
    server_port = server.listen()
    n = 40
    try:
        proxy = start_proxy(
            twistd, server_port, "--upstream-pipeline", "64", "--upstream-connections", "1"
        )
        # Pipelining starts once the connection has brought an answer with L.
        yield ask(proxy.port, request_frame("1 + 1", steps=True))
        server.requests.clear()
        # The server answers nothing until it has every request: only
        # pipelining gets them all to it, all on the proxy's one connection
        # (without, it would see one, and the proxy would wait for its answer).
        server.hold(n)
        conns = yield within(defer.gatherResults([connect(proxy.port) for _ in range(n)]))
        frames = [request_frame(f"{k} * 3 + 1", steps=True) for k in range(n)]
        answered = defer.gatherResults(
            [c.sendRequest(f) for c, f in zip(conns, frames, strict=True)]
        )
        deadline = time.monotonic() + TIMEOUT
        while len(server.requests) < n and time.monotonic() < deadline:
            yield deferLater(0.01)
        assert sorted(server.requests) == sorted(frames)
        assert server.connections == 1
        answers = yield within(answered)
        for k, answer in enumerate(answers):
            steps = [f"({k} * 3) + 1", f"{k * 3} + 1", f"{k * 3 + 1}"]
            assert_answer(raw(answer), codec.encode_result(codec.TEXT, k * 3 + 1, steps))
        for c in conns:
            c.transport.loseConnection()
    finally:
        yield server.close()


# --- the plugin's help ---------------------------------------------------------------------


def test_twistd_cacheproxy_help_lists_every_option(tmp_path):
    out = subprocess.run(
        [script("twistd"), "cacheproxy", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert out.returncode == 0, out.stderr
    for option in (
        "--port",
        "--interface",
        "--server-host",
        "--server-port",
        "--cache-size",
        "--retries",
        "--retry-delay",
        "--timeout",
        "--stale-if-error",
        "--idle-timeout",
        "--max-message-size",
        "--upstream-connections",
        "--upstream-pipeline",
        "--max-connections",
        "--memcached",
        "--memcached-prefix",
        "--memcached-timeout",
        "--memcached-lock-wait",
    ):
        assert f"{option}=" in out.stdout, option


# --- what calc-client and a course client see of the proxy's marks (PROTOCOL.md 6) --------------


def calc_client(port: int, *args: str) -> subprocess.CompletedProcess:
    command = [str(pathlib.Path(sys.executable).with_name("calc-client")), "--port", str(port)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_calc_client_tells_a_hit_from_a_miss_through_the_proxy(calc_server, twistd):
    proxy = start_proxy(twistd, calc_server.port)
    first = calc_client(proxy.port, "--no-steps", "max(2, 3) + 3")
    second = calc_client(proxy.port, "--no-steps", "max(2, 3) + 3")
    unstored = calc_client(proxy.port, "--no-steps", "--no-cache", "max(2, 3) + 3")
    assert (
        first.stdout.splitlines()[-1] == "Result: 6  (computed by the server, cacheable for ever)"
    )
    assert (
        second.stdout.splitlines()[-1] == "Result: 6  (from the proxy's cache, cacheable for ever)"
    )
    assert unstored.stdout.splitlines()[-1] == (
        "Result: 6  (computed by the server, not stored: asked with --no-cache)"
    )


def test_calc_client_tells_a_stale_answer_through_the_proxy(twistd):
    server_port = free_port()
    server = twistd("cacheserver", "--port", str(server_port), "--max-age", "1", port=server_port)
    proxy = start_proxy(twistd, server_port, "--stale-if-error", "60", "--retries", "1")
    fresh = calc_client(proxy.port, "--no-steps", "6 * 7")
    assert (
        fresh.stdout.splitlines()[-1] == "Result: 42  (computed by the server, cacheable for 1 s)"
    )
    server.stop()
    time.sleep(1.2)  # past the answer's lifetime
    stale = calc_client(proxy.port, "--no-steps", "6 * 7")
    assert stale.stdout.splitlines()[-1] == (
        "Result: 42  (from the proxy's cache, stale: served past its lifetime "
        "because the server is unreachable)"
    )


def course_client_ask(port: int, data: bytes) -> object:
    """One request the way the course client makes it: one ``send``, a
    header read as ``!LHHHxx`` (the extension word skipped), the data
    handed to ``pickle.loads``."""
    import pickle
    import struct

    frame = struct.pack("!LHHHxx", int(time.time()), 12 + len(data), 0x1C00, 65535) + data
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.sendall(frame)
        received = b""
        while len(received) < 12 or len(received) < struct.unpack_from("!LH", received)[1]:
            chunk = sock.recv(65536)
            assert chunk, "closed before the whole answer came"
            received += chunk
    _, length, flags, _ = struct.unpack("!LHHHxx", received[:12])
    assert flags & 0x3FF in (200, 400)
    return pickle.loads(received[12:length])


def test_a_course_client_reads_hits_and_misses_as_before(calc_server, twistd, course):
    """Whatever the proxy marks in the extension word, the course client's
    unpickled answers are the same for a miss, a hit and a cached error."""
    from twisted_cacheproxy.calculator.parser import parse

    proxy = start_proxy(twistd, calc_server.port)
    a = VECTORS[1]
    data = course.dumps(parse(a["text"]))
    direct = course_client_ask(calc_server.port, data)
    miss = course_client_ask(proxy.port, data)
    hit = course_client_ask(proxy.port, data)
    assert direct == miss == hit == (6, a["steps"])
    error = course.dumps(parse("1 / 0"))
    answers = [course_client_ask(proxy.port, error) for _ in range(2)]
    assert [(type(e), e.args) for e in answers] == [(ZeroDivisionError, ("division by zero",))] * 2
