"""The header of answers, and the header fields a receiver must ignore
(PROTOCOL.md 1 and 2)."""

from __future__ import annotations

import time
from collections.abc import Generator
from datetime import datetime, timezone
from typing import Any

from ...transport import wire
from ..case import case
from ..context import Context
from ..messages import expect_result, read, request
from ..verdicts import Failed

#: How far an answer's time stamp may be from our clock (the target may be
#: another host whose clock is off by a little).
CLOCK_SLACK = 300


@case("header.answer-type", "An answer has T=0 and status 200 for a valid request", section="2")
def answer_type(ctx: Context) -> Generator[Any, Any, None]:
    """Answers have the T flag (bit 10) at 0 and a status of 200, 400 or 500
    in bits 9-0; a successful calculation is 200."""
    req = ctx.fresh()
    frame = yield ctx.ask(req)
    if frame.header.request:
        raise Failed(f"the answer to {req.label} has T=1, the mark of a request")
    if frame.header.status != wire.OK:
        raise Failed(f"the answer to {req.label} has status {frame.header.status}, not 200")


@case("header.reserved-zero", "Answers leave the reserved flag bits 15-13 at 0", section="1")
def reserved_zero(ctx: Context) -> Generator[Any, Any, None]:
    """Bits 15-13 of the flags word are reserved: send 0 (the course programs
    warn when they are not). Build the flags word from the C, S, T bits and
    the status alone."""
    for req in (ctx.fresh(), request(f"{ctx.session.unique()} +", known=False)):
        frame = yield ctx.ask(req)
        bits = frame.header.flags & wire.RESERVED_MASK
        if bits:
            raise Failed(
                f"the answer to {req.label} has the flags word {frame.header.flags:#06x}: "
                f"reserved bits {bits >> 13:03b} (15-13) are set"
            )


@case(
    "header.length", "An answer's total length counts its 12-byte header and its data", section="1"
)
def length(ctx: Context) -> Generator[Any, Any, None]:
    """The total length field (bytes 4-5) is header plus data, so that the
    receiver can frame by it alone."""
    probe = yield ctx.connect()
    req = ctx.fresh()
    frame = yield ctx.ask(req, probe)
    yield ctx.sleep(0.3)
    if probe.buffer:
        raise Failed(
            f"the answer to {req.label} announced a total length of {frame.header.length}, "
            f"but {len(probe.buffer)} more bytes followed it although nothing else was asked"
        )
    read(frame, req)


@case("header.timestamp", "An answer's time stamp is the time it was built", section="1")
def timestamp(ctx: Context) -> Generator[Any, Any, None]:
    """Bytes 0-3 are the unix time (seconds since 1970, UTC) when the sender
    built the message. Up to five minutes of difference between the clocks of
    two hosts is tolerated."""
    req = ctx.fresh()
    frame = yield ctx.ask(req)
    stamp = frame.header.timestamp
    off = stamp - time.time()
    if abs(off) > CLOCK_SLACK:
        when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise Failed(
            f"the answer to {req.label} is stamped {stamp} ({when}), {abs(off):.0f} s "
            f"{'ahead of' if off > 0 else 'behind'} this machine's clock"
        )


@case(
    "header.reserved-ignored",
    "A request with the reserved flag bits set is answered as without them",
    section="1",
)
def reserved_ignored(ctx: Context) -> Generator[Any, Any, None]:
    """Reserved bits are ignored on receipt: mask them out instead of
    refusing the request or reading them as part of the status."""
    req = ctx.fresh(flags=wire.RESERVED_MASK)
    frame = yield ctx.ask(req)
    expect_result(frame, req)


@case(
    "header.padding-ignored",
    "A request with bytes 10-11 set is answered as without them",
    section="1, 6",
)
def padding_ignored(ctx: Context) -> Generator[Any, Any, None]:
    """Bytes 10-11 are padding to the course programs, which never read them,
    and carry section 6's extension word (a request tag) from other senders:
    a receiver that does not use them ignores them."""
    req = ctx.fresh(ext=wire.tag_bits(wire.MAX_TAG))
    frame = yield ctx.ask(req)
    expect_result(frame, req)
