#!/usr/bin/env python3
"""The slowest requests the server's limits still allow, timed.

For each kind of costly request this builds the largest one the limits of
``twisted_cacheproxy.calculator.expression`` (and the message size) still let through,
searching over its size where there is one to search, and times the server's
whole answer to it: decoding, evaluating (with and without steps) and
encoding, as ``CalculatorServerFactory.answer`` does it on the reactor
thread. A few refused requests that cost work before their refusal (junk
pickles the pre-scan must read to the end, the longest token floods) are
timed too. It prints one line per request and the worst time of all.

    python3 benchmarks/worst_case.py                 # 65535-byte messages
    python3 benchmarks/worst_case.py --max-message-size 8192 --repeat 5

Not part of the test suite; tests/test_event_loop_latency.py checks the
consequence over real TCP. Uses the working tree's package and the pickle
writer of tests/hostile.py.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from hostile import Writer, course_pickle  # noqa: E402
from twisted.internet import task  # noqa: E402

from twisted_cacheproxy.calculator import codec  # noqa: E402
from twisted_cacheproxy.calculator.codec.prescan import MAX_OPCODES, MAX_REDUCES  # noqa: E402
from twisted_cacheproxy.calculator.expression import (  # noqa: E402
    MAX_ARGS,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_INT_WORK,
    MAX_NODES,
    CalculationError,
    Number,
    Unary,
)
from twisted_cacheproxy.calculator.parser import MAX_TOKENS, parse  # noqa: E402
from twisted_cacheproxy.calculator.server import CalculatorServerFactory  # noqa: E402
from twisted_cacheproxy.transport import wire  # noqa: E402


def grouped(terms: list[str], op: str = " + ") -> str:
    """``terms`` joined by ``op`` in groups of at most 100, so the tree stays
    within MAX_DEPTH however many there are."""
    while len(terms) > 100:
        terms = ["(" + op.join(terms[i : i + 100]) + ")" for i in range(0, len(terms), 100)]
    return op.join(terms)


def text(make: Callable[[int], str]) -> Callable[[int], bytes]:
    return lambda n: make(n).encode()


def legacy(make: Callable[[int], str], **options: bool) -> Callable[[int], bytes]:
    return lambda n: course_pickle(parse(make(n)), **options)


def bushy(leaf: str, count: int) -> str:
    """``count`` leaves under ``max`` calls of MAX_ARGS arguments."""
    level = [leaf] * count
    while len(level) > 1:
        level = [
            "max(" + ", ".join(level[i : i + MAX_ARGS]) + ")"
            for i in range(0, len(level), MAX_ARGS)
        ]
    return level[0]


def chain(depth: int, opening: str, leaf: str, closing: str) -> str:
    return opening * depth + leaf + closing * depth


def combined(n: int) -> str:
    """``n`` of the largest powers, a call chain nested to the limit and as
    many leaves as the node limit leaves room for."""
    leaves = (MAX_NODES - 6 * n - MAX_DEPTH) // 2  # each with its "+"
    return grouped([POW] * n + ["1.5"] * max(1, leaves)) + " + " + SIN_CHAIN


# (kind, what, request maker over a size n, the sizes to search). The search
# finds the largest size still answered 200 without steps, which is then timed
# with and without steps.
Family = tuple[str, str, Callable[[int], bytes], range]

POW = "3 ** 8833 % 7"  # one 14,000-bit power
DIGITS = int(MAX_INT_BITS * math.log10(2))  # the longest literal under MAX_INT_BITS
SIN_CHAIN = chain(MAX_DEPTH - 2, "sin(", "1", ")")
FAMILIES: list[Family] = [
    ("integer powers", f"sum of n x ({POW})", text(lambda n: grouped([POW] * n)), range(1, 400)),
    (
        "integer products",
        "sum of n x ((2**6999+1) * (2**6999+1) % 7)",
        text(lambda n: grouped(["(2 ** 6999 + 1) * (2 ** 6999 + 1) % 7"] * n)),
        range(1, 400),
    ),
    (
        "integer remainders",
        "sum of n x ((2**13999-1) % (2**6999+1))",
        text(lambda n: grouped(["(2 ** 13999 - 1) % (2 ** 6999 + 1)"] * n)),
        range(1, 400),
    ),
    (
        "3-argument pow",
        "sum of n x pow(3, 2**64-1, 2**64-59)",
        text(lambda n: grouped(["pow(3, 18446744073709551615, 18446744073709551557)"] * n)),
        range(1, 600),
    ),
    (
        "powers of -1",
        "sum of n x ((-1) ** 2 ** 4000)",
        text(lambda n: grouped(["(-1) ** 2 ** 4000"] * n)),
        range(1, 500),
    ),
    (
        "largest literals",
        f"max of n literals of {DIGITS} digits",
        text(lambda n: "max(" + ", ".join(["9" * DIGITS] * n) + ")"),
        range(1, 20),
    ),
    (
        "largest results in steps",
        "2 ** 13999 - 1 - 2 - ... - n",
        text(lambda n: "2 ** 13999" + "".join(f" - {i}" for i in range(1, n + 1))),
        range(1, MAX_DEPTH - 1),
    ),
    (
        "most nodes",
        "max() tree of n leaves 1.5",
        text(lambda n: bushy("1.5", n)),
        range(1, MAX_NODES),
    ),
    (
        "float functions",
        "sum of n x sin(cos(log(2.5)))",
        text(lambda n: grouped(["sin(cos(log(2.5)))"] * n)),
        range(1, MAX_NODES),
    ),
    (
        "most tokens",
        "sum of n x ((((1))))",
        text(lambda n: grouped(["((((1))))"] * n)),
        range(1, MAX_TOKENS),
    ),
    (
        "deepest calls",
        f"sum of n x sin(sin(...)) {MAX_DEPTH - 2} deep",
        text(lambda n: grouped([SIN_CHAIN] * n)),
        range(1, 20),
    ),
    (
        "deepest powers",
        f"sum of n x 2 ** 1 ** ... {MAX_DEPTH - 2} deep",
        text(lambda n: grouped(["2" + " ** 1" * (MAX_DEPTH - 2)] * n)),
        range(1, 20),
    ),
    (
        "legacy: most nodes",
        "max() tree of n leaves 1.5",
        legacy(lambda n: bushy("1.5", n)),
        range(1, MAX_NODES),
    ),
    (
        "legacy: rand, one generator",
        "sum of n x rand(1, 2)",
        legacy(lambda n: grouped(["rand(1, 2)"] * n)),
        range(1, MAX_NODES),
    ),
    (
        "legacy: rand, a generator each",
        "sum of n x rand(1, 2), each with its own state",
        legacy(lambda n: grouped(["rand(1, 2)"] * n), fresh_generators=True),
        range(1, MAX_REDUCES),
    ),
    (
        "legacy: integer powers",
        f"sum of n x ({POW})",
        legacy(lambda n: grouped([POW] * n)),
        range(1, 400),
    ),
    (
        "everything at once",
        "n powers, a deep call chain and leaves up to MAX_NODES",
        text(combined),
        range(1, 400),
    ),
    (
        "legacy: everything at once",
        "n powers, a deep call chain and leaves up to MAX_NODES",
        legacy(combined),
        range(1, 400),
    ),
    (
        "legacy: deepest calls",
        f"sum of n x sin(sin(...)) {MAX_DEPTH - 2} deep",
        legacy(lambda n: grouped([SIN_CHAIN] * n)),
        range(1, 20),
    ),
]


def refused_requests(limit: int) -> Iterator[tuple[str, str, bytes]]:
    """Requests refused only after work proportional to their size."""
    room = limit - wire.HEADER_SIZE
    yield "refused: token flood", f"{room} x '('", b"(" * room
    yield "refused: token flood", f"{room // 2} x '1+'", b"1+" * (room // 2)
    yield "refused: stray character", "'1+' ... '$'", b"1+" * (room // 2 - 1) + b"$"
    yield "refused: blanks", f"{room} spaces", b" " * room
    body = room - 4
    yield "refused: junk pickle", "EMPTY_TUPLE, POP ...", b"\x80\x04" + b")0" * (body // 2) + b"N."
    yield "refused: junk pickle", "MARK ...", b"\x80\x04" + b"(" * body + b"N."
    yield "refused: junk pickle", "MEMOIZE ...", b"\x80\x04N" + b"\x94" * (body - 1) + b"."
    yield "refused: junk pickle", "BINGET ...", b"\x80\x04N\x94" + b"h\x00" * (body // 2 - 1) + b"."
    yield "refused: junk pickle", "BININT1, POP ...", b"\x80\x04" + b"K\x000" * (body // 3) + b"N."
    state = random.Random(1).getstate()
    w = Writer().global_("random", "Random").plain(state).memoize("state").raw(b"0")
    for _ in range(MAX_REDUCES):
        w.global_("random", "Random").raw(b")R")
        w.recall("state")
        w.raw(b"b0")
    yield "refused: generator states", f"{MAX_REDUCES} generators, one state", w.raw(b"N").stop()
    depth = MAX_DEPTH
    while len(deep_unary(depth * 2)) < room:
        depth *= 2
    yield "refused: deep pickle", f"{depth} unary levels", deep_unary(depth)
    call = Writer().new("FunctionCallExpr").raw(b"(").string("function").function("max")
    call.string("args").raw(b"](").new("Constant").string("value").raw(b"K\x01sb").memoize("one")
    count = 1
    while len(call.out) < room - 10:
        call.recall("one")
        count += 1
    yield "refused: arguments", f"max() with {count} arguments", call.raw(b"eub").stop()


def deep_unary(depth: int) -> bytes:
    """A unary minus chain ``depth`` deep, pickled (by hand: the pickler recurses)."""
    node = Number(1)
    for _ in range(depth):
        node = Unary("-", node)
    return course_pickle(node)


class Timer:
    """Times ``factory.answer`` the way the protocol calls it."""

    def __init__(self, limit: int, repeat: int) -> None:
        self.factory = CalculatorServerFactory(clock=task.Clock(), max_message_size=limit)
        self.limit = limit
        self.repeat = repeat

    def fits(self, data: bytes) -> bool:
        return wire.HEADER_SIZE + len(data) <= self.limit

    def status(self, data: bytes, steps: bool) -> int:
        return wire.decode_header(self._answer(data, steps)).status

    def _answer(self, data: bytes, steps: bool) -> bytes:
        flags = wire.make_flags(request=True, steps=steps)
        return self.factory.answer(wire.Header(0, 0, flags, 0), data, codec.encoding_of(data), 0)

    def time(self, data: bytes, steps: bool) -> tuple[float, int]:
        """The best of ``repeat`` runs, in ms, and the answer's status."""
        best = math.inf
        for _ in range(self.repeat):
            started = time.perf_counter()
            answer = self._answer(data, steps)
            best = min(best, time.perf_counter() - started)
        return best * 1000, wire.decode_header(answer).status

    def largest(self, make: Callable[[int], bytes], sizes: range) -> int | None:
        """The largest size whose request fits and is answered 200 (the
        sizes are searched by bisection: beyond a limit, all are refused);
        None if even the smallest does not fit."""
        low, high = sizes.start, sizes.stop - 1

        def ok(n: int) -> bool:
            try:
                data = make(n)
            except CalculationError:  # a legacy tree the parser will not build
                return False
            return self.fits(data) and self.status(data, False) == 200

        if not ok(low):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if ok(middle):
                low = middle
            else:
                high = middle - 1
        return low


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-message-size", type=int, default=wire.LENGTH_LIMIT)
    parser.add_argument("--repeat", type=int, default=7, help="runs per request; the best counts")
    args = parser.parse_args()
    timer = Timer(args.max_message_size, args.repeat)
    print(
        f"limits: MAX_NODES={MAX_NODES} MAX_DEPTH={MAX_DEPTH} MAX_ARGS={MAX_ARGS} "
        f"MAX_INT_BITS={MAX_INT_BITS} MAX_INT_WORK={MAX_INT_WORK} MAX_TOKENS={MAX_TOKENS} "
        f"MAX_OPCODES={MAX_OPCODES} MAX_REDUCES={MAX_REDUCES}; "
        f"messages up to {args.max_message_size} bytes"
    )
    print(f"{'kind':36} {'n':>5} {'bytes':>6} {'status':>6} {'ms':>8}  request")
    worst = (0.0, "")
    requests = []
    for kind, what, make, sizes in FAMILIES:
        n = timer.largest(make, sizes)
        if n is None:
            print(f"{kind:36} (does not fit in a message)")
        else:
            requests.append((kind, what, n, make(n)))
    requests += [
        (kind, what, "", data) for kind, what, data in refused_requests(args.max_message_size)
    ]
    for kind, what, n, data in requests:
        assert timer.fits(data), kind
        for steps in (False, True):
            ms, status = timer.time(data, steps)
            label = kind + (", steps" if steps else "")
            print(f"{label:36} {n!s:>5} {len(data):6} {status:6} {ms:8.2f}  {what}")
            worst = max(worst, (ms, label))
    print(f"worst: {worst[0]:.2f} ms ({worst[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
