"""The one composition root: every part of a running server or proxy is
built here, from its options, and wired to the others.

A service is its listener (`Listen`: the endpoints of ``--listen``, or of
``--port`` on ``--interface``, in one process; the parent's sockets in a
worker of ``--workers``) with its factory, and, when the
options ask for them, the operations beside it: the metrics that observe the
factory, the access log, the stats line and the admin site. With
``--workers N`` the service is instead the parent that runs N copies of it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
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
from ..transport.endpoint import (
    TCPServerEndpoint,
    adopted_endpoint,
    description,
    kind,
    server_endpoint,
)
from ..transport.service import ServiceFactory
from ..transport.tls import client_options
from .options import CommonOptions, ProxyOptions, Server, ServerOptions
from .parent import WorkersService
from .settings import proxy_settings, server_settings
from .startup import (
    ListeningService,
    PatientEndpoint,
    StartupError,
    cannot_listen_at,
    check_access_log,
    check_bindable,
    read_secret,
)

#: Makes the service that listens for ``factory`` and logs ``settings`` once it does.
Listen = Callable[[CommonOptions, ServiceFactory, str], service.IService]

#: An endpoint to listen on, with where it listens in words (for messages).
Listener = tuple[IStreamServerEndpoint, str]


def endpoint_listener(reactor: Any) -> Listen:
    """The listener of one process: the endpoints of ``--listen``, or of
    ``--port`` on ``--interface`` (`listeners`)."""

    def listen(config: CommonOptions, factory: ServiceFactory, settings: str) -> service.IService:
        return ListeningService(
            listeners(config, reactor),
            factory,
            config.tapname,
            settings,
            grace=config["shutdown-grace"],
            clock=reactor,
        )

    return listen


def listeners(config: CommonOptions, reactor: Any) -> list[Listener]:
    """The endpoint of each place the options say to listen
    (`options.CommonOptions.listens`), through `endpoint.server_endpoint`: a
    ``tcp:`` one sends at once. A description Twisted cannot read, or a TCP
    port that cannot be bound, stops twistd with one line now, before it
    daemonizes."""
    found = []
    for text in config.listens():
        endpoint = _described(config.tapname, "--listen", text, reactor)
        where = text if config["listen"] else address(config["interface"], config["port"])
        bound = _tcp_address(endpoint)
        if bound is not None:
            check_bindable(config.tapname, *bound)
            if isinstance(endpoint, TCPServerEndpoint):
                where = address(*bound)
        found.append((endpoint, where))
    return found


def adopted_listeners(
    config: CommonOptions, reactor: Any, sockets: list[socket.socket]
) -> list[Listener]:
    """A worker's listeners: the sockets its parent listens on and handed in,
    one for each place the options say to listen, in the order of `listeners`
    (`endpoint.adopted_endpoint`). An ``ssl:`` one speaks TLS with the key and
    certificate its description names, which the worker reads itself, so no
    key travels between processes; one line if it cannot read them."""
    found = []
    for skt, text in zip(sockets, config.listens(), strict=True):
        endpoint = _described(
            config.tapname, "--listen", text, reactor, partial(adopted_endpoint, skt=skt)
        )
        found.append((endpoint, _socket_address(skt)))
    return found


def _socket_address(skt: socket.socket) -> str:
    """A socket's address in words, for a message."""
    name = skt.getsockname()
    return f"unix:{name}" if skt.family == socket.AF_UNIX else address(*name[:2])


def _tcp_address(endpoint: IStreamServerEndpoint) -> tuple[str, int] | None:
    """The interface and port a TCP listener (ours, or Twisted's ``ssl:``)
    will bind, to be checked before twistd daemonizes; None for others and
    for port 0. Twisted's SSL endpoint keeps them as ``_interface`` and ``_port``."""
    if isinstance(endpoint, TCPServerEndpoint):
        interface, port = endpoint.interface, endpoint.port
    elif isinstance(endpoint, SSL4ServerEndpoint):
        interface, port = endpoint._interface, endpoint._port
    else:
        return None
    return (interface or "0.0.0.0", port) if port else None


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
            _connector(config, reactor, server),
            reactor,
            max_connections=config["upstream-connections"],
            retries=1 if several else config["retries"],
            retry_delay=config["retry-delay"],
            timeout=config["timeout"],
            pipeline=config["upstream-pipeline"],
        )
        for server in config.servers
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


