"""The proxy's seams, declared as zope interfaces the way Twisted declares
its own (``twisted.internet.interfaces``, ``twisted.names``' resolvers):
what the proxy factory needs of a cache, of a shared tier, of its way to
the servers, and what it tells whoever observes it. Each implementation
says ``@implementer(...)`` and the tests check it with ``verifyObject``."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

from ..transport import wire

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from .entry import Entry
    from .events import Answered

#: What a fetch fires with: the answer's header and data, and when the request left.
Answer = tuple[wire.Header, bytes, float]


class ICache(Interface):
    """Stored answers in this process: encoded answers by key (the S flag
    byte and the request data), bounded by bytes."""

    grace = Attribute("Seconds past its lifetime an entry is still kept (stale-if-error).")
    max_bytes = Attribute("What the stored entries may cost in all, in bytes.")
    entries = Attribute("How many answers are stored.")
    bytes = Attribute("What they cost against the bound.")
    evictions = Attribute("How many were dropped to make room.")

    def get(key: builtins.bytes) -> Entry | None:
        """The `entry.Entry` stored for ``key``, fresh or within its grace, or None."""

    def put(key: builtins.bytes, entry: Entry) -> None:
        """Store ``entry`` for ``key``, replacing any older one."""

    def delete(key: builtins.bytes) -> None:
        """Forget ``key`` if it is stored."""

    def clear() -> int:
        """Forget every entry (a purge); how many there were."""

    def purge(keys: Iterable[builtins.bytes]) -> int:
        """Forget the entries stored under ``keys``; how many of them there were."""


class ISharedTier(Interface):
    """A second cache level shared with other proxies, asked on a miss
    before the server (`sharedcache.SharedCache`)."""

    purged = Attribute(
        "Called with no arguments when another proxy purged the tier (set by the proxy)."
    )
    nodes = Attribute("Its memcached nodes, each with ``host``, ``port`` and ``state``.")

    def counters() -> dict[str, int]:
        """What the tier has done so far (lookups, hits, ...), for the figures."""

    def get(key: bytes) -> Deferred[Entry | None]:
        """A Deferred firing with the `entry.Entry` stored for ``key`` or None; never fails."""

    def put(key: bytes, entry: Entry) -> None:
        """Store ``entry`` for every proxy; errors are dropped (it is only a hint)."""

    def start() -> None:
        """Connect to the nodes."""

    def stop() -> None:
        """Disconnect from the nodes."""

    def purge() -> Deferred[int]:
        """Hide every shared entry; a Deferred firing with the number of nodes purged."""

    def delete(keys: Iterable[bytes]) -> Deferred[int]:
        """Remove the entries of ``keys``; a Deferred firing with how many there were."""


class IUpstreamServer(Interface):
    """One calculator server as the figures show it: its address, whether it
    is in, and what was asked of it."""

    address = Attribute("HOST:PORT, as every figure and log line names the server.")
    healthy = Attribute("Whether misses are sent to it (False while taken out).")
    outstanding = Attribute("Requests sent to it and not yet answered.")
    ejected = Attribute("Times it was taken out after failures.")
    tally = Attribute(
        "Its `upstream.Tally`: answers and failures by kind (health probes "
        "included), and when it last gave each."
    )


class IFetcher(Interface):
    """The proxy's way to the servers on a miss: one server's pool
    (`upstream.UpstreamPool`) or several behind a `balancer.Balancer`."""

    servers = Attribute("The `IUpstreamServer`s it sends to, in the order given.")
    idle = Attribute("Open connections waiting for a request, over every server.")
    connections = Attribute("Connections open or being opened, over every server.")
    framed = Attribute("Whether every server's last answer carried L (PROTOCOL.md 6).")
    pipelining = Attribute("Whether requests may be pipelined to any server.")

    def fetch(frame: bytes) -> Deferred[Answer]:
        """Send one request frame; a Deferred firing with ``(header, data,
        sent)`` (``sent``: the clock time it left) or failing with
        `failures.UpstreamError`."""

    def close() -> None:
        """Close idle connections and stop any timers (on shutdown)."""


class IProxyObserver(Interface):
    """Told what the proxy did (`operations.metrics.ProxyMetrics`): one
    `events.Answered` per request, once its answer is known."""

    def answered(event: Answered) -> None:
        """The proxy decided the answer to one request (`events.Answered`)."""

    def purged(count: int) -> None:
        """A purge removed ``count`` answers from memory."""
