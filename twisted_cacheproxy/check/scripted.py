"""The scripted upstream of proxy mode: a calculator server on
``127.0.0.1:N`` that the proxy under test was started against, like the
fuzzing server of the Autobahn suite.

By default it answers as a correct server does (results computed exactly,
``C=1`` and "forever" unless the answer is an error or calls ``rand``, the
``L`` bit set and tags echoed). A case scripts what it does with each
arrival of a request of its own (a `Reply`: another value, status, cache
control, time stamp, a delay, a close, silence), counts what reaches it,
and stops and restarts it for the server-down cases.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IListeningPort

from ..calculator import codec
from ..calculator.expression import CalculationError, evaluate, evaluate_with_steps
from ..calculator.expression import is_deterministic as deterministic
from ..transport import answers, wire
from ..transport.framing import FrameReceiver
from .probe import RECEIVED, SENT, UPSTREAM, Transcript

#: What the upstream does with an arrival.
ANSWER, CLOSE, SILENT = "answer", "close", "silent"
#: The error an answer of each status carries.
_ERRORS = {400: ("ZeroDivisionError", "division by zero"), 500: ("RuntimeError", "server error")}


@dataclass(frozen=True)
class Reply:
    """What the upstream does with one arrival of a request: answer (after
    ``delay`` seconds) with ``value`` (None: the exact result) or an error
    of ``status``, marked with ``cache`` and ``max_age`` as they are (the
    exact result of an error or of ``rand`` is marked C=0 and 0),
    time-stamped ``age`` seconds ago, with or without ``L`` (``framed``);
    or ``close`` the connection without answering; or stay ``silent``."""

    value: Any = None
    status: int = wire.OK
    cache: bool = True
    max_age: int = wire.FOREVER
    delay: float = 0.0
    action: str = ANSWER
    framed: bool = True
    age: int = 0


class UpstreamConnection(FrameReceiver):
    """One connection from the proxy: answers leave in request order, each
    when its reply is ready."""

    factory: ScriptedUpstream
    maxMessageSize = wire.LENGTH_LIMIT

    def connectionMade(self) -> None:
        super().connectionMade()
        self.name = self.factory.connected(self)
        self._slots: deque[list[bytes | None]] = deque()

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        reply = self.factory.arrived(self, header, data, bool(self._slots))
        if reply.action == CLOSE:
            self.transport.loseConnection()
            return
        slot: list[bytes | None] = [None]
        self._slots.append(slot)
        if reply.action == SILENT:
            return
        answer = self.factory.answer(header, data, reply)
        if reply.delay:
            self.factory.later(reply.delay, self._fill, slot, answer)
        else:
            self._fill(slot, answer)

    def _fill(self, slot: list[bytes | None], answer: bytes) -> None:
        slot[0] = answer
        while self._slots and (ready := self._slots[0][0]) is not None:
            self._slots.popleft()
            if self.connected:
                self.factory.record(self.name, SENT, ready)
                self.sendMessage(ready)

    def invalidFrame(self, reason: str, first: bytes) -> None:
        self.sendMessage(answers.bad_frame(reason, first, int(self.factory.reactor.seconds())))
        self.closeAfterSending()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.connections.discard(self)


class ScriptedUpstream(protocol.Factory[UpstreamConnection]):
    """The upstream server and its script, counts and switches."""

    protocol: type[UpstreamConnection] = UpstreamConnection
    noisy = False

    def __init__(self, reactor: Any, port: int, host: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.listening: IListeningPort | None = None
        self.connections: set[UpstreamConnection] = set()
        self.scripts: dict[bytes, list[Reply]] = {}
        self.arrivals: dict[bytes, list[wire.Header]] = {}
        #: Requests that arrived while an earlier one on their connection
        #: was still unanswered (pipelined to us).
        self.overlaps = 0
        #: Whether unscripted answers carry L (a course server's do not).
        self.framed = True
        #: The transcript of the case running now (its upstream side).
        self.transcript: Transcript | None = None
        self._opened = 0
        self._timers: list[IDelayedCall] = []
        #: While the port is being closed: who waits for it.
        self._closing: list[defer.Deferred[None]] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.listening is not None

    @defer.inlineCallbacks
    def start(self) -> Generator[Any, Any, None]:
        """Listen, once a stop in progress is over (CannotListenError if the
        port is taken)."""
        yield self._closed()
        if self.listening is None:
            self.listening = self.reactor.listenTCP(self.port, self, interface=self.host)

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and drop every connection: the server is down.
        Fires once the port is closed."""
        listening, self.listening = self.listening, None
        for connection in list(self.connections):
            connection.transport.abortConnection()
        if listening is not None:
            self._closing = []
            defer.maybeDeferred(listening.stopListening).addBoth(self._portClosed)
        return self._closed()

    def _closed(self) -> defer.Deferred[None]:
        if self._closing is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closing.append(d)
        return d

    def _portClosed(self, result: Any) -> None:
        waiting, self._closing = self._closing or [], None
        for d in waiting:
            d.callback(None)

    def case_over(self) -> None:
        """Back to the default behaviour between cases: delayed answers
        still due are dropped, unscripted answers carry L again."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self.framed = True
        self.transcript = None

    # --- what cases script and read ---------------------------------------------

    def script(self, data: bytes, *replies: Reply) -> None:
        """How to treat successive arrivals of request ``data`` (the last
        reply stands for every arrival after it)."""
        self.scripts[data] = list(replies)

    def count(self, data: bytes) -> int:
        """How many times request ``data`` has reached the upstream."""
        return len(self.arrivals.get(data, ()))

    # --- for the connections --------------------------------------------------------

    def connected(self, connection: UpstreamConnection) -> str:
        self.connections.add(connection)
        self._opened += 1
        name = f"{UPSTREAM} {self._opened}"
        self.record(name, "proxy connected")
        return name

    def record(self, name: str, what: str, data: bytes = b"") -> None:
        if self.transcript is not None:
            self.transcript.record(name, what, data)

    def later(self, delay: float, f: Any, *args: Any) -> None:
        self._timers.append(self.reactor.callLater(delay, f, *args))

    def arrived(
        self, connection: UpstreamConnection, header: wire.Header, data: bytes, busy: bool
    ) -> Reply:
        """Count an arrival and pick its reply."""
        self.record(connection.name, RECEIVED, wire.HEADER.pack(*header) + data)
        seen = self.arrivals.setdefault(data, [])
        seen.append(header)
        if busy:
            self.overlaps += 1
        replies = self.scripts.get(data)
        if not replies:
            return Reply(framed=self.framed)
        return replies[min(len(seen), len(replies)) - 1]

    def answer(self, header: wire.Header, data: bytes, reply: Reply) -> bytes:
        """The whole answer message ``reply`` says to send to this request."""
        now = int(self.reactor.seconds()) - reply.age
        ext = wire.answer_ext(header) if reply.framed else 0
        if not header.request:
            return wire.rewrite(answers.not_a_request(header, data, now), ext=ext)
        encoding = codec.encoding_of(data)
        steps = header.steps
        cache, max_age, status = reply.cache, reply.max_age, reply.status
        if status != wire.OK:
            payload = codec.encode_error(encoding, *_ERRORS[status])
            steps = False
        elif reply.value is not None:
            shown = [f"({reply.value!r})", repr(reply.value)] if steps else []
            payload = codec.encode_result(encoding, reply.value, shown)
        else:
            status, payload, exact = _computed(data, encoding, steps)
            steps = steps and status == wire.OK
            if not exact:
                cache, max_age = False, 0
        flags = wire.make_flags(request=False, status=status, cache=cache, steps=steps)
        return wire.encode(now, flags, max_age, payload, ext)


def _computed(data: bytes, encoding: str, steps: bool) -> tuple[int, bytes, bool]:
    """Status, payload and cacheability of the exact answer to ``data``:
    errors and ``rand`` are not cacheable."""
    try:
        node = codec.decode_request(data)
        value, shown = evaluate_with_steps(node, 1 << 16) if steps else (evaluate(node), [])
    except CalculationError as e:
        return wire.BAD_REQUEST, codec.encode_error(encoding, e.kind, str(e)), False
    return wire.OK, codec.encode_result(encoding, value, shown), deterministic(node)
