"""The text encoding's grammar: infix expressions with Python's precedence.

``**`` binds tighter than unary minus and is right-associative; ``- 2 ** 2``
is ``-(2 ** 2)`` and ``2 ** -1`` is allowed, exactly as in Python.

The parser is an operator-precedence parser with explicit stacks, so no
input, however deeply nested, can exhaust Python's recursion limit; the
limits of `expression` are checked as the tree is built, and the cheap ones
(size, number of terms) before parsing starts.
"""

from __future__ import annotations

import re
from itertools import islice

from .expression import (
    CONSTANTS,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_NODES,
    Binary,
    CalculationError,
    Call,
    Constant,
    Node,
    Number,
    Unary,
    check_call,
)

#: One token per match, as (number, name, operator, stray character). ASCII
#: only, as in Python's grammar: digits of other scripts (``١٢``, fullwidth
#: ones) or blanks (a no-break space) are stray characters.
_TOKEN = re.compile(
    r"\s*(?:"
    r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|([A-Za-z_][A-Za-z0-9_]*)"
    r"|(\*\*|[-+*/%(),])"
    r"|(\S))",
    re.ASCII,
)
#: What ``\s`` matches in `_TOKEN`.
_BLANKS = " \t\n\r\f\v"
#: Most tokens in one expression (room for brackets and commas around the
#: largest tree); the tokenizer stops reading there.
MAX_TOKENS = 4 * MAX_NODES
#: Longest integer literal, in digits (Python's own int-from-string limit).
MAX_DIGITS = 4300

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "%": 2, "**": 4}
_UNARY_PRECEDENCE = 3  # below `**` on its right, above everything else
_OPERAND_HINT = "expected a number, a name or '('"


def _syntax(message: str) -> CalculationError:
    return CalculationError(message, "SyntaxError")


def _stray(char: str, position: int) -> CalculationError:
    """A character no token starts with, named with its code point when it
    is not ASCII (it may look like a digit or a blank)."""
    if char.isascii():
        return _syntax(f"unexpected character {char!r} at position {position}")
    name = f"{char!r} (U+{ord(char):04X})"
    hint = ": numbers are written with the digits 0-9" if char.isdecimal() else ""
    return _syntax(f"unexpected character {name} at position {position}{hint}")


def _too_deep() -> CalculationError:
    return CalculationError(f"expression nested deeper than {MAX_DEPTH} levels")


def _number(text: str) -> Number:
    if "." in text or "e" in text or "E" in text:
        value: float | int = float(text)
        if value in (float("inf"), float("-inf")):
            raise CalculationError(f"number {text} is out of range", "OverflowError")
        return Number(value)
    if len(text) > MAX_DIGITS:
        raise CalculationError("integer literal too long", "OverflowError")
    value = int(text)
    if value.bit_length() > MAX_INT_BITS:
        raise CalculationError(
            f"integer literal too large (over {MAX_INT_BITS} bits)", "OverflowError"
        )
    return Number(value)


