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
import reprlib
import sys
import types
from collections import OrderedDict
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
        out = io.BytesIO()
        pickler = pickle.Pickler(out, ANSWER_PROTOCOL)
        # A private, empty table: reducers registered process-wide (Twisted's
        # styles module registers one for bound methods) must not change how
        # rand's Random.uniform is pickled.
        pickler.dispatch_table = {}
        pickler.dump(_to_pickled(node, {}))
        return out.getvalue()
    finally:
        if saved is None:
            del sys.modules["calculator"]
        else:
            sys.modules["calculator"] = saved


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


_CALCULATOR = types.ModuleType("calculator", "stand-ins for the course's classes")
for _cls in (*_STANDINS, Associativity):
    setattr(_CALCULATOR, _cls.__name__, _cls)


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

    def __call__(self, value: Any) -> _Associativity:
        if type(value) is not int or value not in (0, 1):
            raise pickle.UnpicklingError("Associativity takes 0 or 1")
        return _ASSOCIATIVITIES[value]


class _RandomState:
    """Stands in for a ``random.Random``: takes one well-formed state."""

    __slots__ = ("state_ok",)

    def __init__(self) -> None:
        self.state_ok = False

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

    def __call__(self) -> _RandomState:
        return _RandomState()


_UNIFORM = _Global("random.Random.uniform")


class _GetattrStandIn:
    """Stands in for ``builtins.getattr``: only ``<Random>.uniform``."""

    __slots__ = ()

    def __call__(self, obj: Any, name: Any) -> _Global:
        if type(obj) is _RandomState and obj.state_ok and type(name) is str and name == "uniform":
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
    "rand": _UNIFORM,
}
_ALLOWED: dict[tuple[str, str], Any] = {("calculator", cls.__name__): cls for cls in _STANDINS}
_ALLOWED.update(
    {
        tuple(q.split(".")): _Global(q)
        for q in (*_BINARY_FUNCTIONS.values(), *_UNARY_FUNCTIONS.values())
    }
)
_ALLOWED.update(
    {tuple(q.split(".")): _Global(q) for q in _CALL_FUNCTIONS.values() if q is not _UNIFORM}
)
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


# --- the opcode pre-scan -------------------------------------------------------

#: Most REDUCE opcodes in one pickle: a course pickle has one per
#: ``Associativity`` member and two per random generator (of some 3 KB each).
MAX_REDUCES = 48
#: Most opcodes in one pickle, not counting the MEMOIZE after each new
#: object: a course pickle has about 8 per node and 630 per generator state,
#: so this is room for the largest tree with fifteen generators; it bounds
#: the time the pre-scan takes.
MAX_OPCODES = 24 * MAX_NODES

# What the scan does per opcode.
_PUSH, _STR, _GET, _PUT, _MEMOIZE, _MARK, _TO_MARK, _SETITEMS = range(8)
_SETITEM, _REDUCE, _POP, _NOOP, _STOP = range(8, 13)

