"""`CalculatorServerFactory`/`CalculatorServerProtocol` on an in-memory transport."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
from helpers import VECTORS, request_frame, vector_value
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from twisted_cacheproxy.calculator import server
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.transport import wire

NOW = 1_700_000_000
ADDR = IPv4Address("TCP", "127.0.0.1", 54321)
VALID = b"max(2, 3) + 3"
VALID_ANSWER = b'{"result": 6, "steps": ["max(2, 3) + 3", "3 + 3", "6"]}'


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(NOW)
    return c


class Conn:
    """One server connection on a StringTransport."""

    def __init__(self, clock, **options):
        self.factory = server.CalculatorServerFactory(clock=clock, **options)
        self.wrapper = self.protocol = self.factory.buildProtocol(ADDR)
        self.transport = StringTransport()
        self.wrapper.makeConnection(self.transport)

    def send(self, raw: bytes) -> bytes:
        """Deliver ``raw`` and return everything the server wrote for it."""
        self.transport.clear()
        self.wrapper.dataReceived(raw)
        return self.transport.value()

    def ask(self, data: bytes, **flags) -> bytes:
        return self.send(req(data, **flags))

    @property
    def open(self) -> bool:
        return not self.transport.disconnecting


@pytest.fixture
def conn(clock):
    return Conn(clock)


def req(data: bytes, *, steps=True, cache=True, max_age=65535, request=True, ts=12345):
    return request_frame(data, steps=steps, cache=cache, max_age=max_age, request=request, ts=ts)


def response(status, body, *, cache=False, steps=False, max_age=0, ts=NOW, tag=0) -> bytes:
    """The exact message a server must send: L set, the request's tag echoed."""
    flags = (0x1000 if cache else 0) | (0x0800 if steps else 0) | status
    return struct.pack("!LHHHH", ts, 12 + len(body), flags, max_age, 1 | tag << 3) + body


def ok_json(value_repr: str, steps: list[str]) -> bytes:
    return f'{{"result": {value_repr}, "steps": {json.dumps(steps)}}}'.encode()


def error_json(message: str, kind: str) -> bytes:
    return json.dumps({"error": message, "type": kind}).encode()


def error_pickle(exc: BaseException) -> bytes:
    return pickle.dumps(exc, 4)


def split(raw: bytes) -> list[bytes]:
    out = []
    while raw:
        n = wire.decode_header(raw).length
        out.append(raw[:n])
        raw = raw[n:]
    return out


# --- the six vectors ---------------------------------------------------------


def test_vector_text_with_steps(conn, vector):
    got = conn.ask(vector["text"].encode())
    body = ok_json(vector["result_repr"], vector["steps"])
    assert got == response(200, body, cache=True, steps=True, max_age=65535)


def test_vector_text_without_steps(conn, vector):
    got = conn.ask(vector["text"].encode(), steps=False)
    assert got == response(200, ok_json(vector["result_repr"], []), cache=True, max_age=65535)


@pytest.mark.parametrize("protocol", [2, 4])
def test_vector_legacy_with_steps(conn, vector, course, protocol):
    data = course.dumps(parse(vector["text"]), protocol)
    got = conn.ask(data)
    body = pickle.dumps((vector_value(vector), vector["steps"]), 4)
    assert got == response(200, body, cache=True, steps=True, max_age=65535)
    value, steps = pickle.loads(got[12:])
    assert steps == vector["steps"]
    assert repr(value) == vector["result_repr"]
    assert type(value).__name__ == vector["result_type"]


def test_vector_legacy_without_steps(conn, vector, course):
    got = conn.ask(course.dumps(parse(vector["text"])), steps=False)
    body = pickle.dumps((vector_value(vector), []), 4)
    assert got == response(200, body, cache=True, max_age=65535)


def test_pipelined_requests_are_answered_in_order(conn, course):
    frames = []
    expected = []
    for i, v in enumerate(VECTORS):
        if i % 2:
            frames.append(req(course.dumps(parse(v["text"])), steps=False))
            body = pickle.dumps((vector_value(v), []), 4)
            expected.append(response(200, body, cache=True, max_age=65535))
        else:
            frames.append(req(v["text"].encode()))
            body = ok_json(v["result_repr"], v["steps"])
            expected.append(response(200, body, cache=True, steps=True, max_age=65535))
    frames.insert(3, req(b"1 / 0"))
    expected.insert(
        3,
        response(
            400, error_json("division by zero", "ZeroDivisionError"), cache=True, max_age=65535
        ),
    )
    stream = b"".join(frames)
    got = conn.send(stream[:100])
    got += conn.send(stream[100:])
    assert split(got) == expected
    assert conn.open


