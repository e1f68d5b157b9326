"""The answering side: `ServiceProtocol` and `ServiceFactory`, what the
server's and the proxy's protocols and factories share."""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.python.failure import Failure

from .endpoint import BatchedWrites
from .framing import FrameReceiver, default_reactor
from .wire import MAX_MESSAGE_SIZE


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
        self.clock = default_reactor() if clock is None else clock
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connectionLimit = max_connections
        #: Open connections, kept by the protocols.
        self.connections: set[ServiceProtocol] = set()
        #: True once `drain` was called: the service is stopping (``/healthz`` says 503).
        self.draining = False

    @property
    def connectionCount(self) -> int:
        """How many connections are open."""
        return len(self.connections)

    def drain(self) -> None:
        """Read no more on any connection: each answers what it has read, as
        after an end-of-file from its client, then closes (a graceful stop)."""
        self.draining = True
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
