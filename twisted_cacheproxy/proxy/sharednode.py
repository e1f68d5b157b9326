"""One memcached node of the shared tier: its connection, kept up by a
`ClientService` with exponential backoff, whether it is up, and the
namespace generation read from it.

A node counts as up from the moment it answered a ``version`` on a new
connection until that connection is lost or times out; each change between
up and down is logged once. The generation is a number kept on each node
under ``<prefix>gen``: bumping it hides every entry of the site at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger, LogPublisher
from twisted.protocols.memcache import MemCacheProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..transport.addresses import address

log = Logger()

#: Most commands one node may have unanswered; past it, lookups on that
#: node are misses at once (a stalled memcached must not pile up work).
MAX_OUTSTANDING = 256
#: Waits between connection attempts: 0.2 s, doubling up to 5 s, each
#: spread by up to 0.1 s so that proxies restarted together do not retry together.
RETRY = backoffPolicy(0.1, maxDelay=5.0, factor=2.0, jitter=lambda: random.random() / 10)


class _NodeProtocol(MemCacheProtocol):
    """Twisted's memcache client, telling its node when it connects and goes."""

    factory: _NodeFactory
    #: A TCP transport in practice (``ITCPTransport``), typed loosely as in `FrameReceiver`.
    transport: Any

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.node._connected(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)  # MemCacheProtocol leaves its command timer running
        self.factory.node._lost(self, reason)

    def timeoutConnection(self) -> None:
        """No answer in time: abort. Twisted's clean close would first wait
        for the bytes still queued to leave, which they never do when the
        node is cut off, and the node would stay up meanwhile."""
        super().timeoutConnection()
        self.transport.abortConnection()


class _NodeFactory(protocol.Factory[_NodeProtocol]):
    """Makes the node's connections, timed by its clock."""

    noisy = False

    def __init__(self, node: Node) -> None:
        self.node = node

    def buildProtocol(self, addr: IAddress | None) -> _NodeProtocol:
        p = _NodeProtocol(timeOut=self.node.command_timeout)
        p.factory = self
        p.callLater = self.node.clock.callLater  # type: ignore[assignment]
        return p


@implementer(IStreamClientEndpoint)
class _Watched:
    """An endpoint that tells its node when a connection attempt fails
    (`ClientService` only retries)."""

    def __init__(self, endpoint: IStreamClientEndpoint, node: Node) -> None:
        self.endpoint = endpoint
        self.node = node

    def connect(self, factory: IProtocolFactory) -> defer.Deferred:
        return self.endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, reason: Failure) -> Failure:
        self.node._down(reason)
        return reason


class _QuietClientService(ClientService):
    """A `ClientService` that does not log each retry: the node logs the
    changes between up and down, once each."""

    _log = Logger(observer=LogPublisher())  # a publisher with no observers


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """The TCP endpoint of ``host`` (an IPv4 or IPv6 address, or a name) and ``port``."""
    kind = TCP6ClientEndpoint if isIPv6Address(host) else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)