def test_timestamp_is_the_clock_at_answer_time(clock, conn):
    clock.advance(42.9)
    got = conn.ask(VALID)
    assert wire.decode_header(got).timestamp == NOW + 42


def test_reserved_request_bits_are_ignored(conn):
    """Receivers pay no attention to the reserved bits 15-13, as the protocol says."""
    flags = 0xE000 | wire.make_flags(request=True, steps=True, cache=True)
    got = conn.send(wire.encode(1, flags, 65535, VALID))
    assert got == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535)


# --- errors -------------------------------------------------------------------


def test_response_sent_as_request_is_a_400(conn):
    got = conn.ask(VALID, request=False)
    body = error_json("not a request: the T flag is 0", "ValueError")
    assert got == response(400, body)
    assert conn.open


def test_response_sent_as_request_legacy_is_a_pickled_400(conn, course):
    got = conn.ask(course.dumps(parse("1 + 1")), request=False)
    assert got == response(400, error_pickle(ValueError("not a request: the T flag is 0")))


MATH_ERRORS = [
    ("1 / 0", "division by zero", "ZeroDivisionError"),
    ("7 % 0", "integer modulo by zero", "ZeroDivisionError"),
    ("sqrt(-1)", "math domain error", "ValueError"),
    ("log(0)", "math domain error", "ValueError"),
    ("2 + sqrt(1 - 5)", "math domain error", "ValueError"),
    (
        "(-8) ** 0.5",
        "result is not a real number: (1.7319121124709868e-16+2.8284271247461903j)",
        "ValueError",
    ),
    (
        "1 + pow(-8, 0.5) * 0",
        "result is not a real number: (1.7319121124709868e-16+2.8284271247461903j)",
        "ValueError",
    ),
    ("2 ** 20000", "integer result too large (over 14000 bits)", "OverflowError"),
    ("1 +", "unexpected end of expression: expected a number, a name or '('", "SyntaxError"),
    ("sin(1, 2)", "sin() takes 1 argument (2 given)", "TypeError"),
    ("max(5)", "'int' object is not iterable", "TypeError"),
    ("min(2.5)", "'float' object is not iterable", "TypeError"),
    ("foo(1)", "unknown function 'foo' at position 0", "SyntaxError"),
]


@pytest.mark.parametrize(("text", "message", "kind"), MATH_ERRORS, ids=[e[0] for e in MATH_ERRORS])
@pytest.mark.parametrize("steps", [True, False], ids=["S1", "S0"])
def test_calculation_errors_are_400_with_the_message(conn, text, message, kind, steps):
    got = conn.ask(text.encode(), steps=steps)
    # A deterministic error is as cacheable as a result; S is never set on errors.
    assert got == response(400, error_json(message, kind), cache=True, max_age=65535)
    assert conn.open
    assert conn.ask(VALID) == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535)


@pytest.mark.parametrize(
    ("text", "exc"),
    [
        ("1 / 0", ZeroDivisionError("division by zero")),
        ("sqrt(-1)", ValueError("math domain error")),
        (
            "(-8) ** 0.5",
            ValueError("result is not a real number: (1.7319121124709868e-16+2.8284271247461903j)"),
        ),
        ("2 ** 20000", OverflowError("integer result too large (over 14000 bits)")),
        ("max(5)", TypeError("'int' object is not iterable")),
        ("min(2.5)", TypeError("'float' object is not iterable")),
    ],
)
def test_legacy_calculation_errors_are_pickled_builtin_exceptions(conn, course, text, exc):
    got = conn.ask(course.dumps(parse(text)))
    assert got == response(400, error_pickle(exc), cache=True, max_age=65535)
    assert conn.open


