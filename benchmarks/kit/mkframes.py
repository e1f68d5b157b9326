#!/usr/bin/env python3
"""Write calculator-protocol request frames (legacy pickle encoding) to a file.

Frames are simply concatenated; each one is self-delimiting through the
total-length field of its 12-byte header ('!LHHHxx').

The expression classes below are this kit's own stand-ins.  They are placed
in a module object registered as sys.modules['calculator'], so pickles name
them 'calculator.X', exactly like the course client's pickles.  Nothing from
the reference implementation is imported.

Examples:
  mkframes.py -o max.bin --expr ex2                 # max(2, 3) + 3, S=1 C=1 cc=65535
  mkframes.py -o pow.bin --expr ex3 --no-steps
  mkframes.py -o miss5000.bin --random 5000 --seed 1
  mkframes.py -o max.bin --expr ex2 --verify 19999   # also check answers of a server
  mkframes.py --list
"""

import argparse
import builtins
import enum
import math
import operator
import pickle
import random
import socket
import struct
import sys
import time
import types

HEADER = struct.Struct("!LHHHxx")
MAX_FRAME = 65535

# --------------------------------------------------------------------------
# Stand-in 'calculator' module: plain classes whose instance __dict__ holds
# exactly the attribute names the protocol lists, in the same order.
# --------------------------------------------------------------------------
calc = types.ModuleType("calculator", "bench stand-ins for the calculator classes")


class Expression:
    __module__ = "calculator"


class Constant(Expression):
    __module__ = "calculator"

    def __init__(self, value):
        self.value = value


class NamedConstant(Expression):
    __module__ = "calculator"

    def __init__(self, name, value):
        self.name = name
        self.value = value


class Associativity(enum.Enum):
    __module__ = "calculator"
    LEFT = 0
    RIGHT = 1


class BinaryOperator:
    __module__ = "calculator"

    def __init__(self, symbol, function, associativity=Associativity.LEFT):
        self.symbol = symbol
        self.function = function
        self.associativity = associativity


class BinaryExpr(Expression):
    __module__ = "calculator"

    def __init__(self, left_operand, operator, right_operand):
        self.left_operand = wrap(left_operand)
        self.operator = operator
        self.right_operand = wrap(right_operand)


class UnaryOperator:
    __module__ = "calculator"

    def __init__(self, symbol, function):
        self.symbol = symbol
        self.function = function


class UnaryExpr(Expression):
    __module__ = "calculator"

    def __init__(self, operator, operand):
        self.operator = operator
        self.operand = wrap(operand)


class Function:
    __module__ = "calculator"

    def __init__(self, name, function):
        self.name = name
        self.function = function


class FunctionCallExpr(Expression):
    __module__ = "calculator"

    def __init__(self, function, args):
        self.function = function
        self.args = [wrap(a) for a in args]


for _cls in (
    Expression,
    Constant,
    NamedConstant,
    Associativity,
    BinaryOperator,
    BinaryExpr,
    UnaryOperator,
    UnaryExpr,
    Function,
    FunctionCallExpr,
):
    setattr(calc, _cls.__name__, _cls)
sys.modules["calculator"] = calc


def wrap(v):
    return v if isinstance(v, Expression) else Constant(v)


# Shared operator objects (shared like the course client's, so the pickle
# memo references them the same way).
ADD = BinaryOperator("+", operator.add)
SUB = BinaryOperator("-", operator.sub)
MUL = BinaryOperator("*", operator.mul)
DIV = BinaryOperator("/", operator.truediv)
MOD = BinaryOperator("%", operator.mod)
POW = BinaryOperator("**", operator.pow, Associativity.RIGHT)
NEG = UnaryOperator("-", operator.neg)
POS = UnaryOperator("+", operator.pos)
FUNCS = {
    n: Function(n, f)
    for n, f in (
        ("sin", math.sin),
        ("cos", math.cos),
        ("tan", math.tan),
        ("sqrt", math.sqrt),
        ("log", math.log),
        ("max", builtins.max),
        ("min", builtins.min),
        ("pow", builtins.pow),
    )
}
E = NamedConstant("E", math.e)


def b(op):
    return lambda left, right: BinaryExpr(left, op, right)


