"""Error answers (PROTOCOL.md 2, 3 and 4): a 400 with the error in the
request's encoding, and the connection still usable afterwards, since the
stream is still in step."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ...transport import wire
from ..case import case
from ..context import Context
from ..messages import Request, expect_error, raw, request
from ..verdicts import Failed


def _refused(ctx: Context, cases: list[tuple[Request, str]]) -> Generator[Any, Any, list[Any]]:
    """Each request on one connection must get a 400; the connection must
    then still answer a valid request."""
    probe = yield ctx.connect()
    readings = []
    for req, why in cases:
        frame = yield ctx.ask(req, probe)
        readings.append(expect_error(frame, req, why))
    yield ctx.still_usable(probe, "the 400 answer" + ("s" if len(cases) > 1 else ""))
    return readings


def _text(text: str) -> Request:
    return request(text, known=False)


@case("errors.syntax", "A syntax error gets a 400, and the connection goes on", section="2, 3.1")
def syntax(ctx: Context) -> Generator[Any, Any, None]:
    """An expression that cannot be parsed is a client error: status 400 with
    {"error": "<message>", "type": "<kind>"} (a SyntaxError, say). Answer
    it and keep the connection open: the stream is still in step."""
    n = ctx.session.unique()
    yield from _refused(
        ctx, [(_text(f"{n} +"), "a syntax error"), (_text(f"({n} + 1"), "a syntax error")]
    )


@case("errors.division-by-zero", "Division by zero gets a 400 'division by zero'", section="4")
def division_by_zero(ctx: Context) -> Generator[Any, Any, None]:
    """Evaluation errors are 400 with the exception's message: Python's
    ZeroDivisionError('division by zero') for N / 0."""
    req = _text(f"{ctx.session.unique()} / 0")
    (reading,) = yield from _refused(ctx, [(req, "a division by zero")])
    if "by zero" not in (reading.error_message or ""):
        raise Failed(
            f"the error for {req.label} must say 'division by zero', not {reading.error!r}"
        )


@case(
    "errors.legacy-error", "A pickled request's error answer is a pickled exception", section="3.2"
)
def legacy_error(ctx: Context) -> Generator[Any, Any, None]:
    """The error answer to a pickled request is a pickle of an exception
    instance any Python can import, such as ZeroDivisionError('division by
    zero'), so that the course client can unpickle and show it."""
    req = request(f"{ctx.session.unique()} / 0", legacy=True, known=False)
    (reading,) = yield from _refused(ctx, [(req, "a division by zero")])
    if "by zero" not in (reading.error_message or ""):
        raise Failed(
            f"the error for {req.label} must say 'division by zero', not {reading.error!r}"
        )


@case("errors.math-domain", "A math domain error gets a 400", section="4")
def math_domain(ctx: Context) -> Generator[Any, Any, None]:
    """math.sqrt of a negative number raises ValueError('math domain
    error'): a 400 with that message, not a crash or a 500."""
    n = ctx.session.unique()
    yield from _refused(
        ctx,
        [(_text(f"sqrt(-{n})"), "a math domain error"), (_text("log(0)"), "a math domain error")],
    )


@case("errors.unknown-name", "An unknown function or name gets a 400", section="3.1")
def unknown_name(ctx: Context) -> Generator[Any, Any, None]:
    """Only pi, tau, e and sin cos tan sqrt log max min pow rand are known:
    anything else is a client error (never looked up with eval or getattr)."""
    n = ctx.session.unique()
    yield from _refused(
        ctx,
        [
            (_text(f"foo({n})"), "a call of an unknown function"),
            (_text(f"{n} + x"), "an unknown name"),
        ],
    )


@case("errors.bad-call", "A function called with the wrong arguments gets a 400", section="3.1, 4")
def bad_call(ctx: Context) -> Generator[Any, Any, None]:
    """Wrong argument counts are Python's TypeError, a 400: sqrt(1, 2), and
    max(5), which the builtin refuses ("'int' object is not iterable")."""
    n = ctx.session.unique()
    yield from _refused(
        ctx,
        [
            (_text(f"sqrt({n}, 2)"), "sqrt with two arguments"),
            (_text(f"max({n})"), "max with one number (Python's TypeError)"),
        ],
    )


@case("errors.not-real", "A result that is not a real number gets a 400", section="4")
def not_real(ctx: Context) -> Generator[Any, Any, None]:
    """Python makes (-8) ** 0.5 a complex number; only real numbers are
    results, so that is a 400 saying so (not a 200 no client can read)."""
    req = _text(f"(-{ctx.session.unique()}) ** 0.5")
    yield from _refused(ctx, [(req, "a complex result")])


@case("errors.response-frame", "A message with T=0 (a response) gets a 400", section="2")
def response_frame(ctx: Context) -> Generator[Any, Any, None]:
    """A message with T=0 sent to a server or proxy is a client error: answer
    400 rather than compute it, forward it, or drop the connection."""
    data = f"{ctx.session.unique()} + 1".encode()
    frame = wire.encode(0, wire.make_flags(request=False, status=wire.OK), wire.FOREVER, data)
    req = raw(frame, f"{data.decode()!r} sent with T=0, status 200 (a response)")
    yield from _refused(ctx, [(req, "not a request")])


@case("errors.garbage", "Data that is neither an expression nor a pickle gets a 400", section="3")
def garbage(ctx: Context) -> Generator[Any, Any, None]:
    """Data that is not UTF-8 text, and data that starts with 0x80 but is
    not a valid pickle, are 400 'unsupported payload' in the request's
    encoding; never a crash, a hang or a closed connection."""
    flags = wire.make_flags(request=True, cache=True)
    bad_text = wire.encode(0, flags, wire.FOREVER, b"\xff\xfe 1 + 1")
    bad_pickle = wire.encode(0, flags, wire.FOREVER, b"\x80\x04garbage, not a pickle")
    yield from _refused(
        ctx,
        [
            (raw(bad_text, "the bytes ff fe '1 + 1' (not UTF-8)"), "not UTF-8 text"),
            (raw(bad_pickle, "0x80 then 'garbage' (a broken pickle)"), "not a valid pickle"),
        ],
    )


@case("errors.empty-request", "A request without data gets a 400", section="3")
def empty_request(ctx: Context) -> Generator[Any, Any, None]:
    """A 12-byte request (no data, total length 12) is valid framing but no
    expression: a 400, and the connection goes on."""
    frame = wire.encode(0, wire.make_flags(request=True, cache=True), wire.FOREVER, b"")
    yield from _refused(ctx, [(raw(frame, "a request with no data (total length 12)"), "empty")])
