"""The text encoding's grammar: infix expressions with Python's precedence.

``**`` binds tighter than unary minus and is right-associative; ``- 2 ** 2``
is ``-(2 ** 2)`` and ``2 ** -1`` is allowed, exactly as in Python.
"""

from __future__ import annotations

import re

from .expression import (
    CONSTANTS,
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

_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|[-+*/%(),])"
    r")"
)
_END = ("end", "", -1)


def _syntax(message: str) -> CalculationError:
    return CalculationError(message, "SyntaxError")


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            at = len(text) - len(text[pos:].lstrip())
            raise _syntax(f"unexpected character {text[at]!r} at position {at}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    if len(tokens) > 4 * MAX_NODES:
        raise CalculationError(f"expression has more than {MAX_NODES} terms")
    tokens.append(_END)
    return tokens


def _number(text: str) -> Number:
    if "." in text or "e" in text or "E" in text:
        value: float | int = float(text)
        if value in (float("inf"), float("-inf")):
            raise CalculationError(f"number {text} is out of range", "OverflowError")
        return Number(value)
    if len(text) > 4300:
        raise CalculationError("integer literal too long", "OverflowError")
    value = int(text)
    if value.bit_length() > MAX_INT_BITS:
        raise CalculationError(
            f"integer literal too large (over {MAX_INT_BITS} bits)", "OverflowError"
        )
    return Number(value)


class _Parser:
    """Recursive descent over a token list; ``depth`` bounds the recursion."""

    def __init__(self, tokens: list[tuple[str, str, int]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.nodes = 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.pos]

    def take(self) -> tuple[str, str, int]:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, op: str) -> None:
        kind, text, at = self.take()
        if kind != "op" or text != op:
            raise _unexpected(kind, text, at, f"expected {op!r}")

    def node(self, node: Node, depth: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculationError(f"expression has more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise CalculationError(f"expression nested deeper than {MAX_DEPTH} levels")
        return node

    # Every method returns (node, depth of that node's subtree).
    def expression(self) -> tuple[Node, int]:
        left, ld = self.term()
        while self.peek()[0] == "op" and self.peek()[1] in "+-":
            op = self.take()[1]
            right, rd = self.term()
            ld = max(ld, rd) + 1
            left = self.node(Binary(left, op, right), ld)
        return left, ld

    def term(self) -> tuple[Node, int]:
        left, ld = self.factor()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/", "%"):
            op = self.take()[1]
            right, rd = self.factor()
            ld = max(ld, rd) + 1
            left = self.node(Binary(left, op, right), ld)
        return left, ld

    def factor(self) -> tuple[Node, int]:
        kind, text, _ = self.peek()
        if kind == "op" and text in ("-", "+"):
            self.take()
            operand, d = self.nested(self.factor)
            return self.node(Unary(text, operand), d + 1), d + 1
        return self.power()

    def power(self) -> tuple[Node, int]:
        base, bd = self.primary()
        kind, text, _ = self.peek()
        if kind == "op" and text == "**":
            self.take()
            exponent, ed = self.nested(self.factor)
            d = max(bd, ed) + 1
            return self.node(Binary(base, "**", exponent), d), d
        return base, bd

    def nested(self, rule) -> tuple[Node, int]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculationError(f"expression nested deeper than {MAX_DEPTH} levels")
        try:
            return rule()
        finally:
            self.depth -= 1

    def primary(self) -> tuple[Node, int]:
        kind, text, at = self.take()
        if kind == "number":
            return self.node(_number(text), 0), 0
        if kind == "op" and text == "(":
            inner = self.nested(self.expression)
            self.expect(")")
            return inner
        if kind == "name":
            upper = text.upper()
            if self.peek()[1] == "(" and self.peek()[0] == "op":
                return self.call(text.lower(), at)
            if upper in CONSTANTS:
                return self.node(Constant(upper), 0), 0
            raise _syntax(f"unknown name {text!r} at position {at}")
        raise _unexpected(kind, text, at, "expected a number, a name or '('")

    def call(self, name: str, at: int) -> tuple[Node, int]:
        if name not in ("sin", "cos", "tan", "sqrt", "log", "max", "min", "pow", "rand"):
            raise _syntax(f"unknown function {name!r} at position {at}")
        self.take()  # "("
        args: list[Node] = []
        depth = 0
        if self.peek()[1] != ")":
            while True:
                arg, d = self.nested(self.expression)
                args.append(arg)
                depth = max(depth, d)
                if self.peek()[0] == "op" and self.peek()[1] == ",":
                    self.take()
                    continue
                break
        self.expect(")")
        check_call(name, len(args))
        return self.node(Call(name, tuple(args)), depth + 1), depth + 1


def _unexpected(kind: str, text: str, at: int, hint: str) -> CalculationError:
    if kind == "end":
        return _syntax(f"unexpected end of expression: {hint}")
    return _syntax(f"unexpected {text!r} at position {at}: {hint}")


def parse(text: str) -> Node:
    """Parse one text-encoded expression, refusing what breaks the limits."""
    tokens = _tokenize(text)
    if len(tokens) == 1:
        raise _syntax("empty expression")
    parser = _Parser(tokens)
    node, _ = parser.expression()
    kind, token, at = parser.peek()
    if kind != "end":
        raise _unexpected(kind, token, at, "expected an operator")
    return node
