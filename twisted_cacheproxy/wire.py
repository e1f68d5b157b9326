"""The calculator wire format: the 12-byte header and a framing Protocol.

Every message is ``!LHHHH`` (time stamp, total length, flags, cache control,
extension word) followed by its data; the total length is the only framing.
The course programs pack the extension word as padding and never read it; we
carry hop capabilities, cache marks and a request tag there (PROTOCOL.md 6).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from .endpoint import BatchedWrites

HEADER = struct.Struct("!LHHHH")
HEADER_SIZE = HEADER.size

#: The cache-control value meaning "no limit" (a response) or "any age" (a request).
FOREVER = 65535
#: Default largest message, header included.
MAX_MESSAGE_SIZE = 8192
#: The largest message the 16-bit length field can describe.
LENGTH_LIMIT = 65535

#: Bits 15-13 of the flags word: sent as 0, ignored on receipt.
RESERVED_MASK = 0xE000
FLAG_CACHE = 1 << 12
FLAG_STEPS = 1 << 11
FLAG_REQUEST = 1 << 10
STATUS_MASK = 0x3FF

#: Extension word, answers: "I frame by length, answer in order, echo tags" (hop by hop).
EXT_FRAMED = 0x0001
#: Extension word, answers: served from a cache's store (end to end).
EXT_FROM_CACHE = 0x0002
#: Extension word, answers: served past its lifetime (stale-if-error), with H and C=0.
EXT_GRACE = 0x0004
#: Extension word, requests and answers: the 13-bit request tag (0: none).
TAG_SHIFT = 3
TAG_MASK = 0xFFF8
MAX_TAG = TAG_MASK >> TAG_SHIFT

OK = 200
BAD_REQUEST = 400
SERVER_ERROR = 500


class Header(NamedTuple):
    """A decoded message header; the flag bits are read through properties."""

    timestamp: int
    length: int
    flags: int
    max_age: int
    ext: int = 0

    @property
    def cache(self) -> bool:
        return bool(self.flags & FLAG_CACHE)

    @property
    def steps(self) -> bool:
        return bool(self.flags & FLAG_STEPS)

    @property
    def request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @property
    def status(self) -> int:
        return self.flags & STATUS_MASK

    @property
    def framed(self) -> bool:
        """The sender frames by length and echoes tags (the ``L`` bit)."""
        return bool(self.ext & EXT_FRAMED)

    @property
    def from_cache(self) -> bool:
        """The answer came from a cache's store (the ``H`` bit)."""
        return bool(self.ext & EXT_FROM_CACHE)

    @property
    def grace(self) -> bool:
        """The answer was served past its lifetime (the ``G`` bit)."""
        return bool(self.ext & EXT_GRACE)

    @property
    def tag(self) -> int:
        """The request tag carried in the extension word (0: none)."""
        return self.ext >> TAG_SHIFT


def make_flags(*, request: bool, status: int = 0, cache: bool = False, steps: bool = False) -> int:
    """Pack the flag bits and status code into the flags word (reserved bits 0)."""
    if not 0 <= status <= STATUS_MASK:
        raise ValueError(f"status {status} does not fit in 10 bits")
    return (
        (FLAG_CACHE if cache else 0)
        | (FLAG_STEPS if steps else 0)
        | (FLAG_REQUEST if request else 0)
        | status
    )


def encode(timestamp: int, flags: int, max_age: int, data: bytes, ext: int = 0) -> bytes:
    """Build one whole message: header plus data."""
    total = HEADER_SIZE + len(data)
    if total > LENGTH_LIMIT:
        raise ValueError(f"message of {total} bytes exceeds the {LENGTH_LIMIT}-byte limit")
    return HEADER.pack(timestamp & 0xFFFFFFFF, total, flags, max_age, ext) + data


def tag_bits(tag: int) -> int:
    """The extension-word bits that carry request tag ``tag`` (0..8191)."""
    return (tag << TAG_SHIFT) & TAG_MASK


def answer_ext(request: Header, marks: int = 0) -> int:
    """The extension word of an answer by a side of ours to ``request``: ``L``,
    the request's tag echoed, and any cache ``marks`` (`EXT_FROM_CACHE`, `EXT_GRACE`)."""
    return EXT_FRAMED | (request.ext & TAG_MASK) | marks


