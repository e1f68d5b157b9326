"""The shape memo: legacy requests of a shape read before are built directly,
and always come out as the full reading (pre-scan, unpickler, checks) says."""

from __future__ import annotations

import struct
from unittest import mock

from helpers import examples, trees
from hostile import Connection, Writer, course_pickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.codec import legacy, shapes
from twisted_cacheproxy.calculator.codec.prescan import scan
from twisted_cacheproxy.calculator.codec.shapes import ShapeMemo
from twisted_cacheproxy.calculator.expression import CalculationError
from twisted_cacheproxy.calculator.parser import parse


def pickled(text: str) -> bytes:
    return codec.encode_request(parse(text), codec.LEGACY)


def outcome(decode, data: bytes) -> str:
    """What a decoder makes of ``data``: the tree (``repr`` tells 1 from 1.0) or the refusal."""
    try:
        return repr(decode(data))
    except CalculationError as e:
        return f"{e.kind}: {e}"


def full(data: bytes) -> str:
    return outcome(legacy.decode_request, data)


class Counting:
    """A `ShapeMemo` that counts its full readings."""

    def __init__(self, **kwargs) -> None:
        self.memo = ShapeMemo(**kwargs)
        self.full = 0

    def decode(self, data: bytes) -> str:
        def counted(data):
            self.full += 1
            return legacy.read_request(data)

        with mock.patch.object(shapes, "read_request", counted):
            return outcome(self.memo.decode, data)


def with_numbers(data: bytes, *values: bytes) -> bytes:
    """``data`` with the value bytes of its first number literals replaced."""
    out = bytearray(data)
    for pos, value in zip(scan(data), values, strict=False):
        hole = shapes._Hole(data, pos)
        assert len(value) == hole.end - hole.start
        out[hole.start : hole.end] = value
    return bytes(out)


def test_a_request_of_a_known_shape_is_built_without_a_full_reading():
    memo = Counting()
    assert memo.decode(pickled("max(2, 3) + 4")) == full(pickled("max(2, 3) + 4"))
    assert memo.full == 2  # the request, and the probe that finds where its numbers go
    assert memo.decode(pickled("max(5, 6) + 7")) == full(pickled("max(5, 6) + 7"))
    assert memo.decode(pickled("max(7, 6) + 5")) == full(pickled("max(7, 6) + 5"))
    assert memo.full == 2 and len(memo.memo) == 1


def test_numbers_of_another_width_are_another_shape():
    memo = Counting()
    for text in ("max(2, 3) + 4", "max(2, 300) + 4", "max(2, 3) + 4.5"):
        assert memo.decode(pickled(text)) == full(pickled(text))
    assert len(memo.memo) == 3 and memo.full == 6


def test_only_the_numbers_of_constants_are_taken_from_the_request():
    # The Associativity of "+" is a BININT1 0 like the right operand: only
    # the operand is a number of the tree, the Associativity must stay 0.
    memo = Counting()
    first = pickled("7 + 0")
    assert memo.decode(first) == "Binary(left=Number(value=7), op='+', right=Number(value=0))"
    assert memo.decode(pickled("8 + 9")) == full(pickled("8 + 9"))
    assert memo.full == 2
    _, associativity, _ = (shapes._Hole(first, p) for p in scan(first))
    bad = bytearray(first)
    bad[associativity.start] = 5
    assert (
        memo.decode(bytes(bad))
        == full(bytes(bad))
        == ("ValueError: unsupported payload: Associativity takes 0 or 1")
    )


def test_a_named_constant_is_part_of_the_shape():
    memo = Counting()
    assert memo.decode(pickled("PI * 2")) == full(pickled("PI * 2"))
    assert memo.decode(pickled("PI * 3")) == full(pickled("PI * 3"))
    assert memo.full == 2
    not_pi = with_numbers(pickled("PI * 3"), struct.pack(">d", 3.0))
    assert memo.decode(not_pi) == full(not_pi)
    assert "named constant 'PI' = 3.0" in full(not_pi)
    assert memo.full == 3


def test_numbers_built_from_a_shape_are_checked_like_the_full_reading_checks_them():
    memo = Counting()
    memo.decode(pickled("1.5 * 2"))
    for value in (float("inf"), float("nan"), -0.0, 1e308):
        data = with_numbers(pickled("1.5 * 2"), struct.pack(">d", value))
        assert memo.decode(data) == full(data)
    assert memo.full == 2
    assert "not a finite int or float" in full(
        with_numbers(pickled("1.5 * 2"), b"\x7f\xf0" + bytes(6))
    )