def _connector(config: ProxyOptions, reactor: Any, server: Server) -> TCPConnector:
    """The way to one server, over TCP or TLS; a trust root that cannot be
    read stops twistd with one line."""
    tls = None
    if server.tls:
        try:
            tls = client_options(server.host, server.trust)
        except ValueError as e:
            where = address(server.host, server.port)
            raise SystemExit(f"{config.tapname}: --server tls:{where}: {e}") from None
    return TCPConnector(reactor, server.host, server.port, timeout=config["timeout"], tls=tls)


def _operated(config: CommonOptions) -> bool:
    """Whether the options ask for any of the operations (the factory then
    has metrics observing it; without, its observer costs nothing)."""
    return bool(_has_admin(config) or config["access-log"] or config["stats-interval"])


def _has_admin(config: CommonOptions) -> bool:
    return bool(config["admin-port"] or config["admin-listen"])


class OperatedService(service.MultiService):
    """The listening service (`main`) with the admin site, access log and
    stats line beside it. It stops `main` first, and the others once `main`
    has drained: the admin site says 503 meanwhile, and the access log and
    the stats line take the last answers."""

    def __init__(self, main: Any) -> None:
        super().__init__()
        self.main = main

    def stopService(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self.main.stopService)
        return d.addBoth(lambda _: service.MultiService.stopService(self))

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
    endpoint: IStreamServerEndpoint
    if listen:
        endpoint, where = _described(name, "--admin-listen", listen, reactor), listen
    else:
        port, interface = config["admin-port"], config["admin-interface"]
        if config.worker is None:  # the parent of workers checked theirs
            check_bindable(name, interface, port, role)
        endpoint = serverFromString(reactor, description(port, interface))
        where = address(interface, port)
    if config.worker is not None:
        # The worker this one replaces (on SIGHUP) holds it until it has drained.
        endpoint = PatientEndpoint(endpoint, reactor, config["shutdown-grace"] + 2)
    main = config["listen"][0] if config["listen"] else address(config["interface"], config["port"])
    title = f"{name} {main}"
    if config.worker is not None:
        title += f", worker {config.worker}"
    access = Access(
        config.adminToken, bool(config["admin-token-for-reads"]), frozenset(config["admin-host"])
    )
    web = site(metrics, partial(admin.page, metrics, title), admin.factory, access, admin.purge)
    return AdminService(
        endpoint, web, lambda e: StartupError(cannot_listen_at(name, where, e, role))
    )


def _described(
    name: str,
    option: str,
    text: str,
    reactor: Any,
    parse: Callable[[Any, str], IStreamServerEndpoint] = server_endpoint,
) -> IStreamServerEndpoint:
    """The endpoint of a description (``--listen``, ``--admin-listen``) made
    by ``parse``; one line if Twisted cannot read it, a file it names cannot
    be read (a TLS key), or systemd passed no such socket."""
    try:
        return parse(reactor, text)
    except (IndexError, KeyError) as e:
        why = str(e)
        if kind(text) == "systemd":
            why = "systemd passed no such socket (LISTEN_FDS, LISTEN_FDNAMES)"
    except OSError as e:
        why = f"{e.strerror}: {e.filename}" if e.filename else str(e)
    except Exception as e:  # what Twisted's parsers raise: ValueError, TypeError, SSL errors
        why = str(e) or type(e).__name__
    raise SystemExit(f"{name}: {option} {text}: {why}")


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
    """The parent of ``--workers`` processes sharing its listening sockets
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
        _described(name, "--admin-listen", config["admin-listen"].replace("{worker}", "1"), reactor)
        settings += f"; admin sites on {config['admin-listen']}, one per worker"

    def listening(where: str) -> None:
        logger.info("listening on {address}, {settings}", address=where, settings=settings)

    return WorkersService(
        reactor,
        listeners(config, reactor),
        config["workers"],
        [name, json.dumps(config.portable())],
        handover=json.dumps(config.secrets()).encode(),
        grace=config["shutdown-grace"],
        on_listening=listening,
        cannot_listen=lambda where, e: cannot_listen_at(name, where, e),
    )
