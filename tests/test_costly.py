"""Requests whose cost explodes are refused before they are computed: huge
integers, float overflow, deep nesting (in text and in pickles, with no
RecursionError anywhere), absurd argument counts and too much big-integer
work. Most of these would run for minutes if computed, so the suite
finishing shows the refusal comes first; the one wall-clock bound is a
generous sanity check.
"""

from __future__ import annotations

import math
import time

import pytest
from hostile import Connection, Writer, course_pickle

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.codec.prescan import MAX_OPCODES
from twisted_cacheproxy.calculator.expression import (
    MAX_ARGS,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_INT_WORK,
    MAX_NODES,
    Binary,
    CalculationError,
    Call,
    Number,
    Unary,
    evaluate,
    evaluate_with_steps,
)
from twisted_cacheproxy.calculator.parser import MAX_TOKENS, parse

TOO_LARGE = f"integer result too large (over {MAX_INT_BITS} bits)"
TOO_DEEP = f"expression nested deeper than {MAX_DEPTH} levels"
TOO_COSTLY = "expression too costly: too much work on large integers"
STEPS_TOO_LONG = "the steps do not fit in one message; ask without steps"


@pytest.fixture
def server():
    """A server that takes the largest messages the length field allows."""
    return Connection(max_message_size=65535)


def refusal(text: str) -> CalculationError:
    """The error both evaluations of ``text`` refuse it with (the same one)."""
    with pytest.raises(CalculationError) as plain:
        evaluate(parse(text))
    with pytest.raises(CalculationError) as stepped:
        evaluate_with_steps(parse(text), 10**7)
    assert (str(plain.value), plain.value.kind) == (str(stepped.value), stepped.value.kind)
    return plain.value


def assert_answered_400(server, data: bytes, message: str, *, steps: bool = False) -> None:
    status, error = server.ask(data, steps=steps)
    assert status == 400
    assert isinstance(error, codec.RemoteError)
    assert error.message == message
    assert server.open
    assert server.ask(b"2 * 21") == (200, (42, []))


# --- integers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "10 ** 10 ** 10",
        "2 ** 100000",
        "9 ** 9 ** 9",
        "pow(2, 10 ** 6)",
        "pow(10, pow(10, 10))",
        "(-3) ** 10 ** 8",
        "(2 ** 7000) * (2 ** 7000)",
        "(2 ** 13999) * 3 ** 2",
        "2 ** 13000 * 2 ** 1001",
        "7 ** 4987",
        "(2 ** 13999 - 1) ** 2",
        "max(2 ** 13999, 3) ** 3",
        "(2 ** 13999) + (2 ** 13999)",
        "-(2 ** 13999) - 2 ** 13999",
    ],
)
def test_integer_results_beyond_the_limit(text):
    error = refusal(text)
    assert (str(error), error.kind) == (TOO_LARGE, "OverflowError")


@pytest.mark.parametrize(
    "text",
    [
        "99999999999999999999999" + " * 99999999999999999999999" * 199,
        "2" + " * 2 ** 71" * 199,
        " * ".join(["(" + " * ".join(["2 ** 71"] * 100) + ")"] * 2),
    ],
    ids=["199 literals", "199 powers", "balanced"],
)
def test_growing_product_chains_stop_at_the_limit(text, server):
    assert str(refusal(text)) == TOO_LARGE
    assert_answered_400(server, text.encode(), TOO_LARGE)
    status, error = server.ask(text.encode(), steps=True)
    assert (status, error.message) in ((400, TOO_LARGE), (400, STEPS_TOO_LONG))


def test_the_largest_integers_are_still_computed():
    assert evaluate(parse("2 ** 13999")).bit_length() == MAX_INT_BITS
    assert evaluate(parse("3 ** 8833")).bit_length() == MAX_INT_BITS
    assert evaluate(parse("(2 ** 6999) * (2 ** 7000)")).bit_length() == MAX_INT_BITS
    assert evaluate(parse("pow(-2, 13999)")) == -(2**13999)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 ** (2 ** 13999)", 1),
        ("(-1) ** (2 ** 13999)", 1),
        ("(-1) ** (2 ** 13999 + 1)", -1),
        ("0 ** (2 ** 13999)", 0),
        ("pow(1, 9 ** 9 ** 2)", 1),
        ("0 ** 0", 1),
        ("1 ** -(2 ** 100)", 1.0),
    ],
)
def test_powers_of_minus_one_zero_and_one_do_not_loop_over_the_exponent(text, value):
    result = evaluate(parse(text))
    assert (result, type(result)) == (value, type(value))


