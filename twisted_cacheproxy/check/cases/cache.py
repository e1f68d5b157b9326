"""The cache rules of a proxy (PROTOCOL.md 2), judged through the scripted
upstream: it decides every answer (a distinct value for each arrival, so
the case can tell a stored answer from a fresh one) and counts what reaches
it."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ...transport import wire
from ..case import PROXY, SHOULD, case
from ..context import Context
from ..messages import expect_error, read, request, shown
from ..probe import Frame
from ..scripted import CLOSE, SILENT, Reply
from ..verdicts import Failed, Skipped

PROXY_ONLY = frozenset({PROXY})
#: The values the scripted upstream gives the first, second and third
#: arrival of a request: which one comes back tells where it came from.
FIRST, SECOND, THIRD = 1111, 2222, 3333
NUMBERED = (Reply(value=FIRST), Reply(value=SECOND), Reply(value=THIRD))
_WHICH = {
    FIRST: f"the upstream's first answer ({FIRST})",
    SECOND: f"its second answer ({SECOND})",
    THIRD: f"its third answer ({THIRD})",
}
#: Seconds a server-down case allows the proxy for its retries (ours gives
#: up after 10 s by default).
DOWN_LIMIT = 15.0
#: Seconds the proxy may take to reach the restarted upstream.
RECOVERY = 10.0


def _scripted(ctx: Context, *replies: Reply) -> str:
    """A fresh expression whose arrivals the upstream answers with
    ``replies`` (by default FIRST, SECOND, THIRD, THIRD, ...)."""
    text = ctx.expression()
    ctx.upstream.script(text.encode(), *(replies or NUMBERED))
    return text


def _ask(
    ctx: Context, text: str, value: Any, count: int, why: str, **options: Any
) -> Generator[Any, Any, Frame]:
    """Ask ``text`` (``options`` as `messages.request`) on a new connection:
    it must get a 200 with ``value``, and the upstream must have been asked
    ``count`` times in all; ``why`` is the rule, for the failure."""
    req = request(text, known=False, **options)
    frame = yield ctx.ask(req)
    reading = read(frame, req)
    seen = ctx.upstream.count(req.data)
    if frame.header.status == wire.OK and reading.value == value and seen == count:
        return frame
    got = reading.error or _WHICH.get(reading.value, shown(reading.value))
    raise Failed(
        f"{why}: {req.label} got {got} (status {frame.header.status}) with the upstream asked "
        f"{seen} time(s) in all; expected {_WHICH.get(value, shown(value))}, asked {count} time(s)"
    )


@case(
    "cache.forwards",
    "A request reaches the upstream and its answer comes back",
    section="2",
    kinds=PROXY_ONLY,
)
def forwards(ctx: Context) -> Generator[Any, Any, None]:
    """A miss is sent to the server with its flags (S=1 asks the server for
    the steps) and the server's answer comes back with its status, flags,
    cache control and data."""
    text = _scripted(ctx, Reply(value=FIRST, max_age=3600))
    req = request(text, known=False, steps=True)
    frame = yield ctx.ask(req)
    arrivals = ctx.upstream.arrivals.get(req.data, [])
    if not arrivals:
        raise Failed(
            f"{req.label} never reached the scripted upstream at {ctx.upstream.address}: was "
            f"the proxy started against it (twistd cacheproxy --server-port "
            f"{ctx.upstream.port}, or the course proxy's -sp {ctx.upstream.port})?"
        )
    if not arrivals[0].steps:
        raise Failed(f"{req.label} reached the upstream with S=0: the proxy must forward S=1")
    reading = read(frame, req)
    h = frame.header
    if h.status != wire.OK or reading.value != FIRST or not h.steps or not h.cache:
        raise Failed(
            f"the upstream answered {req.label} with status 200, S=1, C=1, the value {FIRST}; "
            f"the proxy passed on status {h.status}, S={int(h.steps)}, C={int(h.cache)}, "
            f"{reading.error or shown(reading.value)}"
        )
    if not 3590 <= h.max_age <= 3600:
        raise Failed(f"the upstream said cache control 3600; the proxy passed on {h.max_age}")


@case(
    "cache.miss-then-hit",
    "A second identical request is served from the cache",
    section="2",
    kinds=PROXY_ONLY,
)
def miss_then_hit(ctx: Context) -> Generator[Any, Any, None]:
    """An answer with C=1 and cache control 65535 may be kept forever: the
    next identical request (C=1, any age), from any client, is answered
    from the cache without asking the server."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield from _ask(ctx, text, FIRST, 1, "an answer kept forever must be served from the cache")


