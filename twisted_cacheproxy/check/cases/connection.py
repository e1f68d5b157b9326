"""Connections (PROTOCOL.md 1): persistent, half-closed by the client,
several at once, and one abandoned half-way."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ..case import SHOULD, case
from ..context import Context
from ..messages import expect_result
from ..verdicts import Failed, situation


@case("connection.persistent", "One connection carries five exchanges in turn", section="1")
def persistent(ctx: Context) -> Generator[Any, Any, None]:
    """A connection carries any number of request/answer exchanges until the
    client closes it: keep reading after an answer instead of closing."""
    probe = yield ctx.connect()
    for n in range(1, 6):
        req = ctx.fresh(steps=n == 3)
        with situation(f"exchange {n} of 5 on one connection"):
            frame = yield ctx.ask(req, probe)
            expect_result(frame, req)


@case(
    "connection.half-close",
    "A request sent just before the client's end-of-file is still answered",
    section="1",
    level=SHOULD,
)
def half_close(ctx: Context) -> Generator[Any, Any, None]:
    """A client may shut down its sending side once it has sent its last
    request (nc -N does). Answer what was received before the end-of-file,
    then close the connection."""
    probe = yield ctx.connect()
    req = ctx.fresh()
    probe.send(req.frame)
    probe.half_close()
    frame = yield probe.answer(f"the answer to {req.label}, sent just before our end-of-file")
    expect_result(frame, req)
    rest = yield probe.closed()
    if rest:
        raise Failed(f"{len(rest)} unasked-for bytes followed the answer")


@case(
    "connection.concurrent",
    "A second client is answered while a first one is in the middle of a request",
    section="1",
    level=SHOULD,
)
def concurrent(ctx: Context) -> Generator[Any, Any, None]:
    """Serve clients independently (a thread or a reactor per connection): one
    slow client must not stop the others."""
    slow, other = ctx.fresh(), ctx.fresh()
    first = yield ctx.connect()
    first.send(slow.frame[:7])
    second = yield ctx.connect()
    frame = yield ctx.ask(other, second)
    with situation("while connection 1 had sent 7 bytes of a request"):
        expect_result(frame, other)
    first.send(slow.frame[7:])
    frame = yield first.answer(f"the answer to {slow.label}, completed")
    expect_result(frame, slow)


@case(
    "connection.survives-abort",
    "A client that resets its connection in mid-request does not disturb the service",
    section="1",
    level=SHOULD,
)
def survives_abort(ctx: Context) -> Generator[Any, Any, None]:
    """A peer may vanish at any moment: drop its connection and its half-read
    request, and go on serving everyone else."""
    first = yield ctx.connect()
    req = ctx.fresh()
    first.send(req.frame[:9])
    yield ctx.sleep(0.1)
    first.abort()
    yield ctx.sleep(0.2)
    other = ctx.fresh()
    with situation("after a client reset its connection with 9 bytes sent"):
        frame = yield ctx.ask(other)
        expect_result(frame, other)