@pytest.mark.parametrize(
    ("data", "message", "kind"),
    [
        (b"", "empty request", "SyntaxError"),
        (b"\xff\xfe", "request is not UTF-8 text: invalid start byte", "ValueError"),
        (b"2 $ 3", "unexpected character '$' at position 2", "SyntaxError"),
        (b"1e400", "number 1e400 is out of range", "OverflowError"),
    ],
)
def test_unreadable_text_requests_are_400(conn, data, message, kind):
    got = conn.ask(data)
    assert got == response(400, error_json(message, kind), cache=True, max_age=65535)
    assert conn.ask(VALID) == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "١٢ + 1",
            "unexpected character '\u0661' (U+0661) at position 0: "
            "numbers are written with the digits 0-9",
        ),
        (
            "\uff11\uff12\uff13 + 1",
            "unexpected character '\uff11' (U+FF11) at position 0: "
            "numbers are written with the digits 0-9",
        ),
        (
            "1 + 2\u0663",
            "unexpected character '\u0663' (U+0663) at position 5: "
            "numbers are written with the digits 0-9",
        ),
        ("1\u00a0+ 1", "unexpected character '\\xa0' (U+00A0) at position 1"),
        ("1 + 1\u00a0", "unexpected character '\\xa0' (U+00A0) at position 5"),
    ],
)
def test_digits_and_blanks_outside_ascii_are_400s(conn, text, message):
    """Python's grammar reads ASCII digits only; so does ours, where ``int()``
    would read ``١٢`` as 12 and fullwidth ``123`` as 123."""
    got = conn.ask(text.encode())
    body = json.dumps({"error": message, "type": "SyntaxError"}, ensure_ascii=False).encode()
    assert got == response(400, body, cache=True, max_age=65535)
    assert conn.ask(VALID) == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535)


def test_deep_nesting_within_the_limit_is_answered(conn):
    """199 nested calls: within MAX_DEPTH, so a result, not a crash (500)."""
    text = ("sqrt(" * 199 + "1" + ")" * 199).encode()
    assert conn.ask(text, steps=False) == response(
        200, ok_json("1.0", []), cache=True, max_age=65535
    )


def test_nesting_beyond_the_limit_is_a_400(conn):
    text = ("(" * 201 + "1" + ")" * 201).encode()
    body = error_json("expression nested deeper than 200 levels", "ValueError")
    assert conn.ask(text) == response(400, body, cache=True, max_age=65535)


def test_disallowed_pickle_is_400_unsupported_payload(conn):
    import os

    got = conn.ask(pickle.dumps(os.system, 4))
    exc = ValueError("unsupported payload: posix.system is not allowed")
    assert got == response(400, error_pickle(exc), cache=True, max_age=65535)
    assert conn.open


# --- rand, cache policy -----------------------------------------------------------


def test_rand_answers_are_not_cacheable(conn):
    got = conn.ask(b"rand(1, 2)")
    h = wire.decode_header(got)
    assert (h.status, h.cache, h.steps, h.max_age, h.request) == (200, False, True, 0, False)
    answer = json.loads(got[12:])
    assert 1 <= answer["result"] <= 2
    assert answer["steps"] == ["rand(1, 2)", repr(answer["result"])]


def test_rand_anywhere_makes_the_answer_uncacheable(conn, course):
    got = conn.ask(course.dumps(parse("max(1, rand(2, 3) * 0)")), steps=False)
    assert got == response(200, pickle.dumps((1, []), 4), cache=False, max_age=0)


def test_rand_results_differ(conn):
    values = {json.loads(conn.ask(b"rand(0, 1)", steps=False)[12:])["result"] for _ in range(5)}
    assert len(values) > 1


@pytest.mark.parametrize(
    ("options", "cache", "max_age"),
    [
        ({}, True, 65535),
        ({"max_age": 30}, True, 30),
        ({"max_age": 0}, False, 0),
        ({"cache": False}, False, 0),
        ({"cache": False, "max_age": 30}, False, 0),
    ],
)
def test_cache_policy(clock, options, cache, max_age):
    """The server's options decide cacheability; a request's cache flags do not change it."""
    c = Conn(clock, **options)
    assert c.ask(VALID) == response(200, VALID_ANSWER, cache=cache, steps=True, max_age=max_age)
    err = error_json("division by zero", "ZeroDivisionError")
    assert c.ask(b"1/0") == response(400, err, cache=cache, max_age=max_age)
    # The request's own cache flags do not change the server's policy.
    assert c.ask(VALID, cache=False, max_age=0) == response(
        200, VALID_ANSWER, cache=cache, steps=True, max_age=max_age
    )


# --- size limits -----------------------------------------------------------------------


