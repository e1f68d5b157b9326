"""The extension word (PROTOCOL.md 6): the ``L`` mark, request tags, the
``H`` mark of cache hits and the kept time stamp. The course programs
ignore these bytes, so these cases are EXT: a correct implementation of
sections 1-5 may fail every one of them."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ...transport import wire
from ..case import EXT, PROXY, case
from ..context import Context
from ..messages import expect_result, request
from ..scripted import Reply
from ..verdicts import Failed

PROXY_ONLY = frozenset({PROXY})


@case("ext.length-framed", "Every answer carries L (bit 0 of bytes 10-11)", section="6", level=EXT)
def length_framed(ctx: Context) -> Generator[Any, Any, None]:
    """A side that frames by length, answers in order and echoes tags says
    so with L on every answer it sends, errors included. A proxy sets its
    own L (it is hop by hop), whatever its server's answers carry."""
    ok, bad = ctx.fresh(), request(f"{ctx.session.unique()} +", known=False)
    if ctx.session.upstream is not None:
        for req in (ok, bad):
            ctx.upstream.script(req.data, Reply(framed=False))
    for req in (ok, bad):
        frame = yield ctx.ask(req)
        if not frame.header.ext & wire.EXT_FRAMED:
            raise Failed(f"the answer to {req.label} has bytes 10-11 {frame.header.ext:#06x}: no L")


@case("ext.tag-echo", "Each answer echoes its request's tag", section="6", level=EXT)
def tag_echo(ctx: Context) -> Generator[Any, Any, None]:
    """A side that sets L copies the tag of each request (bits 3-15 of bytes
    10-11) into its answer, pipelined requests and cache hits included."""
    first = ctx.expression()
    tags = (101, 202, 303)
    reqs = [
        request(text, ext=wire.tag_bits(tag))
        for text, tag in zip((first, ctx.expression(), first), tags, strict=True)
    ]
    probe = yield ctx.connect()
    probe.send(b"".join(req.frame for req in reqs))
    for req, tag in zip(reqs, tags, strict=True):
        frame = yield probe.answer(f"the answer to {req.label}")
        expect_result(frame, req)
        h = frame.header
        if not h.ext & wire.EXT_FRAMED or h.tag != tag:
            raise Failed(
                f"the answer to {req.label} (tag {tag}) has bytes 10-11 {h.ext:#06x}: "
                f"L={h.ext & wire.EXT_FRAMED} and tag {h.tag}"
            )


@case(
    "ext.hit-mark",
    "Answers from the cache carry H, others do not",
    section="6",
    level=EXT,
    kinds=PROXY_ONLY,
)
def hit_mark(ctx: Context) -> Generator[Any, Any, None]:
    """H (bit 1 of bytes 10-11) marks an answer that came from a cache's store
    rather than from the server for this request."""
    req = ctx.fresh()
    for n, stored in ((1, False), (2, True)):
        frame = yield ctx.ask(req)
        expect_result(frame, req)
        if frame.header.from_cache != stored:
            which = "a hit" if stored else "a miss, answered by the upstream"
            raise Failed(
                f"request {n} for {req.label} was {which}, but its answer says "
                f"H={int(frame.header.from_cache)}"
            )


STAMP_AGE = 7


@case(
    "ext.keeps-timestamp",
    "A proxy keeps the server's time stamp, hits included",
    section="6",
    level=EXT,
    kinds=PROXY_ONLY,
)
def keeps_timestamp(ctx: Context) -> Generator[Any, Any, None]:
    """The time stamp of an answer is the time the server built it; a cache
    keeps it when it serves the answer again, so that now minus the time
    stamp is the answer's age."""
    req = ctx.fresh()
    ctx.upstream.script(req.data, Reply(age=STAMP_AGE))
    stamps = []
    for _ in range(2):
        frame = yield ctx.ask(req)
        expect_result(frame, req)
        stamps.append(frame.header.timestamp)
    built = int(ctx.reactor.seconds()) - STAMP_AGE
    if not (built - 2 <= stamps[0] <= built + 1 and stamps[1] == stamps[0]):
        raise Failed(
            f"the upstream stamped its answer about {built}; the proxy's miss and hit "
            f"answers were stamped {stamps[0]} and {stamps[1]}"
        )


@case(
    "ext.one-at-a-time",
    "A server without L never gets two requests at once on one connection",
    section="6",
    level=EXT,
    kinds=PROXY_ONLY,
    limit=6,
)
def one_at_a_time(ctx: Context) -> Generator[Any, Any, None]:
    """Nothing on a connection to a server whose answers lack L (a course
    server) can be matched: send it one request at a time, never
    pipelined."""
    up = ctx.upstream
    up.framed = False
    yield up.stop()  # the proxy's connections that have seen L are gone
    yield up.start()
    before = up.overlaps
    reqs = [ctx.fresh() for _ in range(4)]
    for req in reqs:
        up.script(req.data, Reply(delay=0.3, framed=False))
    probes = []
    for req in reqs:
        probe = yield ctx.connect()
        probe.send(req.frame)
        probes.append(probe)
    for probe, req in zip(probes, reqs, strict=True):
        frame = yield probe.answer(f"the answer to {req.label}")
        expect_result(frame, req)
    if up.overlaps != before:
        raise Failed(
            f"the upstream's answers carry no L, yet {up.overlaps - before} request(s) reached "
            f"it while an earlier one on the same connection was unanswered"
        )