# The opcodes pickle protocols 2 to 5 write for a course pickle or an
# answer, as (action, argument, items popped, items pushed). The argument is
# a fixed size in bytes, -n for an n-byte length followed by that many
# bytes, or None for two text lines.
_ALLOWED_OPCODES: dict[str, tuple[int, int | None, int, int]] = {
    "PROTO": (_NOOP, 1, 0, 0),
    "FRAME": (_NOOP, 8, 0, 0),
    "STOP": (_STOP, 0, 1, 0),
    "MARK": (_MARK, 0, 0, 0),  # taken by the fast path
    "POP": (_POP, 0, 1, 0),
    "POP_MARK": (_TO_MARK, 0, 0, 0),
    "NONE": (_PUSH, 0, 0, 1),
    "NEWTRUE": (_PUSH, 0, 0, 1),
    "NEWFALSE": (_PUSH, 0, 0, 1),
    "BININT": (_PUSH, 4, 0, 1),
    "BININT1": (_PUSH, 1, 0, 1),
    "BININT2": (_PUSH, 2, 0, 1),
    "LONG1": (_PUSH, -1, 0, 1),
    "LONG4": (_PUSH, -4, 0, 1),
    "BINFLOAT": (_PUSH, 8, 0, 1),
    "SHORT_BINUNICODE": (_STR, -1, 0, 1),
    "BINUNICODE": (_STR, -4, 0, 1),
    "BINUNICODE8": (_STR, -8, 0, 1),
    "EMPTY_LIST": (_PUSH, 0, 0, 1),
    "APPEND": (_PUSH, 0, 1, 0),  # the list stays
    "APPENDS": (_TO_MARK, 0, 1, 0),  # so does the list below the mark
    "EMPTY_TUPLE": (_PUSH, 0, 0, 1),
    "TUPLE": (_TO_MARK, 0, 0, 1),
    "TUPLE1": (_PUSH, 0, 1, 1),
    "TUPLE2": (_PUSH, 0, 2, 1),
    "TUPLE3": (_PUSH, 0, 3, 1),
    "EMPTY_DICT": (_PUSH, 0, 0, 1),
    "SETITEM": (_SETITEM, 0, 2, 0),
    "SETITEMS": (_SETITEMS, 0, 1, 0),
    "BINGET": (_GET, 1, 0, 1),
    "LONG_BINGET": (_GET, 4, 0, 1),
    "BINPUT": (_PUT, 1, 0, 0),
    "LONG_BINPUT": (_PUT, 4, 0, 0),
    "MEMOIZE": (_MEMOIZE, 0, 0, 0),  # taken by the fast path
    "GLOBAL": (_PUSH, None, 0, 1),
    "STACK_GLOBAL": (_PUSH, 0, 2, 1),
    "REDUCE": (_REDUCE, 0, 2, 1),
    "BUILD": (_PUSH, 0, 1, 0),  # the object stays
    "NEWOBJ": (_PUSH, 0, 2, 1),
}
_OPCODES: list[tuple[int, int | None, int, int] | None] = [None] * 256
for _op in pickletools.opcodes:
    if _op.name in _ALLOWED_OPCODES:
        _OPCODES[ord(_op.code)] = _ALLOWED_OPCODES[_op.name]


_MEMOIZE_CODE = pickle.MEMOIZE[0]
# The fast path's opcodes, by what it does with them (0: not on it). MARK and
# MEMOIZE are only ever taken there; the others also have general entries.
_F_MEMOIZE, _F_STR, _F_GET, _F_EMPTY, _F_BUILD, _F_TWO_TO_ONE, _F_MARK = range(1, 8)
_FAST = [0] * 256
for _codes, _action in (
    (pickle.MEMOIZE, _F_MEMOIZE),
    (pickle.MARK, _F_MARK),
    (pickle.SHORT_BINUNICODE, _F_STR),
    (pickle.BINGET, _F_GET),
    (pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.EMPTY_LIST, _F_EMPTY),
    (pickle.BUILD, _F_BUILD),
    (pickle.STACK_GLOBAL + pickle.NEWOBJ, _F_TWO_TO_ONE),
):
    for _code in _codes:
        _FAST[_code] = _action


