"""The expression model, its evaluator (Python-exact) and the step formatter.

Trees are built by the text parser or the legacy decoder, both of which
enforce `MAX_DEPTH` and `MAX_NODES` while building, so the recursive
functions here never meet a tree deep enough to exhaust the stack.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

Real = int | float

#: Deepest nesting of operators and calls a tree may have.
MAX_DEPTH = 200
#: Most nodes (numbers, constants, operators, calls) in one tree.
MAX_NODES = 10_000
#: Most arguments of one function call.
MAX_ARGS = 100
#: Largest integer result, in bits (about 4,200 decimal digits, under
#: Python's own 4,300-digit int-to-string limit).
MAX_INT_BITS = 14_000


class CalculationError(Exception):
    """A request we refuse, reported as a 400 with `kind` as its error type."""

    kind = "ValueError"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class TooLargeError(CalculationError):
    """The answer would not fit in one message."""


CONSTANTS = {"PI": math.pi, "TAU": math.tau, "E": math.e}

BINARY: dict[str, Callable[[Real, Real], Real]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "%": operator.mod,
    "**": operator.pow,
}
UNARY: dict[str, Callable[[Real], Real]] = {"-": operator.neg, "+": operator.pos}


def _rand(a: Real, b: Real) -> float:
    return random.uniform(a, b)


def _extreme(pick: Callable[..., Real]) -> Callable[..., Real]:
    """``max``/``min`` that also take one argument (which they return)."""

    def call(*args: Real) -> Real:
        return args[0] if len(args) == 1 else pick(*args)

    return call


#: name -> (implementation, fewest arguments, most arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Real], int, int]] = {
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
    "max": (_extreme(max), 1, MAX_ARGS),
    "min": (_extreme(min), 1, MAX_ARGS),
    "pow": (pow, 2, 3),
    "rand": (_rand, 2, 2),
}
#: Functions whose answer is not a function of their arguments.
NONDETERMINISTIC = frozenset({"rand"})


@dataclass(frozen=True, slots=True, eq=True)
class Number:
    value: Real


@dataclass(frozen=True, slots=True, eq=True)
class Constant:
    name: str  # "PI", "TAU" or "E"

    @property
    def value(self) -> float:
        return CONSTANTS[self.name]


@dataclass(frozen=True, slots=True, eq=True)
class Binary:
    left: Node
    op: str
    right: Node


@dataclass(frozen=True, slots=True, eq=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True, slots=True, eq=True)
class Call:
    name: str
    args: tuple[Node, ...]


Node = Number | Constant | Binary | Unary | Call


def check_call(name: str, nargs: int) -> None:
    """Refuse an unknown function or a wrong number of arguments."""
    if name not in FUNCTIONS:
        raise CalculationError(f"unknown function {name!r}", "SyntaxError")
    _, low, high = FUNCTIONS[name]
    if not low <= nargs <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise CalculationError(
            f"{name}() takes {want} argument{'s' if high > 1 else ''} ({nargs} given)",
            "TypeError",
        )


def is_deterministic(node: Node) -> bool:
    """True unless the tree calls a function such as ``rand``."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Call):
            if n.name in NONDETERMINISTIC:
                return False
            stack.extend(n.args)
        elif isinstance(n, Binary):
            stack.append(n.left)
            stack.append(n.right)
        elif isinstance(n, Unary):
            stack.append(n.operand)
    return True


# --- evaluation ---------------------------------------------------------


def _checked(value: object) -> Real:
    """Refuse what is not a finite real number of bounded size."""
    kind = type(value)
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:  # type: ignore[union-attr]
            raise CalculationError(
                f"integer result too large (over {MAX_INT_BITS} bits)", "OverflowError"
            )
        return value  # type: ignore[return-value]
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise CalculationError("float result out of range", "OverflowError")
        return value  # type: ignore[return-value]
    if kind is complex:
        raise CalculationError(f"result is not a real number: {value!r}", "ValueError")
    raise CalculationError(f"unsupported value of type {kind.__name__}", "TypeError")


