"""One connection of a case to the target: a `Probe` sends exactly the bytes
it is given (each write its own segment) and reads answers by their total
length, keeping every byte both ways in the case's `Transcript` for the
report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ..transport import wire
from .verdicts import Failed

#: What a transcript event says happened.
CONNECTED = "connected"
SENT = "sent"
RECEIVED = "received"
HALF_CLOSED = "we half-closed"
END_OF_FILE = "end of file"
CLOSED = "closed"
#: How the scripted upstream's connections are named.
UPSTREAM = "upstream"


class Event(NamedTuple):
    """One thing that happened on a connection, ``at`` seconds into the case."""

    at: float
    connection: str
    what: str
    data: bytes = b""


class Transcript:
    """Everything one case sent and received, connection by connection (the
    scripted upstream's connections too, in proxy mode)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.events: list[Event] = []

    def record(self, connection: str, what: str, data: bytes = b"") -> None:
        self.events.append(Event(self.clock.seconds() - self.started, connection, what, data))

    def heard_from_target(self) -> bool:
        """Whether the target sent anything at all (the upstream side aside)."""
        return any(e.what == RECEIVED for e in self.events if not e.connection.startswith(UPSTREAM))

    def connections(self) -> list[str]:
        """The connections' names, in order of first appearance."""
        return list(dict.fromkeys(e.connection for e in self.events))


class Frame(NamedTuple):
    """One whole message read from a stream."""

    header: wire.Header
    data: bytes

    @property
    def raw(self) -> bytes:
        return wire.HEADER.pack(*self.header) + self.data


def split_frames(stream: bytes) -> tuple[list[Frame], bytes]:
    """The whole messages at the start of ``stream`` and what follows them
    (a partial message, or bytes that cannot be a message)."""
    frames = []
    offset = 0
    while len(stream) - offset >= wire.HEADER_SIZE:
        header = wire.decode_header(stream, offset)
        if header.length < wire.HEADER_SIZE or len(stream) - offset < header.length:
            break
        frames.append(Frame(header, stream[offset + wire.HEADER_SIZE : offset + header.length]))
        offset += header.length
    return frames, stream[offset:]


#: Most bytes a probe keeps unread: far more than any answer it waits for,
#: and a bound on what a target that floods us can cost.
MAX_UNREAD = 1 << 20


class Closed(Failed):
    """The target closed the connection before what we waited for came."""


@implementer(IHalfCloseableProtocol)
class Probe(protocol.Protocol):
    """A client connection under the case's control. Waits (`answer`,
    `closed`, `quiet`) fire when what they wait for has arrived; they have
    no timeout of their own, the case's time limit covers them all."""

    #: A TCP transport (typed loosely: zope interfaces do not combine as types do).
    transport: Any

    def __init__(self, transcript: Transcript, name: str) -> None:
        self.transcript = transcript
        self.name = name
        #: Received bytes not yet taken as answers.
        self.buffer = b""
        #: The target sent end-of-file or the connection is gone.
        self.ended = False
        self.lost = False
        self.answers = 0
        #: The target sent more than `MAX_UNREAD` bytes nobody could read.
        self.flooded = False
        self._aborted = False
        self._waiters: list[tuple[defer.Deferred[Any], Callable[[], Any], Callable[[], str]]] = []

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transcript.record(self.name, CONNECTED)

    def dataReceived(self, data: bytes) -> None:
        if self.flooded:
            return
        self.transcript.record(self.name, RECEIVED, data)
        self.buffer += data
        if len(self.buffer) > MAX_UNREAD:
            self.flooded = True
            self.abort()
        self._poll()

    def readConnectionLost(self) -> None:
        self.transcript.record(self.name, END_OF_FILE)
        self.ended = True
        self._poll()

    def writeConnectionLost(self) -> None:
        """We half-closed and the target has closed too: nothing to do."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._aborted:
            how = "by us"
        else:
            how = "reset by the target" if reason.check(error.ConnectionLost) else "by the target"
        self.transcript.record(self.name, f"{CLOSED} {how}")
        self.ended = self.lost = True
        self._poll()

    # --- sending ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write ``data`` now (it leaves in the reactor's next turn)."""
        if self.lost:
            raise Closed(f"connection {self.name} was closed by the target before we could send")
        self.transcript.record(self.name, SENT, data)
        self.transport.write(data)

    def half_close(self) -> None:
        """Send end-of-file: we will send nothing more, but still read."""
        self.transcript.record(self.name, HALF_CLOSED)
        self.transport.loseWriteConnection()

    def abort(self) -> None:
        """Close at once (the case is over)."""
        if not self.lost:
            self._aborted = True
            self.transport.abortConnection()

    # --- waiting ------------------------------------------------------------

    @property
    def waiting(self) -> list[str]:
        """What this connection's waits are waiting for, in words, with what
        has come of it."""
        return [what() for _, _, what in self._waiters]

    def _progress(self) -> str:
        size = len(self.buffer)
        if not size:
            return "nothing of it received"
        if size < wire.HEADER_SIZE:
            return f"{size} bytes received, not yet a whole header"
        length = wire.decode_header(self.buffer).length
        return f"{size} bytes received; their header announces a total length of {length}"

    def answer(self, what: str = "an answer") -> defer.Deferred[Frame]:
        """The next whole message from the target; `Closed` if the target
        closes first, `Failed` if what comes cannot be a message."""
        return self._wait(
            self._next_frame, lambda: f"{what} on connection {self.name} ({self._progress()})"
        )

    def closed(self) -> defer.Deferred[bytes]:
        """Fires when the target has closed (end-of-file or reset), with
        what it sent after the last answer taken."""
        return self._wait(
            self._end, lambda: f"the target to close connection {self.name} after its answer"
        )

    def _next_frame(self) -> Frame | None:
        buf = self.buffer
        if self.flooded:
            raise Failed(
                f"the target sent over {MAX_UNREAD} bytes on connection {self.name} that are no "
                f"whole answer; calc-check closed it"
            )
        if len(buf) >= wire.HEADER_SIZE:
            header = wire.decode_header(buf)
            if header.length < wire.HEADER_SIZE:
                raise Failed(
                    f"an answer on connection {self.name} has a total length of "
                    f"{header.length}, less than its own 12-byte header (PROTOCOL.md 1)"
                )
            if len(buf) >= header.length:
                self.buffer = buf[header.length :]
                self.answers += 1
                return Frame(header, buf[wire.HEADER_SIZE : header.length])
        if self.ended:
            partial = f" after {len(buf)} bytes of an answer" if buf else ""
            raise Closed(
                f"the target closed connection {self.name}{partial} instead of answering "
                f"({self.answers} whole answer(s) had come on it before)"
            )
        return None

    def _end(self) -> bytes | None:
        return self.buffer if self.ended else None

    def _wait(self, poll: Callable[[], Any], what: Callable[[], str]) -> defer.Deferred[Any]:
        """A Deferred for what ``poll`` returns once it is not None (or
        raises); ``what`` describes the wait, with its progress so far."""
        entry: tuple[defer.Deferred[Any], Callable[[], Any], Callable[[], str]]

        def cancel(d: defer.Deferred[Any]) -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        entry = (d, poll, what)
        self._waiters.append(entry)
        self._poll()
        return d

    def _poll(self) -> None:
        for entry in list(self._waiters):
            d, poll, _ = entry
            try:
                result = poll()
            except Failed as e:
                self._waiters.remove(entry)
                d.errback(e)
                continue
            if result is not None:
                self._waiters.remove(entry)
                d.callback(result)
