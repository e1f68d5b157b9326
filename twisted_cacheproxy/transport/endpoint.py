"""The TCP endpoint the services listen on: Twisted's TCP port, except that
an accepted connection sends a write at once when nothing is queued before it.

Twisted's transports queue every write until the reactor's next turn, so each
answer costs a turn, two ``epoll_ctl`` calls and a ``send`` (twisted/twisted
issue 5303); asyncio's transports send at once and queue only what the socket
refuses. For a protocol whose answers are one small write each, sending at
once removes about half the system calls of an answer. A protocol that sends
several messages while it handles one read must then join them itself, or
each would cost a system call of its own: `BatchedWrites` does that, and the
two belong together.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, tcp, unix
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorSSL,
    IReactorTCP,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .numerals import integer


class BatchedWrites:
    """Mixed into a framing protocol (before `framing.FrameReceiver`): the
    messages it sends while it handles the frames of one read (or one
    fairness turn) leave together, in one write per `batchLimit` bytes, so
    that a full transport can still pause it between them."""

    transport: Any
    #: Messages sent while frames are being handled, not written yet.
    _outgoing: list[bytes] | None = None
    _outgoingSize = 0
    batchLimit = 1 << 16

    def sendMessage(self, message: bytes) -> None:
        """Send one whole message: at once, or with the others of this read."""
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
        super().closeAfterSending()  # type: ignore[misc]

    def handleBuffered(self) -> None:
        outgoing: list[bytes] = []
        self._outgoing = outgoing
        try:
            super().handleBuffered()  # type: ignore[misc]
        finally:
            self._outgoing = None
            if outgoing:
                self._outgoingSize = 0
                self.transport.write(b"".join(outgoing))

    def _flush(self) -> None:
        if self._outgoing:
            self.transport.write(b"".join(self._outgoing))
            self._outgoing.clear()
            self._outgoingSize = 0


class SendAtOnceServer(tcp.Server):
    """An accepted TCP connection whose writes go to the socket at once when
    nothing is queued (what the socket refuses is queued as usual), and which
    likewise closes at once when asked to close with nothing queued. It reads
    `tcp.Connection`'s own state to know that; tests/test_endpoint.py would
    notice if a Twisted release changed it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Answers are whole messages: never hold one back for Nagle.
        self.setTcpNoDelay(True)
        # Twisted's class-level defaults of what each write and read looks
        # at, set on the connection itself: found quicker there.
        self.TLS = self.disconnecting = self._aborting = self._writeDisconnected = False
        self.dataBuffer, self.offset, self.bufferSize = b"", 0, self.bufferSize

    def _nothingQueued(self) -> bool:
        """Nothing waits to be written, so a write or a close may go at once
        (never after ``startTLS``: TLS writes and closes through its own layer)."""
        return bool(
            not self.TLS
            and self.connected
            and not self.disconnecting
            and not self._aborting
            and not self._writeDisconnected
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
        )

    def write(self, data: bytes) -> None:
        if data and self._nothingQueued():
            # Straight to the socket: ``writeSomeData`` would add a memoryview
            # and ``untilConcludes``, a retry on EINTR that Python makes itself.
            try:
                sent = self.socket.send(data)
            except OSError:
                # Would block, or the connection is lost: the queued write
                # tries again once the socket is writable, and finds out.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def loseConnection(self) -> None:
        """Close now when everything written has gone and no paused producer
        holds the close back: Twisted would wait for the socket to be writable
        (an ``epoll_ctl`` and a reactor turn) to find nothing to write. As its
        own close of a half-closed connection does, the protocol hears of it
        before this returns."""
        producer = self.producer
        if self._nothingQueued() and (
            producer is None or (self.streamingProducer and not self.producerPaused)
        ):
            self.disconnecting = True
            self.stopReading()
            self.stopWriting()
            self.connectionLost(Failure(CONNECTION_DONE))
            return
        super().loseConnection()


class _Port(tcp.Port):
    """Twisted's TCP port with `SendAtOnceServer` connections."""

    transport = SendAtOnceServer

    def startListening(self) -> None:
        """``tcp.Port.startListening`` without its ``<factory> starting on
        <port>`` log line: the services log one line of their own that says
        what they listen on and with which limits (`application.startup`)."""
        tcp._reservedFD.reserve()
        skt = None
        try:
            skt = self.createInternetSocket()
            if self.addressFamily == socket.AF_INET6:
                addr = tcp._resolveIPv6(self.interface, self.port)
            else:
                addr = (self.interface, self.port)
            skt.bind(addr)
        except OSError as le:
            if skt is not None:
                skt.close()
            raise CannotListenError(self.interface, self.port, le) from None
        skt.listen(self.backlog)
        self._realPortNumber = skt.getsockname()[1]
        self.factory.doStart()  # type: ignore[union-attr]
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()


class _Adopted(tcp.Port):
    """A listening socket handed in by a parent process (`adopted`): accepted
    from, never bound, and never shut down on stopping (other workers still
    use it). It accepts one connection each time the socket is readable, as
    nginx does with ``multi_accept off``: every worker is woken, and the one
    that is free takes the connection, instead of the first one awake taking a
    whole burst (Twisted's port accepts up to ``numberAccepts`` at once)."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted raises its accept batch after a full one; ours stays 1."""

    def startListening(self) -> None:
        """Accept from the socket as it is (its backlog is the parent's),
        without Twisted's ``starting on`` line."""
        tcp._reservedFD.reserve()
        skt = self._preexistingSocket
        if skt is None:
            raise CannotListenError(self.interface, self.port, OSError("no socket"))
        self._preexistingSocket = None
        self._shouldShutdown = False
        if skt.family != socket.AF_UNIX:
            self._realPortNumber = skt.getsockname()[1]
        factory: Any = self.factory
        factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.startReading()


