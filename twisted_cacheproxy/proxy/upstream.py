"""How the proxy reaches the calculator server: a pool of persistent
connections, opened through a `ClientCreator` Deferred chain, with retries
for connection failures and one timeout over the whole attempt.

Over TLS (``--server tls:HOST:PORT``) the chain is ``ClientCreator.connectSSL``
with Twisted's ``optionsForClientTLS``, and a connection joins the pool only
once its handshake has verified the server's certificate
(`transport.tls.connect_tls`): a certificate that does not verify fails the
miss at once, with no retry, since retrying cannot fix it.

Every request is tagged (PROTOCOL.md 6). A connection whose answers carry
``L`` and echo our tags is kept, reused and may be pipelined; a connection
whose answer does not (a course server, or a middlebox that drops the tags)
is closed after that one answer, so that a stray answer from it can never be
taken for a later request's.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..transport import wire
from ..transport.addresses import address
from ..transport.frameclient import FrameClient, OutOfStepError, ProtocolError
from ..transport.tls import AwaitsHandshake, TLSError, connect_tls
from .failures import FAILURE_KINDS, UpstreamError
from .interfaces import Answer, IFetcher, IUpstreamServer

log = Logger()

#: Seconds without pipelining after a pipelined request timed out.
PIPELINE_PAUSE = 60.0


class Tally:
    """What one server did for us: its answers and its failures by kind, and
    when it last gave each (what the status page and the metrics show)."""

    __slots__ = ("answers", "failures", "last_answer", "last_failure")

    def __init__(self) -> None:
        self.answers = 0
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.last_answer: float | None = None
        #: When, and the message the client was given.
        self.last_failure: tuple[float, str] | None = None

    def answered(self, now: float) -> None:
        self.answers += 1
        self.last_answer = now

    def failed(self, now: float, error: UpstreamError) -> None:
        self.failures[error.kind] += 1
        self.last_failure = (now, str(error))

    @property
    def state(self) -> str:
        """``up`` (its last answer came after any failure), ``down`` or ``unknown``."""
        failure, answer = self.last_failure, self.last_answer
        if failure is not None and (answer is None or failure[0] >= answer):
            return "down"
        return "unknown" if answer is None else "up"


class UpstreamProtocol(FrameClient):
    """One connection to the server; answers come back in request order,
    each checked against its request's tag when the server sets ``L``."""

    pool: UpstreamPool | None = None
    tagged = True
    #: Its answers carry L and echo our tags: it may be reused and pipelined.
    framed = False

    def dataReceived(self, data: bytes) -> None:
        if not self._pending:
            # An idle connection has nothing to say: it is broken, drop it.
            self._fail(ProtocolError("server sent bytes nobody asked for"))
            return
        super().dataReceived(data)

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        if header.status not in wire.STATUSES and not header.request:
            # The course client loses an answer with any other status: it is
            # a broken server, never an answer to relay.
            self._fail(ProtocolError(f"status {header.status} is not 200, 400 or 500"))
            return
        framed = bool(header.ext & wire.EXT_FRAMED and header.tag)
        if not framed:
            if len(self._pending) > 1 or self.bufferedAfter:
                # Nothing on it can be matched: several requests in flight, or
                # a second message after the answer (what a course server sends
                # for a request it read in two pieces). Every request is sent again.
                why = "pipelined" if len(self._pending) > 1 else "followed by more bytes"
                self._fail(OutOfStepError(f"untagged answer {why}"))
                return
            # Its one answer is delivered; it takes no other request.
            self.closeAfterSending()
        self.framed = framed
        if self.pool is not None:
            self.pool.learned(framed)
        super().frameReceived(header, data)
        if self.bufferedAfter and not self._pending and not self._broken:
            self._fail(ProtocolError("server sent bytes nobody asked for"))

    def _fail(self, error: Exception) -> None:
        if isinstance(error, OutOfStepError) and self.pool is not None:
            self.pool.outOfStep(self, error)
        super()._fail(error)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # Out of the pool first: the requests failed next may be sent again.
        if self.pool is not None:
            self.pool.lost(self)
        super().connectionLost(reason)


