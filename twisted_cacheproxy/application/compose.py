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
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from ..calculator.server import CalculatorServerFactory
from ..operations.accesslog import AccessLog, VerboseLog
from ..operations.admin import AccessLogService, AdminService, Purge, StatsService, site
from ..operations.metrics import ProxyMetrics, ServerMetrics
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
    return _operations(config, reactor, main, metrics)


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
    return _operations(config, reactor, main, metrics, factory.purge)


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
    return bool(config["admin-port"] or config["access-log"] or config["stats-interval"])


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


def _operations(
    config: CommonOptions,
    reactor: Any,
    main: service.IService,
    metrics: ProxyMetrics | ServerMetrics,
    purge: Purge | None = None,
) -> OperatedService:
    """``main`` with what ``--admin-port``, ``--access-log`` and
    ``--stats-interval`` ask for beside it."""
    name = config.tapname
    admin_port = config["admin-port"]
    if admin_port:
        check_bindable(name, config["admin-interface"], admin_port, "admin")
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
    if admin_port:
        title = f"{name} {address(config['interface'], config['port'])}"
        if config.worker is not None:
            title += f", worker {config.worker}"
        token = config["admin-token"]
        web = site(metrics, title, token.encode() if token else None, purge)
        AdminService(web, admin_port, config["admin-interface"], metrics).setServiceParent(top)
    return top


def _workers(config: CommonOptions, reactor: Any, settings: str) -> service.IService:
    """The parent of ``--workers`` processes sharing one listening socket
    (`parent` says why), logging the same start-up line as one process.
    Worker N has its own admin site, on ``--admin-port`` + N - 1."""
    name = config.tapname
    logger = Logger(namespace=name)
    settings = f"{config['workers']} workers; {settings}"
    if config["access-log"]:
        check_access_log(name, config["access-log"])
    if config["admin-port"]:
        first = config["admin-port"]
        for port in range(first, first + config["workers"]):
            check_bindable(name, config["admin-interface"], port, "admin")
        last = first + config["workers"] - 1
        settings += f"; admin sites on ports {first}..{last}, one per worker"

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
        grace=config["shutdown-grace"],
        on_listening=listening,
        cannot_listen=lambda e: cannot_listen(name, config["interface"], config["port"], e),
    )
