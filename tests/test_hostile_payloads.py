"""Malicious legacy pickles: each is answered 400, runs nothing, and leaves
the connection (and every later request) served as before.

The payloads are real: where a payload is meant to run a command, a control
test first shows that ``pickle.loads`` does run it.
"""

from __future__ import annotations

import builtins
import copyreg
import io
import math
import os
import pickle
import posix
import random
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from helpers import course_pickle
from hostile import FRESH, Connection, Writer
from hostile import course_pickle as raw_course_pickle

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.codec.prescan import MAX_REDUCES
from twisted_cacheproxy.calculator.expression import MAX_DEPTH, MAX_NODES
from twisted_cacheproxy.calculator.parser import parse


class Reduce:
    """Pickles as ``func(*args)``: what an attacker's ``__reduce__`` returns."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(marker) -> str:
    return f"touch {marker}"


def pickle_string(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def commands(marker) -> dict[str, bytes]:
    """Payloads that create ``marker`` when loaded by ``pickle.loads``."""
    cmd = pickle_string(touch(marker))
    return {
        "os.system via __reduce__": pickle.dumps(Reduce(os.system, touch(marker)), 4),
        "os.system by name (GLOBAL)": b"\x80\x02cos\nsystem\n" + cmd + b"\x85R.",
        "posix.system": b"\x80\x04\x8c\x05posix\x8c\x06system\x93" + cmd + b"\x85R.",
        "getattr(__import__('os'), 'system')": (
            b"\x80\x02c__builtin__\ngetattr\nc__builtin__\n__import__\n"
            + pickle_string("os")
            + b"\x85R"
            + pickle_string("system")
            + b"\x86R"
            + cmd
            + b"\x85R."
        ),
        "builtins.getattr chain, protocol 4": (
            b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93\x8c\x08builtins\x8c\n__import__\x93"
            + pickle_string("os")
            + b"\x85R"
            + pickle_string("system")
            + b"\x86R"
            + cmd
            + b"\x85R."
        ),
        "builtins.eval": pickle.dumps(
            Reduce(builtins.eval, f"__import__('os').system({touch(marker)!r})"), 4
        ),
        "builtins.exec": pickle.dumps(
            Reduce(builtins.exec, f"__import__('os').system({touch(marker)!r})"), 2
        ),
        "subprocess.Popen": pickle.dumps(Reduce(subprocess.Popen, ["touch", str(marker)]), 4),
        "INST": b"\x80\x02(" + cmd + b"ios\nsystem\n.",
        "OBJ": b"\x80\x02(cos\nsystem\n" + cmd + b"o.",
    }


@pytest.mark.parametrize("name", list(commands("x")))
def test_control_the_payload_runs_its_command_under_pickle_loads(name, tmp_path):
    """Each command has run by the time ``pickle.loads`` returns (the Popen
    once waited for), so the refusal test below needs no wait."""
    marker = tmp_path / "ran"
    result = pickle.loads(commands(marker)[name])
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


@pytest.fixture
def server(course):
    """A server connection; ``course`` puts the course's classes in sys.modules."""
    return Connection()


def assert_refused(server, data: bytes, message: str | None = None) -> codec.RemoteError:
    """``data`` is answered 400 and the same connection still answers 200."""
    status, error = server.ask(data)
    assert status == 400
    assert isinstance(error, codec.RemoteError)
    if message is not None:
        assert error.message == message
    assert server.open
    assert server.ask(b"1 + 2") == (200, (3, []))
    assert server.ask(course_pickle(server_tree(), 4)) == (200, (7, []))
    return error


def server_tree():
    course = sys.modules["calculator"]
    return course.build(parse("1 + 2 * 3"))


@pytest.mark.parametrize("name", list(commands("x")))
def test_command_payloads_are_refused_and_run_nothing(server, name, tmp_path):
    marker = tmp_path / "pwned"
    error = assert_refused(server, commands(marker)[name])
    assert error.kind == "ValueError"
    assert error.message.startswith("unsupported payload: ")
    # Refused at the global or opcode that would call it, before any call...
    assert error.message.endswith(" is not allowed")
    # ...and nothing ran: a run leaves the marker before loads returns (the control).
    assert not marker.exists()


