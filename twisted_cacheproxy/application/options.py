"""The options of ``twistd cacheserver`` and ``twistd cacheproxy``
(`usage.Options`, as Twisted's own plugins take theirs), their checks, and
their hand-over to a worker process of ``--workers``."""

from __future__ import annotations

import re
import sys
from typing import Any, NamedTuple, cast

from twisted import __version__ as twisted_version
from twisted.internet.endpoints import quoteStringArgument
from twisted.python import usage

from .. import __version__
from ..operations.units import format_size, parse_size
from ..proxy.sharedcache import check_prefix
from ..transport import numerals, wire
from ..transport.addresses import parse_address, parse_port
from ..transport.endpoint import kind
from .secretfile import read_secret_file


def _integer(text: str) -> int:
    """A whole number in ASCII digits, refused in words that a user reads."""
    return numerals.integer(text)


def _number(text: str) -> float:
    """A number of seconds in ASCII digits (a decimal point allowed; never
    ``inf`` or ``nan``)."""
    return numerals.decimal(text)


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
        self.options.given.add(parameterName)


#: Watching and steering a running service (the operations layer): both services take them.
_OPERATING_OPTIONS: list[list[Any]] = [
    [
        "admin-port",
        None,
        0,
        "Serve the admin site (/status, /metrics, /stats.json, /healthz, and /purge on the "
        "proxy) on this TCP port (0: off).",
        _integer,
    ],
    ["admin-interface", None, "127.0.0.1", "The interface the admin site listens on."],
    [
        "admin-listen",
        None,
        None,
        "Serve the admin site on this Twisted endpoint description instead of --admin-port "
        "(unix:/run/cacheproxy/admin.sock, tcp6:9100:interface=\\:\\:1); with --workers, "
        "{worker} in it stands for each worker's number.",
    ],
    [
        "admin-token",
        None,
        None,
        "POSTs to the admin site need 'Authorization: Bearer TOKEN' (every user sees a "
        "command line: prefer --admin-token-file).",
    ],
    [
        "admin-token-file",
        None,
        None,
        "Read the admin token from this file, which only its owner may read.",
    ],
    ["access-log", None, None, "Write one line per answered request to this file ('-': stdout)."],
    [
        "stats-interval",
        None,
        60.0,
        "Log a summary line every this many seconds and at shutdown (0: off).",
        _number,
    ],
]

#: The kinds of ``--listen`` whose listening socket a parent can hand its
#: ``--workers`` (`parent`); on an ``ssl:`` one each worker speaks TLS with
#: the key and certificate files its description names.
HANDED_ON = ("tcp", "tcp6", "sendatonce", "sendatonce6", "unix", "systemd", "ssl")

#: A token travels in an HTTP header: printable ASCII, no spaces.
_TOKEN = re.compile(rb"[\x21-\x7e]+")


