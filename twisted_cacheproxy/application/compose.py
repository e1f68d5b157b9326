"""The one composition root: every part of a running server or proxy is
built here, from its options, and wired to the others.

A service is its listener (`Listen`: TCP in one process, the parent's
socket in a worker of ``--workers``) with its factory, and, when the
options ask for them, the operations beside it: the metrics that observe the
factory, the access log, the stats line and the admin site. With
``--workers N`` the service is instead the parent that runs N copies of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from ..calculator.server import CalculatorServerFactory
from ..operations.accesslog import AccessLog, VerboseLog
from ..operations.metrics import SAMPLE_EVERY, ProxyMetrics, ServerMetrics
from ..operations.services import AccessLogService, AdminService, Periodic, StatsService
from ..operations.site import Access, Purge, site
from ..operations.statuspage import ProxyStatus, ServerStatus, StatusPage
from ..proxy.balancer import Balancer
from ..proxy.cache import MemoryCache
from ..proxy.factory import CacheProxyFactory
from ..proxy.interfaces import IFetcher
from ..proxy.sharedcache import SharedCache
from ..proxy.upstream import TCPConnector, UpstreamPool
from ..transport.addresses import address, is_loopback_host
from ..transport.endpoint import description
from ..transport.service import ServiceFactory
from .options import CommonOptions, ProxyOptions, ServerOptions
from .parent import WorkersService
from .settings import proxy_settings, server_settings
from .startup import (
    ListeningService,
    cannot_listen,
    cannot_listen_at,
    check_access_log,
    check_bindable,
    read_secret,
)

#: Makes the service that listens for ``factory`` and logs ``settings`` once it does.
Listen = Callable[[CommonOptions, ServiceFactory, str], service.IService]


def tcp_listener(reactor: Any) -> Listen:
    """The listener of one process: ``--port`` on ``--interface``, through
    the endpoint whose connections send at once (`transport.endpoint`)."""

    def listen(config: CommonOptions, factory: ServiceFactory, settings: str) -> service.IService:
        where = description(config["port"], config["interface"], config["backlog"])
        endpoint = serverFromString(reactor, where)
        at = (config["interface"], config["port"])
        return ListeningService(endpoint, factory, config.tapname, at, settings)

    return listen


def makeServerService(config: ServerOptions, reactor: Any, listen: Listen) -> service.IService:
    """The calculator server (or the parent of its ``--workers``)."""
    settings = server_settings(config)
    if config["workers"] > 1:
        return _workers(config, reactor, settings)
    factory = CalculatorServerFactory(
        clock=reactor, max_age=config["max-age"], cache=not config["no-cache"], **config.common()
    )
    main = listen(config, factory, settings)
    if not _operated(config):
        return main
    metrics = ServerMetrics(factory)
    factory.observer = metrics
    return _operations(config, reactor, main, metrics, _Admin(ServerStatus, factory))


def makeProxyService(config: ProxyOptions, reactor: Any, listen: Listen) -> service.IService:
    """The caching proxy (or the parent of its ``--workers``): its memory
    cache, its way to the servers (one pool, or a balancer over several),
    the shared tier when ``--memcached`` names nodes."""
    settings = proxy_settings(config)
    secrets = _memcached_secrets(config)
    if config["workers"] > 1:
        return _workers(config, reactor, settings)
    cache = MemoryCache(config["cache-size"], reactor, grace=config["stale-if-error"])
    shared = None
    if config["memcached"]:
        shared = SharedCache(
            config["memcached"],
            reactor,
            reactor=reactor,
            prefix=config["memcached-prefix"],
            timeout=config["memcached-timeout"] / 1000,
            lock_wait=config["memcached-lock-wait"] / 1000,
            secrets=secrets,
        )
    factory = CacheProxyFactory(
        cache,
        _upstream(config, reactor),
        clock=reactor,
        shared=shared,
        **config.common(),
    )
    main = listen(config, factory, settings)
    if not (_operated(config) or config["verbose"]):
        return main
    metrics = ProxyMetrics(factory)
    factory.observer = metrics
    if config["verbose"]:
        metrics.request_logs.append(VerboseLog())
    return _operations(config, reactor, main, metrics, _Admin(ProxyStatus, factory, factory.purge))


def _memcached_secrets(config: ProxyOptions) -> list[bytes]:
    """The secrets of ``--memcached-secret-file`` (the first signs), read by
    each process itself: a worker is handed the paths, never a secret.
    Without one, nodes beyond loopback stop twistd with one line unless
    ``--memcached-insecure``; otherwise one warning says what is at risk."""
    name, option = config.tapname, "--memcached-secret-file"
    secrets = [read_secret(name, option, path) for path in config["memcached-secret-file"]]
    nodes = config["memcached"]
    if secrets or not nodes:
        return secrets
    beyond = [address(*node) for node in nodes if not is_loopback_host(node[0])]
    if beyond and not config["memcached-insecure"]:
        raise SystemExit(
            f"{name}: memcached {', '.join(beyond)} is beyond this host's loopback: give "
            f"{option} so that its entries are signed (or --memcached-insecure to run "
            f"without, trusting everyone who can reach it)"
        )
    if config.worker is None:  # once, not once per worker
        Logger(namespace=name).warn(
            "shared-tier entries are not signed (no {option}): {who} can make every "
            "proxy of the site serve wrong answers by writing to memcached {nodes}",
            option=option,
            who="anyone who can reach it" if beyond else "any local user",
            nodes=", ".join(address(*node) for node in nodes),
        )
    return secrets


def _upstream(config: ProxyOptions, reactor: Any) -> IFetcher:
    """One pool to the one server, or a balancer over a pool per server
    (each pool then makes one attempt per miss: the balancer retries, on
    the other servers first)."""
    several = len(config.servers) > 1
    pools = [
        UpstreamPool(
            TCPConnector(reactor, host, port, timeout=config["timeout"]),
            reactor,
            max_connections=config["upstream-connections"],
            retries=1 if several else config["retries"],
            retry_delay=config["retry-delay"],
            timeout=config["timeout"],
            pipeline=config["upstream-pipeline"],
        )
        for host, port in config.servers
    ]
    if not several:
        return pools[0]
    return Balancer(
        pools,
        reactor,
        rounds=config["retries"],
        retry_delay=config["retry-delay"],
        timeout=config["timeout"],
        retry_timeouts=bool(config["retry-timeouts"]),
        interval=config["health-interval"],
    )


def _operated(config: CommonOptions) -> bool:
    """Whether the options ask for any of the operations (the factory then
    has metrics observing it; without, its observer costs nothing)."""
    return bool(_has_admin(config) or config["access-log"] or config["stats-interval"])


def _has_admin(config: CommonOptions) -> bool:
    return bool(config["admin-port"] or config["admin-listen"])


class OperatedService(service.MultiService):
    """The listening service (`main`) with the admin site, access log and
    stats line beside it."""

    def __init__(self, main: Any) -> None:
        super().__init__()
        self.main = main

    @property
    def factory(self) -> ServiceFactory:
        """The listening service's factory (as on the listening service itself)."""
        factory: ServiceFactory = self.main.factory
        return factory


