"""Legacy requests read by their shape: what the course client sends again
and again is one tree with other numbers in it.

A `ShapeMemo` keeps, for a request it has read in full (pre-scan, unpickler,
checks), the bytes around each number that becomes a `Number` of the tree,
and a function that builds the tree from those numbers. A later request of
the same length and the same bytes around those numbers is then built
directly: the pre-scan, the unpickler and the checks would do on it what
they did on the first, except where the numbers go (PROTOCOL.md 3.2).

Which numbers those are is found once per shape, by the full reading of a
probe: the first request with each such number replaced by a value that
appears nowhere else. Only a number written straight into a dictionary
(SETITEM after it, as the pickler writes ``Constant.value``) is tried, so
it reaches nothing but the dictionary it is put in; the probe's tree says
which `Number` each one became, and a number whose probe is refused or
goes elsewhere leaves the shape to the full reading, every time.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from ..expression import Binary, CalculationError, Call, Node, Number, Real, Unary
from .legacy import number, read_request

#: How many shapes a `ShapeMemo` keeps by default, and the largest request
#: it learns one from (its probe costs a second full reading, once).
MAX_SHAPES = 64
LARGEST = 2048

_FLOAT = struct.Struct(">d")
_SETITEM = 0x73
#: Number literals of a fixed size: opcode -> (argument bytes, signed), and
#: the two whose argument starts with its own length (LONG1, LONG4).
_FIXED = {0x4B: (1, False), 0x4D: (2, False), 0x4A: (4, True), 0x47: (8, False)}
_LONG = {0x8A: 1, 0x8B: 4}
_BINFLOAT = 0x47
#: The smallest probe integer: above the ``Associativity`` values (0, 1) and
#: the random generator's state version (3), though no probe reaches either.
_FIRST_PROBE = 4

Build = Callable[[list[Real]], Node]


class _Hole:
    """Where one number literal's value lies: bytes ``start:end`` of the data."""

    __slots__ = ("end", "is_float", "signed", "start")

    def __init__(self, data: bytes, pos: int) -> None:
        code = data[pos]
        if code in _LONG:
            width = _LONG[code]
            self.start = pos + 1 + width
            self.end = self.start + int.from_bytes(data[pos + 1 : self.start], "little")
            self.signed = True
        else:
            width, self.signed = _FIXED[code]
            self.start, self.end = pos + 1, pos + 1 + width
        self.is_float = code == _BINFLOAT

    def read(self, data: bytes) -> Real:
        if self.is_float:
            return _FLOAT.unpack_from(data, self.start)[0]
        return int.from_bytes(data[self.start : self.end], "little", signed=self.signed)

    def written(self, value: Real) -> bytes | None:
        """``value`` in this literal's bytes, or None when it does not fit."""
        if self.is_float:
            return _FLOAT.pack(value)
        try:
            return int(value).to_bytes(self.end - self.start, "little", signed=self.signed)
        except OverflowError:
            return None