def f(name):
    return lambda *a: FunctionCallExpr(FUNCS[name], list(a))


add, sub, mul, div, pw = b(ADD), b(SUB), b(MUL), b(DIV), b(POW)
neg = lambda x: UnaryExpr(NEG, x)  # noqa: E731
fmax, fsin, flog = f("max"), f("sin"), f("log")

# The six standard example expressions (text form, tree).
NAMED = {
    "ex1": (
        "(sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13",
        lambda: mul(
            div(fsin(fmax(2, mul(3, 4), 5, mul(6, div(mul(7, 8), 9)), div(10, 11))), 12), 13
        ),
    ),
    "ex2": ("max(2, 3) + 3", lambda: add(fmax(2, 3), 3)),
    "ex3": (
        "3 + ((4 * 2) / ((1 - 5) ** (2 ** 3)))",
        lambda: add(3, div(mul(4, 2), pw(sub(1, 5), pw(2, 3)))),
    ),
    "ex4": ("((1 + 2) ** (3 * 4)) / (5 * 6)", lambda: div(pw(add(1, 2), mul(3, 4)), mul(5, 6))),
    "ex5": (
        "-(-((1 + (2 + 3)) ** -(4 + 5)))",
        lambda: neg(neg(pw(add(1, add(2, 3)), neg(add(4, 5))))),
    ),
    "ex6": (
        "max(2, 3 * 4, log(e), 6 * 7, 9 / 8)",
        lambda: fmax(2, mul(3, 4), flog(E), mul(6, 7), div(9, 8)),
    ),
}
ALIASES = {"max": "ex2", "pow": "ex3"}


def evaluate(e):
    """Python semantics, the same as the protocol asks of a server."""
    if isinstance(e, (Constant, NamedConstant)):
        return e.value
    if isinstance(e, BinaryExpr):
        return e.operator.function(evaluate(e.left_operand), evaluate(e.right_operand))
    if isinstance(e, UnaryExpr):
        return e.operator.function(evaluate(e.operand))
    if isinstance(e, FunctionCallExpr):
        return e.function.function(*[evaluate(a) for a in e.args])
    raise TypeError(type(e))


def text(e):
    if isinstance(e, Constant):
        return repr(e.value)
    if isinstance(e, NamedConstant):
        return e.name.lower()
    if isinstance(e, BinaryExpr):
        return f"({text(e.left_operand)} {e.operator.symbol} {text(e.right_operand)})"
    if isinstance(e, UnaryExpr):
        return f"{e.operator.symbol}({text(e.operand)})"
    return f"{e.function.name}({', '.join(text(a) for a in e.args)})"