class CommonOptions(usage.Options):
    """What both services take: where to listen and how to treat connections.

    Run by twistd (as its subcommand), a bad option ends twistd at once with
    the error first and a pointer to ``--help``, instead of twistd's whole
    help followed by the error."""

    #: The twistd subcommand, for messages.
    tapname = ""
    #: The worker's number (from 1) in a worker process of ``--workers``.
    worker: int | None = None
    #: The admin site's token, from ``--admin-token`` or ``--admin-token-file``.
    adminToken: bytes | None = None
    #: Options never put on a worker's command line, which every user of the
    #: host can read (``ps``): the worker reads them on its standard input.
    SECRET = ("admin-token",)

    optFlags: list[list[Any]] = [
        [
            "admin-token-for-reads",
            None,
            "Every admin page but /healthz needs the token too, not only POSTs.",
        ]
    ]

    optParameters: list[list[Any]] = [
        ["interface", "i", "127.0.0.1", "The interface --port listens on."],
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
            15.0,
            "Seconds a stopping service (or worker) may take to answer the requests it "
            "has read, waiting for the server on a miss; then it closes what is left.",
            _number,
        ],
        *_OPERATING_OPTIONS,
    ]

    def __init__(self) -> None:
        #: The parameters given on the command line (not left at their defaults).
        self.given: set[str] = set()
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)
        # --help shows an opt_ method's docstring as written: one line each.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items() if doc}
        self["admin-host"] = []
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted endpoint description instead of --port and
        --interface; repeatable (tcp:9998:interface=127.0.0.1,
        tcp6:9998:interface=\\:\\:1, unix:/run/cacheproxy.sock,
        ssl:9443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0)."""
        self["listen"].append(description)

    def listens(self) -> list[str]:
        """Where the service listens: the ``--listen`` descriptions, else
        ``--port`` on ``--interface`` as a ``tcp:`` description."""
        if self["listen"]:
            return list(self["listen"])
        interface = quoteStringArgument(self["interface"])
        return [f"tcp:{self['port']}:interface={interface}:backlog={self['backlog']}"]

    def opt_admin_host(self, name: str) -> None:
        """A name the admin site answers for, besides IP addresses and localhost; repeatable."""
        self["admin-host"].append(name.lower())

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
        print(f"{self.tapname} (twisted-cacheproxy) {__version__}, Twisted {twisted_version}")
        sys.exit(0)

    def postOptions(self) -> None:
        self.checkPort("port")
        self.checkListen()
        # 256: the least that still holds every error answer of ours.
        if not 256 <= self["max-message-size"] <= wire.LENGTH_LIMIT:
            raise usage.UsageError("--max-message-size must be 256..65535")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout cannot be negative")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["backlog"] < 1:
            raise usage.UsageError("--backlog must be at least 1")
        self.checkAdmin()
        if self["stats-interval"] < 0:
            raise usage.UsageError("--stats-interval cannot be negative")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["shutdown-grace"] < 0:
            raise usage.UsageError("--shutdown-grace cannot be negative")
        if self["workers"] > 1:
            self.checkWorkers()

    def checkListen(self) -> None:
        """``--listen`` replaces ``--port`` and ``--interface``: not both."""
        shorthand = sorted(self.given & {"port", "interface"})
        if self["listen"] and shorthand:
            given = " and ".join(f"--{name}" for name in shorthand)
            raise usage.UsageError(f"give --listen or {given}, not both")
        for description in self["listen"]:
            if ":" not in description:
                raise usage.UsageError(
                    f"--listen {description}: not an endpoint description "
                    f"(tcp:{description} for a TCP port)"
                )

    def checkAdmin(self) -> None:
        """The admin site's options: one place to listen, of its own; one token."""
        if self["admin-port"] and self["admin-listen"]:
            raise usage.UsageError("give --admin-port or --admin-listen, not both")
        if self["admin-port"]:
            self.checkPort("admin-port")
            if self["workers"] == 1 and not self["listen"] and self["admin-port"] == self["port"]:
                raise usage.UsageError(
                    f"--admin-port {self['admin-port']} is --port too: "
                    "the admin site needs a port of its own"
                )
        if self["admin-token"] is not None and self["admin-token-file"] is not None:
            raise usage.UsageError("give --admin-token or --admin-token-file, not both")
        self.loadToken()
        if self["admin-token-for-reads"] and self.adminToken is None:
            raise usage.UsageError(
                "--admin-token-for-reads needs --admin-token-file (or --admin-token)"
            )

    def loadToken(self) -> None:
        """Set `adminToken` from ``--admin-token`` or the file ``--admin-token-file`` names."""
        option, path = "admin-token", self["admin-token-file"]
        if path is not None:
            option = "admin-token-file"
            try:
                token: bytes | None = read_secret_file(path)
            except ValueError as e:
                raise usage.UsageError(f"--admin-token-file: {e}") from None
        else:
            given = self["admin-token"]
            token = None if given is None else given.encode("utf-8", "surrogateescape")
        if token is not None and not _TOKEN.fullmatch(token):
            raise usage.UsageError(f"--{option}: a token is printable ASCII without spaces")
        self.adminToken = token

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
        if first and not self["listen"] and first <= self["port"] <= last:
            raise usage.UsageError(
                f"--admin-port {first} with --workers {count}: the workers' admin "
                f"sites take ports {first}..{last}, which include --port {self['port']}"
            )
        if self["admin-listen"] and "{worker}" not in self["admin-listen"]:
            raise usage.UsageError(
                f"--admin-listen with --workers {count}: each worker needs an admin site "
                "of its own: put {worker} in it (unix:/run/cacheproxy/admin-{worker}.sock)"
            )
        if self["access-log"] == "-":
            raise usage.UsageError("--access-log - cannot go with --workers: give a file")
        for description in self["listen"]:
            if kind(description) not in HANDED_ON:
                raise usage.UsageError(
                    f"--listen {description} cannot go with --workers: the workers can be "
                    "handed a listening socket (tcp:, tcp6:, unix:, systemd:, ssl:), not a "
                    f"{kind(description)}: endpoint"
                )

    def portable(self) -> dict[str, Any]:
        """The parsed options, as JSON takes them (for a worker's command
        line), except the `SECRET` ones (`secrets`)."""
        return {k: v for k, v in self.items() if k not in self.SECRET}

    def secrets(self) -> dict[str, Any]:
        """The `SECRET` options given, as JSON takes them (for a worker's standard input)."""
        return {k: self[k] for k in self.SECRET if self[k] is not None}

    @classmethod
    def restore(cls, values: dict[str, Any], worker: int) -> CommonOptions:
        """The options of worker number ``worker`` (from 1) of a parent whose
        options were ``values`` (`portable` and `secrets`): one process, with
        the admin site on the worker's own port (``--admin-port`` + worker -
        1) or its own ``--admin-listen`` (``{worker}``: its number)."""
        config = cls()
        config.update(values)
        config.worker = worker
        config["workers"] = 1
        if config["admin-port"]:
            config["admin-port"] += worker - 1
        if config["admin-listen"]:
            config["admin-listen"] = config["admin-listen"].replace("{worker}", str(worker))
        config.loadToken()
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


