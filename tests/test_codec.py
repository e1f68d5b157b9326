"""Payload codecs: course-style pickles in, text and pickles out, answers read back."""

from __future__ import annotations

import copyreg
import io
import json
import math
import operator
import os
import pickle
import random
import subprocess
import sys
import types
from unittest import mock

import pytest
from helpers import course_pickle, examples, trees
from hypothesis import given, settings

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.codec import LEGACY, TEXT, RemoteError, legacy
from twisted_cacheproxy.calculator.expression import (
    MAX_NODES,
    Binary,
    CalculationError,
    Call,
    Constant,
    Number,
    Unary,
)
from twisted_cacheproxy.calculator.parser import parse

ALL_OPERATORS = "(1 + 2 - 3 * 4 / 5 % 6 ** 7) + -(8) + +(9.5)"
ALL_FUNCTIONS = (
    "sin(1) + cos(2) + tan(3) + sqrt(4) + log(5) + log(8, 2) + max(1, 2, 3) + min(4)"
    " + pow(2, 3) + pow(2, 3, 5) + pi + tau + e"
)


def test_encoding_of_looks_at_the_first_byte():
    """A pickle starts with PROTO (0x80), which no UTF-8 text does: one byte tells them apart."""
    assert codec.encoding_of(b"\x80\x04rest") == LEGACY
    assert codec.encoding_of(b"\x80") == LEGACY
    assert codec.encoding_of(b"1 + 1") == TEXT
    assert codec.encoding_of(b"") == TEXT
    assert codec.encoding_of(b"\x81") == TEXT


# --- course pickles in ------------------------------------------------------------------


def test_course_classes_pickle_as_the_protocol_describes(course):
    """The stand-ins themselves: NEWOBJ + BUILD, REDUCE for Associativity,
    globals named as PROTOCOL.md 3.2 lists them."""
    import pickletools

    data = course.dumps(parse("max(1, 2) ** rand(1, 2)"), 4)
    names = [op.name for op, _, _ in pickletools.genops(data)]
    assert "NEWOBJ" in names and "BUILD" in names and "REDUCE" in names
    strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    assert {"calculator", "BinaryExpr", "Associativity", "_operator", "pow"} <= strings
    assert {"builtins", "getattr", "random", "Random", "uniform", "max"} <= strings


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "text",
    [
        "1",
        "2.5",
        "pi",
        "-(3)",
        ALL_OPERATORS,
        ALL_FUNCTIONS,
        "max(2, 3 * 4, log(e), 6 * 7, 9 / 8)",
        "-(-((1 + (2 + 3)) ** -(4 + 5)))",
        "rand(1, 2) * rand(3, 4)",
    ],
)
def test_course_pickles_decode_to_our_tree(course, text, protocol):
    tree = parse(text)
    assert codec.decode_request(course.dumps(tree, protocol)) == tree


@pytest.mark.parametrize("text", ["1 - 2 - 3", "2 ** 3 ** 2", ALL_OPERATORS])
def test_course_pickles_of_a_python_that_pickles_enums_by_name(course, monkeypatch, text):
    """Some Python 3.11 releases (Debian 12's 3.11.2) pickle an Associativity
    as ``getattr(Associativity, 'LEFT')``: the same tree as by its value, and
    calc-check's pickles of that form are byte for byte the course client's."""
    by_name = lambda member, protocol: (getattr, (type(member), member.name))  # noqa: E731
    monkeypatch.setattr(course.Associativity, "__reduce_ex__", by_name)
    data = course.dumps(parse(text), 4)
    assert b"\x8c\x07getattr" in data
    assert codec.decode_request(data) == parse(text)
    assert legacy.encode_request(parse(text), enums_by_name=True) == data


@pytest.mark.parametrize("name", ["left", "LEFTY", "uniform", "__class__"])
def test_getattr_on_associativity_takes_only_its_two_members(course, monkeypatch, name):
    by_name = lambda member, protocol: (getattr, (type(member), name))  # noqa: E731
    monkeypatch.setattr(course.Associativity, "__reduce_ex__", by_name)
    with pytest.raises(codec.CalculationError, match="unsupported payload: getattr is only"):
        codec.decode_request(course.dumps(parse("1 + 2"), 4))