class _Parser:
    """One parse: an operand stack of (node, depth) and an operator stack.

    Operator entries are (precedence, symbol, is_binary); brackets and calls
    are (0, "(" or the function name, operand-stack height).
    """

    def __init__(self, matches: list[re.Match[str]]) -> None:
        self.matches = matches
        self.operands: list[tuple[Node, int]] = []
        self.operators: list[tuple] = []
        self.groups = 0
        self.nodes = 0

    def position(self, index: int) -> int:
        match = self.matches[index]
        return match.start(match.lastindex or 0)  # the token's group: one always matches

    def unexpected(self, index: int, hint: str) -> CalculationError:
        if index == len(self.matches):
            return _syntax(f"unexpected end of expression: {hint}")
        text = self.matches[index][self.matches[index].lastindex or 0]
        return _syntax(f"unexpected {text!r} at position {self.position(index)}: {hint}")

    def push(self, node: Node, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculationError(f"expression has more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise _too_deep()
        self.operands.append((node, depth))

    def reduce_from(self, floor: int) -> None:
        """Apply the operators on top whose precedence is at least ``floor``."""
        operators, operands = self.operators, self.operands
        while operators and operators[-1][0] >= floor:
            _, symbol, binary = operators.pop()
            right, rd = operands.pop()
            if binary:
                left, ld = operands.pop()
                self.push(Binary(left, symbol, right), max(ld, rd) + 1)
            else:
                self.push(Unary(symbol, right), rd + 1)

    def open(self, name: str) -> None:
        self.groups += 1
        if self.groups > MAX_DEPTH:
            raise _too_deep()
        self.operators.append((0, name, len(self.operands)))

    def at_call_start(self) -> bool:
        """Whether the last token was the ``(`` of a call."""
        if not self.operators:
            return False
        precedence, name, height = self.operators[-1]
        return precedence == 0 and name != "(" and height == len(self.operands)

    def close(self) -> None:
        """End the innermost bracket or call at a ``)``."""
        _, name, height = self.operators.pop()
        self.groups -= 1
        if name == "(":
            return
        args = self.operands[height:]
        check_call(name, len(args))
        del self.operands[height:]
        self.push(Call(name, tuple(a for a, _ in args)), max((d for _, d in args), default=0) + 1)

    def parse(self, tokens: list[tuple[str, ...]]) -> Node:
        operators = self.operators
        expect_operand = True
        count = len(tokens)
        i = 0
        while i < count:
            number, name, op, _ = tokens[i]
            if expect_operand:
                if number:
                    self.push(_number(number), 0)
                    expect_operand = False
                elif name:
                    if i + 1 < count and tokens[i + 1][2] == "(":
                        name = name.lower()
                        if name not in FUNCTIONS:
                            at = self.position(i)
                            raise _syntax(f"unknown function {name!r} at position {at}")
                        self.open(name)
                        i += 1
                    elif name.upper() in CONSTANTS:
                        self.push(Constant(name.upper()), 0)
                        expect_operand = False
                    else:
                        raise _syntax(f"unknown name {name!r} at position {self.position(i)}")
                elif op == "(":
                    self.open("(")
                elif op == "-" or op == "+":
                    operators.append((_UNARY_PRECEDENCE, op, False))
                elif op == ")" and self.at_call_start():
                    self.close()  # a call without arguments
                    expect_operand = False
                else:
                    raise self.unexpected(i, _OPERAND_HINT)
            elif op in _PRECEDENCE:
                precedence = _PRECEDENCE[op]
                # All but the right-associative `**` end an equal operator before them.
                self.reduce_from(precedence + 1 if op == "**" else precedence)
                operators.append((precedence, op, True))
                expect_operand = True
            elif (op == ")" or op == ",") and self.groups:
                self.reduce_from(1)
                if op == ")":
                    self.close()
                elif operators[-1][1] == "(":
                    raise self.unexpected(i, "expected ')'")
                else:
                    expect_operand = True
            else:
                raise self.unexpected(i, "expected ')'" if self.groups else "expected an operator")
            i += 1
        if expect_operand:
            raise self.unexpected(count, _OPERAND_HINT)
        if self.groups:
            raise self.unexpected(count, "expected ')'")
        self.reduce_from(1)
        return self.operands[0][0]


def parse(text: str) -> Node:
    """Parse one text-encoded expression, refusing what breaks the limits."""
    # Without trailing blanks every position starts a match, so the scan is
    # linear (a blank tail would be retried from each of its positions).
    matches = list(islice(_TOKEN.finditer(text.rstrip(_BLANKS)), MAX_TOKENS + 1))
    if not matches:
        raise _syntax("empty expression")
    parser = _Parser(matches)
    tokens = [m.groups("") for m in matches]  # number, name, operator, other
    for i, token in enumerate(tokens):
        if token[3]:
            raise _stray(token[3], parser.position(i))
    if sum(1 for t in tokens if t[0] or t[1]) > MAX_NODES:  # each is a node
        raise CalculationError(f"expression has more than {MAX_NODES} terms")
    if len(tokens) > MAX_TOKENS:
        raise CalculationError(f"expression has more than {MAX_TOKENS} tokens")
    return parser.parse(tokens)