class AdoptedPort(_Adopted, _Port):
    """An adopted TCP socket, with `SendAtOnceServer` connections."""


class AdoptedUNIXPort(_Adopted, unix.Port):
    """An adopted UNIX socket (Twisted's connections: no TCP to tune)."""

    def connectionLost(self, reason: Failure) -> None:
        """Close it, but leave its path: the parent that bound it removes it."""
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens on a listening socket that a parent process bound and handed
    in (TCP over IPv4 or IPv6, with `SendAtOnceServer` connections, or UNIX):
    `_Adopted` says how it shares it."""

    def __init__(self, reactor: Any, skt: socket.socket) -> None:
        self.reactor = reactor
        self.socket = skt

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        skt = self.socket
        skt.setblocking(False)
        port: tcp.Port
        if skt.family == socket.AF_UNIX:
            port = AdoptedUNIXPort(skt.getsockname(), factory, reactor=self.reactor)
        else:
            port = AdoptedPort(0, factory, 0, skt.getsockname()[0], self.reactor)
        port._preexistingSocket = skt
        port.startListening()
        return port


@implementer(IReactorSSL)
class _TLSOnAdopted:
    """What Twisted's ``ssl:`` endpoint listens through in a worker: its
    ``listenSSL`` does what the reactor's does (the factory wrapped in TLS,
    each connection its own TLS session) on the adopted socket instead of a
    port of its own, so the description's key, certificate and TLS options
    are Twisted's, read by the worker itself."""

    def __init__(self, reactor: Any, skt: socket.socket) -> None:
        self.reactor = reactor
        self.socket = skt

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        """Accept from the adopted socket, over TLS (the port, backlog and
        interface are the parent's, which bound it)."""
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        return AdoptedEndpoint(self.reactor, self.socket)._listen(tls)

    def connectSSL(self, *args: Any, **kwargs: Any) -> Any:
        """Never used: a listening endpoint connects nowhere."""
        raise NotImplementedError("a worker's TLS listener connects nowhere")


@implementer(IStreamServerEndpoint)
class TCPServerEndpoint:
    """Listens like ``TCP4ServerEndpoint``, with `SendAtOnceServer` connections."""

    def __init__(
        self, reactor: IReactorTCP, port: int, interface: str = "", backlog: int = 511
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        port = _Port(self.port, factory, self.backlog, self.interface, self.reactor)
        port.startListening()
        return port


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SendAtOnceParser:
    """The ``sendatonce:`` endpoint string, for `serverFromString` and every
    Twisted program that takes endpoint strings (``twistd web --listen``...):
    ``sendatonce:PORT[:interface=ADDRESS][:backlog=N]``, a `TCPServerEndpoint`;
    ``sendatonce6:`` is the same on ``::`` unless told otherwise (as ``tcp6:``)."""

    def __init__(self, prefix: str = "sendatonce", interface: str = "") -> None:
        self.prefix = prefix
        self.interface = interface

    def parseStreamServer(  # type: ignore[override]
        self, reactor: IReactorTCP, port: str, interface: str | None = None, backlog: str = "511"
    ) -> TCPServerEndpoint:
        """The endpoint for the string's arguments (the interface's name and
        the backlog are keyword arguments, as with ``tcp:``)."""
        where = self.interface if interface is None else interface
        return TCPServerEndpoint(reactor, integer(port), where, integer(backlog))


def description(port: int, interface: str = "", backlog: int = 511) -> str:
    """The endpoint string of a `TCPServerEndpoint` (interface quoted: an IPv6
    address has colons)."""
    return f"sendatonce:{port}:interface={quoteStringArgument(interface)}:backlog={backlog}"


#: Twisted's TCP endpoint strings, and ours that take the same arguments.
SEND_AT_ONCE = {"tcp": "sendatonce", "tcp6": "sendatonce6"}


def kind(text: str) -> str:
    """The type of an endpoint string: what comes before its first colon."""
    return text.partition(":")[0]


def server_endpoint(reactor: Any, text: str) -> IStreamServerEndpoint:
    """Twisted's `serverFromString`, except that ``tcp:`` and ``tcp6:`` get
    the send-at-once endpoint with the same arguments (``sendatonce:``,
    ``sendatonce6:``). Every other kind (``unix:``, ``ssl:``, ``systemd:``...)
    is Twisted's own: its connections write through Twisted's queue, and TLS
    through its own layer. ValueError, TypeError, KeyError or IndexError when
    Twisted cannot read the string."""
    prefix, colon, rest = text.partition(":")
    if prefix in SEND_AT_ONCE and colon:
        text = f"{SEND_AT_ONCE[prefix]}:{rest}"
    return serverFromString(reactor, text)


def adopted_endpoint(reactor: Any, text: str, skt: socket.socket) -> IStreamServerEndpoint:
    """The endpoint of a listening socket handed in by the parent that
    listened on the description ``text``: an `AdoptedEndpoint`, over TLS for
    an ``ssl:`` description (its files are read now: the errors are those of
    `server_endpoint`)."""
    if kind(text) == "ssl":
        return serverFromString(_TLSOnAdopted(reactor, skt), text)
    return AdoptedEndpoint(reactor, skt)