def test_hand_built_course_tree_with_shared_operators(course):
    plus = course.BINARY["+"]
    power = course.BINARY["**"]
    neg = course.UNARY["-"]
    sqrt = course.FUNCTIONS["sqrt"]
    rand = course.Function("rand", random.Random(7).uniform)
    tree = course.BinaryExpr(
        course.BinaryExpr(course.Constant(1), plus, course.NamedConstant("TAU", math.tau)),
        plus,
        course.BinaryExpr(
            course.UnaryExpr(neg, course.Constant(-2.5)),
            power,
            course.FunctionCallExpr(
                sqrt, [course.FunctionCallExpr(rand, [course.Constant(0), course.Constant(1)])]
            ),
        ),
    )
    expected = Binary(
        Binary(Number(1), "+", Constant("TAU")),
        "+",
        Binary(
            Unary("-", Number(-2.5)),
            "**",
            Call("sqrt", (Call("rand", (Number(0), Number(1))),)),
        ),
    )
    for protocol in (2, 4):
        got = codec.decode_request(course_pickle(tree, protocol))
        assert got == expected
        assert type(got.left.left.value) is int
        assert type(got.right.left.operand.value) is float


@pytest.mark.parametrize(
    "text",
    [
        "1 + 2",
        ALL_OPERATORS,
        ALL_FUNCTIONS,
        "(sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13",
        "max(2, 3 * 4, log(e), 6 * 7, 9 / 8)",
        "sqrt(sqrt(16)) - sqrt(1)",
        "2 ** 3 ** 2",
    ],
)
def test_encode_request_legacy_is_byte_identical_to_a_course_pickle(course, text):
    tree = parse(text)
    assert codec.encode_request(tree, LEGACY) == course.dumps(tree, 4)
    # The package's own stand-ins did not replace ours.
    assert sys.modules["calculator"] is course


def test_encode_request_legacy_with_rand_round_trips(course, monkeypatch):
    """As in calc-client's process, where nothing registers a bound-method reducer."""
    monkeypatch.delitem(copyreg.dispatch_table, types.MethodType, raising=False)
    tree = parse("rand(1, 2) + rand(3, 4)")
    data = codec.encode_request(tree, LEGACY)
    assert data[:2] == b"\x80\x04"
    assert b"getattr" in data and b"twisted" not in data
    assert codec.decode_request(data) == tree
    loaded = pickle.loads(data)  # with our `calculator` module: the course's view
    assert type(loaded) is course.BinaryExpr
    left, right = loaded.left_operand, loaded.right_operand
    assert left.function is right.function  # one Function object per name, as the course does
    assert left.function.name == "rand"
    assert 1 <= left.function.function(1, 2) <= 2
    assert loaded.operator.associativity is course.Associativity.LEFT


def test_encode_request_legacy_with_rand_after_twisted_styles_is_imported():
    """twisted.persisted.styles pickles bound methods as Twisted's, which the course cannot load."""
    import twisted.persisted.styles  # noqa: F401 - registers the reducer

    assert types.MethodType in copyreg.dispatch_table
    tree = parse("rand(1, 2)")
    data = codec.encode_request(tree, LEGACY)
    assert b"twisted" not in data
    assert codec.decode_request(data) == tree


def test_encode_request_legacy_without_a_calculator_module():
    """calc-client writes course pickles without the course's calculator module installed."""
    assert "calculator" not in sys.modules
    data = codec.encode_request(parse("1 + 2"), LEGACY)
    assert "calculator" not in sys.modules
    assert codec.decode_request(data) == parse("1 + 2")