def _scan(data: bytes) -> None:
    """Walk the opcodes once, before unpickling, keeping track of which stack
    items and memo entries are strings, and refuse:

    - any opcode a course pickle does not use (persistent ids, the extension
      registry, INST/OBJ, sets, buffers...), more than `MAX_OPCODES` opcodes
      or more than `MAX_REDUCES` REDUCEs;
    - memo indexes beyond the payload's length (the C unpickler allocates
      memo space up to the index it is given);
    - dictionary keys other than strings (hashing a tuple costs its whole
      size, each time: a nest of shared tuples takes forever);
    - truncation and bytes after STOP, and the stack underflows the model
      meets (the unpickler refuses the others, before the model's view of
      the stack can matter).
    """
    resumed = _resume(data)
    if resumed is None:
        stack: list[bool] = []  # True for a str
        marks: list[int] = []
        memo: dict[int, bool] = {}
        fence = reduces = pos = done = 0
    else:
        stack, marks, memo, fence, reduces, pos, done = resumed
    end = len(data)
    push = stack.append
    preamble = None  # the state at the first number, to remember
    top_put = -1  # the largest memo index a PUT has used
    try:
        for done in range(done, MAX_OPCODES):  # noqa: B020 (resumes the count)
            if pos >= end:
                raise pickle.UnpicklingError("pickle data was truncated")
            code = data[pos]
            fast = _FAST[code]
            if fast:
                # The opcodes that make up most of a course pickle, without the
                # mark checks: at a mark the unpickler refuses them anyway,
                # before anything the model got wrong from there can matter.
                if fast == _F_MEMOIZE:
                    memo[len(memo)] = stack[-1]
                    pos += 1
                    continue
                if fast == _F_STR:  # SHORT_BINUNICODE
                    pos += 2 + data[pos + 1]
                    push(True)
                elif fast == _F_GET:  # BINGET
                    index = data[pos + 1]
                    if index not in memo:
                        raise pickle.UnpicklingError(f"memo index {index} not set")
                    push(memo[index])
                    pos += 2
                    continue
                elif fast == _F_EMPTY:  # EMPTY_TUPLE, EMPTY_DICT, EMPTY_LIST
                    push(False)
                    pos += 1
                elif fast == _F_BUILD:  # the object stays
                    del stack[-1]
                    pos += 1
                    continue
                elif fast == _F_MARK:
                    fence = len(stack)
                    marks.append(fence)
                    pos += 1
                    continue
                else:  # STACK_GLOBAL, NEWOBJ: two items make one
                    del stack[-1]
                    stack[-1] = False
                    pos += 1
                # What the pickler writes after each new object.
                if pos < end and data[pos] == _MEMOIZE_CODE:
                    memo[len(memo)] = stack[-1]
                    pos += 1
                continue
            spec = _OPCODES[code]
            if spec is None:
                raise pickle.UnpicklingError(f"pickle opcode {bytes([code])!r} is not allowed")
            action, size, npop, npush = spec
            if resumed is None and code in _NUMBERS:
                resumed = ()
                # Kept if the pickle proves whole, and if no PUT index in the
                # preamble needs a longer payload than the preamble itself.
                if top_put < pos:
                    preamble = (tuple(stack), tuple(marks), dict(memo), fence, reduces, pos, done)
            pos += 1
            if action == _GET:
                index = int.from_bytes(data[pos : pos + size], "little")
                pos += size
                if index not in memo:
                    raise pickle.UnpicklingError(f"memo index {index} not set")
                push(memo[index])
            elif action in (_PUSH, _STR, _REDUCE):
                if size is None:
                    pos = data.index(b"\n", data.index(b"\n", pos) + 1) + 1
                elif size > 0:
                    pos += size
                elif size:
                    length = int.from_bytes(data[pos : pos - size], "little", signed=size == -4)
                    if length < 0:
                        raise pickle.UnpicklingError("negative length")
                    pos += length - size
                if npop:
                    if len(stack) - npop < fence:
                        raise pickle.UnpicklingError("pickle stack underflow")
                    del stack[-npop:]
                if npush:
                    push(action == _STR)
                if action == _REDUCE:
                    reduces += 1
                    if reduces > MAX_REDUCES:
                        raise pickle.UnpicklingError(f"more than {MAX_REDUCES} REDUCE opcodes")
            elif action == _SETITEM:
                if len(stack) - 3 < fence or not stack[-2]:
                    raise pickle.UnpicklingError("dictionary keys must be strings")
                del stack[-2:]
            elif action in (_TO_MARK, _SETITEMS):
                if not marks:
                    raise pickle.UnpicklingError("could not find MARK")
                mark = marks.pop()
                fence = marks[-1] if marks else 0
                if npop and mark - npop < fence:  # the list or dict below the mark
                    raise pickle.UnpicklingError("pickle stack underflow")
                if action == _SETITEMS and ((len(stack) - mark) % 2 or not all(stack[mark::2])):
                    raise pickle.UnpicklingError("dictionary keys must be strings")
                del stack[mark:]
                if npush:
                    push(False)
            elif action == _PUT:
                index = int.from_bytes(data[pos : pos + size], "little")
                pos += size
                if len(stack) <= fence or index >= end:
                    raise pickle.UnpicklingError(f"memo index {index} out of range")
                memo[index] = stack[-1]
                top_put = max(top_put, index)
            elif action == _POP:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                    fence = marks[-1] if marks else 0
                elif len(stack) <= fence:
                    raise pickle.UnpicklingError("pickle stack underflow")
                else:
                    stack.pop()
            elif action == _STOP:
                if len(stack) <= fence:
                    raise pickle.UnpicklingError("pickle stack underflow")
                if pos != end:
                    raise pickle.UnpicklingError("trailing bytes after the pickle")
                if preamble is not None:
                    _remember(data, preamble)
                return
            else:  # PROTO, FRAME
                pos += size
        raise pickle.UnpicklingError(f"more than {MAX_OPCODES} opcodes")
    except IndexError:  # an argument past the end, or an item the stack lacks
        raise pickle.UnpicklingError(
            "pickle data was truncated" if pos + 1 >= end else "pickle stack underflow"
        ) from None


