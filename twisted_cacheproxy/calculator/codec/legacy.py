"""The legacy encoding (PROTOCOL.md 3.2): course pickles in and out.

The only module that reads or writes pickles. Requests are read by an
allow-list unpickler that builds harmless stand-ins of the course's
``calculator`` classes, after the pre-scan has passed the opcodes; the
stand-ins are then checked and turned into our own `expression` model:
nothing named in a payload is ever called. Requests are written (by the
client) exactly as the course client pickles them, and answers are builtin
exceptions or plain data that any Python can unpickle.
"""

from __future__ import annotations

import builtins
import enum
import io
import math
import pickle
import random
import struct
import types
from typing import Any, SupportsIndex

from ...transport.payload import PROTOCOL
from ..expression import (
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
from .base import RemoteError, brief, shown
from .prescan import scan


def encode_result(value: Real, steps: list[str]) -> bytes:
    """Pickled answer data for a successful calculation."""
    return pickle.dumps((value, steps), PROTOCOL)


# --- the course's `calculator` classes, as stand-ins ------------------------
#
# Everything `find_class` hands to the unpickler is either one of these
# classes (a BUILD on the class itself fails: their ``__setstate__`` needs an
# instance) or an object with neither ``__dict__`` nor slots, so a BUILD
# aimed at it cannot change it: no payload can alter how later ones are read.


class _Pickled:
    """A ``calculator.*`` object: only data, the attributes the protocol lists."""

    __module__ = "calculator"
    fields: tuple[str, ...] = ()

    def __init__(self, *values: Any) -> None:
        if len(values) != len(self.fields):
            raise TypeError(f"{type(self).__name__} takes the attributes {self.fields}")
        self.__dict__.update(zip(self.fields, values, strict=True))

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or tuple(state) != self.fields:
            raise pickle.UnpicklingError(
                f"{type(self).__name__} needs exactly the attributes {self.fields}"
            )
        self.__dict__.update(state)

    def __repr__(self) -> str:
        # No address: refusals quote payload objects back to their sender.
        return f"<calculator.{type(self).__name__}>"


def _standin(name: str, *fields: str) -> type[_Pickled]:
    return type(
        name, (_Pickled,), {"fields": fields, "__module__": "calculator", "__qualname__": name}
    )


PConstant = _standin("Constant", "value")
PNamedConstant = _standin("NamedConstant", "name", "value")
PBinaryExpr = _standin("BinaryExpr", "left_operand", "operator", "right_operand")
PBinaryOperator = _standin("BinaryOperator", "symbol", "function", "associativity")
PUnaryExpr = _standin("UnaryExpr", "operator", "operand")
PUnaryOperator = _standin("UnaryOperator", "symbol", "function")
PFunctionCallExpr = _standin("FunctionCallExpr", "function", "args")
PFunction = _standin("Function", "name", "function")
_STANDINS = (
    PConstant,
    PNamedConstant,
    PBinaryExpr,
    PBinaryOperator,
    PUnaryExpr,
    PUnaryOperator,
    PFunctionCallExpr,
    PFunction,
)


class Associativity(enum.Enum):
    """``calculator.Associativity``, for pickling requests: a REDUCE of its value."""

    __module__ = "calculator"
    LEFT = 0
    RIGHT = 1


class _Global(str):
    """A function named in a payload: a token we look up, never call."""

    __slots__ = ()


class _Associativity(int):
    """An ``Associativity`` member read from a payload."""

    __slots__ = ()


_ASSOCIATIVITIES = (_Associativity(0), _Associativity(1))


class _AssociativityStandIn:
    """Stands in for the ``calculator.Associativity`` class."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<class 'calculator.Associativity'>"

    def __call__(self, value: Any) -> _Associativity:
        if type(value) is not int or value not in (0, 1):
            raise pickle.UnpicklingError("Associativity takes 0 or 1")
        return _ASSOCIATIVITIES[value]


class _RandomState:
    """Stands in for a ``random.Random``: takes one well-formed state."""

    __slots__ = ("state_ok",)

    def __init__(self) -> None:
        self.state_ok = False

    def __repr__(self) -> str:
        return "<random.Random>"

    def __setstate__(self, state: Any) -> None:
        if self.state_ok or not (
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


class _RandomStandIn:
    """Stands in for the ``random.Random`` class."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<class 'random.Random'>"

    def __call__(self) -> _RandomState:
        return _RandomState()


_UNIFORM = _Global("random.Random.uniform")


#: ``getattr(Associativity, NAME)``: how some Python 3.11 releases (Debian
#: 12's 3.11.2) pickle an enum member, where later ones REDUCE its value.
_ASSOCIATIVITY_NAMES = {"LEFT": _ASSOCIATIVITIES[0], "RIGHT": _ASSOCIATIVITIES[1]}


class _GetattrStandIn:
    """Stands in for ``builtins.getattr``: only ``<Random>.uniform``, and an
    ``Associativity`` member by its name."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<built-in function getattr>"

    def __call__(self, obj: Any, name: Any) -> _Global | _Associativity:
        if type(name) is str:
            if type(obj) is _RandomState and obj.state_ok and name == "uniform":
                return _UNIFORM
            if type(obj) is _AssociativityStandIn and name in _ASSOCIATIVITY_NAMES:
                return _ASSOCIATIVITY_NAMES[name]
        raise pickle.UnpicklingError(
            "getattr is only allowed as random.Random.uniform and Associativity.LEFT or .RIGHT"
        )


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
    "rand": _UNIFORM,
}
_ALLOWED: dict[tuple[str, str], Any] = {("calculator", cls.__name__): cls for cls in _STANDINS}
_NAMED = (*_BINARY_FUNCTIONS.values(), *_UNARY_FUNCTIONS.values(), *_CALL_FUNCTIONS.values())
for _qualified_name in _NAMED:
    if _qualified_name is not _UNIFORM:
        _module, _, _name = _qualified_name.partition(".")
        _ALLOWED[(_module, _name)] = _Global(_qualified_name)
_ALLOWED[("calculator", "Associativity")] = _AssociativityStandIn()
_ALLOWED[("builtins", "getattr")] = _GetattrStandIn()
_ALLOWED[("random", "Random")] = _RandomStandIn()
_PY2_MODULES = {"__builtin__": "builtins"}  # protocol 2 names builtins so


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves exactly the names of PROTOCOL.md 3.2, to stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((_PY2_MODULES.get(module, module), name))
        if found is None:
            raise pickle.UnpicklingError(f"{module:.40}.{name:.40} is not allowed")
        return found


def decode_request(data: bytes) -> Node:
    """The expression of legacy request data; `CalculationError` if refused."""
    return read_request(data)[0]


def read_request(data: bytes) -> tuple[Node, list[int]]:
    """`decode_request`, and where the pre-scan found the number literals."""
    try:
        numbers = scan(data)
        obj = _AllowListUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # the unpickler raises many kinds on hostile data
        raise CalculationError(f"unsupported payload: {e}", "ValueError") from None
    return _Converter().convert(obj, 0), numbers


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
            return Number(number(_attributes(obj)[0]))
        if kind is PNamedConstant:
            name, value = _attributes(obj)
            if type(name) is not str or name not in CONSTANTS or value != CONSTANTS[name]:
                raise _unsupported(f"named constant {brief(name)} = {brief(value)}")
            return Constant(name)
        if kind is PBinaryExpr:
            left, op, right = _attributes(obj)
            if type(op) is not PBinaryOperator or type(_attributes(op)[2]) is not _Associativity:
                raise _unsupported("BinaryExpr.operator is not a BinaryOperator")
            symbol = _symbol(op, _BINARY_FUNCTIONS)
            left = self.convert(left, depth + 1)
            return Binary(left, symbol, self.convert(right, depth + 1))
        if kind is PUnaryExpr:
            op, operand = _attributes(obj)
            if type(op) is not PUnaryOperator:
                raise _unsupported("UnaryExpr.operator is not a UnaryOperator")
            return Unary(_symbol(op, _UNARY_FUNCTIONS), self.convert(operand, depth + 1))
        if kind is PFunctionCallExpr:
            function, args = _attributes(obj)
            if type(function) is not PFunction or type(args) is not list:
                raise _unsupported("FunctionCallExpr needs a Function and a list")
            name, callable_ = _attributes(function)
            if type(name) is not str or _CALL_FUNCTIONS.get(name) != _qualified(callable_):
                raise _unsupported(f"function {brief(name)} does not match its callable")
            if len(args) > MAX_ARGS:
                raise CalculationError(f"{name}() has more than {MAX_ARGS} arguments")
            check_call(name, len(args))
            converted = []
            for arg in args:  # a loop, not a comprehension: one frame per level
                converted.append(self.convert(arg, depth + 1))
            return Call(name, tuple(converted))
        raise _unsupported(f"unexpected {kind.__name__} in the expression")


def _attributes(obj: _Pickled) -> tuple[Any, ...]:
    """The attributes of a stand-in, in the protocol's order; refuses one
    that NEWOBJ made but no BUILD filled in."""
    state = obj.__dict__
    if len(state) != len(obj.fields):
        raise _unsupported(f"{type(obj).__name__} without its attributes")
    return tuple(state.values())


def _qualified(function: Any) -> str | None:
    return str(function) if type(function) is _Global else None


def _symbol(op: _Pickled, table: dict[str, str]) -> str:
    symbol, function = _attributes(op)[:2]
    if type(symbol) is not str or table.get(symbol) != _qualified(function):
        raise _unsupported(f"operator {brief(symbol)} does not match its function")
    return symbol


def number(value: Any) -> Real:
    """A number literal as a `Number` holds it; `CalculationError` for one
    too large or not finite."""
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise CalculationError(
                f"integer constant too large (over {MAX_INT_BITS} bits)", "OverflowError"
            )
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise _unsupported(f"constant {brief(value)} is not a finite int or float")


def _unsupported(why: str) -> CalculationError:
    return CalculationError(f"unsupported payload: {why}", "ValueError")


# --- building legacy requests (the client) ----------------------------------


class _RequestWriter:
    """Writes the stand-in graph of a request as protocol 4 opcodes, byte for
    byte as the C pickler writes the course client's objects (framing, memo
    and batching included; a test holds the two together), but naming the
    stand-in classes ``calculator.<name>`` without looking a module of that
    name up: the C pickler resolves every global through ``sys.modules``.

    It keeps a stack of work instead of recursing, so any tree the limits
    admit is written whatever the recursion limit."""

    def __init__(self) -> None:
        self.frames = bytearray(pickle.PROTO + bytes([PROTOCOL]))
        self.frame = bytearray()
        # id -> (index, the object, kept alive so that no id is reused)
        self.memo: dict[int, tuple[int, Any]] = {}
        self.todo: list[tuple[int, Any]] = []

    def dump(self, obj: Any) -> bytes:
        """The whole pickle of ``obj``."""
        todo = self.todo
        todo.append((_SAVE, obj))
        while todo:
            action, item = todo.pop()
            if action == _SAVE:
                self.commit_frame(_FRAME_SIZE_TARGET)
                self.save(item)
            elif action == _WRITE:
                self.frame += item
            else:
                self.memoize(item)
        self.frame += pickle.STOP
        self.commit_frame(0)
        return bytes(self.frames)

    def commit_frame(self, target: int) -> None:
        """Close the current frame once it holds ``target`` bytes or more."""
        frame = self.frame
        if len(frame) < target or not frame:
            return
        if len(frame) >= _FRAME_SIZE_MIN:
            self.frames += pickle.FRAME + len(frame).to_bytes(8, "little")
        self.frames += frame
        self.frame = bytearray()

    def memoize(self, obj: Any) -> None:
        self.memo[id(obj)] = (len(self.memo), obj)
        self.frame += pickle.MEMOIZE

    def later(self, *work: tuple[int, Any]) -> None:
        """Do ``work`` next, in this order."""
        self.todo.extend(reversed(work))

    def save(self, obj: Any) -> None:
        """Write ``obj``, or what opens it and queue the rest."""
        kind = type(obj)
        if obj is None:
            self.frame += pickle.NONE
        elif kind is int:
            self.save_int(obj)
        elif kind is float:
            self.frame += pickle.BINFLOAT + struct.pack(">d", obj)
        elif id(obj) in self.memo:
            index = self.memo[id(obj)][0]
            self.frame += (
                pickle.BINGET + bytes([index])
                if index < 256
                else pickle.LONG_BINGET + index.to_bytes(4, "little")
            )
        elif kind is str:
            data = obj.encode("utf-8", "surrogatepass")
            if len(data) < 256:
                self.frame += pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
            else:
                self.frame += pickle.BINUNICODE + len(data).to_bytes(4, "little") + data
            self.memoize(obj)
        elif kind is tuple:
            self.save_tuple(obj)
        elif kind is list or kind is dict:
            self.save_container(obj)
        elif isinstance(obj, (type, types.BuiltinFunctionType)):
            # A global: module and name (each a string that may be in the memo).
            self.later(
                (_SAVE, obj.__module__),
                (_SAVE, obj.__qualname__),
                (_WRITE, pickle.STACK_GLOBAL),
                (_MEMOIZE, obj),
            )
        else:
            self.save_reduce(obj)

    def save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self.frame += pickle.BININT1 + bytes([value])
        elif 0 <= value < 65536:
            self.frame += pickle.BININT2 + value.to_bytes(2, "little")
        elif -(2**31) <= value < 2**31:
            self.frame += pickle.BININT + value.to_bytes(4, "little", signed=True)
        else:
            data = pickle.encode_long(value)
            if len(data) < 256:
                self.frame += pickle.LONG1 + bytes([len(data)]) + data
            else:
                self.frame += pickle.LONG4 + len(data).to_bytes(4, "little", signed=True) + data

    def save_tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self.frame += pickle.EMPTY_TUPLE
            return
        if len(items) <= 3:
            end = (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(items) - 1]
        else:
            self.frame += pickle.MARK
            end = pickle.TUPLE
        self.later(*((_SAVE, item) for item in items), (_WRITE, end), (_MEMOIZE, items))

    def save_container(self, obj: list[Any] | dict[Any, Any]) -> None:
        """A list or dict: empty, memoized, then filled in batches of 1000."""
        if isinstance(obj, list):
            self.frame += pickle.EMPTY_LIST
            items = obj
            one, many, per = pickle.APPEND, pickle.APPENDS, 1
        else:
            self.frame += pickle.EMPTY_DICT
            items = [part for pair in obj.items() for part in pair]
            one, many, per = pickle.SETITEM, pickle.SETITEMS, 2
        self.memoize(obj)
        work: list[tuple[int, Any]] = []
        for start in range(0, len(items), 1000 * per):
            batch = items[start : start + 1000 * per]
            if len(batch) > per:
                work.append((_WRITE, pickle.MARK))
            work += [(_SAVE, item) for item in batch]
            work.append((_WRITE, many if len(batch) > per else one))
        self.later(*work)

    def save_reduce(self, obj: Any) -> None:
        """An object by its ``__reduce_ex__``: a class and NEWOBJ (the
        stand-ins), or a callable and REDUCE (Associativity, the random
        generator and its bound method), then its state and BUILD."""
        reduced = obj.__reduce_ex__(PROTOCOL)
        func, args = reduced[0], reduced[1]
        state = reduced[2] if len(reduced) > 2 else None
        if getattr(func, "__name__", None) == "__newobj__":
            work = [(_SAVE, args[0]), (_SAVE, args[1:]), (_WRITE, pickle.NEWOBJ)]
        else:
            work = [(_SAVE, func), (_SAVE, args), (_WRITE, pickle.REDUCE)]
        work.append((_MEMOIZE, obj))
        if state is not None:
            work += [(_SAVE, state), (_WRITE, pickle.BUILD)]
        self.later(*work)


_SAVE, _WRITE, _MEMOIZE = range(3)
_FRAME_SIZE_TARGET = 64 * 1024
_FRAME_SIZE_MIN = 4


def encode_request(node: Node, *, enums_by_name: bool = False) -> bytes:
    """Legacy request data for ``node``, pickled exactly the way the course
    client pickles its ``calculator`` objects; with ``enums_by_name``, as it
    does on a Python that pickles an enum member as
    ``getattr(Associativity, 'LEFT')``."""
    operators = _OPERATORS_BY_NAME if enums_by_name else _OPERATORS
    return _RequestWriter().dump(_to_pickled(node, {}, operators))


class _AssociativityByName:
    """An ``Associativity`` member that pickles by its name, as some Python
    3.11 releases (Debian 12's 3.11.2) pickle every enum member."""

    __slots__ = ("name",)

    def __init__(self, member: Associativity) -> None:
        self.name = member.name

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return getattr, (Associativity, self.name)


def _operators(members: dict[Associativity, Any]) -> dict[str, _Pickled]:
    """The course client's binary operators, each ``Associativity`` member
    pickled as the one object ``members`` gives for it (shared, as the
    members are, so the pickle refers back to it)."""
    return {
        s: PBinaryOperator(
            s, BINARY[s], members[Associativity.RIGHT if s == "**" else Associativity.LEFT]
        )
        for s in BINARY
    }


_OPERATORS = _operators({member: member for member in Associativity})
_OPERATORS_BY_NAME = _operators({member: _AssociativityByName(member) for member in Associativity})
_UNARY_OPERATORS = {s: PUnaryOperator(s, UNARY[s]) for s in UNARY}


def _to_pickled(
    node: Node, functions: dict[str, _Pickled], operators: dict[str, _Pickled] = _OPERATORS
) -> _Pickled:
    """Our tree as the course client's objects (operators shared, as it does)."""
    if isinstance(node, Number):
        return PConstant(node.value)
    if isinstance(node, Constant):
        return PNamedConstant(node.name, node.value)
    if isinstance(node, Binary):
        return PBinaryExpr(
            _to_pickled(node.left, functions, operators),
            operators[node.op],
            _to_pickled(node.right, functions, operators),
        )
    if isinstance(node, Unary):
        return PUnaryExpr(
            _UNARY_OPERATORS[node.op], _to_pickled(node.operand, functions, operators)
        )
    if node.name not in functions:
        impl = (
            random.Random().uniform
            if node.name == "rand"
            else getattr(
                math if node.name in ("sin", "cos", "tan", "sqrt", "log") else builtins, node.name
            )
        )
        functions[node.name] = PFunction(node.name, impl)
    return PFunctionCallExpr(
        functions[node.name], [_to_pickled(a, functions, operators) for a in node.args]
    )


# --- reading answers (the client) -------------------------------------------


class _CourseError(Exception):
    """Stands in for the course server's ``api.Calculator*Error`` classes."""

    __module__ = "api"


_API_ERRORS = {
    name: type(name, (_CourseError,), {"__module__": "api"})
    for name in ("CalculatorError", "CalculatorClientError", "CalculatorServerError")
}


# Protocol 2 writes builtin exceptions under Python 2's module names.
_ANSWER_MODULES = {**_PY2_MODULES, "exceptions": "builtins"}


class _AnswerUnpickler(pickle.Unpickler):
    """Reads legacy answers: plain data, builtin exceptions, ``api`` errors."""

    def find_class(self, module: str, name: str) -> Any:
        module = _ANSWER_MODULES.get(module, module)
        if module == "api" and name in _API_ERRORS:
            return _API_ERRORS[name]
        found = getattr(builtins, name, None) if module == "builtins" else None
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"{module:.40}.{name:.40} is not allowed in an answer")


def decode_answer(data: bytes) -> Any:
    """A pickled answer (``(result, steps)``, or whatever else it holds, for
    the caller to refuse); `RemoteError` for an error answer or bad data."""
    try:
        scan(data)
        answer = _AnswerUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise RemoteError("UnreadableAnswer", f"cannot read the answer: {e}") from None
    if isinstance(answer, BaseException):
        raise RemoteError(type(answer).__name__, ", ".join(map(shown, answer.args)))
    return answer