def c_pickle(graph: object) -> bytes:
    """What the C pickler writes for a stand-in graph, with the stand-ins in
    a ``calculator`` module for the moment (as the package once did)."""
    module = types.ModuleType("calculator")
    for cls in (*legacy._STANDINS, legacy.Associativity):
        setattr(module, cls.__name__, cls)
    out = io.BytesIO()
    pickler = pickle.Pickler(out, legacy.PROTOCOL)
    pickler.dispatch_table = {}
    with mock.patch.dict(sys.modules, {"calculator": module}):
        pickler.dump(graph)
    return out.getvalue()


@settings(max_examples=examples(200), deadline=None)
@given(trees(("max", "min", "sin", "rand", "pow"), 40))
def test_the_request_writer_writes_what_the_c_pickler_writes(tree):
    """Our writer gives, byte for byte, the C pickler's output for the course client's objects."""
    graph = legacy._to_pickled(tree, {})
    assert legacy._RequestWriter().dump(graph) == c_pickle(graph)


def test_the_request_writer_frames_and_batches_as_the_c_pickler_does():
    """Over 64 KiB (two frames), 1000 arguments (two batches), 256 memo entries (LONG_BINGET)."""
    args = tuple(Number(i + 0.5) for i in range(3500))
    tree = Binary(Call("max", args), "+", Call("rand", (Number(1), Number(2))))
    graph = legacy._to_pickled(tree, {})
    data = legacy._RequestWriter().dump(graph)
    assert len(data) > 64 * 1024
    assert data == c_pickle(graph)


@pytest.mark.parametrize(
    "text", ["-" * 200 + "1", "(" * 199 + "1" + " + 1)" * 199, "sqrt(" * 199 + "1" + ")" * 199]
)
def test_encode_request_legacy_writes_the_deepest_trees(text):
    tree = parse(text)
    assert codec.decode_request(codec.encode_request(tree, LEGACY)) == tree


def test_encode_request_text():
    assert codec.encode_request(parse("-2 ** 2 + max(1, 2 * 3)")) == b"-(2 ** 2) + max(1, (2 * 3))"
    assert codec.encode_request(parse("(-2) ** 2"), TEXT) == b"(-(2)) ** 2"


def test_decode_request_text():
    assert codec.decode_request(b"1 + 2") == Binary(Number(1), "+", Number(2))
    with pytest.raises(CalculationError) as info:
        codec.decode_request(b"")
    assert (str(info.value), info.value.kind) == ("empty request", "SyntaxError")
    with pytest.raises(CalculationError) as info:
        codec.decode_request("1 + ü".encode("latin-1"))
    assert str(info.value) == "request is not UTF-8 text: invalid start byte"


# --- refused payloads -----------------------------------------------------------------


def refused(data: bytes) -> str:
    with pytest.raises(CalculationError) as info:
        codec.decode_request(data)
    assert info.value.kind == "ValueError"
    assert str(info.value).startswith("unsupported payload: ")
    return str(info.value)


def test_symbol_contradicting_its_function_is_refused(course):
    lying = course.BinaryOperator("+", operator.sub, course.Associativity.LEFT)
    tree = course.BinaryExpr(course.Constant(1), lying, course.Constant(2))
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: operator '+' does not match its function"
    )


def test_unary_symbol_contradicting_its_function_is_refused(course):
    tree = course.UnaryExpr(course.UnaryOperator("-", operator.pos), course.Constant(1))
    assert refused(course_pickle(tree, 2)) == (
        "unsupported payload: operator '-' does not match its function"
    )


def test_a_refusal_quotes_payload_objects_without_addresses(course):
    """What a refusal quotes goes back to the sender: no heap addresses."""
    symbol = course.Constant(1)
    tree = course.UnaryExpr(course.UnaryOperator(symbol, operator.pos), course.Constant(1))
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: operator <calculator.Constant> does not match its function"
    )
    generator = random.Random(1)
    tree = course.FunctionCallExpr(course.Function(generator, math.cos), [course.Constant(1)])
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: function <random.Random> does not match its callable"
    )


def test_function_name_contradicting_its_callable_is_refused(course):
    tree = course.FunctionCallExpr(course.Function("sin", math.cos), [course.Constant(1)])
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: function 'sin' does not match its callable"
    )


