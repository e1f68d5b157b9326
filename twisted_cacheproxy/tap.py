"""twistd options and services: ``twistd -n cacheserver`` and ``twistd -n cacheproxy``."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import __version__, wire
from .endpoint import address


def _integer(text: str) -> int:
    """A whole number, refused in words that a user reads."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _number(text: str) -> float:
    """A number of seconds (a decimal point allowed)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _size(text: str) -> int:
    """A byte count with an optional K, M or G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 64M, 1G)") from None
    if value < 0:
        raise ValueError("a size cannot be negative")
    return value


_size.coerceDoc = "Bytes, with an optional K, M or G suffix."  # type: ignore[attr-defined]


class _NamedCoerce(usage.CoerceParameter):
    """Twisted's coercion of a parameter, with an error that names the option
    (``--port: not a number: 'abc'``) instead of "Parameter type enforcement
    failed"."""

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: {e}") from None


#: Watching and steering a running service (admin.py): both services take them.
_OPERATING_OPTIONS: list[list[Any]] = [
    [
        "admin-port",
        None,
        0,
        "Serve /status, /metrics, /stats.json (and /purge on the proxy) on this port (0: off).",
        _integer,
    ],
    ["admin-interface", None, "127.0.0.1", "The interface the admin site listens on."],
    ["admin-token", None, None, "POSTs to the admin site need 'Authorization: Bearer TOKEN'."],
    ["access-log", None, None, "Write one line per answered request to this file ('-': stdout)."],
    [
        "stats-interval",
        None,
        60.0,
        "Log a summary line every this many seconds and at shutdown (0: off).",
        _number,
    ],
]


