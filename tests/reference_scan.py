"""A reference for the pre-scan, written the slow, obvious way: the opcodes
come from `pickletools.genops` (which reads and checks every argument), and
the stack effects from each opcode's ``stack_before`` and ``stack_after``
as `pickletools` documents them. Only the policy is shared with the fast
scanner: which opcodes are allowed and the limits. `test_fuzz` holds the two
to the same verdict."""

from __future__ import annotations

import pickletools
import re

from twisted_cacheproxy.calculator.codec.prescan import _ALLOWED, MAX_OPCODES, MAX_REDUCES

ALLOWED = frozenset(_ALLOWED)
#: Opcodes that change the item below their arguments in place; every other
#: opcode that pushes makes a new object (NEWOBJ and REDUCE too, although
#: `pickletools` gives their result the type of their first argument).
IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "MEMOIZE"})
#: What GLOBAL may name: dotted ASCII names, as every allowed global is.
NAME = re.compile(rb"[A-Za-z0-9_.]+")


class RefusedError(Exception):
    """The reference's verdict on a refused pickle."""


def reference_scan(data: bytes) -> None:
    """Raise `RefusedError` for what the pre-scan must refuse; return otherwise."""
    stack: list[bool] = []  # True for a str
    marks: list[int] = []
    memo: dict[int, bool] = {}
    reduces = counted = 0
    new_object = False  # whether the last opcode pushed a new object
    try:
        ops = list(pickletools.genops(data))
    except Exception as e:  # truncation, unknown opcodes, bad arguments
        raise RefusedError(f"genops: {e}") from None
    for op, arg, pos in ops:
        if op.name not in ALLOWED:
            raise RefusedError(f"{op.name} is not allowed")
        if not (op.name == "MEMOIZE" and new_object):
            counted += 1
        if counted > MAX_OPCODES:
            raise RefusedError("too many opcodes")
        fence = marks[-1] if marks else 0
        if op.name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()
            new_object = False
            continue
        before = op.stack_before
        if pickletools.markobject in before:
            if not marks:
                raise RefusedError("no mark")
            mark = marks.pop()
            above = stack[mark:]
            del stack[mark:]
            fence = marks[-1] if marks else 0
            below = before.index(pickletools.markobject)
        else:
            above, below = [], len(before)
        if op.name.endswith("PUT"):
            below = 1  # reads the top item
        if len(stack) - below < fence:
            raise RefusedError("stack underflow")
        popped = stack[len(stack) - below :]
        if op.name == "SETITEM" and not popped[1]:
            raise RefusedError("key not a string")
        if op.name == "SETITEMS" and (len(above) % 2 or not all(above[::2])):
            raise RefusedError("key not a string")
        # genops gives GLOBAL's two lines joined by a space: read them again.
        if op.name == "GLOBAL" and not all(map(NAME.fullmatch, data[pos + 1 :].split(b"\n")[:2])):
            raise RefusedError("odd global name")
        if op.name.endswith("PUT"):
            if arg >= len(data):
                raise RefusedError("memo index out of range")
            memo[arg] = popped[0]
            new_object = False
            continue
        del stack[len(stack) - below :]
        if op.name.endswith("GET"):
            if arg not in memo:
                raise RefusedError("memo index not set")
            kind = memo[arg]
        elif op.name in IN_PLACE:
            kind = popped[0]
        else:
            kind = op.stack_after == [pickletools.pyunicode]
        if op.name == "MEMOIZE":
            memo[len(memo)] = kind
        if op.name == "REDUCE":
            reduces += 1
            if reduces > MAX_REDUCES:
                raise RefusedError("too many REDUCEs")
        if op.name == "STOP" and pos + 1 != len(data):
            raise RefusedError("trailing bytes")
        if op.stack_after == [pickletools.markobject]:
            marks.append(len(stack))
        else:
            stack.extend([kind] * len(op.stack_after))
        new_object = (
            bool(op.stack_after) and op.name not in IN_PLACE and not op.name.endswith("GET")
        )