def test_rand_must_be_random_uniform(course):
    tree = course.FunctionCallExpr(
        course.Function("rand", max), [course.Constant(1), course.Constant(2)]
    )
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: function 'rand' does not match its callable"
    )


def test_wrong_named_constant_value_is_refused(course):
    tree = course.NamedConstant("PI", 3.0)
    assert refused(course_pickle(tree, 4)) == "unsupported payload: named constant 'PI' = 3.0"


def test_unknown_symbol_is_refused(course):
    tree = course.BinaryExpr(
        course.Constant(1),
        course.BinaryOperator("//", operator.floordiv, course.Associativity.LEFT),
        course.Constant(2),
    )
    assert refused(course_pickle(tree, 4)) == (
        "unsupported payload: _operator.floordiv is not allowed"
    )


def test_extra_attribute_is_refused(course):
    c = course.Constant(1)
    c.extra = "x"
    assert refused(course_pickle(c, 4)) == (
        "unsupported payload: Constant needs exactly the attributes ('value',)"
    )


def test_non_number_constant_is_refused(course):
    assert refused(course_pickle(course.Constant("1"), 4)) == (
        "unsupported payload: constant '1' is not a finite int or float"
    )
    assert refused(course_pickle(course.Constant(math.inf), 4)) == (
        "unsupported payload: constant inf is not a finite int or float"
    )


def test_plain_data_pickle_is_refused():
    assert (
        refused(pickle.dumps((1, 2), 4))
        == "unsupported payload: unexpected tuple in the expression"
    )


def test_trailing_bytes_are_refused(course):
    data = course.dumps(parse("1 + 1")) + b"junk"
    assert refused(data) == "unsupported payload: trailing bytes after the pickle"


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_arbitrary_globals_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    assert refused(pickle.dumps(Exploit(marker), 4)) == (
        "unsupported payload: posix.system is not allowed"
    )
    assert refused(pickle.dumps(Exploit(marker), 2)) == (
        "unsupported payload: posix.system is not allowed"
    )
    assert not marker.exists()


def test_getattr_is_only_random_uniform(course):
    """getattr in a pickle reaches any attribute: only the course's
    random.uniform passes (and an Associativity member by its name)."""

    class Sneaky:
        def __reduce__(self):
            return (getattr, (random.Random(1), "seed"))

    assert refused(pickle.dumps(Sneaky(), 4)) == (
        "unsupported payload: getattr is only allowed as random.Random.uniform "
        "and Associativity.LEFT or .RIGHT"
    )


def test_truncated_pickle_is_refused(course):
    data = course.dumps(parse("1 + 2"))
    assert refused(data[:-5]).startswith("unsupported payload: ")


# --- answers out ------------------------------------------------------------------------


def test_encode_result_text():
    assert codec.encode_result(TEXT, 6, ["3 + 3", "6"]) == b'{"result": 6, "steps": ["3 + 3", "6"]}'
    assert codec.encode_result(TEXT, 0.5, []) == b'{"result": 0.5, "steps": []}'
    assert json.loads(codec.encode_result(TEXT, math.inf, [])) == {"result": "inf", "steps": []}
    assert json.loads(codec.encode_result(TEXT, -math.inf, [])) == {"result": "-inf", "steps": []}
    assert json.loads(codec.encode_result(TEXT, math.nan, [])) == {"result": "nan", "steps": []}


def test_encode_error_text():
    assert codec.encode_error(TEXT, "ZeroDivisionError", "division by zero") == (
        b'{"error": "division by zero", "type": "ZeroDivisionError"}'
    )
    assert json.loads(codec.encode_error(TEXT, "ValueError", "caf\u00e9")) == {
        "error": "caf\u00e9",
        "type": "ValueError",
    }


def test_encode_legacy_answers_are_protocol_4_pickles():
    assert codec.encode_result(LEGACY, 6, ["6"]) == pickle.dumps((6, ["6"]), 4)
    assert codec.encode_error(LEGACY, "ZeroDivisionError", "division by zero") == pickle.dumps(
        ZeroDivisionError("division by zero"), 4
    )
    # A kind that is not a builtin exception becomes a ValueError.
    assert codec.encode_error(LEGACY, "NoSuchError", "m") == pickle.dumps(ValueError("m"), 4)
    assert codec.encode_error(LEGACY, "print", "m") == pickle.dumps(ValueError("m"), 4)