#: The opcodes of number literals.
_NUMBERS = frozenset(
    pickle.BININT + pickle.BININT1 + pickle.BININT2 + pickle.BINFLOAT + pickle.LONG1 + pickle.LONG4
)
#: Scan states at the first number literal, by the bytes before it. Course
#: pickles of one shape of tree share everything before their first number
#: (the classes and functions down the leftmost path, about half the
#: opcodes), so the scan of the next one resumes there. The state depends
#: only on those bytes, so whoever sent them, it is the same.
_PREAMBLES: OrderedDict[bytes, tuple] = OrderedDict()
MAX_PREAMBLES = 8


def _resume(data: bytes) -> tuple | None:
    """A copy of the scan state after a remembered preamble of ``data``."""
    for preamble, state in _PREAMBLES.items():
        if data.startswith(preamble):
            _PREAMBLES.move_to_end(preamble)
            stack, marks, memo, *rest = state
            return (list(stack), list(marks), dict(memo), *rest)
    return None


def _remember(data: bytes, state: tuple) -> None:
    _PREAMBLES[data[: state[5]]] = state
    while len(_PREAMBLES) > MAX_PREAMBLES:
        _PREAMBLES.popitem(last=False)


def _decode_legacy(data: bytes) -> Node:
    try:
        _scan(data)
        obj = _AllowListUnpickler(io.BytesIO(data)).load()
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
            return Number(_number(_attributes(obj)[0]))
        if kind is PNamedConstant:
            name, value = _attributes(obj)
            if type(name) is not str or name not in CONSTANTS or value != CONSTANTS[name]:
                raise _unsupported(f"named constant {_brief(name)} = {_brief(value)}")
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
                raise _unsupported(f"function {_brief(name)} does not match its callable")
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
        raise _unsupported(f"operator {_brief(symbol)} does not match its function")
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
    raise _unsupported(f"constant {_brief(value)} is not a finite int or float")


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3  # a nest of shared tuples costs at most 6 ** 3 items
_SHORT.maxdict = 0  # reprlib sorts all of a dict's keys to show a few


def _brief(value: Any) -> str:
    """A short ``repr`` of something from a peer, at a bounded cost (the
    plain ``repr`` of a nest of shared tuples takes forever)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's int-to-string limit
        return f"<{type(value).__name__}>"


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


def _shown(value: Any) -> str:
    """A string as itself, anything else as `_brief` shows it."""
    return value if type(value) is str else _brief(value)


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
            raise RemoteError(type(answer).__name__, ", ".join(map(_shown, answer.args)))
    else:
        try:
            answer = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise RemoteError("UnreadableAnswer", f"cannot read the answer: {e}") from None
        if isinstance(answer, dict) and "error" in answer:
            raise RemoteError(_shown(answer.get("type", "Error")), _shown(answer["error"]))
        if isinstance(answer, dict) and "result" in answer:
            answer = (answer["result"], answer.get("steps", []))
    if type(answer) is not tuple or len(answer) != 2 or not isinstance(answer[1], list):
        raise RemoteError("UnreadableAnswer", f"unexpected answer {_brief(answer)}")
    value = answer[0]
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        value = float(value)
    if type(value) not in (int, float):
        raise RemoteError("UnreadableAnswer", f"unexpected answer {_brief(answer)}")
    return value, [_shown(s) for s in answer[1]]
