"""Property-based fuzzing of the frame decoder, the text parser and the
legacy decoder: random and mutated input never raises out of the protocol
and is always answered 200 or 400 (never 500)."""

from __future__ import annotations

import contextlib
import pickletools
import sys
from unittest import mock

import pytest
from helpers import VECTORS, examples, make_course_module, request_frame, trees
from hostile import Connection, course_pickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_scan import reference_scan

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.codec.prescan import _ALLOWED, scan
from twisted_cacheproxy.calculator.expression import (
    Binary,
    CalculationError,
    Call,
    Constant,
    Number,
    Unary,
    evaluate,
    evaluate_with_steps,
)
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.transport import wire

fuzz = settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NODES = (Number, Constant, Binary, Unary, Call)
TEXTS = [
    *(v["text"] for v in VECTORS),
    "pow(2, 10, 1000) % 7 - -PI + tau * E",
    "rand(1, 2) + sqrt(16) - cos(0) * tan(1) / min(4, 5.5e-3)",
    "2 ** 3 ** 2 - (-2) ** 0.5",
]
PICKLES = [codec.encode_request(parse(t), codec.LEGACY) for t in TEXTS] + [
    course_pickle(parse(t), fresh_generators=True) for t in TEXTS[-2:]
]
OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]


@st.composite
def mutated(draw, seeds: list[bytes], extra: list[bytes]) -> bytes:
    """A seed after a few byte flips, overwrites, insertions (random bytes
    or ``extra`` tokens), deletions, truncations and duplicated slices."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "token", "delete", "cut", "copy"]))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "token":
            data[i:i] = draw(st.sampled_from(extra))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[i:]
        else:
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j]
    return bytes(data)


def assert_decodes_or_refuses(data: bytes) -> None:
    """``decode_request`` gives a tree or a CalculationError, and so does
    evaluating the tree, with or without steps."""
    try:
        tree = codec.decode_request(data)
    except CalculationError:
        return
    assert type(tree) in NODES
    for run in (evaluate, lambda t: evaluate_with_steps(t, 8000)):
        with contextlib.suppress(CalculationError):
            run(tree)


def assert_valid_answer(header: wire.Header, payload: bytes) -> None:
    """A response, 200 or 400, whose data our client reads."""
    assert header.status in (200, 400)
    assert not header.request
    try:
        codec.decode_response(payload)
    except codec.RemoteError as e:
        assert e.kind != "UnreadableAnswer"
        assert header.status == 400


def assert_answered(conn: Connection, data: bytes, *, steps: bool = False) -> None:
    (header, payload), *more = conn.feed(request_frame(data, steps=steps, cache=False, ts=0))
    assert not more
    assert_valid_answer(header, payload)
    assert codec.encoding_of(payload) == codec.encoding_of(data)
    assert conn.open


# --- the text parser -----------------------------------------------------------------

GRAMMAR = "0123456789.eE+-*/%(), \t\npitauPIsncoqrtlgmaxd_"


@fuzz
@given(st.text(max_size=200))
def test_parser_on_random_text(text):
    try:
        tree = parse(text)
    except CalculationError:
        return
    assert type(tree) in NODES


@fuzz
@given(st.text(alphabet=GRAMMAR, max_size=120))
def test_parser_on_random_grammar_symbols(text):
    assert_decodes_or_refuses(text.encode())


TOKENS = [t.encode() for t in ["(", ")", ",", "**", "-", "max(", "1e308", "9" * 30, "pi", "  "]]


@fuzz
@given(mutated([t.encode() for t in TEXTS], TOKENS))
def test_mutated_text_requests(data):
    assert_decodes_or_refuses(data)


# --- the legacy decoder -------------------------------------------------------------


@fuzz
@given(mutated(PICKLES, OPCODES))
def test_mutated_legacy_pickles(data):
    assert_decodes_or_refuses(data)


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_after_a_pickle_header(data):
    assert_decodes_or_refuses(b"\x80\x04" + data)


@fuzz
@given(
    st.lists(st.sampled_from([*OPCODES, b"K\x01", b"\x8c\x01a", b"h\x00", b"\x94"]), max_size=60)
)
def test_random_opcode_sequences(opcodes):
    assert_decodes_or_refuses(b"\x80\x04" + b"".join(opcodes) + b".")


# --- through the server protocol ----------------------------------------------------


@settings(fuzz, max_examples=examples(100))
@given(mutated(PICKLES, OPCODES) | mutated([t.encode() for t in TEXTS], TOKENS), st.booleans())
def test_mutated_requests_are_answered_200_or_400(data, steps):
    conn = Connection()
    assert_answered(conn, data[: wire.MAX_MESSAGE_SIZE - wire.HEADER_SIZE], steps=steps)
    assert_answered(conn, b"1 + 1")


def frames_pending(stream: bytes, limit: int) -> int | None:
    """How many bytes the server still needs to finish the message it is
    reading after ``stream``: 0 when in step, -1 inside a header, None once
    a header was impossible (so the connection closed)."""
    offset = 0
    while len(stream) - offset >= wire.HEADER_SIZE:
        length = wire.decode_header(stream, offset).length
        if not wire.HEADER_SIZE <= length <= limit:
            return None
        if len(stream) - offset < length:
            return length - (len(stream) - offset)
        offset += length
    return 0 if offset == len(stream) else -1


def header_bytes() -> st.SearchStrategy[bytes]:
    """Headers with lengths near and beyond the limits, and any flags."""
    lengths = st.sampled_from([0, 1, 11, 12, 13, 20, 8192, 8193, 65535]) | st.integers(0, 65535)
    return st.builds(
        wire.HEADER.pack,
        st.integers(0, 2**32 - 1),
        lengths,
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**16 - 1),  # the extension word
    )


@fuzz
@given(st.lists(st.binary(max_size=40) | header_bytes(), max_size=8))
def test_random_bytes_into_the_server(chunks):
    conn = Connection()
    stream = b""
    answers = []
    for chunk in chunks:
        if not conn.open:
            break
        stream += chunk
        answers += conn.feed(chunk)  # never raises
    for header, payload in answers:
        assert_valid_answer(header, payload)
    pending = frames_pending(stream, wire.MAX_MESSAGE_SIZE)
    if pending is None:
        assert not conn.open  # closed after a bad header
        assert answers and answers[-1][0].status == 400
        return
    assert conn.open
    if pending == -1:
        return  # inside a header: what follows decides the next length
    if pending:
        answers = conn.feed(b"1" * pending)  # finish the message it is reading
        assert len(answers) == 1
        assert_valid_answer(*answers[0])
    assert_answered(conn, b"6 * 7")


@fuzz
@given(
    st.lists(
        st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1), st.binary(max_size=120)),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 50),
)
def test_framed_random_payloads_keep_the_connection_in_step(messages, chunk):
    conn = Connection()
    stream = b"".join(wire.encode(0, flags, age, data) for flags, age, data in messages)
    answers = []
    for i in range(0, len(stream), chunk):
        answers += conn.feed(stream[i : i + chunk])
    assert len(answers) == len(messages)
    for (flags, _, data), (header, payload) in zip(messages, answers, strict=True):
        assert_valid_answer(header, payload)
        if not flags & wire.FLAG_REQUEST:
            assert header.status == 400
        assert codec.encoding_of(payload) == codec.encoding_of(data)
    assert_answered(conn, b"6 * 7")


def verdict(data: bytes) -> str:
    """What the pre-scan says of ``data``."""
    try:
        scan(data)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# --- the pre-scan against its reference -----------------------------------------------


def test_the_scan_knows_each_opcode_by_its_pickletools_code():
    codes = {op.name: ord(op.code) for op in pickletools.opcodes}
    assert {name: row[0] for name, row in _ALLOWED.items()} == {n: codes[n] for n in _ALLOWED}


with mock.patch.dict(sys.modules, {"calculator": make_course_module()}):
    COURSE = sys.modules["calculator"]
    #: Course pickles at every protocol the course programs may use: 2 and 3
    #: name globals with GLOBAL lines, 5 as 4.
    ALL_PROTOCOLS = [COURSE.dumps(parse(t), p) for t in TEXTS[:4] for p in (2, 3, 5)]
#: Answers, which clients scan too.
ANSWERS = [
    codec.encode_result(codec.LEGACY, 2**100, ["2 ** 100", str(2**100)]),
    codec.encode_result(codec.LEGACY, 0.5, []),
    codec.encode_error(codec.LEGACY, "ZeroDivisionError", "division by zero"),
]

# No rand: each of its pickles holds a fresh generator, and hypothesis
# needs the same data for the same draws.
course_pickles = trees(("max", "min", "sin"), 12).map(
    lambda tree: codec.encode_request(tree, codec.LEGACY)
)
pickles = (
    course_pickles
    | mutated(PICKLES + ALL_PROTOCOLS + ANSWERS, OPCODES)
    | course_pickles.flatmap(lambda p: mutated([p], OPCODES))
)


def reference_verdict(data: bytes) -> bool:
    """Whether `reference_scan` accepts ``data``."""
    try:
        reference_scan(data)
        return True
    except Exception:
        return False


# pickletools reads a fuzzed STRING's backslashes with Python's escapes and
# warns of the ones Python does not know: a warning about the fuzz, not us.
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@fuzz
@given(pickles)
def test_the_scan_refuses_what_the_reference_refuses(data):
    assert (verdict(data) == "ok") == reference_verdict(data), data


NUMBER_OPCODES = {"BININT", "BININT1", "BININT2", "BINFLOAT", "LONG1", "LONG4"}


@fuzz
@given(course_pickles | st.sampled_from(PICKLES + ALL_PROTOCOLS + ANSWERS))
def test_the_scan_finds_every_number_literal(data):
    expected = [pos for op, _, pos in pickletools.genops(data) if op.name in NUMBER_OPCODES]
    assert scan(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04](K\x01a.",  # APPEND with only the item above the mark
        b"\x80\x04}(K\x01b.",  # BUILD likewise
        b"\x80\x04\x8c\x01\xff.",  # a string that is not UTF-8
        b"\x80\x02ca b\nc\n.",  # GLOBAL names with a space
        b"\x80\x02c\xc3\xa9\nx\n.",  # and not ASCII
    ],
)
def test_what_the_reference_found_is_refused(data):
    assert not reference_verdict(data)
    assert verdict(data) != "ok"