class _Admin:
    """What the admin site of a service shows besides its metrics: the
    status page of its kind, the factory whose draining ``/healthz`` reports,
    and the proxy's purge."""

    def __init__(
        self, page: type[StatusPage], factory: ServiceFactory, purge: Purge | None = None
    ) -> None:
        self.page = page
        self.factory = factory
        self.purge = purge


def _operations(
    config: CommonOptions,
    reactor: Any,
    main: service.IService,
    metrics: ProxyMetrics | ServerMetrics,
    admin: _Admin,
) -> OperatedService:
    """``main`` with what ``--admin-port`` (or ``--admin-listen``),
    ``--access-log`` and ``--stats-interval`` ask for beside it."""
    name = config.tapname
    web = _admin_site(config, reactor, metrics, admin) if _has_admin(config) else None
    top = OperatedService(main)
    access = config["access-log"]
    if access:
        check_access_log(name, access)
        access_log = AccessLog(access, reactor)
        access_log.open()
        metrics.request_logs.append(access_log)
        AccessLogService(access_log).setServiceParent(top)
    # After the access log: a MultiService stops its children last first,
    # so the listener stops (and its last lines are logged) before the log closes.
    main.setServiceParent(top)
    if config["stats-interval"]:
        StatsService(metrics, config["stats-interval"], f"{name}.stats").setServiceParent(top)
    if web is not None:
        web.setServiceParent(top)
        Periodic(SAMPLE_EVERY, metrics.sample, metrics.clock).setServiceParent(top)
    return top