@case(
    "cache.key-steps",
    "Answers with and without steps are stored apart",
    section="2",
    kinds=PROXY_ONLY,
)
def key_steps(ctx: Context) -> Generator[Any, Any, None]:
    """The S flag is part of what is asked: a stored answer without steps
    does not answer a request with S=1 (key the cache on the data and S)."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    frame = yield from _ask(
        ctx, text, SECOND, 2, "a stored answer without steps cannot answer S=1", steps=True
    )
    if not frame.header.steps:
        raise Failed("the answer to a request with S=1 came back with S=0")


@case(
    "cache.key-encoding",
    "Text and pickled requests are stored apart",
    section="2, 3",
    kinds=PROXY_ONLY,
)
def key_encoding(ctx: Context) -> Generator[Any, Any, None]:
    """An answer is in its request's encoding: the same expression sent as
    text and as a pickle are two requests (key the cache on the data bytes)."""
    text = ctx.expression()
    pickled = request(text, legacy=True, known=False)
    ctx.upstream.script(text.encode(), Reply(value=FIRST))
    ctx.upstream.script(pickled.data, Reply(value=SECOND))
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    frame = yield ctx.ask(pickled)
    reading = read(frame, pickled)
    if reading.value != SECOND:
        raise Failed(
            f"{pickled.label} must get the upstream's {SECOND}, not {shown(reading.value)}"
        )


@case(
    "cache.nocache-request-not-served",
    "A C=0 request is not served from the cache",
    section="2",
    kinds=PROXY_ONLY,
)
def nocache_request_not_served(ctx: Context) -> Generator[Any, Any, None]:
    """With C=0 no cache may serve the answer: the request goes to the server
    even when an answer is stored."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield from _ask(ctx, text, SECOND, 2, "a C=0 request must go to the server", cache=False)


@case(
    "cache.nocache-request-not-stored",
    "The answer to a C=0 request is not stored",
    section="2",
    kinds=PROXY_ONLY,
)
def nocache_request_not_stored(ctx: Context) -> Generator[Any, Any, None]:
    """With C=0 in the request no cache may store the answer, whatever the
    answer's own flags say."""
    text = _scripted(ctx, Reply(value=FIRST, max_age=3600), Reply(value=SECOND))
    yield from _ask(ctx, text, FIRST, 1, "a C=0 request goes to the upstream", cache=False)
    yield from _ask(ctx, text, SECOND, 2, "the answer to a C=0 request must not be stored")


@case(
    "cache.nocache-answer-not-stored",
    "Answers marked C=0 are not stored, errors included",
    section="2",
    kinds=PROXY_ONLY,
)
def nocache_answer_not_stored(ctx: Context) -> Generator[Any, Any, None]:
    """An answer with C=0 must not be cached, whatever its cache control
    field says (3600 here) and whatever its status (a 400 here)."""
    for first in (
        Reply(value=FIRST, cache=False, max_age=3600),
        Reply(status=400, cache=False, max_age=3600),
    ):
        text = _scripted(ctx, first, Reply(value=SECOND))
        req = request(text, known=False)
        frame = yield ctx.ask(req)
        if frame.header.status != first.status:
            raise Failed(
                f"the upstream's {first.status} answer to {req.label} came back as "
                f"{frame.header.status}"
            )
        why = f"a {first.status} answer marked C=0 (cache control 3600) must not be stored"
        yield from _ask(ctx, text, SECOND, 2, why)


@case(
    "cache.lifetime-zero-not-stored",
    "Answers with cache control 0 are not stored",
    section="2",
    kinds=PROXY_ONLY,
)
def lifetime_zero(ctx: Context) -> Generator[Any, Any, None]:
    """C=1 with cache control 0 means the answer must not be cached (0 is not
    'no limit': that is 65535)."""
    text = _scripted(ctx, Reply(value=FIRST, max_age=0), Reply(value=SECOND))
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield from _ask(ctx, text, SECOND, 2, "an answer with cache control 0 must not be stored")