class Node:
    """One memcached server: its connection when it answers, its generation."""

    def __init__(
        self,
        host: str,
        port: int,
        clock: IReactorTime,
        genkey: bytes,
        *,
        command_timeout: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.clock = clock
        self.genkey = genkey
        self.command_timeout = command_timeout
        self.name = f"memcached {address(host, port)}"
        #: The connection, only while the node answers.
        self.protocol: MemCacheProtocol | None = None
        #: The namespace generation last read from the node (None: unknown,
        #: as while it is down).
        self.generation: bytes | None = None
        #: The last generation known, kept while the node is down: a purge
        #: made meanwhile by another proxy is noticed once it is back.
        self.known: bytes | None = None
        #: Called when the generation read moves on from the known one: the
        #: node was purged by another proxy (or by hand).
        self.purged: Callable[[], None] = lambda: None
        #: A purge asked for while the node was down, made once it is back.
        self.purge_pending = False
        #: Commands sent and not answered yet.
        self.outstanding = 0
        self.state = "starting"
        self.factory = _NodeFactory(self)
        #: Keeps the connection up while the node is started.
        self.service: ClientService | None = None

    def start(self, reactor: Any) -> None:
        """Start connecting through ``reactor`` (and reconnecting, with
        backoff, whenever the connection goes)."""
        self.state = "starting"
        endpoint = tcp_endpoint(reactor, self.host, self.port, max(1.0, self.command_timeout))
        self.service = _QuietClientService(
            _Watched(endpoint, self), self.factory, retryPolicy=RETRY, clock=self.clock
        )
        self.service.startService()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self.state = "stopped"  # nothing to log from here on
        service, self.service = self.service, None
        if service is None:
            return defer.succeed(None)
        return service.stopService()

    # --- connection state ---

    def _connected(self, proto: _NodeProtocol) -> None:
        self.send(proto.version()).addCallbacks(lambda _: self._up(proto), lambda _: None)

    def _up(self, proto: _NodeProtocol) -> None:
        if proto._disconnected or self.state == "stopped":
            return
        self.protocol = proto
        if self.state != "up":
            self.state = "up"
            log.info("{node} connected: shared cache tier on", node=self.name)
        if self.purge_pending:
            self.purge_pending = False
            self.bump(proto)
        else:
            self.refresh_generation()

    def _lost(self, proto: _NodeProtocol, reason: Failure) -> None:
        if self.protocol is proto or self.protocol is None:
            self._down(reason)

    def _down(self, reason: Failure) -> None:
        self.protocol = None
        self.generation = None
        if self.state in ("down", "stopped"):
            return
        was, self.state = self.state, "down"
        why = reason.getErrorMessage()
        if was == "up":
            log.warn(
                "{node} lost ({why}): its keys go to the server until it is back; "
                "reconnecting with backoff",
                node=self.name,
                why=why,
            )
        else:
            log.warn(
                "{node} unreachable ({why}): its keys go to the server until it "
                "answers; retrying with backoff",
                node=self.name,
                why=why,
            )

    # --- commands ---

    def send(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d``, a command just sent, until it is answered."""
        self.outstanding += 1

        def answered(result: object) -> object:
            self.outstanding -= 1
            return result

        return d.addBoth(answered)

    def available(self) -> MemCacheProtocol | None:
        """The connection, when the node is up and not overloaded."""
        if self.generation is None or self.outstanding >= MAX_OUTSTANDING:
            return None
        return self.protocol

    def refresh_generation(self) -> None:
        """Read the namespace generation, creating it when the node has none
        (a fresh or restarted memcached): wall-clock seconds, so a recreated
        generation never brings back entries of an older one."""
        proto = self.protocol
        if proto is None:
            return

        def got(result: tuple[int, bytes | None]) -> defer.Deferred | None:
            value = result[1]
            if value is not None:
                self.set_generation(value)
                return None
            created = str(int(self.clock.seconds())).encode()
            return self.send(proto.add(self.genkey, created)).addCallback(lambda _: again())

        def again() -> defer.Deferred | None:
            if self.protocol is not proto:
                return None
            return self.send(proto.get(self.genkey)).addCallback(
                lambda result: self.set_generation(result[1])
            )

        self.send(proto.get(self.genkey)).addCallback(got).addErrback(lambda _: None)

    def set_generation(self, value: bytes | None, *, ours: bool = False) -> None:
        """Take ``value`` as the node's generation if it is a number; a
        change from the known generation that is not ``ours`` is a purge."""
        self.generation = value.strip() if value and value.strip().isdigit() else None
        if self.generation is None:
            return
        was, self.known = self.known, self.generation
        if was is not None and self.generation != was and not ours:
            self.purged()

    def bump(self, proto: MemCacheProtocol) -> defer.Deferred:
        """Purge the node: a new generation hides every entry. Fires with 1
        once done, 0 if the command failed."""

        def bumped(value: int | bool) -> int:
            if value is False:
                # No generation there: nothing under it can be read, and the
                # one created now (wall-clock seconds) is newer than any.
                self.refresh_generation()
            else:
                # Our own purge: the caller has emptied the memory cache.
                self.set_generation(str(value).encode(), ours=True)
            return 1

        return self.send(proto.increment(self.genkey)).addCallbacks(bumped, lambda _: 0)