# 60 steps of up to ~380 characters: about 10,900 bytes of steps.
LONG_SUM = " + ".join(["1"] * 60).encode()


def test_steps_too_long_for_the_message_are_a_400(conn):
    got = conn.ask(LONG_SUM)
    body = error_json("the steps do not fit in one message; ask without steps", "ValueError")
    assert got == response(400, body, cache=True, max_age=65535)
    assert conn.ask(LONG_SUM, steps=False) == response(
        200, ok_json("60", []), cache=True, max_age=65535
    )
    assert conn.open


def test_a_larger_message_limit_leaves_room_for_the_steps(clock):
    c = Conn(clock, max_message_size=65535)
    got = c.ask(LONG_SUM)
    h = wire.decode_header(got)
    assert (h.status, h.steps, len(got)) == (200, True, h.length)
    answer = json.loads(got[12:])
    assert answer["result"] == 60
    assert len(answer["steps"]) == 60
    assert answer["steps"][0] == "(" * 58 + "1 + 1" + ") + 1" * 58
    assert answer["steps"][-3:] == ["(58 + 1) + 1", "59 + 1", "60"]


def test_answer_too_large_for_the_message_is_a_400(clock):
    c = Conn(clock, max_message_size=100)
    got = c.ask(b"2 ** 1000", steps=False)
    body = error_json("the answer does not fit in one message", "ValueError")
    assert got == response(400, body, cache=True, max_age=65535)
    assert len(got) <= 100
    assert c.open


@pytest.mark.parametrize(
    ("first", "body"),
    [
        (
            b"1",
            error_json(
                "impossible message length 5 (must be 12..8192); closing the connection",
                "ValueError",
            ),
        ),
        (
            b"\x80",
            error_pickle(
                ValueError("impossible message length 5 (must be 12..8192); closing the connection")
            ),
        ),
    ],
    ids=["text", "legacy"],
)
def test_impossible_header_one_400_then_close(conn, first, body):
    bad = struct.pack("!LHHHxx", 1, 5, 0x0400, 0) + first + b"rest"
    got = conn.send(req(VALID) + bad + req(VALID))
    assert split(got) == [
        response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535),
        response(400, body),
    ]
    assert conn.transport.disconnecting


def test_message_above_the_configured_limit_is_refused(clock):
    c = Conn(clock, max_message_size=45)
    ok = response(200, ok_json("3", []), cache=True, max_age=65535)
    assert len(ok) == 38
    assert c.ask(b"1 + 2", steps=False) == ok
    got = c.ask(b"1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10")
    msg = "impossible message length 50 (must be 12..45); closing the connection"
    assert got == response(400, error_json(msg, "ValueError"))
    assert c.transport.disconnecting


# --- unexpected failures ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [True, False], ids=["S1", "S0"])
def test_unexpected_exception_is_a_logged_500(conn, monkeypatch, steps):
    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(server, "evaluate", boom)
    monkeypatch.setattr(server, "evaluate_with_steps", boom)
    with capturedLogs() as events:
        got = conn.ask(VALID, steps=steps)
    body = error_json("internal server error", "RuntimeError")
    assert got == response(500, body)
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    event = failures[0]
    assert event["log_failure"].check(RuntimeError)
    assert str(event["log_failure"].value) == "boom"
    assert event["log_format"] == "Unexpected failure answering a request of {size} bytes"
    assert event["size"] == len(VALID)
    assert event["log_level"].name == "critical"
    monkeypatch.undo()
    assert conn.ask(VALID) == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535)


def test_unexpected_exception_legacy_is_a_pickled_500(conn, course, monkeypatch):
    def boom(*args):
        raise KeyError("boom")

    monkeypatch.setattr(server, "evaluate_with_steps", boom)
    with capturedLogs() as events:
        got = conn.ask(course.dumps(parse("1 + 1")))
    assert got == response(500, error_pickle(RuntimeError("internal server error")))
    assert len([e for e in events if "log_failure" in e]) == 1
    assert conn.open


# --- connection handling ------------------------------------------------------------


def test_idle_timeout_closes_only_a_silent_connection(clock):
    c = Conn(clock, idle_timeout=5.0)
    clock.advance(4)
    c.ask(VALID)
    c.send(req(VALID)[:10])  # half a header does not count
    clock.advance(4.99)
    assert c.open
    clock.advance(0.01)
    assert c.transport.disconnecting