def test_refusals_name_the_global(server, tmp_path):
    payloads = commands(tmp_path / "pwned")
    assert (
        assert_refused(server, payloads["posix.system"]).message
        == "unsupported payload: posix.system is not allowed"
    )
    assert (
        assert_refused(server, payloads["builtins.eval"]).message
        == "unsupported payload: builtins.eval is not allowed"
    )
    assert (
        assert_refused(server, payloads["getattr(__import__('os'), 'system')"]).message
        == "unsupported payload: __builtin__.__import__ is not allowed"
    )
    assert (
        assert_refused(server, payloads["INST"]).message
        == "unsupported payload: pickle opcode b'i' is not allowed"
    )
    assert not (tmp_path / "pwned").exists()


# --- a malicious object inside an otherwise valid expression --------------------------


NESTED = [
    "as an operand",
    "deep in a call's arguments",
    "as a constant's value",
    "as an operator's function",
    "as a function's callable",
    "as an operator's associativity",
    "as a key of an object's state",
]


def nested_payload(course, where: str, marker) -> object:
    run = Reduce(os.system, touch(marker))
    one = course.Constant(1)
    plus = course.BINARY["+"]
    if where == "as an operand":
        return course.BinaryExpr(one, plus, run)
    if where == "deep in a call's arguments":
        product = course.BinaryExpr(one, course.BINARY["*"], run)
        negated = course.UnaryExpr(course.UNARY["-"], product)
        return course.FunctionCallExpr(course.FUNCTIONS["max"], [one, negated])
    if where == "as a constant's value":
        return course.BinaryExpr(one, plus, course.Constant(run))
    if where == "as an operator's function":
        operator = course.BinaryOperator("+", os.system, course.Associativity.LEFT)
        return course.BinaryExpr(one, operator, one)
    if where == "as a function's callable":
        return course.FunctionCallExpr(course.Function("sin", builtins.eval), [one])
    if where == "as an operator's associativity":
        return course.BinaryExpr(one, course.BinaryOperator("+", plus.function, run), one)
    constant = course.Constant(1)
    constant.__dict__[run] = 1  # hashable, so it can be a key
    return course.BinaryExpr(one, plus, constant)


@pytest.mark.parametrize("where", NESTED)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_object_nested_in_a_valid_expression(server, course, where, protocol, tmp_path):
    marker = tmp_path / "pwned"
    data = course_pickle(nested_payload(course, where, marker), protocol)
    assert b"calculator" in data
    error = assert_refused(server, data)
    assert error.message.startswith("unsupported payload: ")
    assert not marker.exists()


# --- random.Random and getattr --------------------------------------------------------

GOOD_STATE = random.Random(1).getstate()
GOOD_INTS = GOOD_STATE[1]


def rand_call(
    function: Callable[[Writer], object] | None = None, *, state: object = FRESH
) -> bytes:
    """``rand(1, 2)`` whose Function's callable is what ``function`` writes
    (by default ``getattr(Random(<state>), 'uniform')``)."""
    w = Writer()
    w.new("FunctionCallExpr").raw(b"(").string("function")
    w.new("Function").raw(b"(").string("name").string("rand").string("function")
    if function is None:
        w.random_uniform(state)
    else:
        function(w)
    w.raw(b"ub").string("args").raw(b"](")
    for value in (1, 2):
        w.new("Constant").string("value").number(value).raw(b"sb")
    return w.raw(b"eub").stop()


def test_control_a_well_formed_generator_is_accepted(server):
    status, (value, _) = server.ask(rand_call(state=GOOD_STATE))
    assert status == 200
    assert 1 <= value <= 2


