"""Payload encodings: request data to an expression, answers to response data.

Two encodings, told apart by the first byte of the request data: ``0x80`` (a
pickle PROTO opcode) is the course programs' legacy pickle encoding, anything
else is UTF-8 text answered with JSON. This is the only module that reads or
writes pickles. Legacy data is read by an allow-list unpickler that builds
harmless stand-ins, which are then checked and turned into our own
`expression` model: nothing named in a payload is ever called.
"""

from __future__ import annotations

import builtins
import enum
import io
import json
import math
import pickle
import pickletools
import random
import sys
import types
from typing import Any

from .expression import (
    BINARY,
    CONSTANTS,
    MAX_ARGS,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_NODES,
    UNARY,
    Binary,
    CalculationError,
    Call,
    Constant,
    Node,
    Number,
    Real,
    Unary,
    check_call,
)

TEXT = "text"
LEGACY = "legacy"
_PROTO = 0x80
#: Pickle protocol of our legacy answers (Python 3.4+ reads it).
ANSWER_PROTOCOL = 4


def encoding_of(data: bytes) -> str:
    """The encoding of a request, from its first byte."""
    return LEGACY if data[:1] == b"\x80" else TEXT


class RemoteError(Exception):
    """An error answer read back by a client: its type name and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# --- answers --------------------------------------------------------------


def _json_number(value: Real) -> Real | str:
    if type(value) is float and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    return value


def _builtin_exception(kind: str) -> type[BaseException]:
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return ValueError


def encode_result(encoding: str, value: Real, steps: list[str]) -> bytes:
    """Response data for a successful calculation."""
    if encoding == LEGACY:
        return pickle.dumps((value, steps), ANSWER_PROTOCOL)
    return json.dumps({"result": _json_number(value), "steps": steps}, ensure_ascii=False).encode()


def encode_error(encoding: str, kind: str, message: str) -> bytes:
    """Response data for an error; legacy errors are builtin exceptions, so
    any Python can unpickle them."""
    if encoding == LEGACY:
        return pickle.dumps(_builtin_exception(kind)(message), ANSWER_PROTOCOL)
    return json.dumps({"error": message, "type": kind}, ensure_ascii=False).encode()


# --- requests ---------------------------------------------------------------


def decode_request(data: bytes) -> Node:
    """The expression carried by request data; `CalculationError` if refused."""
    if not data:
        raise CalculationError("empty request", "SyntaxError")
    if data[0] == _PROTO:
        return _decode_legacy(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalculationError(f"request is not UTF-8 text: {e.reason}") from None
    from .parser import parse

    return parse(text)


def encode_request(node: Node, encoding: str = TEXT) -> bytes:
    """Request data for ``node``; legacy data is pickled exactly the way the
    course client pickles its ``calculator`` objects."""
    if encoding == TEXT:
        from .expression import format_node

        return format_node(node).encode()
    saved = sys.modules.get("calculator")
    sys.modules["calculator"] = _CALCULATOR
    try:
        return pickle.dumps(_to_pickled(node, {}), ANSWER_PROTOCOL)
    finally:
        if saved is None:
            del sys.modules["calculator"]
        else:
            sys.modules["calculator"] = saved


# --- the course's `calculator` classes, as stand-ins ------------------------


class _Pickled:
    """A ``calculator.*`` object: only data, the attributes the protocol lists."""

    __module__ = "calculator"
    fields: tuple[str, ...] = ()

    def __init__(self, *values: Any) -> None:
        self.__dict__.update(zip(self.fields, values, strict=False))

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or list(state) != list(self.fields):
            raise pickle.UnpicklingError(
                f"{type(self).__name__} needs exactly the attributes {self.fields}"
            )
        self.__dict__.update(state)


def _standin(name: str, *fields: str) -> type[_Pickled]:
    cls = type(name, (_Pickled,), {"fields": fields, "__module__": "calculator"})
    cls.__qualname__ = name
    return cls


PConstant = _standin("Constant", "value")
PNamedConstant = _standin("NamedConstant", "name", "value")
PBinaryExpr = _standin("BinaryExpr", "left_operand", "operator", "right_operand")
PBinaryOperator = _standin("BinaryOperator", "symbol", "function", "associativity")
PUnaryExpr = _standin("UnaryExpr", "operator", "operand")
PUnaryOperator = _standin("UnaryOperator", "symbol", "function")
PFunctionCallExpr = _standin("FunctionCallExpr", "function", "args")
PFunction = _standin("Function", "name", "function")


class Associativity(enum.Enum):
    """``calculator.Associativity``: pickled as a REDUCE of its value."""

    __module__ = "calculator"
    LEFT = 0
    RIGHT = 1


_CALCULATOR = types.ModuleType("calculator", "stand-ins for the course's classes")
for _cls in (
    PConstant,
    PNamedConstant,
    PBinaryExpr,
    PBinaryOperator,
    PUnaryExpr,
    PUnaryOperator,
    PFunctionCallExpr,
    PFunction,
    Associativity,
):
    setattr(_CALCULATOR, _cls.__name__, _cls)


class _Global:
    """A function named in a payload: a token we look up, never call."""

    __slots__ = ("qualified",)

    def __init__(self, module: str, name: str) -> None:
        self.qualified = f"{module}.{name}"


class _RandomState:
    """Stands in for ``random.Random``: accepts only a well-formed state."""

    state_ok = False

    def __setstate__(self, state: Any) -> None:
        if not (
            type(state) is tuple
            and len(state) == 3
            and state[0] == 3
            and type(state[1]) is tuple
            and len(state[1]) == 625
            and all(type(x) is int and 0 <= x < 2**32 for x in state[1])
            and (state[2] is None or type(state[2]) is float)
        ):
            raise pickle.UnpicklingError("random.Random state of the wrong shape")
        self.state_ok = True


_UNIFORM = _Global("random.Random", "uniform")


def _getattr(obj: Any, name: Any) -> _Global:
    """Stands in for ``builtins.getattr``: only ``<Random>.uniform``."""
    if type(obj) is _RandomState and obj.state_ok and name == "uniform":
        return _UNIFORM
    raise pickle.UnpicklingError("getattr is only allowed as random.Random.uniform")


_BINARY_FUNCTIONS = {
    "+": "_operator.add",
    "-": "_operator.sub",
    "*": "_operator.mul",
    "/": "_operator.truediv",
    "%": "_operator.mod",
    "**": "_operator.pow",
}
_UNARY_FUNCTIONS = {"-": "_operator.neg", "+": "_operator.pos"}
_CALL_FUNCTIONS = {
    "sin": "math.sin",
    "cos": "math.cos",
    "tan": "math.tan",
    "sqrt": "math.sqrt",
    "log": "math.log",
    "max": "builtins.max",
    "min": "builtins.min",
    "pow": "builtins.pow",
    "rand": _UNIFORM.qualified,
}
_TOKENS = {
    q: _Global(*q.split("."))
    for q in [*_BINARY_FUNCTIONS.values(), *_UNARY_FUNCTIONS.values()]
    + [q for q in _CALL_FUNCTIONS.values() if q != _UNIFORM.qualified]
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("calculator", cls.__name__): cls for cls in vars(_CALCULATOR).values() if isinstance(cls, type)
}
_ALLOWED.update({tuple(q.split(".")): token for q, token in _TOKENS.items()})
_ALLOWED[("builtins", "getattr")] = _getattr
_ALLOWED[("random", "Random")] = _RandomState
_PY2_MODULES = {"__builtin__": "builtins"}  # protocol 2 names builtins so


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves exactly the names of PROTOCOL.md 3.2, to stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((_PY2_MODULES.get(module, module), name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return found


# Opcodes a course pickle can contain; anything else (extension registry,
# persistent ids, INST/OBJ, out-of-band buffers) is refused unread.
_REFUSED_OPCODES = {
    "PERSID",
    "BINPERSID",
    "EXT1",
    "EXT2",
    "EXT4",
    "INST",
    "OBJ",
    "NEWOBJ_EX",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
    "BYTEARRAY8",
}
_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
_OPCODES = {op.code.encode("latin-1")[0]: (op.name, op.arg) for op in pickletools.opcodes}


def _scan(data: bytes) -> None:
    """Walk the opcodes once, before unpickling: refuse unknown opcodes and
    memo indexes beyond the payload's length (the C unpickler allocates
    memo space up to the index it is given)."""
    limit = len(data)
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"pickle opcode {opcode.name} is not allowed")
        if opcode.name in _MEMO_OPCODES and not 0 <= int(arg) < limit:
            raise pickle.UnpicklingError(f"memo index {arg} out of range")


def _decode_legacy(data: bytes) -> Node:
    try:
        _scan(data)
        stream = io.BytesIO(data)
        obj = _AllowListUnpickler(stream).load()
        if stream.tell() != len(data):
            raise pickle.UnpicklingError("trailing bytes after the pickle")
    except CalculationError:
        raise
    except Exception as e:  # the unpickler raises many kinds on hostile data
        raise CalculationError(f"unsupported payload: {e}", "ValueError") from None
    return _Converter().convert(obj, 0)


class _Converter:
    """Checks a stand-in graph and builds a fresh tree from it, counting
    nodes and depth as it goes (so shared or cyclic graphs are bounded)."""

    def __init__(self) -> None:
        self.nodes = 0

    def convert(self, obj: Any, depth: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculationError(f"expression has more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise CalculationError(f"expression nested deeper than {MAX_DEPTH} levels")
        kind = type(obj)
        if kind is PConstant:
            return Number(_number(obj.value))
        if kind is PNamedConstant:
            name = obj.name
            if name not in CONSTANTS or obj.value != CONSTANTS[name]:
                raise _unsupported(f"named constant {name!r} = {obj.value!r}")
            return Constant(name)
        if kind is PBinaryExpr:
            op = obj.operator
            if type(op) is not PBinaryOperator or type(op.associativity) is not Associativity:
                raise _unsupported("BinaryExpr.operator is not a BinaryOperator")
            symbol = _symbol(op, _BINARY_FUNCTIONS)
            left = self.convert(obj.left_operand, depth + 1)
            return Binary(left, symbol, self.convert(obj.right_operand, depth + 1))
        if kind is PUnaryExpr:
            op = obj.operator
            if type(op) is not PUnaryOperator:
                raise _unsupported("UnaryExpr.operator is not a UnaryOperator")
            return Unary(_symbol(op, _UNARY_FUNCTIONS), self.convert(obj.operand, depth + 1))
        if kind is PFunctionCallExpr:
            function, args = obj.function, obj.args
            if type(function) is not PFunction or type(args) is not list:
                raise _unsupported("FunctionCallExpr needs a Function and a list")
            name = function.name
            if _CALL_FUNCTIONS.get(name) != _qualified(function.function):
                raise _unsupported(f"function {name!r} does not match its callable")
            if len(args) > MAX_ARGS:
                raise CalculationError(f"{name}() has more than {MAX_ARGS} arguments")
            check_call(name, len(args))
            return Call(name, tuple(self.convert(a, depth + 1) for a in args))
        raise _unsupported(f"unexpected {kind.__name__} in the expression")


def _qualified(function: Any) -> str | None:
    return function.qualified if type(function) is _Global else None


def _symbol(op: Any, table: dict[str, str]) -> str:
    symbol = op.symbol
    if type(symbol) is not str or table.get(symbol) != _qualified(op.function):
        raise _unsupported(f"operator {symbol!r} does not match its function")
    if table is _BINARY_FUNCTIONS:
        assert symbol in BINARY
    else:
        assert symbol in UNARY
    return symbol


def _number(value: Any) -> Real:
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise CalculationError(
                f"integer constant too large (over {MAX_INT_BITS} bits)", "OverflowError"
            )
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise _unsupported(f"constant {value!r} is not a finite int or float")


def _unsupported(why: str) -> CalculationError:
    return CalculationError(f"unsupported payload: {why}", "ValueError")


# --- building legacy requests (the client) ----------------------------------

_OPERATORS = {
    **{s: PBinaryOperator(s, BINARY[s], Associativity.LEFT) for s in BINARY},
    "**": PBinaryOperator("**", BINARY["**"], Associativity.RIGHT),
}
_UNARY_OPERATORS = {s: PUnaryOperator(s, UNARY[s]) for s in UNARY}


def _to_pickled(node: Node, functions: dict[str, _Pickled]) -> _Pickled:
    """Our tree as the course client's objects (operators shared, as it does)."""
    kind = type(node)
    if kind is Number:
        return PConstant(node.value)
    if kind is Constant:
        return PNamedConstant(node.name, node.value)
    if kind is Binary:
        return PBinaryExpr(
            _to_pickled(node.left, functions),
            _OPERATORS[node.op],
            _to_pickled(node.right, functions),
        )
    if kind is Unary:
        return PUnaryExpr(_UNARY_OPERATORS[node.op], _to_pickled(node.operand, functions))
    if node.name not in functions:
        impl = (
            random.Random().uniform
            if node.name == "rand"
            else getattr(
                math if node.name in ("sin", "cos", "tan", "sqrt", "log") else builtins, node.name
            )
        )
        functions[node.name] = PFunction(node.name, impl)
    return PFunctionCallExpr(functions[node.name], [_to_pickled(a, functions) for a in node.args])


