"""The two payload encodings and the evaluation (PROTOCOL.md 3 and 4): the
six standard expressions with their exact results and steps, as text and
as the course client's pickles, the text grammar, every pickled operator
and function, ``rand``, and a pickle that would run code."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

from ...transport import wire
from ..case import SHOULD, case
from ..context import Context
from ..messages import (
    Request,
    expect_error,
    expect_result,
    raw,
    read,
    request,
    shown,
    vector_request,
    vectors,
)
from ..verdicts import Failed

#: Text expressions and their values as Python computes them (PROTOCOL.md
#: 3.1 and 4: the arithmetic is Python's, ``**`` binds tighter than unary
#: minus and is right-associative, constants in any case).
GRAMMAR: tuple[tuple[str, int | float], ...] = (
    ("2 ** 3 ** 2", 2**3**2),
    ("-2 ** 2", -(2**2)),
    ("2 ** -1", 2**-1),
    ("7 % 3 + 7.5 % 2", 7 % 3 + 7.5 % 2),
    ("10 / 4 + 10 / 5", 10 / 4 + 10 / 5),
    ("1.5e-3 * 2", 1.5e-3 * 2),
    ("+4 - -2", +4 - -2),
    ("2*(3+4)", 2 * (3 + 4)),
    ("pi + TAU + e", math.pi + math.tau + math.e),
    ("Pi * 2", math.pi * 2),
    ("sin(1) + cos(1) + tan(1)", math.sin(1) + math.cos(1) + math.tan(1)),
    ("sqrt(16) + log(10)", math.sqrt(16) + math.log(10)),
    ("max(5, 2, 9) - min(4, 1.5)", max(5, 2, 9) - min(4, 1.5)),
    ("pow(2, 10) + pow(2.5, 2)", pow(2, 10) + pow(2.5, 2)),
)

#: Every operator, function and named constant of the legacy encoding,
#: each pickled as the course client pickles it (PROTOCOL.md 3.2).
PICKLED: tuple[tuple[str, int | float], ...] = (
    ("(7 + 2) - (7 * 2)", (7 + 2) - (7 * 2)),
    ("(7 / 2) + (7 % 2)", (7 / 2) + (7 % 2)),
    ("2 ** 3 ** 2", 2**3**2),
    ("-(5) + +(3)", -5 + +3),
    ("sin(1) + cos(1) + tan(1)", math.sin(1) + math.cos(1) + math.tan(1)),
    ("sqrt(2) + log(2)", math.sqrt(2) + math.log(2)),
    ("max(1, 5, 3) + min(4, 2) + pow(2, 8)", max(1, 5, 3) + min(4, 2) + pow(2, 8)),
    ("pi + tau + e", math.pi + math.tau + math.e),
)


#: Seconds for a case that sends six or more requests one after another.
MANY = 5.0


def _each(ctx: Context, reqs: list[Request]) -> Generator[Any, Any, None]:
    """Each request on a connection of its own (so that these cases judge the
    payloads alone, whatever the target does with connections), checked for
    its exact answer."""
    for req in reqs:
        frame = yield ctx.ask(req)
        expect_result(frame, req)


@case(
    "payload.text-results",
    "The six standard expressions as text: exact results",
    section="3.1, 4",
    limit=MANY,
)
def text_results(ctx: Context) -> Generator[Any, Any, None]:
    """Text requests are UTF-8 infix expressions; the answer is JSON
    {"result": <number>, "steps": [...]}, with Python's exact value and type
    (an int stays an int: 6, not 6.0)."""
    yield from _each(ctx, [vector_request(v) for v in vectors()])


@case(
    "payload.text-steps",
    "The six standard expressions as text: exact steps",
    section="3.1, 4",
    limit=MANY,
)
def text_steps(ctx: Context) -> Generator[Any, Any, None]:
    """With S=1 the answer has S=1 and every step exactly as PROTOCOL.md 4
    writes it (brackets, number formats, named constants by name); note the
    brackets around a negative base of **, as in (-4) ** 8."""
    yield from _each(ctx, [vector_request(v, steps=True) for v in vectors()])


@case(
    "payload.legacy-results",
    "The six standard expressions pickled as the course client does: exact results",
    section="3.2, 4",
    limit=MANY,
)
def legacy_results(ctx: Context) -> Generator[Any, Any, None]:
    """Data starting with byte 0x80 is a pickle of the course's calculator
    objects; the answer is a pickle of (result, steps). Unpickle with a
    restricted Unpickler that admits exactly the classes and functions of
    PROTOCOL.md 3.2."""
    yield from _each(ctx, [vector_request(v, legacy=True) for v in vectors()])


@case(
    "payload.legacy-steps",
    "The six standard expressions pickled as the course client does: exact steps",
    section="3.2, 4",
    limit=MANY,
)
def legacy_steps(ctx: Context) -> Generator[Any, Any, None]:
    """With S=1 a pickled request gets the same steps as a text one, in the
    pickled (result, steps) tuple."""
    yield from _each(ctx, [vector_request(v, legacy=True, steps=True) for v in vectors()])


@case("payload.no-steps-unless-asked", "Without S=1 an answer has S=0 and no steps", section="2, 3")
def no_steps(ctx: Context) -> Generator[Any, Any, None]:
    """Steps are sent only when the request has S=1; otherwise the answer has
    S=0 and an empty steps list."""
    for req in (ctx.fresh(legacy=False), ctx.fresh(legacy=True)):
        frame = yield ctx.ask(req)
        reading = expect_result(frame, req)
        if frame.header.steps or reading.steps:
            raise Failed(
                f"{req.label} did not ask for steps, but the answer has S={int(frame.header.steps)}"
                f" and the steps {reading.steps!r}"
            )


@case(
    "payload.text-grammar",
    "The text grammar: precedence, constants, every function",
    section="3.1, 4",
    limit=MANY,
)
def text_grammar(ctx: Context) -> Generator[Any, Any, None]:
    """The text encoding knows numbers (1.5e-3 too), pi/tau/e in any case,
    + - * / % **, unary - and +, and sin cos tan sqrt log max min pow; **
    binds tighter than unary minus and groups to the right, as in Python."""
    yield from _each(ctx, [request(text, expected=value) for text, value in GRAMMAR])


@case(
    "payload.legacy-functions",
    "Every operator, function and constant pickled as the course client does",
    section="3.2, 4",
    limit=MANY,
)
def legacy_functions(ctx: Context) -> Generator[Any, Any, None]:
    """The restricted Unpickler must admit every function global of PROTOCOL.md
    3.2 (_operator.add ... pos, math.sin ... log, builtins.max min pow) and
    Associativity, Constant, NamedConstant and the expression classes."""
    reqs = [request(text, legacy=True, expected=value) for text, value in PICKLED]
    yield from _each(ctx, reqs)


@case(
    "payload.legacy-enums-by-name",
    "Operators pickled as some Python 3.11 releases pickle them: Associativity by name",
    section="3.2",
    level=SHOULD,
    limit=MANY,
)
def legacy_enums_by_name(ctx: Context) -> Generator[Any, Any, None]:
    """Some Python 3.11 releases (Debian 12's 3.11.2 among them) pickle an
    enum member as getattr(calculator.Associativity, 'LEFT'), not as
    Associativity(0): a course client run there sends that. Admit getattr on
    Associativity with LEFT or RIGHT (and nothing else) and read the same tree."""
    reqs = [
        request(text, legacy=True, enums_by_name=True, expected=value)
        for text, value in PICKLED[:3]
    ]
    yield from _each(ctx, reqs)


def _rand_requests(ctx: Context) -> list[tuple[Request, int]]:
    low = ctx.session.unique()
    text = f"rand({low}, {low + 1})"
    return [(request(text, legacy=legacy, known=False), low) for legacy in (False, True)]


@case("payload.rand", "rand(a, b) gives a float between a and b, as text and pickled", section="3")
def rand(ctx: Context) -> Generator[Any, Any, None]:
    """rand(a, b) is random.uniform(a, b); pickled, it is getattr(random.Random(
    <state>), 'uniform'): rebuild it without unpickling a real Random."""
    for req, low in _rand_requests(ctx):
        frame = yield ctx.ask(req)
        reading = read(frame, req)
        value = reading.value
        if (
            frame.header.status != wire.OK
            or type(value) is not float
            or not low <= value <= low + 1
        ):
            got = reading.error or shown(value)
            raise Failed(f"{req.label} must give a float from {low} to {low + 1}, not {got}")


@case("payload.rand-not-cacheable", "An answer that used rand is marked not cacheable", section="4")
def rand_not_cacheable(ctx: Context) -> Generator[Any, Any, None]:
    """Non-deterministic answers (anything that calls rand) are sent with C=0
    (or a cache control of 0): no cache may keep them."""
    for req, _ in _rand_requests(ctx):
        frame = yield ctx.ask(req)
        if frame.header.cache and frame.header.max_age:
            raise Failed(
                f"the answer to {req.label} says C=1 with cache control "
                f"{frame.header.max_age}: a cache would keep one random number for everyone"
            )


#: Protocol 2 pickle: GLOBAL time.sleep, 3, TUPLE1, REDUCE, STOP. Run by a
#: plain ``pickle.loads``, it sleeps 3 seconds (and does nothing else).
SLEEPING_PICKLE = b"\x80\x02ctime\nsleep\nK\x03\x85R."
SLEEP = 3.0


@case(
    "payload.legacy-runs-no-code",
    "A pickle naming a function outside the allowed list is refused without running it",
    section="3.2",
    limit=SLEEP + 3,
)
def legacy_runs_no_code(ctx: Context) -> Generator[Any, Any, None]:
    """pickle.loads on network data runs whatever the data names. This pickle
    names time.sleep with 3 s (harmless, but it shows); read legacy data
    with an Unpickler whose find_class admits only PROTOCOL.md 3.2's names,
    and answer everything else with 400."""
    req = raw(
        wire.encode(0, wire.make_flags(request=True), wire.FOREVER, SLEEPING_PICKLE),
        "a pickle that calls time.sleep with 3 when unpickled",
    )
    started = ctx.reactor.seconds()
    frame = yield ctx.ask(req)
    took = ctx.reactor.seconds() - started
    if took >= SLEEP - 0.5:
        raise Failed(
            f"the answer to {req.label} took {took:.1f} s: the pickle was unpickled without "
            f"restriction, which runs any code a client names"
        )
    expect_error(frame, req, "a pickle naming a function outside the allowed list")