class Shape:
    """One learned shape: the bytes that must match, where its numbers are,
    and how the tree is built from them (None: it is read in full, its probe
    having been refused, without probing it again)."""

    __slots__ = ("build", "holes", "length", "segments")

    def __init__(self, data: bytes, holes: list[_Hole], build: Build | None) -> None:
        self.length = len(data)
        self.holes = holes
        self.build = build
        segments, at = [], 0
        for hole in holes:
            if hole.start > at:
                segments.append((at, data[at : hole.start]))
            at = hole.end
        if at < len(data):
            segments.append((at, data[at:]))
        self.segments = tuple(segments)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` (of this shape's length) has its bytes around the numbers."""
        for at, segment in self.segments:  # noqa: SIM110 (no generator per request)
            if not data.startswith(segment, at):
                return False
        return True

    def tree(self, data: bytes) -> Node:
        """The tree of ``data``, which `matches`."""
        if self.build is None:
            return read_request(data)[0]
        return self.build([hole.read(data) for hole in self.holes])


class ShapeMemo:
    """The shapes of legacy requests read lately (`MAX_SHAPES`, the least
    recently used forgotten first). A server keeps one for all its
    connections: a shape depends only on the bytes, whoever sent them."""

    def __init__(self, size: int = MAX_SHAPES, largest: int = LARGEST) -> None:
        self.size = size
        self.largest = largest
        self._recent: OrderedDict[Shape, None] = OrderedDict()
        self._by_length: dict[int, list[Shape]] = {}

    def __len__(self) -> int:
        return len(self._recent)

    def decode(self, data: bytes) -> Node:
        """The expression of legacy request data, as `legacy.decode_request`
        reads it; `CalculationError` if refused."""
        for known in self._by_length.get(len(data), ()):
            if known.matches(data):
                self._recent.move_to_end(known)
                return known.tree(data)
        node, numbers = read_request(data)
        if len(data) <= self.largest:
            self._keep(learn(data, numbers, node))
        return node

    def _keep(self, shape: Shape) -> None:
        self._recent[shape] = None
        self._by_length.setdefault(shape.length, []).append(shape)
        while len(self._recent) > self.size:
            old, _ = self._recent.popitem(last=False)
            same = self._by_length[old.length]
            same.remove(old)
            if not same:
                del self._by_length[old.length]


def learn(data: bytes, numbers: list[int], node: Node) -> Shape:
    """The shape of ``data``, which the full reading made ``node`` of, with
    its number literals at ``numbers``; one read in full when the probe is
    refused or a probe value does not fit its literal."""
    holes = [_Hole(data, pos) for pos in numbers]
    tried = [h for h in holes if h.end < len(data) and data[h.end] == _SETITEM]
    if not tried:  # nothing to probe: only these very bytes are this shape
        return Shape(data, [], _same(node))
    taken = {(type(v), v) for v in (hole.read(data) for hole in holes)}
    probe = bytearray(data)
    values: dict[tuple[type, Real], int] = {}
    next_int, next_float = _FIRST_PROBE, 0.5
    for index, hole in enumerate(tried):
        value: Real
        if hole.is_float:
            while (float, next_float) in taken:
                next_float += 1.0
            value, next_float = next_float, next_float + 1.0
        else:
            while (int, next_int) in taken:
                next_int += 1
            value, next_int = next_int, next_int + 1
        written = hole.written(value)
        if written is None:
            return Shape(data, tried, None)
        probe[hole.start : hole.end] = written
        values[(type(value), value)] = index
    try:
        probed, _ = read_request(bytes(probe))
    except CalculationError:
        return Shape(data, tried, None)
    return Shape(data, tried, _compile(probed, values) or _same(probed))


def _compile(node: Node, holes: dict[tuple[type, Real], int]) -> Build | None:
    """A function of a request's numbers that builds the probed tree ``node``
    with each probe value replaced by its number (through the same checks as
    the full reading), or None when no number in it came from a probe: it is
    then the same in every request of the shape."""
    if type(node) is Number:
        index = holes.get((type(node.value), node.value))
        if index is None:
            return None
        return lambda values: Number(number(values[index]))
    if type(node) is Binary:
        left, right = _compile(node.left, holes), _compile(node.right, holes)
        if left is None and right is None:
            return None
        left, right, op = left or _same(node.left), right or _same(node.right), node.op
        return lambda values: Binary(left(values), op, right(values))
    if type(node) is Unary:
        operand = _compile(node.operand, holes)
        if operand is None:
            return None
        unary = node.op
        return lambda values: Unary(unary, operand(values))
    if type(node) is Call:
        compiled = [_compile(arg, holes) for arg in node.args]
        if all(arg is None for arg in compiled):
            return None
        args = [b or _same(a) for a, b in zip(node.args, compiled, strict=True)]
        name = node.name

        def call(values: list[Real]) -> Node:
            built = []
            for arg in args:  # a loop, not a comprehension: one frame per level
                built.append(arg(values))
            return Call(name, tuple(built))

        return call
    return None


def _same(node: Node) -> Build:
    """The `Build` of a tree that has no probed number in it."""
    return lambda values: node