# --- reading answers (the client) -------------------------------------------


class _CourseError(Exception):
    """Stands in for the course server's ``api.Calculator*Error`` classes."""

    __module__ = "api"


_API_ERRORS = {
    name: type(name, (_CourseError,), {"__module__": "api"})
    for name in ("CalculatorError", "CalculatorClientError", "CalculatorServerError")
}


class _AnswerUnpickler(pickle.Unpickler):
    """Reads legacy answers: plain data, builtin exceptions, ``api`` errors."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if module == "api" and name in _API_ERRORS:
            return _API_ERRORS[name]
        found = getattr(builtins, name, None) if module == "builtins" else None
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an answer")


def decode_response(data: bytes) -> tuple[Real, list[str]]:
    """The result and steps of an answer; `RemoteError` for an error answer
    or for data that cannot be read."""
    if data[:1] == b"\x80":
        try:
            _scan(data)
            answer = _AnswerUnpickler(io.BytesIO(data)).load()
        except Exception as e:
            raise RemoteError("UnreadableAnswer", f"cannot read the answer: {e}") from None
        if isinstance(answer, BaseException):
            message = answer.args[0] if len(answer.args) == 1 else ", ".join(map(str, answer.args))
            raise RemoteError(type(answer).__name__, str(message))
    else:
        try:
            answer = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise RemoteError("UnreadableAnswer", f"cannot read the answer: {e}") from None
        if isinstance(answer, dict) and "error" in answer:
            raise RemoteError(str(answer.get("type", "Error")), str(answer["error"]))
        if isinstance(answer, dict) and "result" in answer:
            answer = (answer["result"], answer.get("steps", []))
    if type(answer) is not tuple or len(answer) != 2 or not isinstance(answer[1], list):
        raise RemoteError("UnreadableAnswer", f"unexpected answer {answer!r:.80}")
    value = answer[0]
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        value = float(value)
    return value, [str(s) for s in answer[1]]