@pytest.mark.parametrize(
    "state",
    [
        (2, GOOD_INTS, None),
        (3, GOOD_INTS[:-1], None),
        (3, (*GOOD_INTS, 0), None),
        (3, (-1, *GOOD_INTS[1:]), None),
        (3, (2**32, *GOOD_INTS[1:]), None),
        (3, (0.5, *GOOD_INTS[1:]), None),
        (3, ("x", *GOOD_INTS[1:]), None),
        (3, GOOD_INTS, "not a gauss value"),
        (3, GOOD_INTS),
        (3, GOOD_INTS, None, None),
        (3, (), None),
        None,
        "state",
        12345,
    ],
    ids=lambda s: repr(s)[:30],
)
def test_random_state_of_the_wrong_shape(server, state):
    error = assert_refused(server, rand_call(state=state))
    assert error.message in (
        "unsupported payload: random.Random state of the wrong shape",
        "unsupported payload: getattr is only allowed as random.Random.uniform "
        "and Associativity.LEFT or .RIGHT",
    )


def good_random(w: Writer) -> None:
    w.global_("random", "Random").raw(b")R").plain(GOOD_STATE).raw(b"b")


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (good_random, b"\x8c\x04seed"),
        (good_random, b"\x8c\x08getstate"),
        (good_random, b"\x8c\x0d__reduce_ex__"),
        (good_random, b"\x8c\x08uniform "),
        (good_random, b"K\x01"),
        (lambda w: w.global_("random", "Random").raw(b")R"), b"\x8c\x07uniform"),
        (lambda w: w.global_("random", "Random"), b"\x8c\x07uniform"),
        (lambda w: w.global_("calculator", "Constant"), b"\x8c\x08__init__"),
        (lambda w: w.new("Constant").string("value").raw(b"K\x01sb"), b"\x8c\x07uniform"),
        (lambda w: w.global_("math", "sin"), b"\x8c\x07uniform"),
        (lambda w: w.string("os"), b"\x8c\x06system"),
        (lambda w: w.raw(b"N"), b"\x8c\x07uniform"),
    ],
    ids=[
        "Random.seed",
        "Random.getstate",
        "Random.__reduce_ex__",
        "Random.'uniform '",
        "Random.1",
        "Random without state",
        "the Random class",
        "calculator.Constant.__init__",
        "a Constant",
        "math.sin",
        "'os'.system",
        "None",
    ],
)
def test_getattr_on_anything_but_a_random_uniform(server, target, name):
    def getattr_of(w: Writer) -> None:
        w.global_("builtins", "getattr")
        target(w)
        w.raw(name + b"\x86R")

    error = assert_refused(server, rand_call(getattr_of))
    assert error.message == (
        "unsupported payload: getattr is only allowed as random.Random.uniform "
        "and Associativity.LEFT or .RIGHT"
    )


def test_random_with_a_seed_argument_is_refused(server):
    def seeded(w: Writer) -> None:
        w.global_("builtins", "getattr").global_("random", "Random").raw(b"K\x05\x85R")
        w.string("uniform").raw(b"\x86R")

    assert_refused(server, rand_call(seeded))


# --- recursive, shared and self-referencing structures ---------------------------------


def test_self_referencing_binary_expression(server, course):
    node = course.BinaryExpr(None, course.BINARY["+"], course.Constant(1))
    node.left_operand = node  # the pickle memo makes it a cycle
    data = course_pickle(node, 4)
    assert_refused(server, data, f"expression nested deeper than {MAX_DEPTH} levels")


def test_call_whose_argument_list_holds_the_call(server, course):
    args = [course.Constant(1)]
    call = course.FunctionCallExpr(course.FUNCTIONS["max"], args)
    args.append(call)
    assert_refused(
        server, course_pickle(call, 4), f"expression nested deeper than {MAX_DEPTH} levels"
    )


def test_exponential_dag_through_memo_sharing(server, course):
    node = course.Constant(1)
    for _ in range(60):  # 2**60 leaves once expanded, about a kilobyte pickled
        node = course.BinaryExpr(node, course.BINARY["*"], node)
    data = course_pickle(node, 4)
    assert len(data) < 2000
    assert_refused(server, data, f"expression has more than {MAX_NODES} terms")


def tuple_bomb(levels: int) -> bytes:
    """Opcodes pushing t(levels), where t(0) = () and t(n+1) = (t(n), t(n)):
    a few bytes per level, 2**levels items for anything that walks it."""
    return b")" + b"q\x01h\x01\x86" * levels