class TLSUpstreamProtocol(AwaitsHandshake, UpstreamProtocol):
    """One connection to the server over TLS, usable once its handshake is done."""


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class _Fetch:
    """One request's way to an answer: which attempt it is on, what to cancel
    (a retry timer, a connection attempt, a sent request) when it is given up,
    and when it times out."""

    __slots__ = ("attempt", "conn", "d", "deadline", "frame", "pending", "resent", "sent", "why")

    def __init__(self, frame: bytes, deadline: float) -> None:
        self.frame = frame
        self.deadline = deadline
        self.attempt = 0
        self.resent = 0  # times sent again after its connection went out of step
        self.conn: UpstreamProtocol | None = None  # where it was last sent
        self.why = ""  # why the last connection attempt failed
        #: What to stop when it is given up: the retry's DelayedCall, the
        #: connection attempt's or the sent request's Deferred, or the
        #: `_Unqueue` of its place in the queue.
        self.pending: _Cancellable | None = None
        self.sent = 0.0
        self.d: defer.Deferred[Answer] = defer.Deferred(self.cancel)

    def settle(self, result: Answer | Exception) -> None:
        """Fire with an answer or fail."""
        if isinstance(result, Exception):
            self.d.errback(result)
        else:
            self.d.callback(result)

    def cancel(self, d: defer.Deferred[Answer] | None = None) -> None:
        """Give up: stop the pending work (also ``d``'s canceller)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()


class IConnector(Interface):
    """What opens connections to one server for a pool."""

    address = Attribute("HOST:PORT of the server.")

    def connect() -> defer.Deferred[UpstreamProtocol]:
        """A Deferred firing with a new `UpstreamProtocol`, or
        failing with the reason there is none."""


@implementer(IConnector)
class TCPConnector:
    """Opens connections to a server over TCP through a `ClientCreator`
    Deferred chain, each attempt bounded by ``timeout``; over TLS when given
    ``tls``, the client options of `transport.tls.client_options`."""

    def __init__(
        self, reactor: IReactorTCP, host: str, port: int, timeout: float = 10.0, tls: Any = None
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        #: How every figure names the server, over TCP or TLS alike.
        self.address = address(host, port)
        self._creator = protocol.ClientCreator(reactor, UpstreamProtocol)

    def connect(self) -> defer.Deferred[UpstreamProtocol]:
        if self.tls is None:
            return self._creator.connectTCP(self.host, self.port, timeout=self.timeout)
        return connect_tls(
            self.reactor, TLSUpstreamProtocol, self.host, self.port, self.tls, self.timeout
        )


@implementer(IFetcher, IUpstreamServer)
class UpstreamPool:
    """Persistent connections to one server, reused for request after request
    (nginx ``keepalive``). `fetch` fires with ``(header, data, sent)``, where
    ``sent`` is the clock time the request left, or fails with `UpstreamError`.
    At most ``max_queued`` requests wait for a free connection; past that a
    request fails at once ("proxy overloaded") rather than pile up.

    With ``pipeline`` above 1, a request goes on the busiest connection that
    has room (fewer than ``pipeline`` requests in flight) before an idle one,
    and on an idle one before a new one: requests arriving together leave in
    one write and come back in one read, so both sides pay their system calls
    and reactor turns once per batch rather than once per request, and a slow
    answer delays at most ``pipeline - 1`` others. Only on connections that
    have brought an answer with ``L`` and our tag (ours do; the course server
    reads one ``recv`` as one message and never gets more than one request). A request
    on a connection that breaks under it, which one timed-out neighbour does
    by closing it, or that went out of step, is sent again. A far end that
    garbles pipelined requests (a tag mismatch with several in flight) gets
    one request at a time from then on; one that lets a pipelined request
    time out, for `PIPELINE_PAUSE` seconds (it may only be slow).
    """

    #: Each retry waits this factor longer than the one before.
    backoff = 2.0

    def __init__(
        self,
        connector: IConnector,
        clock: IReactorTime,
        *,
        max_connections: int = 32,
        retries: int = 5,
        retry_delay: float = 0.5,
        timeout: float = 10.0,
        max_queued: int = 4096,
        pipeline: int = 1,
    ) -> None:
        self.connector = connector
        self.clock = clock
        self.max_queued = max_queued
        self.max_connections = max_connections
        self.attempts = max(1, retries)
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.pipeline = pipeline
        #: Whether requests may still be pipelined to this server.
        self.pipelining = pipeline > 1
        #: What the last answer said: the server frames by length and echoes tags.
        self.framed = False
        self.address: str = connector.address
        #: How error messages name the server.
        self.name = f"calculator server {self.address}"
        #: Its answers and failures (it is the one server it sends to).
        self.tally = Tally()
        self._dialing = 0
        self._outstanding = 0
        self._idle: list[UpstreamProtocol] = []
        self._open: list[UpstreamProtocol] = []
        #: Connections that may be pipelined and have requests in flight.
        self._busy: list[UpstreamProtocol] = []
        self._queue: deque[_Fetch] = deque()
        #: Fetches in the order they began, so by deadline (some settled), and
        #: the one timer that times out the first unsettled one.
        self._watched: deque[_Fetch] = deque()
        self._sweeper: IDelayedCall | None = None
        self._sweeping = False

    @property
    def idle(self) -> int:
        """Open connections waiting for a request."""
        return len(self._idle)

    @property
    def outstanding(self) -> int:
        """Requests fetched and not yet answered or failed (for a balancer)."""
        return self._outstanding

    @property
    def connections(self) -> int:
        """Connections open or being opened: what counts against the limit."""
        return self._dialing + len(self._open)

    @property
    def servers(self) -> list[UpstreamPool]:
        """The one server it sends to: itself."""
        return [self]

    @property
    def healthy(self) -> bool:
        """A lone server is never taken out: every miss is sent to it."""
        return True

    #: A lone server is never taken out.
    ejected = 0

    def fetch(self, frame: bytes) -> defer.Deferred[Answer]:
        """Send one request frame upstream; see the class docstring."""
        fetch = _Fetch(frame, self.clock.seconds() + self.timeout)
        self._outstanding += 1
        fetch.d.addBoth(self._done)
        self._watch(fetch)
        self._dispatch(fetch)
        return fetch.d

    def _done(self, result: Answer | Failure) -> Answer | Failure:
        self._outstanding -= 1
        if not isinstance(result, Failure):
            self.tally.answered(self.clock.seconds())
        elif isinstance(result.value, UpstreamError):
            self.tally.failed(self.clock.seconds(), result.value)
        if not self._outstanding:
            self._watched.clear()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
        return result

    def _watch(self, fetch: _Fetch) -> None:
        """Time ``fetch`` out at its deadline. Every fetch has the same
        timeout, so one timer serves them all, set for the first deadline
        not yet settled: cheaper than a timer per request."""
        watched = self._watched
        while watched and watched[0].d.called:
            watched.popleft()
        if len(watched) > 2 * self._outstanding + 64:  # behind a slow one
            self._watched = watched = deque(f for f in watched if not f.d.called)
        watched.append(fetch)
        if self._sweeper is None and not self._sweeping:
            self._sweeper = self.clock.callLater(self.timeout, self._sweep)

    def _sweep(self) -> None:
        """Time out every fetch past its deadline; wait for the next one."""
        self._sweeper = None
        now = self.clock.seconds()
        # A timed-out fetch's callbacks may fetch again: the timer waits for
        # the end of the sweep, and the list is read afresh each time.
        self._sweeping = True
        try:
            while self._watched:
                fetch = self._watched[0]
                if not fetch.d.called and fetch.deadline > now:
                    break
                self._watched.popleft()
                if not fetch.d.called:
                    self._timedOut(fetch)
        finally:
            self._sweeping = False
        if self._watched:
            self._sweeper = self.clock.callLater(self._watched[0].deadline - now, self._sweep)

    def learned(self, framed: bool) -> None:
        """An answer said whether the server frames by length and echoes tags."""
        self.framed = framed

    def outOfStep(self, conn: UpstreamProtocol, reason: Exception) -> None:
        """A connection's answers stopped matching its requests."""
        log.warn("{name}: {reason}; closing the connection", name=self.name, reason=reason)
        if conn.pending > 1:
            self._stopPipelining(str(reason))

    def _stopPipelining(self, why: str, pause: float | None = None) -> None:
        """One request at a time from now on, or for ``pause`` seconds."""
        if not self.pipelining:
            return
        self.pipelining = False
        if pause is None:
            until = "from now on"
        else:
            until = f"for {pause:g} s"
            self.clock.callLater(pause, self._resumePipelining)
        log.warn(
            "{name}: {why} with requests pipelined; sending one at a time {until}",
            name=self.name,
            why=why,
            until=until,
        )

    def _resumePipelining(self) -> None:
        self.pipelining = True
        log.info("{name}: pipelining again", name=self.name)

    def _timedOut(self, fetch: _Fetch) -> None:
        conn = fetch.conn
        if fetch.pending is not None and conn is not None and conn.pending > 1:
            self._stopPipelining("an answer did not come in time", PIPELINE_PAUSE)
        fetch.cancel()
        if fetch.why:
            why = f"unreachable within {self.timeout:g} s ({_attempts(fetch.attempt)}): {fetch.why}"
        else:
            why = f"did not answer within {self.timeout:g} s"
        kind = "timeout" if fetch.conn is not None else "unreachable"
        fetch.settle(UpstreamError(f"{self.name} {why}", kind))

    def _dispatch(self, fetch: _Fetch, fresh: bool = False) -> None:
        """Send ``fetch`` on (pipelining) the busiest connection with room,
        else an idle one, else open one, else queue it; ``fresh`` prefers a
        new connection, which has no stray answer on its way."""
        if not fresh:
            if self.pipelining and (busiest := self._busiest()) is not None:
                self._send(fetch, busiest, reused=True)
                return
            while self._idle:
                conn = self._idle.pop()
                if conn.usable:
                    self._send(fetch, conn, reused=True)
                    return
        if self.connections < self.max_connections and (fresh or not self._waitForDial()):
            self._connect(fetch)
        elif len(self._queue) >= self.max_queued:
            fetch.settle(
                UpstreamError(
                    f"proxy overloaded: {len(self._queue)} requests already wait for {self.name}",
                    "overloaded",
                )
            )
        else:
            self._queue.append(fetch)
            fetch.pending = _Unqueue(self._queue, fetch)

    def _busiest(self) -> UpstreamProtocol | None:
        """The pipelined connection with the most requests in flight that has
        room for one more."""
        best = None
        most = 0
        room = self.pipeline
        for conn in self._busy:
            pending = conn.pending
            if most < pending < room and conn.usable:
                best, most = conn, pending
        return best

    def _waitForDial(self) -> bool:
        """Pipelining to a server known to frame by length, requests wait for
        a connection being opened rather than each open its own."""
        return self.pipelining and self.framed and self._dialing > 0

    def _connect(self, fetch: _Fetch) -> None:
        fetch.attempt += 1
        self._dialing += 1
        d = self.connector.connect()
        fetch.pending = d
        d.addCallbacks(
            self._connected, self._connectFailed, callbackArgs=(fetch,), errbackArgs=(fetch,)
        )

    def _connected(self, conn: UpstreamProtocol, fetch: _Fetch) -> None:
        self._dialing -= 1
        conn.pool = self
        self._open.append(conn)
        self._send(fetch, conn, reused=False)
        self._release(conn)

    def _connectFailed(self, reason: Failure, fetch: _Fetch) -> None:
        self._dialing -= 1
        self._freed()
        if reason.check(defer.CancelledError):
            return
        fetch.why = _reason(reason.value)
        if fetch.attempt >= self.attempts or reason.check(TLSError):
            fetch.pending = None
            fetch.settle(
                UpstreamError(
                    f"{self.name} unreachable after {_attempts(fetch.attempt)}: {fetch.why}"
                )
            )
            return
        delay = self.retry_delay * self.backoff ** (fetch.attempt - 1)
        fetch.pending = self.clock.callLater(delay, self._dispatch, fetch)

    def _send(self, fetch: _Fetch, conn: UpstreamProtocol, reused: bool) -> None:
        fetch.sent = self.clock.seconds()
        fetch.conn = conn
        d = conn.sendRequest(fetch.frame)
        if conn.framed and conn not in self._busy:
            self._busy.append(conn)
        fetch.pending = d
        d.addCallbacks(
            self._answered,
            self._sendFailed,
            callbackArgs=(fetch, conn),
            errbackArgs=(fetch, reused),
        )

    def _answered(
        self, message: tuple[wire.Header, bytes], fetch: _Fetch, conn: UpstreamProtocol
    ) -> None:
        fetch.pending = None
        header, data = message
        self._release(conn)
        fetch.settle((header, data, fetch.sent))

    def _sendFailed(self, reason: Failure, fetch: _Fetch, reused: bool) -> None:
        if reason.check(defer.CancelledError):
            return
        fetch.pending = None
        if reason.check(OutOfStepError):
            fetch.resent += 1
            if fetch.resent < self.attempts:
                self._dispatch(fetch, fresh=True)
            else:
                fetch.settle(
                    UpstreamError(f"{self.name} answered out of step: {reason.value}", "invalid")
                )
            return
        if reason.check(error.ConnectionAborted) or (
            reused and reason.check(error.ConnectionDone, error.ConnectionLost)
        ):
            # We closed the connection for another request on it, or the
            # server closed an idle pooled one: not this request's fault, so
            # try again on another.
            self._dispatch(fetch)
            return
        if isinstance(reason.value, ProtocolError):
            message, kind = f"{self.name} sent an invalid answer: {reason.value}", "invalid"
        else:
            message, kind = f"{self.name} closed the connection before answering", "closed"
        fetch.settle(UpstreamError(message, kind))

    def _release(self, conn: UpstreamProtocol) -> None:
        """Give a connection with room (its answer has come, or it has just
        opened) to the requests queued for one, or keep it idle once nothing
        is in flight on it."""
        if conn.transport is None or not conn.usable:
            return
        queue = self._queue
        room = self.pipeline if conn.framed and self.pipelining else 1
        while queue and conn.pending < room:
            fetch = queue.popleft()
            if not fetch.d.called:
                self._send(fetch, conn, reused=True)
        if not conn.pending:
            if conn in self._busy:
                self._busy.remove(conn)
            self._idle.append(conn)
        else:
            self._dialForQueued()

    def lost(self, conn: UpstreamProtocol) -> None:
        """A connection closed: forget it."""
        if conn in self._idle:
            self._idle.remove(conn)
        if conn in self._open:
            self._open.remove(conn)
        if conn in self._busy:
            self._busy.remove(conn)
        self._freed()

    def _freed(self) -> None:
        """A connection (or an attempt at one) is gone: its place goes to the
        requests queued for one."""
        self._dialForQueued()

    def _dialForQueued(self) -> None:
        """Open connections for queued requests while the limit allows."""
        while self._queue and self.connections < self.max_connections and not self._waitForDial():
            fetch = self._queue.popleft()
            if not fetch.d.called:
                self._connect(fetch)

    def close(self) -> None:
        """Close every idle connection (on shutdown)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.closeAfterSending()


class _Unqueue:
    """Cancels a request still waiting for a free connection."""

    __slots__ = ("fetch", "queue")

    def __init__(self, queue: deque, fetch: _Fetch) -> None:
        self.queue = queue
        self.fetch = fetch

    def cancel(self) -> None:
        if self.fetch in self.queue:
            self.queue.remove(self.fetch)


def _reason(e: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words."""
    if isinstance(e, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(e, error.TimeoutError):
        return "connection timed out"
    os_error = e.osError if isinstance(e, error.ConnectError) else None
    return str(os_error or e).strip().rstrip(".")


def _attempts(count: int) -> str:
    return f"{count} attempt{'s' if count > 1 else ''}"
