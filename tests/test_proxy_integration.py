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
from helpers import proxy_factory, request_frame
from processes import HOST, connect, free_port, script, start_proxy, within
from twisted.internet import defer, protocol

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.framing import FrameReceiver

pytestmark = pytest.mark.integration

VECTORS = json.loads(
    (pathlib.Path(__file__).parent / "data" / "protocol-vectors.json").read_text()
)["vectors"]
#: How long any single exchange in these tests may take.
TIMEOUT = 10.0


@pytest.fixture
def calc_server(twistd):
    port = free_port()
    return twistd("cacheserver", "--port", str(port), port=port)


# --- clients and counting servers in this process --------------------------------------


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


def raw(message: tuple[wire.Header, bytes]) -> bytes:
    """The message as it came over the wire, less its extension word (what
    the course programs read of it; its bits are checked apart)."""
    header, data = message
    return wire.encode(header.timestamp, header.flags, header.max_age, data)


@defer.inlineCallbacks
def exchange(port: int, *frames: bytes):
    """Send ``frames`` pipelined on one new connection; their (header, data) answers."""
    conn = yield connect(port)
    try:
        answers = yield within(defer.gatherResults([conn.sendRequest(f) for f in frames]))
    finally:
        conn.transport.loseConnection()
    return answers


@defer.inlineCallbacks
def ask(port: int, *frames: bytes):
    """Send ``frames`` pipelined on one new connection; the answers' bytes
    less the extension word, in order."""
    answers = yield exchange(port, *frames)
    return [raw(a) for a in answers]


def request(text: str, *, steps=True, cache=True, max_age=wire.FOREVER) -> bytes:
    return request_frame(text, steps=steps, cache=cache, max_age=max_age)


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


class CountingProtocol(FrameReceiver):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections += 1

    answered = 0

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        f = self.factory
        f.requests.append(raw((header, data)))
        if f.answers_per_connection and self.answered >= f.answers_per_connection:
            # As if this connection had been closed while idle, just before the request.
            self.transport.loseConnection()
            return
        self.answered += 1
        now = int(f.clock.seconds())
        frame = f.calculator.answer(header, data, codec.TEXT, now)
        f.sent.append(frame[:10] + b"\x00\x00" + frame[12:])
        if f.held is not None:
            f.held.append((self.transport, frame))
            if len(f.held) >= f.hold_until:
                held, f.held = f.held, None
                for transport, answer in held:
                    transport.write(answer)
        elif f.delay:
            f.clock.callLater(f.delay, self.transport.write, frame)
        else:
            self.transport.write(frame)


class CountingServer(protocol.Factory):
    """A calculator server that records every connection, request and answer,
    and can hold each answer back for ``delay`` seconds, or (`hold`) every
    answer until it has a given number of them."""

    protocol = CountingProtocol

    def __init__(self, delay: float = 0.0, answers_per_connection: int = 0) -> None:
        from twisted.internet import reactor

        self.clock = reactor
        self.delay = delay
        self.held: list[tuple] | None = None
        self.hold_until = 0
        self.answers_per_connection = answers_per_connection
        self.calculator = CalculatorServerFactory(clock=reactor)
        self.connections = 0
        self.requests: list[bytes] = []
        self.sent: list[bytes] = []
        self.port = None

    def hold(self, count: int) -> None:
        """Send no answer until ``count`` more are ready, then all of them."""
        self.held, self.hold_until = [], count

    def listen(self) -> int:
        from twisted.internet import reactor

        self.port = reactor.listenTCP(0, self, interface=HOST)
        return self.port.getHost().port

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)


# --- 3.1: client -> server ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_1_client_to_server(calc_server):
    a, b = VECTORS[1], VECTORS[0]
    first = yield ask(calc_server.port, request(a["text"]))
    second = yield ask(calc_server.port, request(a["text"]))
    other = yield ask(calc_server.port, request(b["text"]))
    for frame in (first[0], second[0]):
        assert_answer(frame, vector_payload(a))
    assert_answer(other[0], vector_payload(b))