def rewrite(
    message: bytes, *, flags: int | None = None, max_age: int | None = None, ext: int | None = None
) -> bytes:
    """``message`` with some of its header words replaced (time stamp, length
    and data kept): how a proxy re-marks a stored or forwarded answer."""
    _, _, old_flags, old_age, old_ext = HEADER.unpack_from(message)
    return (
        message[:6]
        + _WORDS.pack(
            old_flags if flags is None else flags,
            old_age if max_age is None else max_age,
            old_ext if ext is None else ext,
        )
        + message[HEADER_SIZE:]
    )


_WORDS = struct.Struct("!HHH")


def with_tag(answer: bytes, request: Header) -> bytes:
    """``answer`` with ``request``'s tag in its extension word (the same
    bytes when it is already there)."""
    ext = int.from_bytes(answer[10:12], "big")
    tag = request.ext & TAG_MASK
    if ext & TAG_MASK == tag:
        return answer
    return rewrite(answer, ext=(ext & ~TAG_MASK) | tag)


def decode_header(buf: bytes, offset: int = 0) -> Header:
    """Read the header that starts at ``offset`` of ``buf``."""
    return Header._make(HEADER.unpack_from(buf, offset))


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
    #: Received bytes not yet handled, and how many there are.
    _pieces: list[bytes]
    _size = 0
    #: How many bytes must be buffered before a whole frame can be there.
    _need = HEADER_SIZE
    _paused = False
    _held = False
    _full = False
    _broken = False
    _eof = False
    #: When the last complete message came (or the connection opened).
    _activeAt = 0.0
    _nextTurn: IDelayedCall | None = None
    #: Seconds one connection may spend on frames it has buffered before the
    #: reactor serves others: a pipelined batch of heavy requests must not
    #: stall every other client.
    turnBudget = 0.005
    #: Bytes already received after the message being handled.
    bufferedAfter = 0

    @property
    def inputLimit(self) -> int:
        """Most bytes waiting to be handled before we stop reading: four
        largest messages, and never less than one 64 KiB read."""
        return max(4 * self.maxMessageSize, 1 << 16)

    def callLater(self, period: float, func: Callable[..., object], *args: object) -> IDelayedCall:
        """Schedule on `clock` (the idle timeout and the fairness turns)."""
        return (self.clock or _reactor()).callLater(period, func, *args)

    def makeConnection(self, transport: Any) -> None:
        self._pieces = []
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self.markActive()
        self.setTimeout(self.idleTimeout)
        # We produce responses; the transport tells us when its buffer is full.
        self.transport.registerProducer(self, True)

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
        """Close the connection once every message sent so far has left."""
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
        self._handleFrames()

    def _handleFrames(self) -> None:
        pieces = self._pieces
        if not pieces:
            return
        buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        offset = 0
        end = len(buf)
        clock = self.clock or _reactor()
        started = clock.seconds()
        while not (self._paused or self._held) and end - offset >= HEADER_SIZE:
            if offset and clock.seconds() - started >= self.turnBudget:
                # Other connections get their turn before the rest of ours.
                self._nextTurn = self.callLater(0, self._resumeTurn)
                break
            header = Header._make(HEADER.unpack_from(buf, offset))
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
        rest = buf[offset:] if offset else buf
        pieces.clear()
        self._size = len(rest)
        if rest:
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
        return (self.clock or _reactor()).seconds()

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


def _reactor() -> IReactorTime:
    """The global reactor, imported only when needed (not at import time)."""
    from twisted.internet import reactor

    return reactor


def _length_at(buf: bytes) -> int:
    """The total length in the header at the start of ``buf`` (at least a header)."""
    return max(HEADER_SIZE, int.from_bytes(buf[4:6], "big"))


class ProtocolError(Exception):
    """The peer sent something that is not a valid answer to our request."""


class OutOfStepError(ProtocolError):
    """An answer's tag is not its request's: the connection is out of step
    (a duplicated, late or stray answer); what waits on it may be sent again."""