def _admin_site(
    config: CommonOptions, reactor: Any, metrics: ProxyMetrics | ServerMetrics, admin: _Admin
) -> AdminService:
    """The admin site's listener, on ``--admin-listen`` or, through the same
    endpoint as the service's own, ``--admin-port`` on ``--admin-interface``
    (checked now: a port taken is one line before twistd goes on)."""
    name = config.tapname
    role = _admin_role(config["admin-port"] - (config.worker or 1) + 1, config.worker)
    listen = config["admin-listen"]
    if listen:
        endpoint, where = _described(name, listen, reactor), listen
    else:
        port, interface = config["admin-port"], config["admin-interface"]
        check_bindable(name, interface, port, role)
        endpoint = serverFromString(reactor, description(port, interface))
        where = address(interface, port)
    title = f"{name} {address(config['interface'], config['port'])}"
    if config.worker is not None:
        title += f", worker {config.worker}"
    access = Access(
        config.adminToken, bool(config["admin-token-for-reads"]), frozenset(config["admin-host"])
    )
    web = site(metrics, partial(admin.page, metrics, title), admin.factory, access, admin.purge)
    return AdminService(endpoint, web, lambda e: cannot_listen_at(name, where, e, role))


def _described(name: str, listen: str, reactor: Any) -> IStreamServerEndpoint:
    """The endpoint of ``--admin-listen``; one line if Twisted cannot read it."""
    try:
        return serverFromString(reactor, listen)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise SystemExit(f"{name}: --admin-listen {listen}: {e}") from None


def _admin_role(first_port: int, worker: int | None) -> str:
    """What listens on an admin site's address, for a message: "admin site",
    or with ``--workers`` which worker's and how its port was derived."""
    if worker is None:
        return "admin site"
    if not first_port:
        return f"admin site of worker {worker}"
    offset = f" + {worker - 1}" if worker > 1 else ""
    return f"admin site of worker {worker}, --admin-port {first_port}{offset}"


def _workers(config: CommonOptions, reactor: Any, settings: str) -> service.IService:
    """The parent of ``--workers`` processes sharing one listening socket
    (`parent` says why), logging the same start-up line as one process.
    Worker N has its own admin site, on ``--admin-port`` + N - 1 or on
    ``--admin-listen`` with N for ``{worker}``. The workers are handed the
    options on their command line, the secret ones on their standard input."""
    name = config.tapname
    logger = Logger(namespace=name)
    settings = f"{config['workers']} workers; {settings}"
    if config["access-log"]:
        check_access_log(name, config["access-log"])
    first, count = config["admin-port"], config["workers"]
    if first:
        for worker in range(1, count + 1):
            role = _admin_role(first, worker)
            check_bindable(name, config["admin-interface"], first + worker - 1, role)
        settings += f"; admin sites on ports {first}..{first + count - 1}, one per worker"
    if config["admin-listen"]:
        _described(name, config["admin-listen"].replace("{worker}", "1"), reactor)
        settings += f"; admin sites on {config['admin-listen']}, one per worker"

    def listening(where: tuple[str, int]) -> None:
        logger.info(
            "listening on {address}, {settings}", address=address(*where), settings=settings
        )

    return WorkersService(
        reactor,
        config["interface"],
        config["port"],
        config["backlog"],
        config["workers"],
        [name, json.dumps(config.portable())],
        handover=json.dumps(config.secrets()).encode(),
        grace=config["shutdown-grace"],
        on_listening=listening,
        cannot_listen=lambda e: cannot_listen(name, config["interface"], config["port"], e),
    )