LIFETIME = 2
LIFETIME_WAIT = LIFETIME + 1.2


@case(
    "cache.lifetime-honoured",
    "An answer is not served past its lifetime",
    section="2",
    kinds=PROXY_ONLY,
    limit=LIFETIME_WAIT + 4,
)
def lifetime_honoured(ctx: Context) -> Generator[Any, Any, None]:
    """An answer with cache control N may be cached for N seconds from when
    it came; after that the next request goes to the server."""
    text = _scripted(ctx, Reply(value=FIRST, max_age=LIFETIME), Reply(value=SECOND))
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield ctx.sleep(LIFETIME_WAIT)
    why = f"an answer with a lifetime of {LIFETIME} s must not be served {LIFETIME_WAIT:g} s later"
    yield from _ask(ctx, text, SECOND, 2, why)


REMAINING_WAIT = 2.2


@case(
    "cache.remaining-lifetime",
    "A hit carries the answer's remaining lifetime",
    section="2",
    kinds=PROXY_ONLY,
    limit=REMAINING_WAIT + 4,
)
def remaining_lifetime(ctx: Context) -> Generator[Any, Any, None]:
    """An answer's cache control is how long it may still be kept: served
    from a cache t seconds after it came, it says N - t (at least 1), or a
    cache behind the proxy would keep it past the server's limit; 65535
    (forever) stays 65535."""
    minute = _scripted(ctx, Reply(value=FIRST, max_age=60), Reply(value=SECOND))
    forever = _scripted(ctx, Reply(value=FIRST), Reply(value=SECOND))
    yield from _ask(ctx, minute, FIRST, 1, "a miss goes to the upstream")
    started = ctx.reactor.seconds()
    yield from _ask(ctx, forever, FIRST, 1, "a miss goes to the upstream")
    yield ctx.sleep(REMAINING_WAIT)
    try:
        hit = yield from _ask(ctx, minute, FIRST, 1, "a hit")
    except Failed as e:
        raise Skipped(f"the proxy did not serve the answer from its cache ({e})") from None
    age = ctx.reactor.seconds() - started
    h = hit.header
    if not h.cache or not 60 - age - 2 <= h.max_age <= 59:
        raise Failed(
            f"the upstream allowed 60 s; served from the cache {age:.1f} s later, the answer "
            f"must say C=1 and about {60 - age:.0f} s, not C={int(h.cache)} and {h.max_age} s"
        )
    hit = yield from _ask(ctx, forever, FIRST, 1, "a hit")
    if not hit.header.cache or hit.header.max_age != wire.FOREVER:
        raise Failed(
            f"an answer kept forever (65535) must still say C=1 and 65535 when served from the "
            f"cache, not C={int(hit.header.cache)} and {hit.header.max_age}"
        )


AGE_WAIT = 2.2


@case(
    "cache.request-max-age",
    "A request's max-age refuses older stored answers",
    section="2",
    kinds=PROXY_ONLY,
    limit=AGE_WAIT + 4,
)
def request_max_age(ctx: Context) -> Generator[Any, Any, None]:
    """In a request with C=1 the cache control is the oldest stored answer
    the client accepts, in seconds: an older one is fetched again."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield ctx.sleep(AGE_WAIT)
    why = f"a request with max-age 1 must not accept an answer stored {AGE_WAIT:g} s ago"
    yield from _ask(ctx, text, SECOND, 2, why, max_age=1)
    req = request(text, known=False, max_age=60)
    frame = yield ctx.ask(req)
    value = read(frame, req).value
    if value not in (FIRST, SECOND) or ctx.upstream.count(req.data) != 2:
        raise Failed(f"{req.label} must be served from the cache, not {shown(value)}")


@case(
    "cache.reload", "A request with max-age 0 fetches a fresh answer", section="2", kinds=PROXY_ONLY
)
def reload(ctx: Context) -> Generator[Any, Any, None]:
    """C=1 with cache control 0 in a request means 'reload': the proxy fetches
    a fresh answer from the server even though one is stored."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield from _ask(ctx, text, SECOND, 2, "max-age 0 means reload", max_age=0)