class _CommonOptions(usage.Options):
    """What both services take: where to listen and how to treat connections.

    Run by twistd (as its subcommand), a bad option ends twistd at once with
    the error first and a pointer to ``--help``, instead of twistd's whole
    help followed by the error."""

    #: The twistd subcommand, for messages.
    tapname = ""
    #: The worker's number (from 1) in a worker process of ``--workers``.
    worker: int | None = None

    optParameters: list[list[Any]] = [
        ["interface", "i", "127.0.0.1", "The interface to listen on."],
        [
            "max-message-size",
            None,
            wire.MAX_MESSAGE_SIZE,
            "Largest message in bytes, header included (256..65535).",
            _integer,
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Close connections with no complete request for this many seconds (0: never).",
            _number,
        ],
        [
            "max-connections",
            None,
            10_000,
            "Most concurrent client connections; more are closed at once.",
            _integer,
        ],
        [
            "backlog",
            None,
            511,
            "Connections the kernel may queue before they are accepted "
            "(capped by net.core.somaxconn).",
            _integer,
        ],
        [
            "workers",
            None,
            1,
            "Worker processes sharing the port (1: this process serves).",
            _integer,
        ],
        [
            "shutdown-grace",
            None,
            5.0,
            "With --workers: seconds a stopping worker may take to finish its connections.",
            _number,
        ],
        *_OPERATING_OPTIONS,
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise SystemExit(
                f"{self.tapname}: {e}\nRun 'twistd {self.tapname} --help' for the options."
            ) from None

    def opt_version(self) -> None:
        """Display the version of twisted-cacheproxy and exit."""
        from twisted import __version__ as twisted_version

        print(f"{self.tapname} (twisted-cacheproxy) {__version__}, Twisted {twisted_version}")
        sys.exit(0)

    def postOptions(self) -> None:
        self.checkPort("port")
        # 256: the least that still holds every error answer of ours.
        if not 256 <= self["max-message-size"] <= wire.LENGTH_LIMIT:
            raise usage.UsageError("--max-message-size must be 256..65535")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout cannot be negative")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["backlog"] < 1:
            raise usage.UsageError("--backlog must be at least 1")
        if self["admin-port"]:
            self.checkPort("admin-port")
        if self["stats-interval"] < 0:
            raise usage.UsageError("--stats-interval cannot be negative")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["shutdown-grace"] < 0:
            raise usage.UsageError("--shutdown-grace cannot be negative")
        if self["workers"] > 1:
            self.checkWorkers()

    def checkWorkers(self) -> None:
        """What ``--workers`` cannot go with: admin ports past 65535 or on
        ``--port``, and an access log on standard output (the workers'
        standard output carries their log events to the parent)."""
        first, count = self["admin-port"], self["workers"]
        last = first + count - 1
        if first and last > 65535:
            raise usage.UsageError(
                f"--admin-port {first} with --workers {count}: "
                f"the workers' admin sites would need ports up to {last}"
            )
        if first and first <= self["port"] <= last:
            raise usage.UsageError(
                f"--admin-port {first} with --workers {count}: the workers' admin "
                f"sites take ports {first}..{last}, which include --port {self['port']}"
            )
        if self["access-log"] == "-":
            raise usage.UsageError("--access-log - cannot go with --workers: give a file")

    def portable(self) -> dict[str, Any]:
        """The parsed options, as JSON takes them (for a worker process)."""
        return dict(self)

    @classmethod
    def restore(cls, values: dict[str, Any], worker: int) -> _CommonOptions:
        """The options of worker number ``worker`` (from 1) of a parent whose
        options were ``values``: one process, with the admin site on the
        worker's own port (``--admin-port`` + worker - 1)."""
        config = cls()
        config.update(values)
        config.worker = worker
        config["workers"] = 1
        if config["admin-port"]:
            config["admin-port"] += worker - 1
        return config

    def checkPort(self, name: str) -> None:
        """Refuse a TCP port number outside 1..65535."""
        if not 0 < self[name] < 65536:
            raise usage.UsageError(f"--{name} must be 1..65535, not {self[name]}")

    def common(self) -> dict[str, Any]:
        """The factory keyword arguments these options give."""
        return {
            "max_message_size": self["max-message-size"],
            "idle_timeout": self["idle-timeout"] or None,
            "max_connections": self["max-connections"],
        }


class ServerOptions(_CommonOptions):
    """Options of ``twistd cacheserver``."""

    tapname = "cacheserver"
    synopsis = "[options]"
    longdesc = (
        "A calculator server for the course protocol (text and pickle payloads), "
        "listening on 127.0.0.1:9999 unless told otherwise."
    )
    optParameters = [
        ["port", "p", 9999, "The TCP port to listen on.", _integer],
        [
            "max-age",
            None,
            wire.FOREVER,
            "Cache lifetime in seconds given to answers (65535: forever).",
            _integer,
        ],
        *_CommonOptions.optParameters,
    ]
    optFlags = [["no-cache", None, "Mark every answer as not cacheable (C=0)."]]

    def postOptions(self) -> None:
        super().postOptions()
        if not 0 <= self["max-age"] <= wire.FOREVER:
            raise usage.UsageError("--max-age must be 0..65535")


def _reason(e: OSError) -> str:
    """An OS error in lower-case words: "address already in use"."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def cannot_listen(config: _CommonOptions, e: OSError) -> str:
    """The one line a service that cannot listen ends with."""
    where = address(config["interface"], config["port"])
    return f"{config.tapname}: cannot listen on {where}: {_reason(e)}"


def check_listening(config: _CommonOptions) -> None:
    """Stop twistd with one line, exit status 1, if ``--interface`` and
    ``--port`` cannot be bound (a port in use, an address this host does not
    have). twistd makes the service before it daemonizes, writes a pid file
    or starts logging, so the line reaches the user's terminal; left to the
    listening itself, the error is a traceback in the log."""
    interface = config["interface"]
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As Twisted's port does: a connection in TIME_WAIT does not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, config["port"]))
        except OSError as e:
            raise SystemExit(cannot_listen(config, e)) from None


class ListeningService(service.Service):
    """Listens on its endpoint when twistd starts it (a port that cannot be
    bound stops twistd with one line) and logs, once it listens, one line
    saying where and with which settings."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: wire.ServiceFactory,
        config: _CommonOptions,
        settings: str,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.config = config
        self.settings = settings
        self.log = Logger(namespace=config.tapname)
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
                # Taken between check_listening and now: still one line.
                raise SystemExit(cannot_listen(self.config, error.socketError))
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


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _limits(config: _CommonOptions) -> str:
    """The connection limits both services share, in words."""
    idle = config["idle-timeout"]
    return (
        f"messages up to {config['max-message-size']} bytes, "
        f"idle timeout {_seconds(idle) if idle else 'off'}, "
        f"at most {config['max-connections']} connections"
    )


def server_settings(config: ServerOptions) -> str:
    """The server's start-up line after its address."""
    age = config["max-age"]
    if config["no-cache"] or not age:
        cache = "answers not cacheable"
    else:
        cache = f"answers cacheable for {'ever' if age == wire.FOREVER else _seconds(age)}"
    return f"{cache}; {_limits(config)}"


#: Makes the service that listens for ``factory`` and logs ``settings`` once it does.
Listen = Callable[[Any, wire.ServiceFactory, str], service.IService]


def _listening(
    config: _CommonOptions,
    factory: wire.ServiceFactory,
    settings: str,
) -> service.IService:
    """A service listening on ``--port`` and ``--interface`` whose connections
    send at once (`endpoint`); a port that cannot be bound stops twistd at
    start-up with one line."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from .endpoint import description

    where = description(config["port"], config["interface"], config["backlog"])
    return ListeningService(serverFromString(reactor, where), factory, config, settings)


def makeServerService(config: ServerOptions, listen: Listen = _listening) -> service.IService:
    """A TCP service serving the calculator (in ``--workers`` processes);
    ``listen`` makes its listener (a worker's adopts the parent's socket)."""
    from .server import CalculatorServerFactory

    if config["workers"] > 1:
        return _workers(config, server_settings(config))
    factory = CalculatorServerFactory(
        max_age=config["max-age"], cache=not config["no-cache"], **config.common()
    )
    return _operated(config, factory, listen(config, factory, server_settings(config)))


def _operated(config: _CommonOptions, factory: Any, main: service.IService) -> service.IService:
    """``main`` with the admin site, access log and stats line beside it (admin.py)."""
    from .admin import operated

    title = f"{config.tapname} {address(config['interface'], config['port'])}"
    if config.worker is not None:
        title += f", worker {config.worker}"
    return operated(config, factory, main, title)


def _workers(config: _CommonOptions, settings: str) -> service.IService:
    """The parent of ``--workers`` processes sharing one listening socket
    (workers.py says why), logging the same start-up line as one process.
    Worker N has its own admin site, on ``--admin-port`` + N - 1."""
    from .admin import check_access_log, check_admin_port
    from .workers import WorkersService

    logger = Logger(namespace=config.tapname)
    settings = f"{config['workers']} workers; {settings}"
    if config["access-log"]:
        check_access_log(config.tapname, config["access-log"])
    if config["admin-port"]:
        first = config["admin-port"]
        for port in range(first, first + config["workers"]):
            check_admin_port(config.tapname, config["admin-interface"], port)
        last = first + config["workers"] - 1
        settings += f"; admin sites on ports {first}..{last}, one per worker"

    def listening(where: tuple[str, int]) -> None:
        logger.info(
            "listening on {address}, {settings}", address=address(*where), settings=settings
        )

    return WorkersService(
        config["interface"],
        config["port"],
        config["backlog"],
        config["workers"],
        [config.tapname, json.dumps(config.portable())],
        grace=config["shutdown-grace"],
        on_listening=listening,
        cannot_listen=lambda e: cannot_listen(config, e),
    )


@dataclass(frozen=True)
class TapEntry:
    """What a twistd ``ServiceMaker`` looks up by name: options and a maker.
    Through it, twistd checks that the service can listen before making it."""

    Options: type[_CommonOptions]
    make: Callable[..., service.IService]

    def makeService(self, config: _CommonOptions) -> service.IService:
        check_listening(config)
        return self.make(config)


server = TapEntry(ServerOptions, makeServerService)


class ProxyOptions(_CommonOptions):
    """Options of ``twistd cacheproxy``."""

    tapname = "cacheproxy"
    synopsis = "[options]"
    longdesc = (
        "A caching proxy for the calculator protocol, listening on 127.0.0.1:9998 "
        "in front of the calculator server at 127.0.0.1:9999 unless told otherwise."
    )
    optParameters = [
        ["port", "p", 9998, "The TCP port to listen on.", _integer],
        ["server-host", None, "127.0.0.1", "The calculator server's host."],
        ["server-port", None, 9999, "The calculator server's port.", _integer],
        [
            "cache-size",
            None,
            64 << 20,
            "Most bytes the cache may hold, with K, M, G suffixes (default 64M).",
            _size,
        ],
        ["retries", None, 5, "Connection attempts per miss before answering 500.", _integer],
        [
            "retry-delay",
            None,
            0.5,
            "Seconds before the second attempt; doubles each time.",
            _number,
        ],
        ["timeout", None, 10.0, "Seconds one miss may take upstream, retries included.", _number],
        [
            "stale-if-error",
            None,
            0.0,
            "Serve answers up to N s past their lifetime while the server is unreachable (0: off).",
            _number,
        ],
        [
            "upstream-connections",
            None,
            32,
            "Most connections to the server, kept open and reused.",
            _integer,
        ],
        [
            "upstream-pipeline",
            None,
            8,
            "Most requests in flight on one server connection (1: no pipelining). "
            "Only on connections whose answers said L; a course server gets one at a time.",
            _integer,
        ],
        [
            "memcached-prefix",
            None,
            "cacheproxy:",
            "Prefix of this site's keys in memcached (sites sharing one memcached "
            "each take their own).",
        ],
        [
            "memcached-timeout",
            None,
            50,
            "Milliseconds one shared-cache lookup may take before it counts as a miss.",
            _integer,
        ],
        [
            "memcached-lock-wait",
            None,
            0,
            "On a shared-cache miss, take a lock so that only one proxy asks the server, "
            "and wait up to this many milliseconds for another proxy's answer (0: off).",
            _integer,
        ],
        [
            "health-interval",
            None,
            0.0,
            "With several --server: probe each server every S seconds (0: off).",
            _number,
        ],
        *_CommonOptions.optParameters,
    ]
    optFlags = [
        ["verbose", "v", "Log every hit and miss (at debug level)."],
        [
            "retry-timeouts",
            None,
            "With several --server: send a miss that timed out on one server to another "
            "(each then has half of --timeout).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The ``--server`` addresses, in order, as (host, port).
        self.servers: list[tuple[str, int]] = []
        self["memcached"] = []

    def opt_server(self, value: str) -> None:
        """A calculator server as HOST:PORT ([::1]:9999 for IPv6); repeat for
        several (balanced, with health checks and failover). Default: the
        one --server-host and --server-port give."""
        self.servers.append(server_address(value))

    def opt_memcached(self, value: str) -> None:
        """A memcached node HOST:PORT for the shared cache tier; repeat it
        for several nodes (every proxy of a site lists the same ones)."""
        from .sharedcache import parse_address

        try:
            self["memcached"].append(parse_address(value))
        except ValueError as e:
            raise usage.UsageError(f"--memcached: {e}") from None

    def postOptions(self) -> None:
        super().postOptions()
        self.checkPort("server-port")
        if not self.servers:
            self.servers = [(self["server-host"], self["server-port"])]
        if len(set(self.servers)) != len(self.servers):
            raise usage.UsageError("--server: the same server is given twice")
        if self["health-interval"] < 0:
            raise usage.UsageError("--health-interval cannot be negative")
        for name in ("retry-delay", "stale-if-error"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")
        if self["retries"] < 1:
            raise usage.UsageError("--retries must be at least 1")
        if self["timeout"] <= 0:
            raise usage.UsageError("--timeout must be positive")
        for name in ("upstream-connections", "upstream-pipeline"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["memcached-lock-wait"] < 0:
            raise usage.UsageError("--memcached-lock-wait cannot be negative")
        if self["memcached-timeout"] < 1:
            raise usage.UsageError("--memcached-timeout must be at least 1 (ms)")
        if len(set(self["memcached"])) != len(self["memcached"]):
            raise usage.UsageError("--memcached: the same node is given twice")
        if self["workers"] > 1 and not self["memcached"]:
            raise usage.UsageError(
                "--workers needs --memcached: each worker has its own memory cache, "
                "and only the shared tier lets them share answers"
            )
        from .sharedcache import check_prefix

        try:
            check_prefix(self["memcached-prefix"])
        except ValueError as e:
            raise usage.UsageError(f"--memcached-prefix: {e}") from None

    def portable(self) -> dict[str, Any]:
        return {**super().portable(), "servers": self.servers}

    @classmethod
    def restore(cls, values: dict[str, Any], worker: int) -> ProxyOptions:
        config = cast(ProxyOptions, super().restore(values, worker))
        config.servers = [(host, port) for host, port in config.pop("servers")]
        config["memcached"] = [(host, port) for host, port in config["memcached"]]
        return config


def server_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9999`` for IPv6) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--server: expected HOST:PORT, not {text!r}")
    return host, int(port)


def makeProxyService(config: ProxyOptions, listen: Listen = _listening) -> service.IService:
    """A TCP service running the caching proxy (in ``--workers`` processes);
    ``listen`` makes its listener (a worker's adopts the parent's socket)."""
    from twisted.internet import reactor

    if config["workers"] > 1:
        return _workers(config, proxy_settings(config))

    from .balancer import Balancer
    from .cache import MemoryCache
    from .proxy import CacheProxyFactory
    from .upstream import TCPConnector, UpstreamPool

    cache = MemoryCache(config["cache-size"], reactor, grace=config["stale-if-error"])
    several = len(config.servers) > 1
    pools = [
        UpstreamPool(
            TCPConnector(reactor, host, port, timeout=config["timeout"]),
            reactor,
            max_connections=config["upstream-connections"],
            # With several servers the balancer retries, on the others first.
            retries=1 if several else config["retries"],
            retry_delay=config["retry-delay"],
            timeout=config["timeout"],
            pipeline=config["upstream-pipeline"],
        )
        for host, port in config.servers
    ]
    pool: UpstreamPool | Balancer = pools[0]
    if several:
        pool = Balancer(
            pools,
            reactor,
            rounds=config["retries"],
            retry_delay=config["retry-delay"],
            timeout=config["timeout"],
            retry_timeouts=bool(config["retry-timeouts"]),
            interval=config["health-interval"],
        )
    shared = None
    if config["memcached"]:
        from .sharedcache import SharedCache

        shared = SharedCache(
            config["memcached"],
            reactor,
            prefix=config["memcached-prefix"],
            timeout=config["memcached-timeout"] / 1000,
            lock_wait=config["memcached-lock-wait"] / 1000,
        )
    factory = CacheProxyFactory(
        cache, pool, verbose=config["verbose"], shared=shared, **config.common()
    )
    return _operated(config, factory, listen(config, factory, proxy_settings(config)))


def _bytes(size: int) -> str:
    """A byte count the way ``--cache-size`` takes it (64M, 512K, 1000)."""
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return f"{size} bytes"


def proxy_settings(config: ProxyOptions) -> str:
    """The proxy's start-up line after its address."""
    stale = config["stale-if-error"]
    depth = config["upstream-pipeline"]
    servers = config.servers or [(config["server-host"], config["server-port"])]
    where = ", ".join(address(host, port) for host, port in servers)
    each = " each" if len(servers) > 1 else ""
    upstream = (
        f"in front of the server{'s' if len(servers) > 1 else ''} at {where} "
        f"({config['upstream-connections']} connections{each}, "
        f"{'no pipelining' if depth == 1 else f'pipelining {depth} deep'}, "
        f"{config['retries']} attempts, timeout {_seconds(config['timeout'])}"
    )
    if len(servers) > 1:
        interval = config["health-interval"]
        upstream += (
            f", health checks {'every ' + _seconds(interval) if interval else 'passive'}, "
            f"{'timeouts retried' if config['retry-timeouts'] else 'timeouts not retried'}"
        )
    upstream += ")"
    cache = (
        f"cache {_bytes(config['cache-size'])}, "
        f"stale-if-error {_seconds(stale) if stale else 'off'}"
    )
    if config["memcached"]:
        nodes = ", ".join(address(host, port) for host, port in config["memcached"])
        cache += (
            f", shared tier on memcached {nodes} (prefix {config['memcached-prefix']!r}, "
            f"lookup timeout {config['memcached-timeout']} ms"
        )
        wait = config["memcached-lock-wait"]
        cache += f", lock wait {wait} ms)" if wait else ")"
    return f"{upstream}; {cache}; {_limits(config)}"


proxy = TapEntry(ProxyOptions, makeProxyService)

#: The services by twistd subcommand (a worker process looks its own up).
ENTRIES = {"cacheserver": server, "cacheproxy": proxy}
