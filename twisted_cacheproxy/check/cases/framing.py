"""Framing by the total length (PROTOCOL.md 1): TCP splits and joins
messages as it likes, and only the length field says where one ends."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from typing import Any

from ...transport import wire
from ..case import PROXY, case
from ..context import Context
from ..messages import expect_error, expect_result, raw, request
from ..scripted import Reply
from ..verdicts import Failed, Skipped, situation

#: Seconds between the pieces of a split request: the receiver gets them
#: in separate reads.
GAP = 0.25


@case("framing.split-request", "A request sent in three pieces is answered once", section="1")
def split_request(ctx: Context) -> Generator[Any, Any, None]:
    """Reassemble each message by its total length: TCP may deliver one
    message over several reads. Never assume one recv() is one message; read
    until you have 12 header bytes, then until you have the total length."""
    probe = yield ctx.connect()
    req = ctx.fresh()
    for piece in (req.frame[:5], req.frame[5:14]):
        probe.send(piece)
        yield ctx.sleep(GAP)
    probe.send(req.frame[14:])
    frame = yield probe.answer(f"the answer to {req.label}, sent in pieces of 5, 9 and the rest")
    expect_result(frame, req)
    yield ctx.still_usable(probe, "a request sent in three pieces")


@case("framing.two-in-one", "Two requests in one segment get two answers", section="1")
def two_in_one(ctx: Context) -> Generator[Any, Any, None]:
    """One read may hold several messages: after handling one, look for the
    next in what is left of the buffer instead of dropping it."""
    probe = yield ctx.connect()
    first, second = ctx.fresh(), ctx.fresh()
    probe.send(first.frame + second.frame)
    for n, req in enumerate((first, second), 1):
        with situation(f"answer {n} of 2, both requests sent in one write"):
            frame = yield probe.answer(f"the answer to {req.label} (both sent in one write)")
            expect_result(frame, req)


@case("framing.pipelined", "Eight pipelined requests are answered in request order", section="1")
def pipelined(ctx: Context) -> Generator[Any, Any, None]:
    """A client may send several requests before reading: the answers come
    back in the order of the requests, one each."""
    probe = yield ctx.connect()
    reqs = [ctx.fresh(steps=n % 2 == 1) for n in range(8)]
    for req in reqs:
        probe.send(req.frame)
    for n, req in enumerate(reqs, 1):
        with situation(f"answer {n} of 8 pipelined"):
            frame = yield probe.answer(f"answer {n} of 8, to {req.label}")
            expect_result(frame, req)


@case(
    "framing.largest-message",
    "A request of the largest allowed size (8192 bytes by default) is answered",
    section="1",
)
def largest_message(ctx: Context) -> Generator[Any, Any, None]:
    """Messages of up to 8192 bytes in all (8180 of data) are valid unless the
    target was configured otherwise (tell calc-check with
    --max-message-size). Read into a buffer until the whole message is
    there; a single recv(4096) is not enough."""
    if ctx.session.legacy:
        raise Skipped(
            "the message is a text expression padded with spaces, and the target does not read "
            "text (see payload.text-results)"
        )
    size = ctx.session.max_message_size
    expression = ctx.expression()
    text = expression + " " * (size - wire.HEADER_SIZE - len(expression))
    req = dataclasses.replace(
        request(text),
        label=f"{expression!r} followed by spaces up to {size} bytes in all (text, S=0, C=1)",
    )
    probe = yield ctx.connect()
    frame = yield ctx.ask(req, probe)
    expect_result(frame, req)
    yield ctx.still_usable(probe, f"a request of {size} bytes")


def _impossible(length: int, data: bytes) -> bytes:
    header = wire.HEADER.pack(
        int(time.time()), length, wire.make_flags(request=True, cache=True), wire.FOREVER, 0
    )
    return header + data


def _refused_then_closed(ctx: Context, frame: bytes, label: str) -> Generator[Any, Any, None]:
    probe = yield ctx.connect()
    req = raw(frame, label)
    probe.send(frame)
    answer = yield probe.answer(f"the 400 answer to {label}")
    expect_error(answer, req, "a header that cannot be valid")
    rest = yield probe.closed()
    if rest:
        raise Failed(
            f"after the 400 answer to {label}, {len(rest)} more bytes came before the close: "
            f"send one answer, then close"
        )


@case(
    "framing.length-too-small", "A total length under 12 gets one 400, then the close", section="1"
)
def length_too_small(ctx: Context) -> Generator[Any, Any, None]:
    """A total length below 12 (the header's own size) cannot be valid and the
    stream cannot be resynchronised: answer one 400 saying why, then close the
    connection. Do not wait for more bytes and do not crash."""
    label = "a header announcing a total length of 5"
    yield from _refused_then_closed(ctx, _impossible(5, b""), label)


@case(
    "framing.length-too-large",
    "A total length above the limit gets one 400, then the close",
    section="1",
)
def length_too_large(ctx: Context) -> Generator[Any, Any, None]:
    """A total length above the configured limit (8192 by default) cannot be
    valid: answer one 400 saying why as soon as the header is read, then
    close; do not wait for data that will not come. A target configured for
    larger messages is checked with --max-message-size."""
    limit = ctx.session.max_message_size
    if limit >= wire.LENGTH_LIMIT:
        raise Skipped(f"the target takes messages of up to {limit} bytes: no length is too large")
    label = f"a header announcing a total length of {limit + 1} (limit {limit}) and 5 data bytes"
    yield from _refused_then_closed(ctx, _impossible(limit + 1, b"1 + 1"), label)


@case(
    "framing.hit-in-order",
    "A cached answer waits for the slower answer pipelined before it",
    section="1",
    kinds=frozenset({PROXY}),
    limit=5,
)
def hit_in_order(ctx: Context) -> Generator[Any, Any, None]:
    """Answers go back in request order even when a later one is ready first
    (a hit behind a miss): hold it until the answers before it have gone."""
    slow, cached = ctx.fresh(), ctx.fresh()
    ctx.upstream.script(slow.data, Reply(delay=1.0))
    frame = yield ctx.ask(cached)
    expect_result(frame, cached)
    probe = yield ctx.connect()
    probe.send(slow.frame + cached.frame)
    for n, req in enumerate((slow, cached), 1):
        with situation(
            f"the upstream answers {slow.label} after 1 s and {cached.label} is in the "
            f"proxy's cache; pipelined in that order, answer {n} must be the answer to "
            f"request {n}"
        ):
            frame = yield probe.answer(f"answer {n} of 2, to {req.label}")
            expect_result(frame, req)