@case(
    "cache.rand-not-stored",
    "A rand answer (sent with C=0) is never stored",
    section="2, 4",
    kinds=PROXY_ONLY,
)
def rand_not_stored(ctx: Context) -> Generator[Any, Any, None]:
    """The server marks answers that call rand C=0; each request for one goes
    to the server and gets its own random number."""
    low = ctx.session.unique()
    req = request(f"rand({low}, {low + 1})", known=False)
    for n in (1, 2):
        frame = yield ctx.ask(req)
        reading = read(frame, req)
        if frame.header.status != wire.OK or ctx.upstream.count(req.data) != n:
            raise Failed(
                f"{req.label} must reach the server every time: asked {n} time(s), the upstream "
                f"saw it {ctx.upstream.count(req.data)} time(s) ({reading.error or 'status 200'})"
            )


@case(
    "cache.server-error-not-stored",
    "A 500 answer is not stored, even marked C=1",
    section="2",
    level=SHOULD,
    kinds=PROXY_ONLY,
)
def server_error_not_stored(ctx: Context) -> Generator[Any, Any, None]:
    """A 500 says the server failed this time; a proxy that stores it repeats
    the failure after the server has recovered. Store only answers that
    are not server errors."""
    text = _scripted(ctx, Reply(status=500, max_age=3600), Reply(value=SECOND))
    req = request(text, known=False)
    frame = yield ctx.ask(req)
    expect_error(frame, req, "answered 500 by the upstream", status=wire.SERVER_ERROR)
    yield from _ask(ctx, text, SECOND, 2, "a 500 answer (C=1, 3600 s) must not be stored")


@case(
    "cache.coalescing",
    "Identical concurrent misses reach the upstream once",
    section="2",
    level=SHOULD,
    kinds=PROXY_ONLY,
    limit=5,
)
def coalescing(ctx: Context) -> Generator[Any, Any, None]:
    """Three clients asking the same thing while the first miss is on its way
    wait for that one answer instead of each asking the server (request
    coalescing, as Varnish and nginx do)."""
    text = _scripted(ctx, Reply(value=FIRST, delay=1.0))
    req = request(text, known=False)
    probes = []
    for _ in range(3):
        probe = yield ctx.connect()
        probe.send(req.frame)
        probes.append(probe)
    for probe in probes:
        frame = yield probe.answer(f"the answer to {req.label}")
        value = read(frame, req).value
        if value != FIRST:
            raise Failed(f"{req.label} must get the upstream's {FIRST}, not {shown(value)}")
    seen = ctx.upstream.count(req.data)
    if seen != 1:
        raise Failed(
            f"three identical requests while the first was in flight (the upstream "
            f"takes 1 s) reached the upstream {seen} times, not once"
        )


def _failed_or_answered(frame: Frame, req: Any, value: int | None) -> None:
    if frame.header.status == wire.SERVER_ERROR:
        return
    reading = read(frame, req)
    if value is not None and frame.header.status == wire.OK and reading.value == value:
        return
    raise Failed(
        f"{req.label} must get a 500 (the server failed) or a retried answer, not "
        f"status {frame.header.status}: {reading.error or shown(reading.value)}"
    )


@case(
    "cache.upstream-close",
    "The upstream closing without an answer gets an answer, not a hang",
    section="2",
    kinds=PROXY_ONLY,
    limit=12,
)
def upstream_close(ctx: Context) -> Generator[Any, Any, None]:
    """When the server closes the connection without answering, the client
    still gets an answer: a 500 ('the proxy could not reach the server'), or
    the answer of a retry. Never leave the client waiting."""
    text = _scripted(ctx, Reply(action=CLOSE), Reply(value=SECOND))
    req = request(text, known=False)
    frame = yield ctx.ask(req)
    _failed_or_answered(frame, req, SECOND)


