"""What a case works with: the `Session` (the target, the run's unique
numbers, the scripted upstream in proxy mode) and the case's own `Context`
(its connections and its transcript)."""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol, task

from ..transport import wire
from ..transport.addresses import address
from .messages import Request, expect_result, request
from .probe import Frame, Probe, Transcript
from .verdicts import situation

if TYPE_CHECKING:
    from .scripted import ScriptedUpstream


class Session:
    """One run against one target: its address and kind, the largest message
    it was configured for, the scripted upstream (proxy mode), the encoding
    of the requests of cases that judge no encoding, and a source of numbers
    no other case of the run uses, so that no case can be served an answer
    another case left in a proxy's cache."""

    def __init__(
        self,
        reactor: Any,
        kind: str,
        host: str,
        port: int,
        *,
        max_message_size: int = wire.MAX_MESSAGE_SIZE,
        upstream: ScriptedUpstream | None = None,
    ) -> None:
        self.reactor = reactor
        self.kind = kind
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.upstream = upstream
        #: Send pickles where no encoding is judged (`readable_encoding`).
        self.legacy = False
        # Eight digits: every unique expression of a run has the same length.
        self._next = random.randrange(10_000_000, 90_000_000)

    @property
    def target(self) -> str:
        return address(self.host, self.port)

    def unique(self) -> int:
        self._next += 1
        return self._next


class Context:
    """One case's run: the connections it opened (all closed when it ends)
    and the transcript of everything they carried."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reactor = session.reactor
        self.transcript = Transcript(session.reactor)
        self.probes: list[Probe] = []

    @property
    def upstream(self) -> ScriptedUpstream:
        assert self.session.upstream is not None, "a proxy case run against a server"
        return self.session.upstream

    def connect(self) -> defer.Deferred[Probe]:
        """A new connection to the target."""
        name = str(len(self.probes) + 1)
        creator = protocol.ClientCreator(self.reactor, Probe, self.transcript, name)
        d = creator.connectTCP(self.session.host, self.session.port, timeout=10)
        return d.addCallback(self._opened)

    def _opened(self, probe: Probe) -> Probe:
        self.probes.append(probe)
        return probe

    def close(self) -> None:
        """The case is over: close every connection it opened."""
        for probe in self.probes:
            probe.abort()

    def stalled(self) -> str:
        """What the case was waiting for, in words (when it ran out of time)."""
        waits = [what for probe in self.probes for what in probe.waiting]
        return "; ".join(waits) if waits else "(nothing the target could send)"

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(self.reactor, seconds, lambda: None)

    def expression(self) -> str:
        """A text expression no other case of this run sends: ``N + 1``."""
        return f"{self.session.unique()} + 1"

    def fresh(self, **options: Any) -> Request:
        """A request for a fresh `expression` (options as `messages.request`),
        in the session's encoding unless told."""
        options.setdefault("legacy", self.session.legacy)
        return request(self.expression(), **options)

    @defer.inlineCallbacks
    def ask(self, req: Request, probe: Probe | None = None) -> Generator[Any, Any, Frame]:
        """Send ``req`` (on a new connection unless told) and take its answer."""
        if probe is None:
            probe = yield self.connect()
        probe.send(req.frame)
        frame = yield probe.answer(f"the answer to {req.label}")
        return frame

    @defer.inlineCallbacks
    def still_usable(self, probe: Probe, after: str) -> Generator[Any, Any, None]:
        """The connection must still answer a new request correctly ``after``
        what the case did (no stray answer left in the stream, not closed)."""
        req = self.fresh()
        with situation(
            f"after {after}, the connection must still carry requests and answers "
            f"(PROTOCOL.md 1); a new request {req.label} on it failed"
        ):
            frame = yield self.ask(req, probe)
            expect_result(frame, req)


#: Seconds the target may take to answer the request that picks the encoding.
PREFLIGHT = 3.0


@defer.inlineCallbacks
def readable_encoding(session: Session) -> Generator[Any, Any, bool]:
    """Whether the cases that judge no encoding must send pickles: only when
    the target answers a pickled request correctly and a text one not (a
    course-style server), so that those cases judge what they are about;
    the payload cases judge both encodings in any case."""
    for legacy in (False, True):
        ctx = Context(session)
        req = ctx.fresh(legacy=legacy)
        try:
            frame = yield ctx.ask(req).addTimeout(PREFLIGHT, session.reactor)
            expect_result(frame, req)
        except Exception:
            continue
        finally:
            ctx.close()
        return legacy
    return False