def _power(base: Real, exponent: Real) -> Real:
    """``**`` and ``pow(a, b)``, refusing integer results too large to compute."""
    if (
        type(base) is int
        and type(exponent) is int
        and abs(base) > 1
        and (base.bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise CalculationError(
            f"integer result too large (over {MAX_INT_BITS} bits)", "OverflowError"
        )
    return base**exponent


def _apply_binary(op: str, left: Real, right: Real) -> Real:
    if op == "**":
        return _checked(_power(left, right))
    return _checked(BINARY[op](left, right))


def _apply_unary(op: str, operand: Real) -> Real:
    return _checked(UNARY[op](operand))


def _apply_call(name: str, args: list[Real]) -> Real:
    if name == "pow" and len(args) == 2:
        return _checked(_power(args[0], args[1]))
    if name == "pow" and any(type(a) is int and a.bit_length() > 64 for a in args[1:]):
        raise CalculationError("pow() with a modulus takes 64-bit exponent and modulus")
    return _checked(FUNCTIONS[name][0](*args))


def _guard(func: Callable[..., Real], *args: object) -> Real:
    """Run one operation, turning Python's arithmetic errors into 400s."""
    try:
        return func(*args)
    except CalculationError:
        raise
    except (ArithmeticError, ValueError, TypeError) as e:
        raise CalculationError(str(e), type(e).__name__) from None


def evaluate(node: Node) -> Real:
    """The value of ``node`` with Python's arithmetic."""
    kind = type(node)
    if kind is Number:
        return node.value  # type: ignore[union-attr]
    if kind is Binary:
        return _guard(
            _apply_binary,
            node.op,
            evaluate(node.left),
            evaluate(node.right),  # type: ignore[union-attr]
        )
    if kind is Unary:
        return _guard(_apply_unary, node.op, evaluate(node.operand))  # type: ignore[union-attr]
    if kind is Call:
        return _guard(_apply_call, node.name, [evaluate(a) for a in node.args])  # type: ignore[union-attr]
    return node.value  # Constant


def evaluate_with_steps(node: Node, budget: int) -> tuple[Real, list[str]]:
    """The value of ``node`` and its reduction steps (PROTOCOL.md section 4).

    Each step is the whole tree after one more node has been reduced, so the
    steps are made by walking the tree in post-order and rendering it each
    time every child of a node is a value. ``budget`` bounds the characters of
    all steps together; past it `TooLargeError` is raised, which also bounds the
    work, since rendering costs about as much as its output.
    """
    values: dict[int, Real] = {}
    steps: list[str] = []
    used = 0

    def emit() -> None:
        nonlocal used
        text = format_node(node, values)
        used += len(text) + 4
        if used > budget:
            raise TooLargeError(
                "the steps do not fit in one message; ask without steps", "ValueError"
            )
        steps.append(text)

    def walk(n: Node) -> Real:
        kind = type(n)
        if kind is Number or kind is Constant:
            value = n.value  # type: ignore[union-attr]
        else:
            if kind is Binary:
                left = walk(n.left)  # type: ignore[union-attr]
                right = walk(n.right)  # type: ignore[union-attr]
                emit()
                value = _guard(_apply_binary, n.op, left, right)  # type: ignore[union-attr]
            elif kind is Unary:
                operand = walk(n.operand)  # type: ignore[union-attr]
                emit()
                value = _guard(_apply_unary, n.op, operand)  # type: ignore[union-attr]
            else:
                args = [walk(a) for a in n.args]  # type: ignore[union-attr]
                emit()
                value = _guard(_apply_call, n.name, args)  # type: ignore[union-attr]
        values[id(n)] = value
        return value

    result = walk(node)
    if steps:
        steps.append(repr(result))
    return result, steps


# --- formatting -----------------------------------------------------------

# Where a node is written, which decides its brackets.
_TOP, _OPERAND, _POW_BASE, _BARE = range(4)


def format_node(node: Node, values: dict[int, Real] | None = None) -> str:
    """Write ``node`` in step notation (PROTOCOL.md section 4); nodes whose id
    is in ``values`` are written as that value."""
    done = values if values is not None else {}

    def fmt(n: Node, where: int) -> str:
        if done and id(n) in done:
            text = repr(done[id(n)])
            return f"({text})" if where == _POW_BASE and text[0] == "-" else text
        kind = type(n)
        if kind is Number:
            text = repr(n.value)  # type: ignore[union-attr]
            return f"({text})" if where == _POW_BASE and text[0] == "-" else text
        if kind is Constant:
            return n.name  # type: ignore[union-attr]
        if kind is Binary:
            base = _POW_BASE if n.op == "**" else _OPERAND  # type: ignore[union-attr]
            text = f"{fmt(n.left, base)} {n.op} {fmt(n.right, _OPERAND)}"  # type: ignore[union-attr]
            return text if where in (_TOP, _BARE) else f"({text})"
        if kind is Unary:
            text = f"{n.op}({fmt(n.operand, _BARE)})"  # type: ignore[union-attr]
            return f"({text})" if where == _POW_BASE else text
        args = n.args  # type: ignore[union-attr]
        inner = _BARE if len(args) == 1 else _OPERAND
        return f"{n.name}({', '.join(fmt(a, inner) for a in args)})"  # type: ignore[union-attr]

    return fmt(node, _TOP)
