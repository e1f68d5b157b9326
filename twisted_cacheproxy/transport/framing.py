"""Length framing: `FrameReceiver`, the base of every connection of ours.

It reassembles messages by their total length and carries what every
endpoint needs besides: an idle timeout, backpressure, a bound on input
waiting to be handled, fairness turns and half-close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from .wire import HEADER, HEADER_SIZE, MAX_MESSAGE_SIZE, Header, make_header


@implementer(IHalfCloseableProtocol)
class FrameReceiver(protocol.Protocol, TimeoutMixin):
    """Reassembles messages by their total length, in the spirit of
    ``IntNStringReceiver``, and calls `frameReceived` once per message.

    It also carries what every endpoint of ours needs: an idle timeout that
    only a complete message restarts (noted per message, not rescheduled),
    backpressure (stop reading while our own unsent output is above the
    transport's high-water mark), a bound on input waiting to be handled,
    and half-close: what arrived before the peer's end-of-file is still
    handled.
    """

    #: A TCP transport in practice (``ITCPTransport`` and ``IPushProducer``);
    #: typed loosely because zope interfaces do not combine as types do.
    transport: Any
    maxMessageSize = MAX_MESSAGE_SIZE
    idleTimeout: float | None = None
    #: Where the turn budget reads the time (the reactor unless a factory says).
    clock: IReactorTime | None = None
    #: Seconds one connection may spend on frames it has buffered before the
    #: reactor serves others: a pipelined batch of heavy requests must not
    #: stall every other client.
    turnBudget = 0.005

    # The state of one connection, set by `makeConnection` on the protocol
    # itself (every message reads it: an instance's own attribute is found
    # quicker than a class's default).
    #: Received bytes not yet handled, and how many there are.
    _pieces: list[bytes]
    _size: int
    #: How many bytes must be buffered before a whole frame can be there.
    _need: int
    #: Output backpressure, a hold (`holdInput`), a full input buffer.
    _paused: bool
    _held: bool
    _full: bool
    #: Registered as the transport's producer (from `connectionMade` to the close).
    _producing: bool
    #: Nothing more is read (`_discardInput`); the peer sent end-of-file.
    _broken: bool
    _eof: bool
    #: When the last complete message came (or the connection opened).
    _activeAt: float
    #: The fairness turn that will handle the rest of what is buffered.
    _nextTurn: IDelayedCall | None
    #: Bytes already received after the message being handled.
    bufferedAfter: int

    @property
    def inputLimit(self) -> int:
        """Most bytes waiting to be handled before we stop reading: four
        largest messages, and never less than one 64 KiB read."""
        return max(4 * self.maxMessageSize, 1 << 16)

    def callLater(self, period: float, func: Callable[..., object], *args: object) -> IDelayedCall:
        """Schedule on `clock` (the idle timeout and the fairness turns)."""
        return (self.clock or default_reactor()).callLater(period, func, *args)

    def makeConnection(self, transport: Any) -> None:
        if self.clock is None:  # looked up once, not at every read
            self.clock = default_reactor()
        self._pieces = []
        self._size = self.bufferedAfter = 0
        self._need = HEADER_SIZE
        self._paused = self._held = self._full = self._producing = self._broken = self._eof = False
        self._activeAt = 0.0
        self._nextTurn = None
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self.markActive()
        self.setTimeout(self.idleTimeout)
        # We produce responses; the transport tells us when its buffer is full.
        self.transport.registerProducer(self, True)
        self._producing = True

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        self._pieces.append(data)
        self._size += len(data)
        if self._nextTurn is not None or self._paused or self._held:
            # Not handled now: past the bound, stop reading until it drains.
            if self._size > self.inputLimit and not self._full:
                self._full = True
                self._updateReading()
        elif self._size >= self._need:
            self._process()

    def readConnectionLost(self) -> None:
        """The peer sent end-of-file: answer what came before it, then close."""
        self._eof = True
        if self._nextTurn is None and not (self._paused or self._held):
            self._process()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def sendMessage(self, message: bytes) -> None:
        """Send one whole message."""
        self.transport.write(message)

    def closeAfterSending(self) -> None:
        """Close the connection once every message sent so far has left (no
        longer its producer: a TLS transport closes only once it has none)."""
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _process(self) -> None:
        self.handleBuffered()
        if self._broken or self._nextTurn is not None or self._paused or self._held:
            return
        if self._full:
            self._full = False
            self._updateReading()
        if self._eof:
            self.endOfInput()

    def handleBuffered(self) -> None:
        """Hand the whole frames buffered to `frameReceived` (within the turn
        budget): what a subclass wraps to act once per read or turn."""
        pieces = self._pieces
        if not pieces:
            return
        buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        offset = 0
        end = len(buf)
        clock = self.clock or default_reactor()
        started = clock.seconds()
        while not (self._paused or self._held) and end - offset >= HEADER_SIZE:
            if offset and clock.seconds() - started >= self.turnBudget:
                # Other connections get their turn before the rest of ours.
                self._nextTurn = self.callLater(0, self._resumeTurn)
                break
            header = make_header(HEADER.unpack_from(buf, offset))
            length = header.length
            if length < HEADER_SIZE or length > self.maxMessageSize:
                self._discardInput()
                first = buf[offset + HEADER_SIZE : offset + HEADER_SIZE + 1]
                limit = self.maxMessageSize
                self.invalidFrame(
                    f"impossible message length {length} "
                    f"(must be {HEADER_SIZE}..{limit}); closing the connection",
                    first,
                )
                return
            if end - offset < length:
                break
            data = buf[offset + HEADER_SIZE : offset + length]
            offset += length
            self.bufferedAfter = end - offset
            self._activeAt = started
            self.frameReceived(header, data)
            if self._broken or self.transport is None or self.transport.disconnecting:
                self._discardInput()
                return
        pieces.clear()
        if offset == end:  # the usual read: whole frames, nothing left over
            self._size = 0
            self._need = HEADER_SIZE
            return
        rest = buf[offset:] if offset else buf
        self._size = len(rest)
        pieces.append(rest)
        self._need = _length_at(rest) if len(rest) >= HEADER_SIZE else HEADER_SIZE

    def _discardInput(self) -> None:
        """Nothing more is read from this connection, ever."""
        self._broken = True
        self._pieces.clear()
        self._size = 0

    def _resumeTurn(self) -> None:
        self._nextTurn = None
        if not self._broken:
            self._process()

    def frameReceived(self, header: Header, data: bytes) -> None:
        """Handle one complete message."""
        raise NotImplementedError

    def invalidFrame(self, reason: str, first: bytes) -> None:
        """The stream cannot be resynchronised: nothing more is read from it,
        and this must close it. ``first`` is the first data byte, when it has
        arrived (it tells the encoding of an answer)."""
        self.closeAfterSending()

    def endOfInput(self) -> None:
        """The peer has sent end-of-file and every whole frame before it has
        been handled (a partial one never will be): close once answered."""
        self._discardInput()
        self.closeAfterSending()

    def _seconds(self) -> float:
        return (self.clock or default_reactor()).seconds()

    def markActive(self) -> None:
        """Count the idle timeout from now, as after a complete message."""
        self._activeAt = self._seconds()

    def timeoutConnection(self) -> None:
        """The idle timer ran out: if a message came since it was set, set it
        again for the rest of the period (cheaper than moving the timer at
        every message), else the connection is `idle`."""
        timeout = self.idleTimeout
        quiet = self._seconds() - self._activeAt
        if timeout is not None and quiet < timeout:
            self.setTimeout(timeout - quiet)
        else:
            self.idle()

    def idle(self) -> None:
        """Idle: an orderly close (FIN) when nothing is half-received or
        unsent, an abort when the peer left a frame half-sent or stopped
        reading its answers."""
        if self._size or self._paused:
            self.transport.abortConnection()
        else:
            self._discardInput()
            self.closeAfterSending()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = False
        self.setTimeout(None)
        self._discardInput()
        if self._nextTurn is not None:
            self._nextTurn.cancel()
            self._nextTurn = None

    # IPushProducer: the transport pauses us when its send buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._paused = False
        self._readAgain()

    def holdInput(self) -> None:
        """Stop reading until `releaseInput`: enough work is already in hand."""
        self._held = True
        self._updateReading()

    def releaseInput(self) -> None:
        self._held = False
        self._readAgain()

    def _updateReading(self) -> None:
        """Read from the transport unless output backpressure, a hold or a
        full input buffer says not to."""
        if self.transport is None:
            return
        if self._paused or self._held or self._full:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _readAgain(self) -> None:
        """Read and handle frames again, unless output backpressure or a hold
        still stops it."""
        if self._paused or self._held:
            return
        self._updateReading()
        if not self._broken and self._nextTurn is None:
            self._process()

    def stopProducing(self) -> None:
        self._paused = True


def default_reactor() -> IReactorTime:
    """The global reactor, imported only when needed (not at import time)."""
    from twisted.internet import reactor

    return reactor


def _length_at(buf: bytes) -> int:
    """The total length in the header at the start of ``buf`` (at least a header)."""
    return max(HEADER_SIZE, int.from_bytes(buf[4:6], "big"))