@case(
    "cache.upstream-silent",
    "An upstream that never answers gets the client a 500",
    section="2",
    level=SHOULD,
    kinds=PROXY_ONLY,
    limit=20,
)
def upstream_silent(ctx: Context) -> Generator[Any, Any, None]:
    """A server that accepts the request and then says nothing must not hang
    the client forever: give up after a timeout (seconds, not minutes) and
    answer 500."""
    text = _scripted(ctx, Reply(action=SILENT))
    req = request(text, known=False)
    frame = yield ctx.ask(req)
    _failed_or_answered(frame, req, None)


@case(
    "cache.down-serves-cached",
    "Stored answers are served while the upstream is down",
    section="2",
    kinds=PROXY_ONLY,
    limit=6,
)
def down_serves_cached(ctx: Context) -> Generator[Any, Any, None]:
    """A fresh stored answer needs no server: look in the cache before
    connecting to the server, so that hits work while it is down."""
    text = _scripted(ctx)
    yield from _ask(ctx, text, FIRST, 1, "a miss goes to the upstream")
    yield ctx.upstream.stop()
    yield from _ask(ctx, text, FIRST, 1, "with the upstream down, a stored answer must be served")


@case(
    "cache.down-uncached-error",
    "An uncached request while the upstream is down gets a 500",
    section="2",
    kinds=PROXY_ONLY,
    limit=DOWN_LIMIT,
)
def down_uncached_error(ctx: Context) -> Generator[Any, Any, None]:
    """When the server cannot be reached, answer 500 ('the proxy could not
    reach the server') within a few seconds, retries included; never hang
    and never drop the client's connection without an answer."""
    yield ctx.upstream.stop()
    req = ctx.fresh(known=False)
    frame = yield ctx.ask(req)
    expect_error(frame, req, "asked while the upstream is down", status=wire.SERVER_ERROR)


def _recovered(ctx: Context, seconds: float) -> Generator[Any, Any, int]:
    """Fresh requests, one every half second, until one gets a 200 from the
    restarted upstream; how many it took (0: none within ``seconds``)."""
    deadline = ctx.reactor.seconds() + seconds
    tries = 0
    while ctx.reactor.seconds() < deadline:
        tries += 1
        req = ctx.fresh()
        frame = yield ctx.ask(req)
        if frame.header.status == wire.OK:
            return tries
        yield ctx.sleep(0.5)
    return 0


@case(
    "cache.restart-recovers",
    "The proxy reaches the upstream again once it is back",
    section="2",
    kinds=PROXY_ONLY,
    limit=RECOVERY + 4,
)
def restart_recovers(ctx: Context) -> Generator[Any, Any, None]:
    """After the server was down and is back, new requests reach it: connect
    anew instead of keeping a dead connection made at start-up."""
    yield ctx.upstream.stop()
    probe = yield ctx.connect()
    probe.send(ctx.fresh().frame)  # the proxy finds the server down
    yield ctx.sleep(1.0)
    yield ctx.upstream.start()
    if not (yield from _recovered(ctx, RECOVERY)):
        raise Failed(
            f"the upstream was down for a request and is back; new requests sent over "
            f"{RECOVERY:g} s did not get a 200 from it"
        )


@case(
    "cache.unreachable-not-stored",
    "The proxy's own 500 while the upstream is down is not stored",
    section="2",
    kinds=PROXY_ONLY,
    limit=DOWN_LIMIT + RECOVERY,
)
def unreachable_not_stored(ctx: Context) -> Generator[Any, Any, None]:
    """'The server could not be reached' is no answer of the server: once it
    is back, the same request must reach it instead of getting the stored
    500."""
    yield ctx.upstream.stop()
    req = ctx.fresh()
    frame = yield ctx.ask(req)
    expect_error(frame, req, "asked while the upstream is down", status=wire.SERVER_ERROR)
    yield ctx.upstream.start()
    if not (yield from _recovered(ctx, RECOVERY)):
        raise Skipped("the proxy did not reach the restarted upstream (see cache.restart-recovers)")
    frame = yield ctx.ask(req)
    if frame.header.status != wire.OK or ctx.upstream.count(req.data) != 1:
        raise Failed(
            f"with the upstream back, {req.label} got status {frame.header.status} and reached "
            f"the upstream {ctx.upstream.count(req.data)} time(s): the 500 given while it was "
            f"down was kept"
        )