class ServerOptions(CommonOptions):
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
        *CommonOptions.optParameters,
    ]
    optFlags = [["no-cache", None, "Mark every answer as not cacheable (C=0)."]]

    def postOptions(self) -> None:
        super().postOptions()
        if not 0 <= self["max-age"] <= wire.FOREVER:
            raise usage.UsageError("--max-age must be 0..65535")


class ProxyOptions(CommonOptions):
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
            "Most bytes the cache may hold, with a K, M or G suffix.",
            parse_size,
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
        *CommonOptions.optParameters,
    ]
    optFlags = [
        [
            "verbose",
            "v",
            "Log one line per request at debug level: client, cache status, times and the request.",
        ],
        [
            "retry-timeouts",
            None,
            "With several --server: send a miss that timed out on one server to another "
            "(each then has half of --timeout).",
        ],
        [
            "memcached-insecure",
            None,
            "Allow memcached nodes beyond loopback without --memcached-secret-file "
            "(whoever can write to them can then make every proxy serve wrong answers).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The ``--server`` servers, in order.
        self.servers: list[Server] = []
        self["memcached"] = []
        self["memcached-secret-file"] = []
        # --help shows the default as it is written, not in bytes.
        self.defaults["cache-size"] = format_size(self["cache-size"])

    def opt_server(self, value: str) -> None:
        """A calculator server as HOST:PORT ([::1]:9999 for IPv6), or over TLS
        as tls:HOST:PORT[:trustRoots=PATH] (the certificates to trust, a PEM
        file or a folder of them; default: this host's); repeat for several
        (balanced, with health checks and failover). Default: the one
        --server-host and --server-port give."""
        if value.startswith("tls:"):
            self.servers.append(_tls_server(value))
        else:
            self.servers.append(Server(*_address("server", value)))

    def opt_memcached(self, value: str) -> None:
        """A memcached node HOST:PORT for the shared cache tier; repeat it
        for several nodes (every proxy of a site lists the same ones)."""
        self["memcached"].append(_address("memcached", value))

    def opt_memcached_secret_file(self, path: str) -> None:
        """A file holding the secret that signs shared-tier entries, readable
        by its owner only, the same on every proxy of a site. Repeat it with
        the older secret during a rotation: the first signs, all verify."""
        self["memcached-secret-file"].append(path)

    def postOptions(self) -> None:
        super().postOptions()
        self.checkPort("server-port")
        if not self.servers:
            self.servers = [Server(self["server-host"], self["server-port"])]
        if len({server[:2] for server in self.servers}) != len(self.servers):
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
        if self["memcached-secret-file"] and not self["memcached"]:
            raise usage.UsageError("--memcached-secret-file needs --memcached")
        if len(set(self["memcached"])) != len(self["memcached"]):
            raise usage.UsageError("--memcached: the same node is given twice")
        if self["workers"] > 1 and not self["memcached"]:
            raise usage.UsageError(
                "--workers needs --memcached: each worker has its own memory cache, "
                "and only the shared tier lets them share answers"
            )
        try:
            check_prefix(self["memcached-prefix"])
        except ValueError as e:
            raise usage.UsageError(f"--memcached-prefix: {e}") from None

    def portable(self) -> dict[str, Any]:
        return {**super().portable(), "servers": self.servers}

    @classmethod
    def restore(cls, values: dict[str, Any], worker: int) -> ProxyOptions:
        config = cast(ProxyOptions, super().restore(values, worker))
        config.servers = [Server(*server) for server in config.pop("servers")]
        config["memcached"] = [(host, port) for host, port in config["memcached"]]
        return config


class Server(NamedTuple):
    """A calculator server of ``--server``: where, and whether over TLS with
    which certificates trusted (None: this host's)."""

    host: str
    port: int
    tls: bool = False
    trust: str | None = None


def _tls_server(text: str) -> Server:
    """The `Server` of ``tls:HOST:PORT[:trustRoots=PATH]`` (Twisted's ``tls:``
    client endpoint; colons in HOST escaped with a backslash, or HOST in
    brackets); a usage error saying what is wrong otherwise."""
    fields = [""]
    escaped = bracketed = False
    for c in text[len("tls:") :]:
        if escaped or c not in "\\:" or bracketed:
            fields[-1] += c
            escaped = False
            bracketed = bracketed != (c in "[]")
        elif c == "\\":
            escaped = True
        else:
            fields.append("")
    positional = [f for f in fields if "=" not in f]
    keywords = dict(f.split("=", 1) for f in fields if "=" in f)
    if len(positional) != 2 or not positional[0]:
        raise usage.UsageError(f"--server {text}: not tls:HOST:PORT[:trustRoots=PATH]")
    host, port = positional
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    unknown = sorted(set(keywords) - {"trustRoots"})
    if unknown:
        raise usage.UsageError(f"--server {text}: unknown argument {unknown[0]} (trustRoots=PATH)")
    try:
        number = parse_port(port)
    except ValueError as e:
        raise usage.UsageError(f"--server: {e}") from None
    return Server(host, number, True, keywords.get("trustRoots"))


def _address(option: str, text: str) -> tuple[str, int]:
    """The (host, port) of an option's ``HOST:PORT`` value, or a usage error."""
    try:
        return parse_address(text)
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None