def test_powers_of_one_with_huge_exponents_in_bulk(server):
    """Python loops over all the exponent's bits: 2000 such terms took 0.3 s."""
    term = "1 ** 2 ** 4000"
    text = "max(" + ", ".join([term] * MAX_ARGS) + ") + 2"
    assert evaluate(parse(text)) == 3
    assert server.ask(text.encode())[0] == 200


@pytest.mark.parametrize("digits", [4301, 5000, 20_000])
def test_integer_literals_beyond_the_digit_limit(digits, server):
    with pytest.raises(CalculationError) as info:
        parse("9" * digits)
    assert (str(info.value), info.value.kind) == ("integer literal too long", "OverflowError")
    assert_answered_400(server, b"1 + " + b"9" * digits, "integer literal too long")


def test_integer_literal_over_the_bit_limit():
    with pytest.raises(CalculationError) as info:
        parse("9" * 4250)
    assert str(info.value) == f"integer literal too large (over {MAX_INT_BITS} bits)"


def test_legacy_integer_constants_over_the_bit_limit(server):
    for value in (10**5000, -(2**MAX_INT_BITS), 2 ** (8 * 60000)):
        data = Writer().new("Constant").string("value").number(value).raw(b"sb").stop()
        message = f"integer constant too large (over {MAX_INT_BITS} bits)"
        assert_answered_400(server, data, message)


def test_three_argument_pow_keeps_to_64_bits():
    message = "pow() with a modulus takes 64-bit exponent and modulus"
    for text in ("pow(3, 2 ** 64, 7)", "pow(3, 7, 2 ** 64 + 1)", "pow(3, -(2 ** 70), 7)"):
        assert str(refusal(text)) == message
    assert evaluate(parse("pow(2 ** 13999 + 1, 2 ** 64 - 1, 2 ** 64 - 59)")) >= 0


# --- the integer work budget ------------------------------------------------------------


def size(tree) -> int:
    """The number of nodes in ``tree``."""
    count, todo = 0, [tree]
    while todo:
        node = todo.pop()
        count += 1
        if type(node) is Binary:
            todo += [node.left, node.right]
        elif type(node) is Unary:
            todo.append(node.operand)
        elif type(node) is Call:
            todo += node.args
    return count


def sums(term: str, count: int) -> str:
    """``count`` copies of ``term`` added up, in groups of at most 100 so the
    tree stays within MAX_DEPTH."""
    groups = [" + ".join([f"({term})"] * min(100, count - start)) for start in range(0, count, 100)]
    return " + ".join(f"({g})" for g in groups)


@pytest.mark.parametrize(
    "term",
    [
        "3 ** 8833 % 7",
        "(2 ** 6999 + 1) * (2 ** 6999 + 1) % 7",
        "(2 ** 13999 - 1) % (2 ** 6999 + 1)",
        "pow(3, 18446744073709551615, 18446744073709551557)",
    ],
    ids=["powers", "products", "remainders", "modular powers"],
)
def test_big_integer_work_is_bounded_per_request(term, server):
    """Each term is within the limits, all of them together are too much work for one request."""
    assert evaluate(parse(term)) >= 0  # one is fine
    count = MAX_NODES // (size(parse(term)) + 1)  # as many as the node limit allows
    text = sums(term, count)
    error = refusal(text)
    assert (str(error), error.kind) == (TOO_COSTLY, "OverflowError")
    assert_answered_400(server, text.encode(), TOO_COSTLY)


def test_work_budget_admits_up_to_its_limit():
    # One 3 ** 8833 (14,000 bits, 218 words) costs 218 ** 2 // 4 units.
    each = (int(8833 * math.log2(3)) >> 6) ** 2 // 4
    fits = MAX_INT_WORK // each
    assert fits >= 50
    assert evaluate(parse(sums("3 ** 8833 % 7", fits))) == fits * (3**8833 % 7)
    assert str(refusal(sums("3 ** 8833 % 7", fits + 1))) == TOO_COSTLY


