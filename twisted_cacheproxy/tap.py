"""twistd options and services: ``twistd -n cacheserver`` and ``twistd -n cacheproxy``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import internet, service
from twisted.python import usage

from . import wire


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


class _CommonOptions(usage.Options):
    """What both services take: where to listen and how to treat connections."""

    optParameters: list[list[Any]] = [
        ["interface", "i", "127.0.0.1", "The interface to listen on."],
        [
            "max-message-size",
            None,
            wire.MAX_MESSAGE_SIZE,
            "Largest message in bytes, header included (256..65535).",
            int,
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Close connections with no complete request for this many seconds (0: never).",
            float,
        ],
        [
            "max-connections",
            None,
            10_000,
            "Most concurrent client connections; more are closed at once.",
            int,
        ],
        [
            "backlog",
            None,
            511,
            "Connections the kernel may queue before they are accepted "
            "(capped by net.core.somaxconn).",
            int,
        ],
    ]

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

    synopsis = "[options]"
    longdesc = "A calculator server for the course protocol (text and pickle payloads)."
    optParameters = [
        ["port", "p", 9999, "The TCP port to listen on.", int],
        [
            "max-age",
            None,
            wire.FOREVER,
            "Cache lifetime in seconds given to answers (65535: forever).",
            int,
        ],
        *_CommonOptions.optParameters,
    ]
    optFlags = [["no-cache", None, "Mark every answer as not cacheable (C=0)."]]

    def postOptions(self) -> None:
        super().postOptions()
        if not 0 <= self["max-age"] <= wire.FOREVER:
            raise usage.UsageError("--max-age must be 0..65535")


def _listening(config: _CommonOptions, factory) -> service.IService:
    """A service listening on ``--port`` and ``--interface`` whose connections
    send at once (`endpoint`); a port that cannot be bound stops twistd at
    start-up, as Twisted's own strports services do."""
    from twisted.internet import reactor

    from .endpoint import TCPServerEndpoint

    endpoint = TCPServerEndpoint(reactor, config["port"], config["interface"], config["backlog"])
    listening = internet.StreamServerEndpointService(endpoint, factory)
    listening._raiseSynchronously = True
    return listening


def makeServerService(config: ServerOptions) -> service.IService:
    """A TCP service serving the calculator."""
    from .server import CalculatorServerFactory

    factory = CalculatorServerFactory(
        max_age=config["max-age"], cache=not config["no-cache"], **config.common()
    )
    return _listening(config, factory)


@dataclass(frozen=True)
class TapEntry:
    """What a twistd ``ServiceMaker`` looks up by name: options and a maker."""

    Options: type[usage.Options]
    makeService: Callable[[Any], service.IService]


server = TapEntry(ServerOptions, makeServerService)


class ProxyOptions(_CommonOptions):
    """Options of ``twistd cacheproxy``."""

    synopsis = "[options]"
    longdesc = "A caching proxy for the calculator protocol, in front of a calculator server."
    optParameters = [
        ["port", "p", 9998, "The TCP port to listen on.", int],
        ["server-host", None, "127.0.0.1", "The calculator server's host."],
        ["server-port", None, 9999, "The calculator server's port.", int],
        [
            "cache-size",
            None,
            64 << 20,
            "Most bytes the cache may hold, with K, M, G suffixes (default 64M).",
            _size,
        ],
        ["retries", None, 5, "Connection attempts per miss before answering 500.", int],
        ["retry-delay", None, 0.5, "Seconds before the second attempt; doubles each time.", float],
        ["timeout", None, 10.0, "Seconds one miss may take upstream, retries included.", float],
        [
            "stale-if-error",
            None,
            0.0,
            "Serve answers up to N s past their lifetime while the server is unreachable (0: off).",
            float,
        ],
        [
            "upstream-connections",
            None,
            32,
            "Most connections to the server, kept open and reused.",
            int,
        ],
        [
            "upstream-pipeline",
            None,
            1,
            "Most requests in flight on one server connection (1: no pipelining). "
            "Only for servers that frame by length, as ours does; not the course server.",
            int,
        ],
        *_CommonOptions.optParameters,
    ]
    optFlags = [["verbose", "v", "Log every hit and miss (at debug level)."]]

    def postOptions(self) -> None:
        super().postOptions()
        self.checkPort("server-port")
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


def makeProxyService(config: ProxyOptions) -> service.IService:
    """A TCP service running the caching proxy."""
    from .proxy import CacheProxyFactory

    factory = CacheProxyFactory(
        server_host=config["server-host"],
        server_port=config["server-port"],
        cache_size=config["cache-size"],
        retries=config["retries"],
        retry_delay=config["retry-delay"],
        timeout=config["timeout"],
        stale_if_error=config["stale-if-error"],
        upstream_connections=config["upstream-connections"],
        upstream_pipeline=config["upstream-pipeline"],
        verbose=config["verbose"],
        **config.common(),
    )
    return _listening(config, factory)


proxy = TapEntry(ProxyOptions, makeProxyService)
