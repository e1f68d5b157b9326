"""The opcode pre-scan: one linear walk over legacy data, before the unpickler
sees it, that refuses what a course pickle never holds and what would cost
the unpickler more than the payload's size (PROTOCOL.md 3.2, SECURITY).

It reads the opcodes from the bytes themselves (it never imports pickle),
keeping a model of the unpickler's stack, marks and memo in which each item
is only "a string" or "something else": enough to refuse non-string
dictionary keys. Each opcode is one row of `_OPCODES`: how much argument it
has, what it pops and pushes, and, for the few that need more, a handler.
It also tells where the number literals are, which is all that `shapes`
needs to know of a pickle to recognise the next one of its shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..expression import MAX_NODES

#: Most REDUCE opcodes in one pickle: a course pickle has one per
#: ``Associativity`` member and two per random generator (of some 3 KB each).
MAX_REDUCES = 48
#: Most opcodes in one pickle, not counting the MEMOIZE after each new
#: object: a course pickle has about 8 per node and 630 per generator state,
#: so this is room for the largest tree with fifteen generators; it bounds
#: the time the pre-scan takes.
MAX_OPCODES = 24 * MAX_NODES


class PickleRefusedError(ValueError):
    """Legacy data the pre-scan refuses, and why."""


_MEMOIZE = 0x94
_NAME = re.compile(rb"[A-Za-z0-9_.]+")


class _Scan:
    """One pre-scan of ``data``: the model, and the handlers of the opcodes
    that need more than a fixed argument and a fixed stack effect. Each
    handler takes the opcode's position and its row's argument, makes the
    opcode's pops and checks, and returns the next opcode's position."""

    __slots__ = ("data", "marks", "memo", "numbers", "reduces", "stack")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stack: list[bool] = []  # True for a str
        self.marks = [0]  # where each MARK was; the last is the fence
        self.memo: dict[int, bool] = {}
        self.reduces = 0
        self.numbers: list[int] = []  # where each number literal's opcode is

    def walk(self) -> list[int]:
        """Scan to STOP; the positions of the number literals."""
        data, stack, marks, memo = self.data, self.stack, self.marks, self.memo
        push, number = stack.append, self.numbers.append
        # Locals: the loop runs once per opcode, and global lookups cost it.
        memoize, handlers, table = _MEMOIZE, _HANDLERS, _OPCODES
        fixed, short_str, get, mark, end, literal = _FIXED, _SHORT_STR, _GET, _MARK, _END, _NUMBER
        pos = 0
        try:
            for _ in range(MAX_OPCODES):
                row = table[data[pos]]
                if row is None:
                    raise PickleRefusedError(
                        f"pickle opcode {data[pos : pos + 1]!r} is not allowed"
                    )
                kind, arg, need, npop, pushed = row
                if kind == fixed:
                    if need:
                        if len(stack) - need < marks[-1]:
                            raise PickleRefusedError("pickle stack underflow")
                        del stack[-npop:]
                    pos += arg
                elif kind == short_str:  # SHORT_BINUNICODE, the commonest handler's case
                    start = pos + 2
                    pos = start + data[pos + 1]
                    try:
                        data[start:pos].decode("utf-8", "surrogatepass")
                    except UnicodeDecodeError:
                        raise PickleRefusedError("a string is not UTF-8") from None
                elif kind == get:  # BINGET, a quarter of a course pickle
                    index = data[pos + 1]
                    if index not in memo:
                        raise PickleRefusedError(f"memo index {index} not set")
                    push(memo[index])
                    pos += 2
                    continue
                elif kind == mark:
                    marks.append(len(stack))
                    pos += 1
                    continue
                elif kind == literal:
                    number(pos)
                    pos += arg
                elif kind == end:
                    return self.stop(pos)
                else:
                    pos = handlers[kind](self, pos, arg)
                if pushed is not None:
                    push(pushed)
                    # What the pickler writes after each new object.
                    if data[pos] == memoize:
                        memo[len(memo)] = pushed
                        pos += 1
        except IndexError:  # an argument or an opcode past the end
            raise PickleRefusedError("pickle data was truncated") from None
        raise PickleRefusedError(f"more than {MAX_OPCODES} opcodes")

    def stop(self, pos: int) -> list[int]:
        """Where `walk` ends, at STOP: one item, and nothing after it."""
        if len(self.stack) <= self.marks[-1]:
            raise PickleRefusedError("pickle stack underflow")
        if pos + 1 != len(self.data):
            raise PickleRefusedError("trailing bytes after the pickle")
        return self.numbers

    def long(self, pos: int, arg: int) -> int:
        """A LONG1 or LONG4 literal: an ``arg``-byte length and that many bytes."""
        self.numbers.append(pos)
        return self.sized(pos, arg)

    def sized(self, pos: int, arg: int) -> int:
        """An ``arg``-byte length (signed when 4 bytes, as LONG4's is) and that many bytes."""
        start = pos + 1 + arg
        length = int.from_bytes(self.data[pos + 1 : start], "little", signed=arg == 4)
        if length < 0:
            raise PickleRefusedError("negative length")
        return start + length

    def string(self, pos: int, arg: int) -> int:
        """A long str: an ``arg``-byte length and that many bytes of UTF-8 (as
        the unpickler decodes them; `walk` checks the short ones itself)."""
        start = pos + 1 + arg
        end = self.sized(pos, arg)
        try:
            self.data[start:end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PickleRefusedError("a string is not UTF-8") from None
        return end

    def lines(self, pos: int, arg: int) -> int:
        """GLOBAL's two text lines, module and name: dotted ASCII names, as
        every global the allow-list admits is."""
        data = self.data
        try:
            first = data.index(b"\n", pos + 1)
            second = data.index(b"\n", first + 1)
        except ValueError:
            raise PickleRefusedError("pickle data was truncated") from None
        if not (_NAME.fullmatch(data, pos + 1, first) and _NAME.fullmatch(data, first + 1, second)):
            raise PickleRefusedError("GLOBAL names must be dotted ASCII names")
        return second + 1

    def put(self, pos: int, arg: int) -> int:
        """Memoize the top item at an ``arg``-byte index, within the payload's
        length (the C unpickler allocates memo space up to the index)."""
        index = int.from_bytes(self.data[pos + 1 : pos + 1 + arg], "little")
        if len(self.stack) <= self.marks[-1] or index >= len(self.data):
            raise PickleRefusedError(f"memo index {index} out of range")
        self.memo[index] = self.stack[-1]
        return pos + 1 + arg

    def get(self, pos: int, arg: int) -> int:
        """Push a copy of the memo entry at an ``arg``-byte index."""
        index = int.from_bytes(self.data[pos + 1 : pos + 1 + arg], "little")
        if index not in self.memo:
            raise PickleRefusedError(f"memo index {index} not set")
        self.stack.append(self.memo[index])
        return pos + 1 + arg

    def memoize(self, pos: int, arg: int) -> int:
        """A MEMOIZE that does not follow a new object."""
        if len(self.stack) <= self.marks[-1]:
            raise PickleRefusedError("pickle stack underflow")
        self.memo[len(self.memo)] = self.stack[-1]
        return pos + 1

    def pop_mark(self, below: int) -> int:
        """Drop the last mark and what is above it; ``below`` items (the list
        or dict being filled) must sit between it and the fence before it."""
        marks = self.marks
        if len(marks) == 1:
            raise PickleRefusedError("could not find MARK")
        mark = marks.pop()
        if mark - below < marks[-1]:
            raise PickleRefusedError("pickle stack underflow")
        return mark

    def to_mark(self, pos: int, arg: int) -> int:
        """What is above the last mark makes one item, or none (POP_MARK)."""
        del self.stack[self.pop_mark(arg) :]
        return pos + 1

    def setitems(self, pos: int, arg: int) -> int:
        """Keys and values above the last mark, into the dict below it."""
        stack = self.stack
        mark = self.pop_mark(arg)
        if (len(stack) - mark) % 2 or not all(stack[mark::2]):
            raise PickleRefusedError("dictionary keys must be strings")
        del stack[mark:]
        return pos + 1

    def setitem(self, pos: int, arg: int) -> int:
        """One key and value into the dict below them (hashing a key other than
        a string costs its whole size, each time: a nest of shared tuples
        takes forever)."""
        stack = self.stack
        if len(stack) - 3 < self.marks[-1] or not stack[-2]:
            raise PickleRefusedError("dictionary keys must be strings")
        del stack[-2:]
        return pos + 1

    def reduce(self, pos: int, arg: int) -> int:
        """A call, of the two items on top (`MAX_REDUCES` at most)."""
        stack = self.stack
        if len(stack) - 2 < self.marks[-1]:
            raise PickleRefusedError("pickle stack underflow")
        del stack[-2:]
        self.reduces += 1
        if self.reduces > MAX_REDUCES:
            raise PickleRefusedError(f"more than {MAX_REDUCES} REDUCE opcodes")
        return pos + 1

    def pop(self, pos: int, arg: int) -> int:
        """POP takes the top item, or the last mark if nothing is above it."""
        marks, stack = self.marks, self.stack
        if len(marks) > 1 and marks[-1] == len(stack):
            marks.pop()
        elif len(stack) <= marks[-1]:
            raise PickleRefusedError("pickle stack underflow")
        else:
            stack.pop()
        return pos + 1


# What `_Scan.walk` does with an opcode: call its `_HANDLERS` entry, or, by
# itself, skip a fixed-size argument (noting where a number is), check a
# short string, push a BINGET's memo entry, set a mark or end at STOP.
_LONG, _STR, _LINES, _GET4, _PUT, _MEMO, _TO_MARK, _SETITEM, _SETITEMS, _REDUCE = range(10)
_POP, _FIXED, _SHORT_STR, _GET, _MARK, _END, _NUMBER = range(10, 17)
_HANDLERS: list[Callable[[_Scan, int, int], int]] = [
    _Scan.long,
    _Scan.string,
    _Scan.lines,
    _Scan.get,
    _Scan.put,
    _Scan.memoize,
    _Scan.to_mark,
    _Scan.setitem,
    _Scan.setitems,
    _Scan.reduce,
    _Scan.pop,
]
#: An opcode's row: what `walk` does with it; its argument (the bytes to
#: skip, the opcode's included, for `_FIXED` and `_NUMBER`, the handler's argument
#: otherwise); for `_FIXED`, the items it needs above the last mark and the
#: items it pops (fewer when it changes the one below in place); and what is
#: pushed last (True: a str, False: anything else, None: nothing).
_Row = tuple[int, int, int, int, bool | None]

# The opcodes pickle protocols 2 to 5 write for a course pickle or an
# answer, by name (a test holds each code against `pickletools`), as
# (code, *row); every other opcode is refused.
_ALLOWED: dict[str, tuple[int, int, int, int, int, bool | None]] = {
    "PROTO": (0x80, _FIXED, 2, 0, 0, None),
    "FRAME": (0x95, _FIXED, 9, 0, 0, None),
    "STOP": (0x2E, _END, 0, 0, 0, None),
    "MARK": (0x28, _MARK, 0, 0, 0, None),
    "POP": (0x30, _POP, 0, 0, 0, None),
    "POP_MARK": (0x31, _TO_MARK, 0, 0, 0, None),
    "NONE": (0x4E, _FIXED, 1, 0, 0, False),
    "NEWTRUE": (0x88, _FIXED, 1, 0, 0, False),
    "NEWFALSE": (0x89, _FIXED, 1, 0, 0, False),
    "BININT": (0x4A, _NUMBER, 5, 0, 0, False),
    "BININT1": (0x4B, _NUMBER, 2, 0, 0, False),
    "BININT2": (0x4D, _NUMBER, 3, 0, 0, False),
    "LONG1": (0x8A, _LONG, 1, 0, 0, False),
    "LONG4": (0x8B, _LONG, 4, 0, 0, False),
    "BINFLOAT": (0x47, _NUMBER, 9, 0, 0, False),
    "SHORT_BINUNICODE": (0x8C, _SHORT_STR, 1, 0, 0, True),
    "BINUNICODE": (0x58, _STR, 4, 0, 0, True),
    "BINUNICODE8": (0x8D, _STR, 8, 0, 0, True),
    "EMPTY_LIST": (0x5D, _FIXED, 1, 0, 0, False),
    "APPEND": (0x61, _FIXED, 1, 2, 1, None),  # the list stays
    "APPENDS": (0x65, _TO_MARK, 1, 0, 0, None),  # so does the list below the mark
    "EMPTY_TUPLE": (0x29, _FIXED, 1, 0, 0, False),
    "TUPLE": (0x74, _TO_MARK, 0, 0, 0, False),
    "TUPLE1": (0x85, _FIXED, 1, 1, 1, False),
    "TUPLE2": (0x86, _FIXED, 1, 2, 2, False),
    "TUPLE3": (0x87, _FIXED, 1, 3, 3, False),
    "EMPTY_DICT": (0x7D, _FIXED, 1, 0, 0, False),
    "SETITEM": (0x73, _SETITEM, 0, 0, 0, None),
    "SETITEMS": (0x75, _SETITEMS, 1, 0, 0, None),  # the dict stays below the mark
    "BINGET": (0x68, _GET, 0, 0, 0, None),
    "LONG_BINGET": (0x6A, _GET4, 4, 0, 0, None),
    "BINPUT": (0x71, _PUT, 1, 0, 0, None),
    "LONG_BINPUT": (0x72, _PUT, 4, 0, 0, None),
    "MEMOIZE": (_MEMOIZE, _MEMO, 0, 0, 0, None),
    "GLOBAL": (0x63, _LINES, 0, 0, 0, False),
    "STACK_GLOBAL": (0x93, _FIXED, 1, 2, 2, False),
    "REDUCE": (0x52, _REDUCE, 0, 0, 0, False),
    "BUILD": (0x62, _FIXED, 1, 2, 1, None),  # the object stays
    "NEWOBJ": (0x81, _FIXED, 1, 2, 2, False),
}
_OPCODES: list[_Row | None] = [None] * 256
for _code, _kind, _arg, _need, _npop, _pushed in _ALLOWED.values():
    _OPCODES[_code] = (_kind, _arg, _need, _npop, _pushed)


def scan(data: bytes) -> list[int]:
    """Walk the opcodes once, before unpickling, and return where the number
    literals are; `PickleRefusedError` for:

    - any opcode a course pickle does not use (persistent ids, the extension
      registry, INST/OBJ, sets, buffers...), more than `MAX_OPCODES` opcodes
      or more than `MAX_REDUCES` REDUCEs;
    - memo indexes beyond the payload's length;
    - dictionary keys other than strings;
    - truncation, bytes after STOP, and stack underflows.
    """
    return _Scan(data).walk()