# --- floats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e308 * 10", "float result out of range"),
        ("-1e308 * 10", "float result out of range"),
        ("1e308 + 1e308", "float result out of range"),
        ("1e300 * 1e300", "float result out of range"),
        ("1e308 / 1e-308", "float result out of range"),
        ("max(1e308 * 10, 1)", "float result out of range"),
        ("rand(-1e308, 1e308)", "float result out of range"),
        ("10.0 ** 400", "(34, 'Numerical result out of range')"),
        ("2.0 ** 1e10", "(34, 'Numerical result out of range')"),
        ("pow(10.0, 400)", "(34, 'Numerical result out of range')"),
        ("2 ** 10000 * 1.0", "int too large to convert to float"),
        ("(2 ** 13999) / 3", "integer division result too large for a float"),
        ("sqrt(2 ** 13999)", "int too large to convert to float"),
        ("1.5 ** (2 ** 2000)", "int too large to convert to float"),
        ("1e400", "number 1e400 is out of range"),
    ],
)
def test_float_overflow_is_a_400(text, message, server):
    if text == "1e400":
        with pytest.raises(CalculationError) as info:
            parse(text)
        error = info.value
    else:
        error = refusal(text)
    assert (str(error), error.kind) == (message, "OverflowError")
    assert_answered_400(server, text.encode(), message)
    status, _ = server.ask(text.encode(), steps=True)
    assert status == 400


def test_nan_and_inf_never_come_back(server):
    """JSON has no NaN nor Infinity: a calculation that makes one is a 400, not an answer."""
    for text in ("1e308 * 10 - 1e308 * 10", "sin(1e308 * 10)"):
        assert server.ask(text.encode())[0] == 400


# --- nesting, in text -------------------------------------------------------------------

DEEP_TEXT = {
    "brackets": lambda n: "(" * n + "1" + ")" * n,
    "unary minus": lambda n: "-" * n + "1",
    "unary mixed": lambda n: ("-+" * n)[:n] + "1",
    "powers": lambda n: "2" + " ** 1" * n,
    "calls": lambda n: "sin(" * n + "1" + ")" * n,
    "max calls": lambda n: "max(1, " * n + "1" + ")" * n,
    "bracketed sums": lambda n: "(1 + " * n + "1" + ")" * n,
    "opened only": lambda n: "(" * n,
    "calls opened only": lambda n: "cos(" * n,
}


@pytest.mark.parametrize("shape", list(DEEP_TEXT))
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 10_000, 100_000])
def test_deep_text_is_refused_without_recursion_error(shape, depth):
    with pytest.raises(CalculationError) as info:
        parse(DEEP_TEXT[shape](depth))
    assert str(info.value) in (
        TOO_DEEP,
        f"expression has more than {MAX_TOKENS} tokens",
        f"expression has more than {MAX_NODES} terms",
    )


@pytest.mark.parametrize("shape", list(DEEP_TEXT))
def test_deep_text_is_answered_400(shape, server):
    data = DEEP_TEXT[shape](10_000).encode()[:65_000]
    status, error = server.ask(data)
    assert status == 400
    assert isinstance(error, codec.RemoteError)
    assert server.ask(b"1") == (200, (1, []))


def assert_computed(server, data: bytes, value) -> None:
    """Answered 200 with ``value``; with steps, 200 or the steps-budget 400
    (the deepest recursion, evaluator and formatter, happens either way)."""
    status, (result, _) = server.ask(data)
    assert (status, repr(result)) == (200, repr(value))
    status, answer = server.ask(data, steps=True)
    if status == 200:
        assert answer[1][-1:] in ([], [repr(value)])
    else:
        assert (status, answer.message) == (400, STEPS_TOO_LONG)


@pytest.mark.parametrize("shape", [s for s in DEEP_TEXT if "only" not in s])
def test_nesting_at_the_limit_is_computed(shape, server):
    text = DEEP_TEXT[shape](MAX_DEPTH)
    assert_computed(server, text.encode(), evaluate(parse(text)))
    _, steps = evaluate_with_steps(parse(text), 10**7)  # no budget: every step
    assert len(steps) in (0, MAX_DEPTH + 1, 2 * MAX_DEPTH + 1)


# --- nesting, in legacy pickles (written by hand: the pickler recurses) ----------------


