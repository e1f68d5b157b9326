"""The calculator wire format: the 12-byte header and a framing Protocol.

Every message is ``!LHHHH`` (time stamp, total length, flags, cache control,
extension word) followed by its data; the total length is the only framing.
The course programs pack the extension word as padding and never read it; we
carry hop capabilities, cache marks and a request tag there (PROTOCOL.md 6).
"""

from __future__ import annotations

import struct
from collections import deque
from time import monotonic
from typing import NamedTuple

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.protocols.policies import LimitTotalConnectionsFactory, TimeoutMixin

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


def decode_header(buf: bytes, offset: int = 0) -> Header:
    """Read the header that starts at ``offset`` of ``buf``."""
    return Header._make(HEADER.unpack_from(buf, offset))


class FrameReceiver(protocol.Protocol, TimeoutMixin):
    """Reassembles messages by their total length, in the spirit of
    ``IntNStringReceiver``, and calls `frameReceived` once per message.

    It also carries what every endpoint of ours needs: an idle timeout that
    only a complete message resets, and backpressure (stop reading while our
    own unsent output is above the transport's high-water mark).
    """

    maxMessageSize = MAX_MESSAGE_SIZE
    idleTimeout: float | None = None
    _buffer = b""
    _paused = False
    _held = False
    _broken = False
    _nextTurn = None
    #: Seconds one connection may spend on frames it has buffered before the
    #: reactor serves others: a pipelined batch of heavy requests must not
    #: stall every other client.
    turnBudget = 0.005
    #: Bytes already received after the message being handled.
    bufferedAfter = 0
    #: Messages sent while frames are being handled, to leave in one write
    #: (or more: one per `batchLimit` bytes, so a full transport can pause us).
    _outgoing: list[bytes] | None = None
    _outgoingSize = 0
    batchLimit = 1 << 16

    def connectionMade(self) -> None:
        self.setTimeout(self.idleTimeout)
        # We produce responses; the transport tells us when its buffer is full.
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if self._nextTurn is None:
            self._process()

    def sendMessage(self, message: bytes) -> None:
        """Send one whole message. Those sent while received frames are being
        handled leave together once they are handled (in one write per
        `batchLimit` bytes)."""
        outgoing = self._outgoing
        if outgoing is None:
            self.transport.write(message)
            return
        outgoing.append(message)
        self._outgoingSize += len(message)
        if self._outgoingSize >= self.batchLimit:
            self._flush()

    def closeAfterSending(self) -> None:
        """Close the connection once every message sent so far has left."""
        self._flush()
        self.transport.loseConnection()

    def _flush(self) -> None:
        if self._outgoing:
            self.transport.write(b"".join(self._outgoing))
            self._outgoing.clear()
            self._outgoingSize = 0

    def _process(self) -> None:
        self._outgoing = []
        try:
            self._handleFrames()
        finally:
            self._flush()
            self._outgoing = None

    def _handleFrames(self) -> None:
        buf = self._buffer
        offset = 0
        end = len(buf)
        started = monotonic()
        while not (self._paused or self._held) and end - offset >= HEADER_SIZE:
            if offset and monotonic() - started >= self.turnBudget:
                # Other connections get their turn before the rest of ours.
                self._nextTurn = self.callLater(0, self._resumeTurn)
                break
            header = Header._make(HEADER.unpack_from(buf, offset))
            length = header.length
            if length < HEADER_SIZE or length > self.maxMessageSize:
                self._buffer = b""
                self._broken = True
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
            self.resetTimeout()
            self.frameReceived(header, data)
            if self.transport is None or self.transport.disconnecting:
                self._buffer = b""
                return
        self._buffer = buf[offset:] if offset else buf

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

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.connected = False
        self.setTimeout(None)
        self._buffer = b""
        if self._nextTurn is not None:
            self._nextTurn.cancel()
            self._nextTurn = None

    # IPushProducer: the transport pauses us when its send buffer is full.
    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._readAgain()

    def holdInput(self) -> None:
        """Stop reading until `releaseInput`: enough work is already in hand."""
        self._held = True
        self.transport.pauseProducing()

    def releaseInput(self) -> None:
        self._held = False
        self._readAgain()

    def _readAgain(self) -> None:
        """Read and handle frames again, unless output backpressure or a hold
        still stops it."""
        if self._paused or self._held:
            return
        self.transport.resumeProducing()
        if not self._broken and self._nextTurn is None:
            self._process()

    def stopProducing(self) -> None:
        self._paused = True


class ProtocolError(Exception):
    """The peer sent something that is not a valid answer to our request."""


class FrameClient(FrameReceiver):
    """The requesting side: one Deferred per request, fired in order with
    ``(header, data)`` of its answer, like ``memcache.MemCacheProtocol``.

    Pending requests fail when the connection is lost or the peer breaks the
    protocol; cancelling a pending request closes the connection, since an
    answer already asked for cannot be skipped on a shared stream.
    """

    _aborted = False

    def __init__(self) -> None:
        self._pending: deque[Deferred] = deque()

    @property
    def pending(self) -> int:
        """How many requests still wait for their answer."""
        return len(self._pending)

    @property
    def usable(self) -> bool:
        """Whether a request sent now could be answered: connected, and not
        closing (a closing connection may not know it yet)."""
        return self.connected and not self._aborted and not self.transport.disconnecting

    def sendRequest(self, frame: bytes) -> Deferred:
        """Send one whole request message; the Deferred fires with its answer."""
        d = Deferred(self._cancel)
        self._pending.append(d)
        self.transport.write(frame)
        return d

    def _cancel(self, d: Deferred) -> None:
        if d in self._pending:
            self._pending.remove(d)
        self._abort()

    def frameReceived(self, header: Header, data: bytes) -> None:
        if not self._pending:
            self._fail(ProtocolError("answer received with no request pending"))
            return
        if header.flags & FLAG_REQUEST:
            self._fail(ProtocolError("peer sent a request (T=1) instead of an answer"))
            return
        self._pending.popleft().callback((header, data))

    def invalidFrame(self, reason: str, first: bytes) -> None:
        self._fail(ProtocolError(f"peer sent an {reason}"))

    def _fail(self, error: Exception) -> None:
        self._aborted = True  # before the requests fail: they may be sent again
        self._failAll(error)
        self._abort()

    def _abort(self) -> None:
        self._aborted = True
        self.transport.abortConnection()

    def _failAll(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for d in pending:
            d.errback(error)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self._failAll(reason.value)


class ServiceFactory(LimitTotalConnectionsFactory):
    """What the server's and the proxy's factories share: the clock, the
    message size limit, the idle timeout and the connection limit (counted by
    `twisted.protocols.policies`), handed to every protocol they build."""

    #: No "Starting factory <...>" lines: the services log one line saying
    #: what they listen on (tap.py).
    noisy = False

    def __init__(
        self,
        *,
        clock=None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_connections: int | None = 10_000,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connectionLimit = max_connections

    def buildProtocol(self, addr):
        wrapper = super().buildProtocol(addr)
        if wrapper is not None:
            p = wrapper.wrappedProtocol
            p.maxMessageSize = self.max_message_size
            p.idleTimeout = self.idle_timeout
            p.callLater = self.clock.callLater
        return wrapper