def test_nest_of_shared_tuples_as_a_dict_key(server):
    """Hashing the key walks all 2**60 paths: this hung the server for good."""
    data = b"\x80\x04}" + tuple_bomb(60) + b"Ns."
    started = time.perf_counter()
    assert_refused(server, data, "unsupported payload: dictionary keys must be strings")
    assert time.perf_counter() - started < 1  # generous: it is refused unread


@pytest.mark.parametrize(
    "prefix",
    [
        Writer().global_("calculator", "Associativity"),  # an Enum lookup hashes it
        Writer().global_("calculator", "Constant"),  # only (0 or 1) args are allowed
    ],
    ids=["Associativity", "Constant"],
)
def test_nest_of_shared_tuples_as_an_argument(server, prefix):
    data = bytes(prefix.out) + tuple_bomb(60) + b"\x85R."
    started = time.perf_counter()
    assert_refused(server, data)
    assert time.perf_counter() - started < 1


def test_nest_of_shared_tuples_in_a_named_constant(server):
    """Its name is hashed by the lookup, and was written into the error message."""
    w = Writer().new("NamedConstant").raw(b"(").string("name").raw(tuple_bomb(60))
    data = w.string("value").number(math.pi).raw(b"ub").stop()
    error = assert_refused(server, data)
    assert error.message.startswith("unsupported payload: named constant ((")
    assert len(error.message) < 200


def test_deeply_nested_list_as_a_constant(server):
    """Its repr in the error message raised RecursionError: a 500."""
    w = Writer().new("Constant").string("value").raw(b"]" * 3000 + b"a" * 2999)
    assert_refused(server, w.raw(b"sb").stop())


def test_huge_integer_as_a_named_constant_value(server):
    """Its repr in the error message exceeded the int-to-string limit: a 500."""
    w = Writer().new("NamedConstant").raw(b"(").string("name").string("PI").string("value")
    data = w.number(10**5000).raw(b"ub").stop()
    assert_refused(server, data, "unsupported payload: named constant 'PI' = <int>")


