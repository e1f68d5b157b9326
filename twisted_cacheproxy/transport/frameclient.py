"""The requesting side of a connection: `FrameClient`, one Deferred per
request in the manner of ``twisted.protocols.memcache``, with tag checks."""

from __future__ import annotations

import random
from collections import deque

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .framing import FrameReceiver
from .wire import EXT_FRAMED, FLAG_REQUEST, HEADER_SIZE, LENGTH_LIMIT, MAX_TAG, TAG_SHIFT, Header


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

    def __init__(self) -> None:
        #: (Deferred, tag) of each request awaiting its answer, in order.
        self._pending: deque[tuple[Deferred[tuple[Header, bytes]], int]] = deque()
        #: Tags start anywhere, so that an answer a peer sends unasked (as a
        #: connection opens, say) matches a request only by a 1-in-8191 chance.
        self._lastTag = random.randrange(MAX_TAG)

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
        self.closeAfterSending()

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
