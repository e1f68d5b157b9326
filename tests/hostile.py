"""Support for the hostile-input tests: an in-memory server connection, and
course-style pickles written opcode by opcode, without recursion.

The pickler recurses once per nesting level, so it cannot write the deep
trees the limits must refuse, and it never writes the hostile opcode
sequences the pre-scan must refuse. `Writer` emits protocol 4 opcodes the
way the pickler does for the course client's objects (NEWOBJ + BUILD, one
shared operator object per symbol, MEMOIZE after every object), and
`course_pickle` writes a whole `expression` tree with an explicit stack.
"""

from __future__ import annotations

import math
import random
import struct

from helpers import request_frame
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.expression import Binary, Call, Constant, Node, Number, Unary
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire

#: `Writer.random_uniform`'s default: a fresh, well-formed generator state.
FRESH = object()


def split_frames(stream: bytes) -> list[tuple[wire.Header, bytes]]:
    """Whole messages in ``stream`` (which must hold nothing else)."""
    frames = []
    while stream:
        header = wire.decode_header(stream)
        assert wire.HEADER_SIZE <= header.length <= len(stream)
        frames.append((header, stream[wire.HEADER_SIZE : header.length]))
        stream = stream[header.length :]
    return frames


class Connection:
    """A server protocol on a `StringTransport`, as the factory builds it."""

    def __init__(self, **options: object) -> None:
        self.factory = CalculatorServerFactory(clock=task.Clock(), **options)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def feed(self, data: bytes) -> list[tuple[wire.Header, bytes]]:
        """Deliver raw bytes; the whole messages written back."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        # Let the protocol take every turn it yields (its turn budget is real
        # time, so a slow run yields where a fast one does not); Clock runs
        # turns scheduled during the advance in that same advance.
        self.factory.clock.advance(0)
        return split_frames(self.transport.value())

    def ask(self, data: bytes, *, steps: bool = False) -> tuple[int, object]:
        """Send one request; its status and its decoded answer: ``(value, steps)``
        or the `codec.RemoteError` it carries."""
        (header, payload), *more = self.feed(request_frame(data, steps=steps, cache=False, ts=0))
        assert not more
        assert not header.request
        try:
            return header.status, codec.decode_response(payload)
        except codec.RemoteError as e:
            return header.status, e

    @property
    def open(self) -> bool:
        return not self.transport.disconnecting


BINARY_FUNCTIONS = {
    "+": ("_operator", "add"),
    "-": ("_operator", "sub"),
    "*": ("_operator", "mul"),
    "/": ("_operator", "truediv"),
    "%": ("_operator", "mod"),
    "**": ("_operator", "pow"),
}
UNARY_FUNCTIONS = {"-": ("_operator", "neg"), "+": ("_operator", "pos")}
CALL_FUNCTIONS = {
    "sin": ("math", "sin"),
    "cos": ("math", "cos"),
    "tan": ("math", "tan"),
    "sqrt": ("math", "sqrt"),
    "log": ("math", "log"),
    "max": ("builtins", "max"),
    "min": ("builtins", "min"),
    "pow": ("builtins", "pow"),
}


class Writer:
    """A protocol 4 pickle, one opcode at a time."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x04")
        self.memo: dict[object, int] = {}  # what we memoized -> its memo index
        self.memo_size = 0

    def raw(self, data: bytes) -> Writer:
        self.out += data
        return self

    def memoize(self, key: object = None) -> Writer:
        """MEMOIZE the top of the stack (as the pickler does after each object)."""
        if key is not None:
            self.memo[key] = self.memo_size
        self.memo_size += 1
        return self.raw(b"\x94")

    def get(self, index: int) -> Writer:
        if index < 256:
            return self.raw(b"h" + bytes([index]))
        return self.raw(b"j" + struct.pack("<I", index))

    def recall(self, key: object) -> bool:
        """Push a memoized object again; False if it was never memoized."""
        if key not in self.memo:
            return False
        self.get(self.memo[key])
        return True

    def string(self, text: str) -> Writer:
        if not self.recall(("str", text)):
            data = text.encode()
            self.raw(b"\x8c" + bytes([len(data)]) + data).memoize(("str", text))
        return self

    def global_(self, module: str, name: str) -> Writer:
        if not self.recall(("global", module, name)):
            self.string(module).string(name).raw(b"\x93").memoize(("global", module, name))
        return self

    def number(self, value: int | float) -> Writer:
        if type(value) is float:
            return self.raw(b"G" + struct.pack(">d", value))
        if 0 <= value < 256:
            return self.raw(b"K" + bytes([value]))
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        if len(data) < 256:
            return self.raw(b"\x8a" + bytes([len(data)]) + data)
        return self.raw(b"\x8b" + struct.pack("<i", len(data)) + data)

    def new(self, cls: str, key: object = None) -> Writer:
        """``calculator.<cls>`` made by NEWOBJ (memoized as ``key``), with an
        empty dict for BUILD."""
        return self.global_("calculator", cls).raw(b")\x81").memoize(key).raw(b"}").memoize()

    def associativity(self, value: int) -> Writer:
        if not self.recall(("assoc", value)):
            self.global_("calculator", "Associativity").number(value).raw(b"\x85").memoize()
            self.raw(b"R").memoize(("assoc", value))
        return self

    def binary_operator(self, symbol: str) -> Writer:
        if not self.recall(("binop", symbol)):
            self.new("BinaryOperator", ("binop", symbol)).raw(b"(").string("symbol")
            self.string(symbol).string("function").global_(*BINARY_FUNCTIONS[symbol])
            self.string("associativity").associativity(1 if symbol == "**" else 0)
            self.raw(b"ub")
        return self

    def unary_operator(self, symbol: str) -> Writer:
        if not self.recall(("unop", symbol)):
            self.new("UnaryOperator", ("unop", symbol)).raw(b"(").string("symbol")
            self.string(symbol).string("function").global_(*UNARY_FUNCTIONS[symbol]).raw(b"ub")
        return self

    def random_uniform(self, state: object = FRESH) -> Writer:
        """``getattr(random.Random(<state>), 'uniform')``, a new generator each
        time (by default with a fresh, well-formed state)."""
        if state is FRESH:
            state = random.Random().getstate()
        self.global_("builtins", "getattr").global_("random", "Random").raw(b")R").memoize()
        self.plain(state).raw(b"b").string("uniform").raw(b"\x86").memoize().raw(b"R").memoize()
        return self

    def plain(self, value: object) -> Writer:
        """None, numbers, strings and (nested) tuples, without memoizing."""
        if value is None:
            return self.raw(b"N")
        if type(value) is str:
            data = value.encode()
            return self.raw(b"X" + struct.pack("<I", len(data)) + data)
        if type(value) is tuple:
            self.raw(b"(")
            for item in value:
                self.plain(item)
            return self.raw(b"t")
        return self.number(value)

    def function(self, name: str, state: object = None) -> Writer:
        """The ``calculator.Function`` for ``name``, shared unless it is ``rand``
        with its own generator ``state``."""
        key = ("function", name) if state is None else None
        if key is not None and self.recall(key):
            return self
        self.new("Function", key).raw(b"(").string("name").string(name).string("function")
        if name == "rand":
            self.random_uniform(FRESH if state is None else state)
        else:
            self.global_(*CALL_FUNCTIONS[name])
        return self.raw(b"ub")

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def course_pickle(tree: Node, *, fresh_generators: bool = False) -> bytes:
    """``tree`` pickled as the course client's objects, however deep it is.

    With ``fresh_generators`` each ``rand`` call carries its own generator
    state (as a client that builds a new ``Random`` per call would send).
    """
    w = Writer()
    todo: list[object] = [tree]
    while todo:
        item = todo.pop()
        if type(item) is bytes:
            w.raw(item)
        elif type(item) is tuple:  # a deferred method call
            getattr(w, item[0])(*item[1:])
        elif type(item) is Number:
            w.new("Constant").string("value").number(item.value).raw(b"sb")
        elif type(item) is Constant:
            w.new("NamedConstant").raw(b"(").string("name").string(item.name)
            w.string("value").number(getattr(math, item.name.lower())).raw(b"ub")
        elif type(item) is Binary:
            w.new("BinaryExpr").raw(b"(").string("left_operand")
            todo += [
                b"ub",
                item.right,
                ("string", "right_operand"),
                ("binary_operator", item.op),
                ("string", "operator"),
                item.left,
            ]
        elif type(item) is Unary:
            w.new("UnaryExpr").raw(b"(").string("operator").unary_operator(item.op)
            w.string("operand")
            todo += [b"ub", item.operand]
        elif type(item) is Call:
            fresh = fresh_generators and item.name == "rand"
            w.new("FunctionCallExpr").raw(b"(").string("function")
            w.function(item.name, random.Random().getstate() if fresh else None)
            w.string("args").raw(b"]").memoize().raw(b"(")
            todo += [b"eub", *reversed(item.args)]
        else:
            raise TypeError(item)
    return w.stop()
