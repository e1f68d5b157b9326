"""The services that run beside a server's or proxy's listener: the admin
site's listener, the sampler of the status page's chart, the access log and
the stats line."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger

from ..transport.addresses import in_words
from .accesslog import AccessLog
from .metrics import ProxyMetrics, ServerMetrics
from .site import AdminSite, is_loopback

log = Logger()


class AdminService(StreamServerEndpointService):
    """Serves the admin site on its endpoint (any Twisted server endpoint).

    A port that cannot be bound stops twistd with the exception that
    ``cannot_listen`` makes of the error (one line); once it listens, one line says
    where, and a warning says so when it listens beyond this host's
    loopback without a token."""

    # Twisted's own flag (as `strports.service` sets it): an endpoint that
    # fails at once raises from privilegedStartService instead of being logged.
    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: AdminSite,
        cannot_listen: Callable[[BaseException], BaseException],
    ) -> None:
        super().__init__(endpoint, site)
        self.site = site
        self.cannot_listen = cannot_listen

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:  # a UNIX socket's lock: an OSError
            raise self.cannot_listen(e) from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        host = port.getHost()
        where = in_words(host) or str(host)
        beyond = False
        if isinstance(host, (IPv4Address, IPv6Address)):
            where, beyond = f"http://{where}/", not is_loopback(host)
        log.info("admin site on {where}", where=where)
        if beyond and self.site.access.token is None:
            log.warn(
                "the admin site listens beyond loopback without a token "
                "(--admin-token-file): anyone who reaches {where} reads every page",
                where=where,
            )
        return port


class Periodic(service.Service):
    """Calls ``call`` every ``interval`` seconds of ``clock``, the first time
    one interval after the start (`TimerService` calls at once)."""

    def __init__(self, interval: float, call: Callable[[], object], clock: IReactorTime) -> None:
        self.interval = interval
        self.call = call
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.call)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class AccessLogService(service.Service):
    """Opens the access log at start, reopens it on SIGUSR1, closes it at stop."""

    def __init__(self, access_log: AccessLog) -> None:
        self.access_log = access_log
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self.access_log.start()
        self._previous = signal.signal(signal.SIGUSR1, self._signalled)

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler: the reopen is queued for the reactor's thread.
        self.access_log.reactor.callFromThread(self.access_log.reopen)
        # twistd rotates its own log file on SIGUSR1: keep doing that too.
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
        self.access_log.close()


class StatsService(Periodic):
    """One summary line in the log every ``interval`` seconds, and at shutdown."""

    def __init__(self, metrics: ProxyMetrics | ServerMetrics, interval: float, name: str) -> None:
        super().__init__(interval, self._line, metrics.clock)
        self.metrics = metrics
        self.log = Logger(namespace=name)

    def _line(self, final: bool = False) -> None:
        line = self.metrics.statsLine(final)
        if line is not None:  # None: nothing happened since the last line
            self.log.info("{line}", line=line)

    def stopService(self) -> None:
        super().stopService()
        self._line(final=True)