def test_default_idle_timeout_is_60_seconds(clock, conn):
    clock.advance(59.9)
    assert conn.open
    clock.advance(0.1)
    assert conn.transport.disconnecting


def test_no_idle_timeout(clock):
    c = Conn(clock, idle_timeout=None)
    assert clock.getDelayedCalls() == []
    clock.advance(10**6)
    assert c.open


def test_connection_limit(clock):
    factory = server.CalculatorServerFactory(clock=clock, max_connections=2)
    first = factory.buildProtocol(ADDR)
    first.makeConnection(StringTransport())
    second = factory.buildProtocol(ADDR)
    second.makeConnection(StringTransport())
    assert factory.buildProtocol(ADDR) is None
    first.connectionLost(Failure(error.ConnectionDone()))
    third = factory.buildProtocol(ADDR)
    assert third is not None
    assert isinstance(third, server.CalculatorServerProtocol)


def test_built_protocol_carries_the_factory_settings(clock):
    factory = server.CalculatorServerFactory(clock=clock, max_message_size=1000, idle_timeout=7)
    p = factory.buildProtocol(ADDR)
    assert isinstance(p, server.CalculatorServerProtocol)
    assert (p.maxMessageSize, p.idleTimeout, p.factory) == (1000, 7, factory)


# --- the extension word, half-close, bounded input ---------------------------------


def tagged(data: bytes, ext: int) -> bytes:
    return req(data)[:10] + ext.to_bytes(2, "big") + req(data)[12:]


@pytest.mark.parametrize("ext", [77 << 3, 77 << 3 | 0b111], ids=["tag", "tag+unknown-bits"])
def test_the_request_tag_is_echoed_with_l(conn, ext):
    """A pipelining proxy matches each answer to its request by the tag it echoes, with L set."""
    got = conn.send(tagged(VALID, ext))
    assert got == response(200, VALID_ANSWER, cache=True, steps=True, max_age=65535, tag=77)


def test_even_a_400_to_a_message_that_is_not_a_request_echoes_the_tag(conn):
    """The proxy waiting on that tag must get an answer even when the message was refused."""
    got = conn.send(tagged(VALID, 9 << 3)[:6] + b"\x10\x00" + tagged(VALID, 9 << 3)[8:])
    assert wire.decode_header(got).ext == wire.EXT_FRAMED | 9 << 3
    assert wire.decode_header(got).status == 400


def test_a_half_closed_connection_gets_every_answer_then_a_close(conn):
    conn.transport.clear()
    conn.wrapper.dataReceived(req(b"1 + 1") + req(b"2 + 2") + req(b"3 + 3"))
    conn.wrapper.readConnectionLost()
    answers = split(conn.transport.value())
    assert [json.loads(a[12:])["result"] for a in answers] == [2, 4, 6]
    assert conn.transport.disconnecting and not conn.transport.disconnected


def test_a_half_closed_connection_is_answered_across_fairness_turns(clock):
    """A client that sends its requests then shuts its side gets every answer, over many turns."""
    c = Conn(clock)
    c.protocol.turnBudget = 0.0
    c.transport.clear()
    c.wrapper.dataReceived(b"".join(req(b"%d" % n) for n in range(5)))
    c.wrapper.readConnectionLost()
    assert len(split(c.transport.value())) == 1 and not c.transport.disconnecting
    for _ in range(10):
        clock.advance(0)  # the fairness turns
    assert [json.loads(a[12:])["result"] for a in split(c.transport.value())] == list(range(5))
    assert c.transport.disconnecting


def test_a_pipelining_client_is_not_read_while_its_backlog_is_above_the_bound(clock):
    """A client pipelining faster than it is answered is paused at about 64 KiB waiting."""
    c = Conn(clock)
    c.protocol.turnBudget = 0.0
    batch = req(b"1 + 1") * 1000  # 25 KB
    c.wrapper.dataReceived(batch)
    reads = 1
    while c.transport.producerState == "producing":
        c.wrapper.dataReceived(batch)
        reads += 1
    # Reading stops once more than 64 KiB (four largest messages, at least 64 KiB) wait.
    assert reads == 4 and c.protocol._size > 65536
    for _ in range(reads * 1000):
        clock.advance(0)  # the fairness turns, one answer each
    assert len(split(c.transport.value())) == reads * 1000
    assert c.transport.producerState == "producing"