class FrameClient(FrameReceiver):
    """The requesting side: one Deferred per request, fired in order with
    ``(header, data)`` of its answer, like ``memcache.MemCacheProtocol``.

    Pending requests fail when the connection is lost or the peer breaks the
    protocol; cancelling a pending request closes the connection, since an
    answer already asked for cannot be skipped on a shared stream. A
    connection we abort delivers nothing more, not even answers already
    buffered. With `tagged` set, each request carries a tag of its own
    (PROTOCOL.md 6) and an ``L`` answer with another request's tag fails
    everything pending with `OutOfStepError` instead of being delivered.
    """

    maxMessageSize = LENGTH_LIMIT
    tagged = False
    _lastTag = 0

    def __init__(self) -> None:
        #: (Deferred, tag) of each request awaiting its answer, in order.
        self._pending: deque[tuple[Deferred[tuple[Header, bytes]], int]] = deque()

    @property
    def pending(self) -> int:
        """How many requests still wait for their answer."""
        return len(self._pending)

    @property
    def usable(self) -> bool:
        """Whether a request sent now could be answered: connected, and not
        closing (a closing connection may not know it yet)."""
        return bool(self.connected and not self._broken and not self.transport.disconnecting)

    def sendRequest(self, frame: bytes) -> Deferred[tuple[Header, bytes]]:
        """Send one whole request message; the Deferred fires with its answer."""
        d: Deferred[tuple[Header, bytes]] = Deferred(self._cancel)
        tag = 0
        if self.tagged:
            tag = self._lastTag % MAX_TAG + 1
            self._lastTag = tag
            frame = frame[:10] + (tag << TAG_SHIFT).to_bytes(2, "big") + frame[HEADER_SIZE:]
        self._pending.append((d, tag))
        self.transport.write(frame)
        return d

    def _cancel(self, d: Deferred[tuple[Header, bytes]]) -> None:
        for i, (waiting, _) in enumerate(self._pending):
            if waiting is d:
                del self._pending[i]
                break
        self._abort()

    def frameReceived(self, header: Header, data: bytes) -> None:
        if not self._pending:
            self._fail(ProtocolError("answer received with no request pending"))
            return
        if header.flags & FLAG_REQUEST:
            self._fail(ProtocolError("peer sent a request (T=1) instead of an answer"))
            return
        d, tag = self._pending[0]
        # An L answer with tag 0 means the tags do not get through: no mismatch.
        if tag and header.ext & EXT_FRAMED and header.tag and header.tag != tag:
            self._fail(OutOfStepError(f"answer tagged {header.tag} for the request tagged {tag}"))
            return
        self._pending.popleft()
        d.callback((header, data))

    def invalidFrame(self, reason: str, first: bytes) -> None:
        self._fail(ProtocolError(f"peer sent an {reason}"))

    def endOfInput(self) -> None:
        """The peer will send nothing more: what still waits fails."""
        self._discardInput()
        self.transport.loseConnection()

    def idle(self) -> None:
        self._abort()

    def _fail(self, error: Exception) -> None:
        self._discardInput()  # before the requests fail: they may be sent again
        self._failAll(error)
        self._abort()

    def _abort(self) -> None:
        self._discardInput()
        self.transport.abortConnection()

    def _failAll(self, error: BaseException | None) -> None:
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            d.errback(error)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self._failAll(reason.value)


class ServiceProtocol(BatchedWrites, FrameReceiver):
    """The answering side of a connection to one of our services: counted
    by its `ServiceFactory` while it is open, its answers to one read joined
    into one write (`endpoint.BatchedWrites`)."""

    factory: ServiceFactory

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class ServiceFactory(protocol.Factory[ServiceProtocol]):
    """What the server's and the proxy's factories share: the clock, the
    message size limit, the idle timeout and the connection limit, handed to
    every protocol they build."""

    protocol: type[ServiceProtocol]

    #: No "Starting factory <...>" lines: the services log one line saying
    #: what they listen on (tap.py).
    noisy = False

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_connections: int | None = 10_000,
    ) -> None:
        self.clock = _reactor() if clock is None else clock
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connectionLimit = max_connections
        #: Open connections, kept by the protocols.
        self.connections: set[ServiceProtocol] = set()

    @property
    def connectionCount(self) -> int:
        """How many connections are open."""
        return len(self.connections)

    def drain(self) -> None:
        """Read no more on any connection: each answers what it has read, as
        after an end-of-file from its client, then closes (a graceful stop)."""
        for p in list(self.connections):
            p.transport.pauseProducing()
            p.readConnectionLost()

    def buildProtocol(self, addr: IAddress | None) -> ServiceProtocol | None:
        """A protocol for a new connection, or None (the connection is closed
        at once) when `connectionLimit` connections are already open."""
        if self.connectionLimit is not None and self.connectionCount >= self.connectionLimit:
            return None
        p = self.protocol()
        p.factory = self
        p.maxMessageSize = self.max_message_size
        p.idleTimeout = self.idle_timeout
        p.clock = self.clock
        return p