def random_exprs(n, seed, shape):
    """n expressions with pairwise distinct pickles."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        if shape == "max":  # same shape as ex2: max(a, b) + c
            e = add(fmax(rng.randrange(1000), rng.randrange(1000)), rng.randrange(1000))
        else:  # 'tree': small random tree of + - * max min, ints only

            def node(d):
                if d == 0 or rng.random() < 0.25:
                    return Constant(rng.randrange(1, 100))
                k = rng.randrange(5)
                if k < 3:
                    return BinaryExpr(node(d - 1), (ADD, SUB, MUL)[k], node(d - 1))
                return FunctionCallExpr(FUNCS[("max", "min")[k - 3]], [node(d - 1), node(d - 1)])

            e = node(3)
            if not isinstance(e, Expression) or isinstance(e, Constant):
                continue
        key = pickle.dumps(e)
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def frame(expr, steps, cache, cache_control, ts=None):
    data = pickle.dumps(expr)  # default protocol (4 on 3.8+), NEWOBJ + BUILD
    total = HEADER.size + len(data)
    if total > MAX_FRAME:
        raise ValueError(f"frame too large: {total}")
    flags = (int(cache) << 12) | (int(steps) << 11) | (1 << 10)
    cc = cache_control if cache else 0
    return HEADER.pack(int(time.time()) if ts is None else ts, total, flags, cc) + data


# --------------------------------------------------------------------------
# Verification against a running server/proxy (127.0.0.1 only).
# --------------------------------------------------------------------------
class _Safe(pickle.Unpickler):
    def find_class(self, module, name):  # results are tuples/lists/str/int/float
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def verify(frames, exprs, port, show):
    """Send each frame lockstep on one connection; check status 200 + exact result."""
    bad = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i, (fr, e) in enumerate(zip(frames, exprs, strict=False)):
            s.sendall(fr)
            hdr = _recv_exact(s, HEADER.size)
            _ts, total, flags, cc = HEADER.unpack(hdr)
            body = _recv_exact(s, total - HEADER.size) if total > HEADER.size else b""
            status, is_req = flags & 0x3FF, bool(flags & (1 << 10))
            want = evaluate(e)
            try:
                got, steps = _Safe(__import__("io").BytesIO(body)).load()
            except Exception as ex:  # error payloads hold api.* exceptions
                got, steps = f"<unreadable: {ex}>", []
            ok = (
                status == 200 and not is_req and type(got) is type(want) and repr(got) == repr(want)
            )
            if not ok:
                bad += 1
            if show or not ok:
                print(
                    f"[{i}] status={status} C={flags >> 12 & 1} S={flags >> 11 & 1} cc={cc} "
                    f"len={total} result={got!r} expected={want!r} {'OK' if ok else 'MISMATCH'}"
                    + (f" steps={steps}" if show else "")
                )
    print(f"verify: {len(frames) - bad}/{len(frames)} frames answered 200 with the expected result")
    return bad == 0


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--out", help="output file (frames concatenated)")
    ap.add_argument(
        "--expr",
        action="append",
        default=[],
        help="named expression (ex1..ex6; aliases max=ex2, pow=ex3); repeatable",
    )
    ap.add_argument(
        "--random", type=int, default=0, metavar="N", help="add N distinct random expressions"
    )
    ap.add_argument(
        "--shape",
        choices=("max", "tree"),
        default="max",
        help="random shape: 'max' = max(a, b) + c (like ex2), 'tree' = random depth<=3 tree",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--steps", dest="steps", action="store_true", default=True, help="S=1 (default)"
    )
    ap.add_argument("--no-steps", dest="steps", action="store_false", help="S=0")
    ap.add_argument(
        "--cache", dest="cache", action="store_true", default=True, help="C=1 (default)"
    )
    ap.add_argument(
        "--no-cache", dest="cache", action="store_false", help="C=0 (cache control sent as 0)"
    )
    ap.add_argument(
        "--cache-control", type=int, default=65535, help="max-age, 0..65535 (default 65535)"
    )
    ap.add_argument(
        "--verify", type=int, metavar="PORT", help="send each frame to 127.0.0.1:PORT and check"
    )
    ap.add_argument("--show", action="store_true", help="print each expression / answer")
    ap.add_argument("--list", action="store_true", help="list named expressions and exit")
    a = ap.parse_args()

    if a.list:
        for k, (t, mk) in NAMED.items():
            print(f"{k}: {t} = {evaluate(mk())!r}")
        return 0
    if not 0 <= a.cache_control <= 65535:
        ap.error("cache control must be 0..65535")
    exprs = []
    for name in a.expr:
        name = ALIASES.get(name, name)
        if name not in NAMED:
            ap.error(f"unknown expression {name!r} (see --list)")
        exprs.append(NAMED[name][1]())
    exprs += random_exprs(a.random, a.seed, a.shape)
    if not exprs:
        ap.error("nothing to write: give --expr and/or --random")
    frames = [frame(e, a.steps, a.cache, a.cache_control) for e in exprs]
    if a.out:
        with open(a.out, "wb") as fh:
            for fr in frames:
                fh.write(fr)
        sizes = [len(x) for x in frames]
        print(
            f"wrote {len(frames)} frames, {sum(sizes)} bytes, "
            f"frame size {min(sizes)}..{max(sizes)} "
            f"(S={int(a.steps)} C={int(a.cache)} cc={a.cache_control if a.cache else 0}) to {a.out}"
        )
    if a.show:
        for e in exprs[:20]:
            print(f"  {text(e)} = {evaluate(e)!r}")
    if a.verify is not None:
        return 0 if verify(frames, exprs, a.verify, a.show) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
