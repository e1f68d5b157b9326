"""The answering side: `ServiceProtocol` and `ServiceFactory`, what the
server's and the proxy's protocols and factories share."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IHalfCloseableDescriptor, IReactorTime
from twisted.python.failure import Failure

from .addresses import address
from .endpoint import BatchedWrites
from .framing import FrameReceiver, default_reactor
from .wire import MAX_MESSAGE_SIZE


class ServiceProtocol(BatchedWrites, FrameReceiver):
    """The answering side of a connection to one of our services: counted
    by its `ServiceFactory` while it is open, its answers to one read joined
    into one write (`endpoint.BatchedWrites`)."""

    factory: ServiceFactory
    #: Draining: the close that follows the last answer is a half-close.
    _draining = False
    #: Our end-of-file is sent: whatever comes now is read and dropped.
    _halfClosed = False

    def connectionMade(self) -> None:
        self._peer: str | None = None
        self.factory.connections.add(self)
        super().connectionMade()

    @property
    def peer(self) -> str:
        """The client's ``host:port`` (``-`` when its address has none, as a
        UNIX socket's), as the logs show it: worked out once, not for every
        request (each ``getPeer`` makes an address object). Kept as a plain
        attribute (``cached_property`` would make every other attribute of
        the protocol slower to read, by writing to its ``__dict__``)."""
        if self._peer is None:
            try:
                found = self.transport.getPeer()
                self._peer = address(found.host, found.port)
            except AttributeError:
                self._peer = "-"
        return self._peer

    def drain(self) -> None:
        """Read no more requests: answer those already read, as after an
        end-of-file from the client, then close."""
        self._draining = True
        self.transport.pauseProducing()
        self.readConnectionLost()

    def closeAfterSending(self) -> None:
        """Close; while draining, over TCP or a UNIX socket, send an
        end-of-file after the answers instead and close once the client
        does: a request it sent meanwhile then meets an end-of-file (never
        a reset, which the kernel sends when unread bytes meet a close), and
        the client knows to send it again elsewhere."""
        if not (self._draining and IHalfCloseableDescriptor.providedBy(self.transport)):
            super().closeAfterSending()
            return
        if self._halfClosed:
            return
        self._halfClosed = True
        self._flush()
        transport: Any = self.transport
        transport.loseWriteConnection()
        transport.resumeProducing()

    def readConnectionLost(self) -> None:
        if self._halfClosed:
            self.transport.loseConnection()
        else:
            super().readConnectionLost()

    def writeConnectionLost(self) -> None:
        if not self._halfClosed:  # our own half-close: wait for the client's
            super().writeConnectionLost()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.forget(self)
        super().connectionLost(reason)


class ServiceFactory(protocol.Factory[ServiceProtocol]):
    """What the server's and the proxy's factories share: the clock, the
    message size limit, the idle timeout and the connection limit, handed to
    every protocol they build."""

    protocol: type[ServiceProtocol]

    #: No "Starting factory <...>" lines: the services log one line saying
    #: what they listen on (`application.startup`).
    noisy = False

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_connections: int | None = 10_000,
    ) -> None:
        self.clock = default_reactor() if clock is None else clock
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connectionLimit = max_connections
        #: Open connections, kept by the protocols.
        self.connections: set[ServiceProtocol] = set()
        #: True once `drain` was called: the service is stopping (``/healthz`` says 503).
        self.draining = False
        #: Fired by the last connection to close once draining (`drain`).
        self._emptied: defer.Deferred[None] | None = None

    @property
    def connectionCount(self) -> int:
        """How many connections are open."""
        return len(self.connections)

    def drain(self) -> defer.Deferred[None]:
        """Read no more requests on any connection: each answers what it has
        read, then closes (`ServiceProtocol.drain`: a graceful stop). Fires
        once no connection is left; cancelling it stops waiting."""

        def stopWaiting(_: defer.Deferred[None]) -> None:
            self._emptied = None

        self.draining = True
        emptied: defer.Deferred[None] = defer.Deferred(stopWaiting)
        self._emptied = emptied
        for p in list(self.connections):
            p.drain()
        self._fireIfEmpty()
        return emptied

    def forget(self, p: ServiceProtocol) -> None:
        """``p``'s connection is closed: no longer counted or waited for."""
        self.connections.discard(p)
        self._fireIfEmpty()

    def _fireIfEmpty(self) -> None:
        emptied = self._emptied
        if emptied is not None and not self.connections:
            self._emptied = None
            emptied.callback(None)

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
