"""Start-up, as an operator meets it: what cannot work stops twistd with one
line on the terminal (exit status 1), and a service that listens says so
once, with its settings.

twistd makes the services before it daemonizes, writes a pid file or starts
logging, so a check made while making them reaches the user's terminal; left
to the listening itself, the same error is a traceback in the log.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..operations.units import plural, seconds
from ..transport.addresses import address, in_words
from ..transport.endpoint import kind
from ..transport.service import ServiceFactory
from .secretfile import read_secret_file


class StartupError(SystemExit, Exception):
    """A service that cannot start, in one line, once twistd has daemonized.

    A SystemExit, so that ``twistd -n`` ends with just the line; an Exception
    too, so that a daemonizing twistd reports it to the parent process that
    waits for the start (one that is only a SystemExit never reaches it, and
    that parent waits for ever)."""


def _reason(e: object) -> str:
    """An OS error in lower-case words: "address already in use" (a
    `CannotListenError` by the socket error inside it)."""
    if isinstance(e, CannotListenError) and e.socketError is not None:
        e = e.socketError
    text = getattr(e, "strerror", None) or str(e)
    return text[:1].lower() + text[1:]


def cannot_listen(name: str, interface: str, port: int, e: OSError, role: str = "") -> str:
    """The one line a service that cannot listen ends with (``role``: what
    listens there besides the service itself, such as "admin site")."""
    return cannot_listen_at(name, address(interface, port), e, role)


def cannot_listen_at(name: str, where: str, e: object, role: str = "") -> str:
    """`cannot_listen` for an address in words (an endpoint description)."""
    where += f" ({role})" if role else ""
    return f"{name}: cannot listen on {where}: {_reason(e)}"


def bound_socket(interface: str, port: int) -> socket.socket:
    """A TCP socket bound to ``interface`` and ``port`` as Twisted's port
    binds one (a connection in TIME_WAIT does not block it); OSError if the
    port is in use or the address is not this host's."""
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_STREAM)
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        skt.bind((interface, port))
    except OSError:
        skt.close()
        raise
    return skt


def check_bindable(name: str, interface: str, port: int, role: str = "") -> None:
    """Stop twistd with one line if ``interface`` and ``port`` cannot be bound."""
    try:
        bound_socket(interface, port).close()
    except OSError as e:
        raise SystemExit(cannot_listen(name, interface, port, e, role)) from None


def check_access_log(name: str, path: str) -> None:
    """Stop twistd with one line if ``--access-log`` cannot be opened."""
    if path == "-":
        return
    try:
        open(path, "ab").close()
    except OSError as e:
        raise SystemExit(f"{name}: cannot open --access-log {path}: {e.strerror}") from None


#: The least a secret read from a file may hold, in bytes.
MIN_SECRET = 16


def read_secret(name: str, option: str, path: str) -> bytes:
    """The secret in the file at ``path`` (given with ``option``); stops
    twistd with one line when `secretfile.read_secret_file` refuses it or it
    holds fewer than `MIN_SECRET` bytes."""
    try:
        return read_secret_file(path, MIN_SECRET)
    except ValueError as e:
        raise SystemExit(f"{name}: {option}: {e}") from None


class ListeningService(service.Service):
    """Listens on each of its endpoints when twistd starts it (one that
    cannot listen stops twistd with one line) and logs, for each, one line
    saying where and with which settings.

    Stopping it drains, the way twistd waits for a service: it accepts no
    more connections, each connection answers what it has read and closes
    (`ServiceFactory.drain`), and the Deferred `stopService` returns fires
    once every connection is closed, or after ``grace`` seconds, when those
    left are closed unanswered. The factory stays started until then (the
    proxy's misses still reach the server)."""

    def __init__(
        self,
        listeners: Sequence[tuple[IStreamServerEndpoint, str]],
        factory: ServiceFactory,
        name: str,
        settings: str,
        *,
        grace: float = 15.0,
        clock: IReactorTime | None = None,
        announce: bool = True,
    ) -> None:
        #: Each endpoint, with where it listens in words (for a message).
        self.listeners = list(listeners)
        #: Whether to log the start-up line (a worker's parent logs it instead).
        self.announce = announce
        self.factory = factory
        self.tapname = name
        self.settings = settings
        self.grace = grace
        self.clock = clock or factory.clock
        self.log = Logger(namespace=name)
        self.ports: list[IListeningPort] = []
        self._drained: defer.Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for endpoint, where in self.listeners:
            outcome: list[IListeningPort | Failure] = []
            endpoint.listen(self.factory).addBoth(outcome.append)
            # Every endpoint of ours listens at once; a failure must stop twistd now.
            (result,) = outcome
            if isinstance(result, Failure):
                raise StartupError(cannot_listen_at(self.tapname, where, result.value))
            self.ports.append(result)
            if self.announce:
                self.log.info(
                    "listening on {address}, {settings}",
                    address=listening_at(result, where),
                    settings=self.settings,
                )

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._drained is not None or not self.ports:
            return None
        factory, ports, self.ports = self.factory, self.ports, []
        factory.numPorts += 1  # started until drained, whatever the ports do
        stopped: list[defer.Deferred[Any]] = [
            defer.maybeDeferred(port.stopListening) for port in ports
        ]
        self.log.info(
            "stopping: no more connections accepted; {open}",
            open=f"waiting up to {seconds(self.grace)} for the answers of "
            f"{plural(factory.connectionCount, 'open connection')}"
            if factory.connectionCount
            else "none open",
        )
        self._drained = factory.drain()
        self._drained.addCallback(
            lambda _: self.log.info("stopped: every request read was answered")
        )
        self._drained.addTimeout(self.grace, self.clock, onTimeoutCancel=self._closeTheRest)
        d: defer.Deferred[Any] = defer.gatherResults([*stopped, self._drained], consumeErrors=True)
        return d.addBoth(lambda _: factory.doStop())

    def _closeTheRest(self, result: object, timeout: float) -> None:
        """The grace is over: close the connections still open."""
        left = list(self.factory.connections)
        self.log.warn(
            "stopped after {grace}: closing {count} still open",
            grace=seconds(self.grace),
            count=plural(len(left), "connection"),
        )
        for p in left:
            p.transport.abortConnection()


def listening_at(port: IListeningPort, where: str) -> str:
    """Where ``port`` listens, in words: ``127.0.0.1:9998``, ``[::1]:9998``,
    ``unix:/run/cacheproxy.sock``; ``over TLS`` or ``from systemd`` after it
    when its description (``where``) says so."""
    words = in_words(port.getHost()) or where
    how = {"ssl": " over TLS", "systemd": " (a socket from systemd)"}.get(kind(where), "")
    return words + how


@implementer(IStreamServerEndpoint)
class PatientEndpoint:
    """Listens on ``endpoint``, trying again every `RETRY` seconds for up to
    ``patience`` seconds while it cannot: a new worker's admin site, whose
    address the worker it replaces holds until it has drained."""

    RETRY = 0.1

    def __init__(self, endpoint: IStreamServerEndpoint, clock: IReactorTime, patience: float):
        self.endpoint = endpoint
        self.clock = clock
        self.patience = patience

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        deadline = self.clock.seconds() + self.patience

        def attempt() -> defer.Deferred[Any]:
            return self.endpoint.listen(factory).addErrback(again)

        def again(failure: Failure) -> Any:
            failure.trap(CannotListenError)
            if self.clock.seconds() >= deadline:
                return failure
            return task.deferLater(self.clock, self.RETRY, attempt)

        return attempt()