PLAIN_LOADS = r"""
import pickle, sys
for line in sys.stdin.read().split():
    obj = pickle.loads(bytes.fromhex(line))
    print(type(obj).__module__, type(obj).__name__, repr(obj))
print(sorted(m for m in sys.modules if m.startswith("twisted")))
"""


@pytest.mark.integration  # spawns a plain python
def test_legacy_answers_unpickle_in_a_plain_python(tmp_path):
    """The course client has no Twisted nor our package: our answers load with builtins alone."""
    answers = [
        codec.encode_result(LEGACY, -0.38748277824137206, ["(sin(1) / 12) * 13", "x"]),
        codec.encode_result(LEGACY, 42, []),
        codec.encode_result(LEGACY, 2**200, ["2 ** 200", str(2**200)]),
        codec.encode_error(LEGACY, "ZeroDivisionError", "division by zero"),
        codec.encode_error(LEGACY, "ValueError", "math domain error"),
        codec.encode_error(LEGACY, "SyntaxError", "unexpected end of expression"),
        codec.encode_error(LEGACY, "OverflowError", "integer result too large"),
        codec.encode_error(LEGACY, "RuntimeError", "internal server error"),
    ]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PLAIN_LOADS],
        input="\n".join(a.hex() for a in answers),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "builtins tuple (-0.38748277824137206, ['(sin(1) / 12) * 13', 'x'])",
        "builtins tuple (42, [])",
        f"builtins tuple ({2**200}, ['2 ** 200', '{2**200}'])",
        "builtins ZeroDivisionError ZeroDivisionError('division by zero')",
        "builtins ValueError ValueError('math domain error')",
        "builtins SyntaxError SyntaxError('unexpected end of expression')",
        "builtins OverflowError OverflowError('integer result too large')",
        "builtins RuntimeError RuntimeError('internal server error')",
        "[]",
    ]


# --- answers read back ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_decode_response_legacy_result(protocol):
    assert codec.decode_response(pickle.dumps((6, ["3 + 3", "6"]), protocol)) == (6, ["3 + 3", "6"])
    value, steps = codec.decode_response(pickle.dumps((0.1, []), protocol))
    assert (repr(value), steps) == ("0.1", [])


def test_decode_response_text_result():
    assert codec.decode_response(b'{"result": 6, "steps": ["3 + 3", "6"]}') == (6, ["3 + 3", "6"])
    value, _ = codec.decode_response(b'{"result": 6.0, "steps": []}')
    assert type(value) is float
    for word, expected in (("inf", math.inf), ("-inf", -math.inf)):
        assert codec.decode_response(f'{{"result": "{word}", "steps": []}}'.encode()) == (
            expected,
            [],
        )
    value, _ = codec.decode_response(b'{"result": "nan", "steps": []}')
    assert math.isnan(value)
    assert codec.decode_response(b'{"result": 1}') == (1, [])


def remote(data: bytes) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        codec.decode_response(data)
    return info.value


def test_decode_response_text_error():
    e = remote(b'{"error": "division by zero", "type": "ZeroDivisionError"}')
    assert (e.kind, e.message, str(e)) == (
        "ZeroDivisionError",
        "division by zero",
        "ZeroDivisionError: division by zero",
    )
    e = remote(b'{"error": "x"}')
    assert (e.kind, e.message) == ("Error", "x")