# --- memo indexes, opcodes the course never uses -----------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x04Nr\xff\xff\xff\xff.", "memo index 4294967295 out of range"),
        (b"\x80\x04Nr\x00\x00\x00\x10.", "memo index 268435456 out of range"),
        (b"\x80\x04Nq\xff.", "memo index 255 out of range"),
        (b"\x80\x04j\xff\xff\xff\xff.", "memo index 4294967295 not set"),
        (b"\x80\x04h\x00.", "memo index 0 not set"),
        (b"\x80\x04Np4294967295\n.", "pickle opcode b'p' is not allowed"),
        (b"\x80\x04g4294967295\n.", "pickle opcode b'g' is not allowed"),
        (b"\x80\x04\x82\x01.", "pickle opcode b'\\x82' is not allowed"),
        (b"\x80\x04\x83\x01\x00.", "pickle opcode b'\\x83' is not allowed"),
        (b"\x80\x04\x84\x01\x00\x00\x00.", "pickle opcode b'\\x84' is not allowed"),
        (b"\x80\x04\x8f(K\x01\x90.", "pickle opcode b'\\x8f' is not allowed"),
        (b"\x80\x04(K\x01\x91.", "pickle opcode b'\\x91' is not allowed"),
        (b"\x80\x04(K\x01K\x02l.", "pickle opcode b'l' is not allowed"),
        (
            b"\x80\x04\x96\x01\x00\x00\x00\x00\x00\x00\x00x.",
            "pickle opcode b'\\x96' is not allowed",
        ),
        (b"\x80\x05\x97.", "pickle opcode b'\\x97' is not allowed"),
        (b"\x80\x04N2.", "pickle opcode b'2' is not allowed"),
        (b"\x80\x04\x8c\x02id\x8c\x01x\x93)}\x92.", "pickle opcode b'\\x92' is not allowed"),
        (b"\x80\x04}K\x01Ns.", "dictionary keys must be strings"),
        (b"\x80\x04}(\x8c\x01aK\x01K\x02K\x03u.", "dictionary keys must be strings"),
        (b"\x80\x04}(\x8c\x01aK\x01K\x02u.", "dictionary keys must be strings"),
        (b"\x80\x040.", "pickle stack underflow"),
        (b"\x80\x04N(\x85.", "pickle stack underflow"),
        (b"\x80\x04N.junk", "trailing bytes after the pickle"),
        (b"\x80\x04N", "pickle data was truncated"),
        (b"\x80\x04X\xff\xff\xff\x7fabc.", "pickle data was truncated"),
        (b"\x80\x04\x8b\xff\xff\xff\xff.", "negative length"),
        (b"\x80\x04N\x94" + b"\x94" * 10 + b"u.", "could not find MARK"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_opcode_stream_refusals(server, data, message):
    assert_refused(server, data, f"unsupported payload: {message}")


def test_persistent_ids_are_refused(server, tmp_path):
    class Persisting(pickle.Pickler):
        def persistent_id(self, obj):
            return f"touch {tmp_path / 'pwned'}" if isinstance(obj, Reduce) else None

    for protocol, opcode in ((0, "P"), (2, "Q"), (4, "Q")):
        buf = io.BytesIO()
        Persisting(buf, protocol).dump(Reduce(print))
        data = buf.getvalue()
        if protocol == 0:
            data = b"\x80\x02" + data  # a legacy request starts with PROTO
        message = f"unsupported payload: pickle opcode b'{opcode}' is not allowed"
        assert_refused(server, data, message)
    assert not (tmp_path / "pwned").exists()


def test_extension_registry_codes_are_refused(server, tmp_path, monkeypatch):
    """A process that registered posix.system as extension 240 pickles it as EXT1."""
    monkeypatch.setitem(copyreg._extension_registry, ("posix", "system"), 240)
    monkeypatch.setitem(copyreg._inverted_registry, 240, ("posix", "system"))
    marker = tmp_path / "pwned"
    data = pickle.dumps(Reduce(posix.system, touch(marker)), 4)
    assert b"\x82\xf0" in data
    assert_refused(server, data, "unsupported payload: pickle opcode b'\\x82' is not allowed")
    assert not marker.exists()
    pickle.loads(data)
    assert marker.exists()
    copyreg._extension_cache.pop(240, None)


def test_huge_memo_index_is_refused_before_allocating(server):
    """The C unpickler grows its memo array to twice the index it is given."""
    data = b"\x80\x04N" + b"r" + (2**31).to_bytes(4, "little") + b"."
    started = time.perf_counter()
    assert_refused(server, data)
    assert time.perf_counter() - started < 1


# --- payloads that changed the server for every later request ----------------------------


def test_build_cannot_rename_a_shared_function_token(server):
    """BUILD with slot state used to set math.sin's token to anything."""
    w = Writer().global_("math", "sin").raw(b"N}").string("qualified").string("_operator.add")
    assert_refused(server, w.raw(b"s\x86b").stop())
    assert server.ask(b"sin(0)") == (200, (0.0, []))
    assert server.ask(raw_course_pickle(parse("sin(0) + 1"))) == (200, (1.0, []))


@pytest.mark.parametrize(
    "target",
    [
        lambda w: w.global_("calculator", "Associativity").raw(b"K\x00\x85R"),
        lambda w: w.global_("calculator", "Associativity"),
        lambda w: w.global_("builtins", "getattr"),
        lambda w: w.global_("random", "Random"),
        lambda w: w.global_("random", "Random").raw(b")R"),
        lambda w: w.global_("calculator", "Constant"),
        lambda w: w.global_("_operator", "add"),
    ],
    ids=["Associativity(0)", "Associativity", "getattr", "Random", "Random()", "Constant", "add"],
)
@pytest.mark.parametrize("slots", [False, True], ids=["dict state", "slot state"])
def test_build_cannot_change_what_find_class_hands_out(server, target, slots):
    w = Writer()
    target(w)
    if slots:
        w.raw(b"N")
    w.raw(b"}").string("_value_").raw(b"K\x07s")
    if slots:
        w.raw(b"\x86")
    assert_refused(server, w.raw(b"b").stop())
    assert codec.legacy.Associativity.LEFT.value == 0
    assert server.ask(raw_course_pickle(parse("2 ** 3 - 1"))) == (200, (7, []))


def test_many_generators_sharing_one_state_are_refused(server):
    """Each REDUCE + BUILD on one memoized state cost a 625-item check."""
    w = Writer().global_("random", "Random").plain(GOOD_STATE).memoize("state").raw(b"0")
    for _ in range(MAX_REDUCES + 1):
        w.global_("random", "Random").raw(b")R")
        w.recall("state")
        w.raw(b"b0")
    assert_refused(
        server, w.raw(b"N").stop(), f"unsupported payload: more than {MAX_REDUCES} REDUCE opcodes"
    )


def test_one_generator_takes_one_state(server):
    w = Writer().global_("random", "Random").raw(b")R").plain(GOOD_STATE).raw(b"b")
    w.plain(GOOD_STATE).raw(b"b")
    assert_refused(server, w.stop(), "unsupported payload: random.Random state of the wrong shape")


# --- objects the unpickler makes but no BUILD completes ----------------------------------


@pytest.mark.parametrize(
    "data",
    [
        Writer().global_("calculator", "Constant").raw(b")\x81").stop(),
        Writer().new("BinaryExpr").raw(b"0").stop(),
        Writer().global_("calculator", "BinaryExpr").raw(b")R").stop(),
        Writer().global_("calculator", "Constant").raw(b"(K\x01K\x02tR").stop(),
        Writer().global_("calculator", "Constant").raw(b"K\x05\x85R").stop(),  # REDUCE: allowed
    ],
    ids=["NEWOBJ only", "NEWOBJ, no BUILD", "REDUCE ()", "REDUCE 2 args", "REDUCE 1 arg"],
)
def test_stand_ins_without_their_attributes(server, data):
    if data.endswith(b"\x85R."):
        assert server.ask(data) == (200, (5, []))
    else:
        assert_refused(server, data)


def test_binary_expression_whose_operator_was_never_built(server):
    w = Writer().new("BinaryExpr").raw(b"(").string("left_operand")
    w.new("Constant").string("value").raw(b"K\x01sb")
    w.string("operator").global_("calculator", "BinaryOperator").raw(b")\x81")
    w.string("right_operand").new("Constant").string("value").raw(b"K\x01sb")
    error = assert_refused(server, w.raw(b"ub").stop())
    assert error.message == "unsupported payload: BinaryOperator without its attributes"


def test_no_refusal_is_a_server_error(server, tmp_path):
    """Everything above, once more, on one connection: never a 500."""
    for data in commands(tmp_path / "pwned").values():
        status, _ = server.ask(data)
        assert status == 400
    assert server.open


# --- answers from a hostile server or proxy (the client's side) --------------------------


@pytest.mark.parametrize(
    "answer",
    [
        Writer().global_("builtins", "ValueError").raw(tuple_bomb(60) + b"\x85R").stop(),
        Writer().raw(b"K\x01](" + tuple_bomb(60) + b"e\x86").stop(),
        Writer().raw(tuple_bomb(60) + b"]\x86").stop(),
        Writer().raw(tuple_bomb(60) + b"\x85").stop(),
        Writer().global_("builtins", "ValueError").number(10**5000).raw(b"\x85R").stop(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"error": ' + b"[" * 500 + b"]" * 500 + b"}",
    ],
    ids=["error argument", "a step", "the result", "the answer", "huge int", "deep JSON", "error"],
)
def test_hostile_answers_are_read_at_a_bounded_cost(answer):
    """repr() or str() of these took minutes, or raised RecursionError or ValueError."""
    started = time.perf_counter()
    try:
        value, steps = codec.decode_response(answer)
    except codec.RemoteError as e:
        shown = str(e)
    else:  # a step that is not a string is shown as a short repr
        assert value == 1
        shown = "".join(steps)
    assert len(shown) < 1000
    assert time.perf_counter() - started < 1  # generous sanity bound
