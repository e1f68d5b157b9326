"""The opcode pre-scan: one linear walk over legacy data, before the unpickler
sees it, that refuses what a course pickle never holds and what would cost
the unpickler more than the payload's size (PROTOCOL.md 3.2, SECURITY)."""

from __future__ import annotations

import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Iterator

from ..expression import MAX_NODES

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


def scan(data: bytes, preambles: PreambleMemo | None = None) -> None:
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
    resumed = None if preambles is None else preambles.resume(data)
    if resumed is None:
        stack: list[bool] = []  # True for a str
        marks: list[int] = []
        memo: dict[int, bool] = {}
        fence = reduces = pos = done = 0
    else:
        stack, marks, memo = list(resumed[0]), list(resumed[1]), dict(resumed[2])
        fence, reduces, pos, done = resumed[3:]
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
                if preamble is not None and preambles is not None:
                    preambles.remember(data, preamble)
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
#: How many preambles a `PreambleMemo` keeps by default.
MAX_PREAMBLES = 8

#: A scan's state: stack, marks, memo, fence, reduces, position, opcodes done.
_State = tuple[tuple[bool, ...], tuple[int, ...], dict[int, bool], int, int, int, int]


class PreambleMemo:
    """Scan states at the first number literal, by the bytes before it.

    Course pickles of one shape of tree share everything before their first
    number (the classes and functions down the leftmost path, about half the
    opcodes), so the scan of the next one resumes there. The state depends
    only on those bytes, so whoever sent them, it is the same: one memo can
    serve every connection of a server.
    """

    def __init__(self, size: int = MAX_PREAMBLES) -> None:
        self.size = size
        self._states: OrderedDict[bytes, _State] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[bytes]:
        """The remembered preambles, least recently used first."""
        return iter(self._states)

    def resume(self, data: bytes) -> _State | None:
        """The scan state after a remembered preamble of ``data``, if any."""
        for preamble, state in self._states.items():
            if data.startswith(preamble):
                self._states.move_to_end(preamble)
                return state
        return None

    def remember(self, data: bytes, state: _State) -> None:
        """Keep ``state``, the scan state at position ``state[5]`` of ``data``."""
        self._states[data[: state[5]]] = state
        while len(self._states) > self.size:
            self._states.popitem(last=False)