def test_a_constant_shared_through_the_memo_stays_one_number():
    w = Writer()
    w.new("FunctionCallExpr").raw(b"(").string("function").function("max")
    w.string("args").raw(b"]").memoize().raw(b"(")
    w.new("Constant", "seven").string("value").number(7).raw(b"sb")
    w.recall("seven")
    w.raw(b"eub")
    data = w.stop()
    memo = Counting()
    assert memo.decode(data) == full(data)
    other = with_numbers(data, b"\x09")
    assert memo.decode(other) == full(other)
    assert full(other).count("Number(value=9)") == 2
    assert memo.full == 2


def test_a_number_put_where_no_probe_can_go_leaves_the_shape_to_the_full_reading():
    # A NamedConstant whose value is set with SETITEM: tried, but its probe
    # is refused (not PI), so every request of the shape is read in full,
    # without being probed again.
    w = Writer()
    w.new("NamedConstant").string("name").string("PI").raw(b"s")
    w.string("value").number(3.141592653589793).raw(b"sb")
    data = w.stop()
    assert full(data) == "Constant(name='PI')"
    memo = Counting()
    for _ in range(3):
        assert memo.decode(data) == full(data)
    assert memo.full == 2 + 1 + 1 and len(memo.memo) == 1
    other = with_numbers(data, struct.pack(">d", 3.0))
    assert memo.decode(other) == full(other) and "named constant" in full(other)
    assert memo.full == 5


def test_a_shape_without_numbers_to_try_is_learned_without_a_probe():
    memo = Counting()
    assert memo.decode(pickled("PI * E")) == full(pickled("PI * E"))
    assert memo.decode(pickled("PI * E")) == full(pickled("PI * E"))
    assert memo.full == 1 and len(memo.memo) == 1


def test_a_refused_request_leaves_no_shape():
    memo = Counting()
    good = pickled("max(2, 3) + 4")
    assert memo.decode(good + b"junk") == full(good + b"junk")
    assert "trailing bytes" in full(good + b"junk")
    assert len(memo.memo) == 0 and memo.full == 1


def test_shapes_are_bounded_and_the_least_recently_used_goes_first():
    memo = ShapeMemo(size=4)
    texts = ["-" * n + "1" for n in range(6)]
    for text in texts:
        memo.decode(pickled(text))
    assert len(memo) == 4
    counting = Counting()
    counting.memo = memo
    counting.decode(pickled("-" * 5 + "2"))  # learned last: built directly
    counting.decode(pickled("2"))  # forgotten: read in full, and learned again
    assert counting.full == 2 and len(memo) == 4


def test_a_request_over_the_largest_is_read_in_full_and_not_learned():
    data = pickled(" + ".join(["1"] * 60))
    memo = Counting(largest=len(data) - 1)
    assert memo.decode(data) == full(data)
    assert memo.decode(data) == full(data)
    assert memo.full == 2 and len(memo.memo) == 0


def test_each_server_factory_remembers_its_own_shapes():
    data = pickled("max(2, 3) + 4")
    first, second = Connection(), Connection()
    assert first.ask(data) == (200, (7, []))
    assert len(first.factory.shapes) == 1 and not second.factory.shapes


# --- against the full reading, on random trees and numbers -----------------------------

fuzz = settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

seeds = trees(("max", "min", "sin", "pow", "log"), 10).flatmap(
    lambda tree: st.sampled_from([codec.encode_request(tree, codec.LEGACY), course_pickle(tree)])
)


@st.composite
def renumbered(draw, data: bytes) -> bytes:
    """``data`` with some of its number literals' value bytes redrawn: numbers
    of every value, and broken Associativity, named constants and the like."""
    out = bytearray(data)
    for pos in scan(data):
        hole = shapes._Hole(data, pos)
        if draw(st.booleans()):
            width = hole.end - hole.start
            out[hole.start : hole.end] = draw(st.binary(min_size=width, max_size=width))
    return bytes(out)


@fuzz
@given(seeds.flatmap(lambda seed: st.tuples(st.just(seed), st.lists(renumbered(seed), max_size=6))))
def test_a_shape_reads_every_request_as_the_full_reading_does(case):
    seed, others = case
    memo = ShapeMemo()
    for data in (seed, *others, seed):
        assert outcome(memo.decode, data) == full(data), data
