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
#: Most nodes (numbers, constants, operators, calls) in one tree: parsing,
#: decoding and evaluating the largest tree then takes well under 20 ms.
MAX_NODES = 1_000
#: Most arguments of one function call.
MAX_ARGS = 100
#: Largest integer result, in bits (about 4,200 decimal digits, under
#: Python's own 4,300-digit int-to-string limit).
MAX_INT_BITS = 14_000
#: Most work one evaluation may spend on large integers, in products of
#: 64-bit words (about 3 ns each, so at most about 3 ms): ``*`` and ``%``
#: cost the product of their operands' sizes, ``**`` and ``pow(a, b)`` a
#: quarter of the square of their result's, ``pow(a, b, m)`` 128 per bit of
#: ``b`` (the other operations are linear in their operands' size). It
#: admits 84 results of the largest size.
MAX_INT_WORK = 1_000_000


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


#: name -> (implementation, fewest arguments, most arguments). ``max`` and
#: ``min`` are the builtins themselves, so one argument is their own
#: ``TypeError`` ("'int' object is not iterable"), as on the course server.
FUNCTIONS: dict[str, tuple[Callable[..., Real], int, int]] = {
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
    "max": (max, 1, MAX_ARGS),
    "min": (min, 1, MAX_ARGS),
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
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _too_large()
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise CalculationError("float result out of range", "OverflowError")
        return value
    if type(value) is complex:
        raise CalculationError(f"result is not a real number: {value!r}", "ValueError")
    raise CalculationError(f"unsupported value of type {type(value).__name__}", "TypeError")


def _too_large() -> CalculationError:
    return CalculationError(f"integer result too large (over {MAX_INT_BITS} bits)", "OverflowError")


class _Arithmetic:
    """The operations of one evaluation: Python's arithmetic, refusing integer
    results over `MAX_INT_BITS` before computing them and charging the work
    on big integers against `MAX_INT_WORK` (see there)."""

    __slots__ = ("work",)

    def __init__(self) -> None:
        self.work = 0

    def charge(self, units: int) -> None:
        self.work += units
        if self.work > MAX_INT_WORK:
            raise CalculationError(
                "expression too costly: too much work on large integers", "OverflowError"
            )

    def power(self, base: Real, exponent: Real) -> Real:
        """``**`` and ``pow(a, b)``; results over the limit are refused from
        the operands' sizes, before computing."""
        if type(base) is int and type(exponent) is int and exponent > 0:
            if -1 <= base <= 1:  # Python would loop over all the exponent's bits
                return base if exponent & 1 else base * base
            if (base.bit_length() - 1) * exponent > MAX_INT_BITS:
                raise _too_large()
            words = int(exponent * math.log2(abs(base))) >> 6
            self.charge(words * words // 4)
        return base**exponent

    def binary(self, op: str, left: Real, right: Real) -> Real:
        if op == "**":
            return _checked(self.power(left, right))
        if type(left) is int and type(right) is int and (op == "*" or op == "%"):
            if op == "*" and left.bit_length() + right.bit_length() - 1 > MAX_INT_BITS:
                raise _too_large()
            self.charge((left.bit_length() >> 6) * (right.bit_length() >> 6))
        return _checked(BINARY[op](left, right))

    def unary(self, op: str, operand: Real) -> Real:
        return _checked(UNARY[op](operand))

    def call(self, name: str, args: list[Real]) -> Real:
        if name == "pow":
            if len(args) == 2:
                return _checked(self.power(args[0], args[1]))
            if any(type(a) is int and a.bit_length() > 64 for a in args[1:]):
                raise CalculationError("pow() with a modulus takes 64-bit exponent and modulus")
            if type(args[1]) is int:
                self.charge(128 * args[1].bit_length())
        return _checked(FUNCTIONS[name][0](*args))

    def apply(self, node: Node, values: list[Real]) -> Real:
        """The value of ``node`` (not a number) from its operands' values,
        with Python's arithmetic errors turned into 400s."""
        try:
            kind = type(node)
            if kind is Binary:
                return self.binary(node.op, values[0], values[1])  # type: ignore[union-attr]
            if kind is Unary:
                return self.unary(node.op, values[0])  # type: ignore[union-attr]
            return self.call(node.name, values)  # type: ignore[union-attr]
        except CalculationError:
            raise
        except (ArithmeticError, ValueError, TypeError) as e:
            raise CalculationError(str(e), type(e).__name__) from None


def _operands(node: Node) -> tuple[Node, ...]:
    kind = type(node)
    if kind is Binary:
        return (node.left, node.right)  # type: ignore[union-attr]
    if kind is Unary:
        return (node.operand,)  # type: ignore[union-attr]
    return node.args  # type: ignore[union-attr]


def evaluate(node: Node) -> Real:
    """The value of ``node`` with Python's arithmetic."""
    return _evaluate(node, _Arithmetic())


def _evaluate(node: Node, arithmetic: _Arithmetic) -> Real:
    kind = type(node)
    if kind is Number or kind is Constant:
        return node.value  # type: ignore[union-attr]
    values = []
    for operand in _operands(node):  # a loop, not a comprehension: one frame per level
        values.append(_evaluate(operand, arithmetic))
    return arithmetic.apply(node, values)


def evaluate_with_steps(node: Node, budget: int) -> tuple[Real, list[str]]:
    """The value of ``node`` and its reduction steps (PROTOCOL.md section 4).

    Each step is the whole tree after one more node has been reduced, so the
    steps are made by walking the tree in post-order and rendering it each
    time every child of a node is a value. ``budget`` bounds the characters of
    all steps together; past it `TooLargeError` is raised, which also bounds the
    work, since rendering costs about as much as its output.
    """
    arithmetic = _Arithmetic()
    values: dict[int, Real] = {}
    entered: set[int] = set()
    formatter = _Formatter(values, entered)
    steps: list[str] = []
    used = 0

    def emit() -> None:
        nonlocal used
        text = formatter.text(node, _TOP)
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
            entered.add(id(n))
            operands = []
            for operand in _operands(n):
                operands.append(walk(operand))
            emit()
            value = arithmetic.apply(n, operands)
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
    return _Formatter(values if values is not None else {}).text(node, _TOP)


class _Formatter:
    """Writes a tree in step notation, the nodes whose id is in ``values`` as
    that value. Given the ids of the nodes the steps' walk has ``entered``,
    it keeps the text of the others from one step to the next: a subtree the
    walk has not entered yet cannot have changed, so each step costs about
    the size of the part that did."""

    __slots__ = ("entered", "kept", "values")

    def __init__(self, values: dict[int, Real], entered: set[int] | None = None) -> None:
        self.values = values
        self.entered = entered
        self.kept: dict[int, tuple[int, str]] = {}  # id -> (where, text)

    def text(self, n: Node, where: int) -> str:
        key = id(n)
        if key in self.values:
            text = repr(self.values[key])
            return f"({text})" if where == _POW_BASE and text[0] == "-" else text
        if self.entered is None:
            return self.write(n, where)
        kept = self.kept.get(key)
        if kept is not None and kept[0] == where and key not in self.entered:
            return kept[1]
        text = self.write(n, where)
        self.kept[key] = (where, text)
        return text

    def write(self, n: Node, where: int) -> str:
        kind = type(n)
        if kind is Number:
            text = repr(n.value)  # type: ignore[union-attr]
            return f"({text})" if where == _POW_BASE and text[0] == "-" else text
        if kind is Constant:
            return n.name  # type: ignore[union-attr]
        if kind is Binary:
            base = _POW_BASE if n.op == "**" else _OPERAND  # type: ignore[union-attr]
            left = self.text(n.left, base)  # type: ignore[union-attr]
            text = f"{left} {n.op} {self.text(n.right, _OPERAND)}"  # type: ignore[union-attr]
            return text if where in (_TOP, _BARE) else f"({text})"
        if kind is Unary:
            text = f"{n.op}({self.text(n.operand, _BARE)})"  # type: ignore[union-attr]
            return f"({text})" if where == _POW_BASE else text
        args = n.args  # type: ignore[union-attr]
        inner = _BARE if len(args) == 1 else _OPERAND
        texts = []
        for a in args:  # a loop, not a comprehension: fewer frames per level
            texts.append(self.text(a, inner))
        return f"{n.name}({', '.join(texts)})"  # type: ignore[union-attr]
