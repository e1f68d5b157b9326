"""Start-up, as an operator meets it: what cannot work stops twistd with one
line on the terminal (exit status 1), and a service that listens says so
once, with its settings.

twistd makes the services before it daemonizes, writes a pid file or starts
logging, so a check made while making them reaches the user's terminal; left
to the listening itself, the same error is a traceback in the log.
"""

from __future__ import annotations

import socket

from twisted.application import service
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..transport.addresses import address
from ..transport.service import ServiceFactory
from .secretfile import read_secret_file


def _reason(e: OSError) -> str:
    """An OS error in lower-case words: "address already in use"."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def cannot_listen(name: str, interface: str, port: int, e: OSError, role: str = "") -> str:
    """The one line a service that cannot listen ends with (``role``: what
    listens there besides the service itself, such as "admin site")."""
    return cannot_listen_at(name, address(interface, port), e, role)


def cannot_listen_at(name: str, where: str, e: OSError, role: str = "") -> str:
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
    """Listens on its endpoint when twistd starts it (a port taken since the
    check still stops twistd with one line) and logs, once it listens, one
    line saying where and with which settings."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: ServiceFactory,
        name: str,
        where: tuple[str, int],
        settings: str,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.tapname = name
        self.where = where
        self.settings = settings
        self.log = Logger(namespace=name)
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[IListeningPort | Failure] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        # Our endpoint listens at once; a failure must stop twistd now, not later.
        (result,) = outcome
        if isinstance(result, Failure):
            error = result.value
            if isinstance(error, CannotListenError):
                raise SystemExit(cannot_listen(self.tapname, *self.where, error.socketError))
            result.raiseException()
        self.port = result
        host = result.getHost()
        assert isinstance(host, (IPv4Address, IPv6Address))
        self.log.info(
            "listening on {address}, {settings}",
            address=address(host.host, host.port),
            settings=self.settings,
        )

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