def deep_tree(shape: str, depth: int):
    node = Number(2)
    for _ in range(depth):
        if shape == "unary":
            node = Unary("-", node)
        elif shape == "left sums":
            node = Binary(node, "+", Number(1))
        elif shape == "powers":
            node = Binary(node, "**", Number(1))
        else:
            node = Call("sin", (node,))
    return node


SHAPES = ["unary", "left sums", "powers", "calls"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 10_000, 100_000])
def test_deep_legacy_pickles_are_refused_without_recursion_error(shape, depth):
    data = course_pickle(deep_tree(shape, depth))
    with pytest.raises(CalculationError) as info:
        codec.decode_request(data)
    if depth <= 1000:
        assert str(info.value) == TOO_DEEP
    else:  # too long to read at all
        assert str(info.value) == f"unsupported payload: more than {MAX_OPCODES} opcodes"


@pytest.mark.parametrize("shape", SHAPES)
def test_deep_legacy_pickles_are_answered_400(shape, server):
    depth = 1000
    data = course_pickle(deep_tree(shape, depth))
    assert len(data) < 65535 - 12
    assert_answered_400(server, data, TOO_DEEP)


@pytest.mark.parametrize("shape", SHAPES)
def test_legacy_nesting_at_the_limit_is_computed(shape, server):
    tree = deep_tree(shape, MAX_DEPTH)
    assert codec.decode_request(course_pickle(tree)) == tree
    assert_computed(server, course_pickle(tree), evaluate(tree))


def test_deep_nesting_of_plain_containers_in_a_pickle(server):
    """Lists nested 10,000 deep as a Constant's value: nothing walks them."""
    w = Writer().new("Constant").string("value").raw(b"]" * 10_000 + b"a" * 9_999)
    started = time.perf_counter()
    status, error = server.ask(w.raw(b"sb").stop())
    assert status == 400
    assert error.message.startswith("unsupported payload: constant [[[")
    assert time.perf_counter() - started < 2  # generous sanity bound


# --- argument counts ---------------------------------------------------------------------


def test_max_with_100000_arguments_in_text(server):
    text = "max(" + ", ".join(["1"] * 100_000) + ")"
    with pytest.raises(CalculationError) as info:
        parse(text)
    assert str(info.value) == f"expression has more than {MAX_NODES} terms"
    with pytest.raises(CalculationError) as info:
        parse("max(" + "(" * 100_000)
    assert str(info.value) == f"expression has more than {MAX_TOKENS} tokens"
    for count in (MAX_ARGS + 1, 1000, 30_000):
        data = ("min(" + ",".join(["1"] * count) + ")").encode()
        status, error = server.ask(data)
        assert status == 400
        assert error.kind in ("TypeError", "ValueError")


def test_max_with_just_over_max_args(server):
    data = ("max(" + ",".join(["1"] * (MAX_ARGS + 1)) + ")").encode()
    message = f"max() takes 1 to {MAX_ARGS} arguments ({MAX_ARGS + 1} given)"
    assert_answered_400(server, data, message)


@pytest.mark.parametrize("count", [MAX_ARGS + 1, 10_000, 30_000, 100_000])
def test_legacy_call_with_too_many_arguments(count, server):
    w = Writer().new("FunctionCallExpr").raw(b"(").string("function").function("max")
    w.string("args").raw(b"](").new("Constant").string("value").raw(b"K\x01sb").memoize("one")
    for _ in range(count - 1):
        w.recall("one")
    data = w.raw(b"eub").stop()
    with pytest.raises(CalculationError) as info:
        codec.decode_request(data)
    assert str(info.value) in (
        f"max() has more than {MAX_ARGS} arguments",
        f"unsupported payload: more than {MAX_OPCODES} opcodes",  # from about 24,000
    )
    if len(data) < 65535 - 12:
        assert_answered_400(server, data, str(info.value))


def test_nodes_beyond_the_limit(server):
    """Bushy, so that only the node count is over: max(max(1, ..., 1), ...)."""
    inner = "max(" + ",".join(["1"] * 50) + ")"
    text = "max(" + ",".join([inner] * (MAX_NODES // 50)) + ")"  # 51 nodes each, and one
    with pytest.raises(CalculationError) as info:
        parse(text)
    assert str(info.value) == f"expression has more than {MAX_NODES} terms"
    assert_answered_400(server, text.encode(), str(info.value))