@pytest.mark.parametrize("protocol", [3, 4, 5])
@pytest.mark.parametrize(
    "exc",
    [
        ZeroDivisionError("division by zero"),
        ValueError("math domain error"),
        OverflowError("(34, 'Numerical result out of range')"),
        SyntaxError("bad"),
        RuntimeError("internal server error"),
        TypeError("unsupported operand type(s)"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_decode_response_builtin_exceptions(exc, protocol):
    e = remote(pickle.dumps(exc, protocol))
    assert (e.kind, e.message) == (type(exc).__name__, exc.args[0])


def test_decode_response_protocol_2_builtin_exception():
    e = remote(pickle.dumps(ZeroDivisionError("division by zero"), 2))
    assert (e.kind, e.message) == ("ZeroDivisionError", "division by zero")


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "name", ["CalculatorError", "CalculatorClientError", "CalculatorServerError"]
)
def test_decode_response_course_api_errors(api, name, protocol):
    data = pickle.dumps(getattr(api, name)("the server says no"), protocol)
    del sys.modules["api"]  # the reader must not need the course's module
    e = remote(data)
    assert (e.kind, e.message) == (name, "the server says no")


def test_decode_response_exception_with_several_args(api):
    e = remote(pickle.dumps(api.CalculatorServerError("bad", 500), 4))
    assert (e.kind, e.message) == ("CalculatorServerError", "bad, 500")


def test_decode_response_never_loads_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    e = remote(pickle.dumps(Exploit(marker), 4))
    assert e.kind == "UnreadableAnswer"
    assert e.message == "cannot read the answer: posix.system is not allowed in an answer"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "cannot read the answer: Expecting value: line 1 column 1 (char 0)"),
        (b"[1, 2]", "unexpected answer [1, 2]"),
        (b'{"result": 1, "steps": "x"}', "unexpected answer (1, 'x')"),
        (pickle.dumps([1, []], 4), "unexpected answer [1, []]"),
        (pickle.dumps((1, 2, 3), 4), "unexpected answer (1, 2, 3)"),
    ],
)
def test_decode_response_unreadable(data, message):
    e = remote(data)
    assert (e.kind, e.message) == ("UnreadableAnswer", message)


# --- limits on legacy trees ----------------------------------------------------------------


def unary_chain(course, depth):
    node = course.Constant(1)
    for _ in range(depth):
        node = course.UnaryExpr(course.UNARY["-"], node)
    return node


def test_legacy_depth_limit(course):
    assert codec.decode_request(course_pickle(unary_chain(course, 200), 4)) == parse(
        "-" * 200 + "1"
    )
    with pytest.raises(CalculationError) as info:
        codec.decode_request(course_pickle(unary_chain(course, 201), 4))
    assert str(info.value) == "expression nested deeper than 200 levels"


def test_legacy_shared_subtrees_are_counted_as_expanded(course):
    """A few hundred bytes can share one subtree 2**40 times: the node limit counts it expanded."""
    node = course.Constant(1)
    for _ in range(40):  # 2**40 leaves once expanded, a few hundred bytes pickled
        node = course.BinaryExpr(node, course.BINARY["+"], node)
    data = course_pickle(node, 4)
    assert len(data) < 2000
    with pytest.raises(CalculationError) as info:
        codec.decode_request(data)
    assert str(info.value) == f"expression has more than {MAX_NODES} terms"


def test_legacy_cycle_is_bounded(course):
    """A pickle can make a node its own operand: the depth limit ends the cycle."""
    node = course.BinaryExpr(None, course.BINARY["+"], course.Constant(1))
    node.left_operand = node
    with pytest.raises(CalculationError) as info:
        codec.decode_request(course_pickle(node, 4))
    assert str(info.value) == "expression nested deeper than 200 levels"


def test_legacy_too_many_arguments(course):
    call = course.FunctionCallExpr(course.FUNCTIONS["max"], [course.Constant(1)] * 101)
    with pytest.raises(CalculationError) as info:
        codec.decode_request(course_pickle(call, 4))
    assert str(info.value) == "max() has more than 100 arguments"


def test_legacy_wrong_arity(course):
    call = course.FunctionCallExpr(course.FUNCTIONS["sin"], [])
    with pytest.raises(CalculationError) as info:
        codec.decode_request(course_pickle(call, 4))
    assert (str(info.value), info.value.kind) == ("sin() takes 1 argument (0 given)", "TypeError")