# --- 3.2: the same through the proxy -----------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_2_through_the_proxy_hit_without_upstream_contact(twistd):
    server = CountingServer()
    server_port = server.listen()
    try:
        proxy = start_proxy(twistd, server_port)
        a, b = VECTORS[1], VECTORS[0]
        first = request(a["text"])
        (miss,) = yield ask(proxy.port, first)
        assert_answer(miss, vector_payload(a))
        assert server.requests == [first]  # forwarded unchanged
        assert server.sent == [miss]  # relayed unchanged
        assert server.connections == 1

        (hit,) = yield ask(proxy.port, request(a["text"]))
        assert hit == miss  # forever-cacheable: the stored bytes, as they were
        ((header, _),) = yield exchange(proxy.port, request(a["text"]))
        assert (header.framed, header.from_cache, header.grace) == (True, True, False)
        assert len(server.requests) == 1
        assert server.connections == 1

        other = request(b["text"])
        (different,) = yield ask(proxy.port, other)
        assert_answer(different, vector_payload(b))
        assert server.requests == [first, other]
        assert server.sent[1] == different
        assert server.connections == 1  # the pooled connection was reused
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_scenario_3_2_with_the_real_server(calc_server, twistd):
    proxy = start_proxy(twistd, calc_server.port)
    a = VECTORS[1]
    (miss,) = yield ask(proxy.port, request(a["text"]))
    assert_answer(miss, vector_payload(a))
    calc_server.stop()  # nothing upstream any more: the hit must come from the cache
    (hit,) = yield ask(proxy.port, request(a["text"]))
    assert hit == miss


# --- 3.3: the server stopped, then restarted --------------------------------------------


@pytest_twisted.inlineCallbacks
def test_scenario_3_3_server_down_then_back(calc_server, twistd):
    proxy = start_proxy(twistd, calc_server.port)
    a, b = VECTORS[1], VECTORS[4]
    (cached,) = yield ask(proxy.port, request(a["text"]))
    assert_answer(cached, vector_payload(a))

    calc_server.stop()
    (again,) = yield ask(proxy.port, request(a["text"]))
    assert again == cached

    started = time.monotonic()
    (failed,) = yield ask(proxy.port, request(b["text"]))
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
    (recovered,) = yield ask(proxy.port, request(b["text"]))
    assert_answer(recovered, vector_payload(b))
    (still,) = yield ask(proxy.port, request(a["text"]))
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
        frame = request("max(2, 3) + 3")
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
        (cached,) = yield ask(port, request("1 + 2"))
        server.delay = 2.0
        slow_conn = yield connect(port)
        slow = slow_conn.sendRequest(request("2 + 3"))
        started = time.monotonic()
        (hit,) = yield ask(port, request("1 + 2"))
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
        first, second = request("1 + 2"), request("2 + 3")
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
    (a,) = yield ask(proxy.port, request("1 + 2"))
    assert wire.decode_header(a).status == wire.OK
    yield deferLater(0.5)  # the server closes the pooled connection meanwhile
    (b,) = yield ask(proxy.port, request("2 + 3"))
    assert_answer(b, codec.encode_result(codec.TEXT, 5, ["2 + 3", "5"]))


@pytest_twisted.inlineCallbacks
def test_pipelined_misses_reach_the_server_before_its_first_answer(twistd):
    server = CountingServer()
    server_port = server.listen()
    n = 40
    try:
        proxy = start_proxy(
            twistd, server_port, "--upstream-pipeline", "64", "--upstream-connections", "1"
        )
        # Pipelining starts once the connection has brought an answer with L.
        yield ask(proxy.port, request("1 + 1"))
        server.requests.clear()
        # The server answers nothing until it has every request: only
        # pipelining gets them all to it, all on the proxy's one connection
        # (without, it would see one, and the proxy would wait for its answer).
        server.hold(n)
        conns = yield within(defer.gatherResults([connect(proxy.port) for _ in range(n)]))
        frames = [request(f"{k} * 3 + 1") for k in range(n)]
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
