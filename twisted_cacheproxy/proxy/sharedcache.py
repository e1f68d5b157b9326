"""The shared cache tier (L2): answers kept in memcached, for every proxy
pointed at the same nodes.

One `MemCacheProtocol` connection per node, kept up by a reconnecting
client factory with backoff; keys spread over the nodes by `ring.Ring`. The
tier never fails a request: a node that is down, slow or stalled, or a value
that is not ours, is an L2 miss, and the proxy asks the server.

What memcached holds, per answer (`encode_entry`): a fixed header, the
proxy's whole cache key, and the stored answer::

    magic "TCPX" (4) | version 1 (1) | reserved 0 (1) | lifetime (u16)
    | stored, wall-clock seconds (float64) | key length (u16)
    | answer length (u32) | key | answer

``stored`` is when the request that fetched the answer was sent, so every
proxy computes the same age. The memcached key is a fixed-length digest,
``<prefix><generation>:<sha256 of our key, hex>``; the generation is a number
kept on each node under ``<prefix>gen``, read along with every lookup, so
bumping it (`SharedCache.purge`, or ``incr <prefix>gen 1`` by hand) hides
every entry at once without ``flush_all``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.memcache import MemCacheProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..transport import wire
from ..transport.addresses import address
from .cache import Entry
from .interfaces import ISharedTier
from .ring import Ring

log = Logger()


MAGIC = b"TCPX"
VERSION = 1
#: The fixed header of a stored entry (see the module's docstring).
ENTRY_HEADER = struct.Struct("!4sBBHdHI")
#: The memcached flags word of our values: a value with other flags is not ours.
FLAGS = 0x7443
#: Default ``--memcached-timeout``: the most one L2 lookup may take, in ms.
DEFAULT_TIMEOUT_MS = 50
#: Default ``--memcached-prefix``.
DEFAULT_PREFIX = "cacheproxy:"
#: Longest prefix: with the generation and the digest a key stays under
#: memcached's 250 bytes.
MAX_PREFIX = 100
#: Most commands one node may have unanswered; past it, lookups on that
#: node are misses at once (a stalled memcached must not pile up work).
MAX_OUTSTANDING = 256

#: How often a proxy waiting on another's lock looks for its answer, in seconds.
LOCK_POLL = 0.005
#: Lifetime of a lock entry in memcached, in seconds (its clock ticks in
#: whole seconds: 2 holds it at least one).
LOCK_EXPIRY = 2
#: How often each node's generation is read, in seconds, so that a purge
#: by another proxy empties this one's memory cache within about as long.
GENERATION_POLL = 1.0
#: What `SharedCache._answered` gives for an entry that is simply not there.
_ABSENT: Any = object()
#: What a lookup gives whose command failed (its connection lost).
_FAILED: Any = object()

#: The extension word of a stored answer: ours (L), from a cache (H).
_HIT = wire.EXT_FRAMED | wire.EXT_FROM_CACHE


# --- the entry format -------------------------------------------------------------


def encode_entry(key: bytes, entry: Entry) -> bytes:
    """The bytes memcached keeps for ``entry`` under our ``key``."""
    header = ENTRY_HEADER.pack(
        MAGIC, VERSION, 0, entry.lifetime, entry.stored, len(key), len(entry.answer)
    )
    return header + key + entry.answer


def decode_entry(key: bytes, value: bytes) -> Entry | None:
    """The entry in ``value`` if it is ours, whole, and stored for ``key``;
    None for anything else (garbage, another version, truncated or padded,
    another key under a colliding digest, an answer that may not be cached)."""
    size = ENTRY_HEADER.size
    if len(value) < size:
        return None
    magic, version, _, lifetime, stored, key_length, answer_length = ENTRY_HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        return None
    if len(value) != size + key_length + answer_length or key_length != len(key):
        return None
    if value[size : size + key_length] != key or not math.isfinite(stored):
        return None
    answer = value[size + key_length :]
    if len(answer) < wire.HEADER_SIZE:
        return None
    header = wire.decode_header(answer)
    if (
        header.length != len(answer)
        or header.request
        or not header.cache
        or header.max_age != lifetime
        or not lifetime
        or header.status >= wire.SERVER_ERROR
    ):
        return None
    if header.ext != _HIT:
        answer = wire.rewrite(answer, ext=_HIT)
    return Entry(answer, stored, lifetime)


def expiry(entry: Entry, now: float) -> int | None:
    """The expiry to give memcached: the answer's remaining lifetime in whole
    seconds (never longer), 0 (none) for answers cacheable for ever; None
    when it has no lifetime left."""
    if entry.lifetime == wire.FOREVER:
        return 0
    left = math.floor(entry.lifetime - entry.age(now))
    return left if left >= 1 else None


def check_prefix(prefix: str) -> bytes:
    """``prefix`` as memcached key bytes; ValueError when memcached cannot take it."""
    raw = prefix.encode("utf-8")
    if len(raw) > MAX_PREFIX:
        raise ValueError(f"at most {MAX_PREFIX} bytes")
    if any(b <= 32 or b == 127 for b in raw):
        raise ValueError("no spaces or control characters (memcached keys cannot hold them)")
    return raw


# --- one memcached node -------------------------------------------------------------


class _NodeProtocol(MemCacheProtocol):
    """Twisted's memcache client, telling its node when it connects and goes."""

    factory: _NodeFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.node._connected(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.node._lost(self, reason)


class _NodeFactory(protocol.ReconnectingClientFactory):
    """Keeps one connection to a node, retrying with exponential backoff."""

    noisy = False
    protocol = _NodeProtocol  # type: ignore[assignment]
    maxDelay = 5
    initialDelay = 0.2

    def __init__(self, node: Node) -> None:
        self.node = node
        self.clock = node.clock  # type: ignore[assignment]
        self.delay = self.initialDelay

    def buildProtocol(self, addr: Any) -> _NodeProtocol:  # type: ignore[override]
        p = _NodeProtocol(timeOut=self.node.command_timeout)
        p.factory = self
        p.callLater = self.node.clock.callLater  # type: ignore[assignment]
        return p

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.node._down(reason)
        super().clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        super().clientConnectionLost(connector, reason)


class Node:
    """One memcached server: its connection when it answers, its generation.

    It counts as up from the moment it answered a ``version`` on a new
    connection until that connection is lost or times out; each change
    between up and down is logged once."""

    def __init__(
        self,
        host: str,
        port: int,
        clock: IReactorTime,
        genkey: bytes,
        *,
        command_timeout: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.clock = clock
        self.genkey = genkey
        self.command_timeout = command_timeout
        self.name = f"memcached {address(host, port)}"
        #: The connection, only while the node answers.
        self.protocol: MemCacheProtocol | None = None
        #: The namespace generation last read from the node (None: unknown,
        #: as while it is down).
        self.generation: bytes | None = None
        #: The last generation known, kept while the node is down: a purge
        #: made meanwhile by another proxy is noticed once it is back.
        self.known: bytes | None = None
        #: Called when the generation read moves on from the known one: the
        #: node was purged by another proxy (or by hand).
        self.purged: Callable[[], None] = lambda: None
        #: A purge asked for while the node was down, made once it is back.
        self.purge_pending = False
        #: Commands sent and not answered yet.
        self.outstanding = 0
        self.state = "starting"
        self.factory = _NodeFactory(self)
        self._connector: Any = None

    def start(self, reactor: Any) -> None:
        """Start connecting (and reconnecting whenever the connection goes)."""
        self.factory.continueTrying = True
        self.state = "starting"
        self._connector = reactor.connectTCP(
            self.host, self.port, self.factory, timeout=max(1.0, self.command_timeout)
        )

    def stop(self) -> None:
        """Stop reconnecting and close the connection."""
        self.state = "stopped"  # nothing to log from here on
        self.factory.stopTrying()
        if self._connector is not None:
            self._connector.disconnect()

    # --- connection state ---

    def _connected(self, proto: _NodeProtocol) -> None:
        self.send(proto.version()).addCallbacks(lambda _: self._up(proto), lambda _: None)

    def _up(self, proto: _NodeProtocol) -> None:
        if proto._disconnected or self.state == "stopped":
            return
        self.factory.resetDelay()
        self.protocol = proto
        if self.state != "up":
            self.state = "up"
            log.info("{node} connected: shared cache tier on", node=self.name)
        if self.purge_pending:
            self.purge_pending = False
            self.bump(proto)
        else:
            self.refresh_generation()

    def _lost(self, proto: _NodeProtocol, reason: Failure) -> None:
        if self.protocol is proto or self.protocol is None:
            self._down(reason)

    def _down(self, reason: Failure) -> None:
        self.protocol = None
        self.generation = None
        if self.state in ("down", "stopped"):
            return
        was, self.state = self.state, "down"
        why = reason.getErrorMessage()
        if was == "up":
            log.warn(
                "{node} lost ({why}): its keys go to the server until it is back; "
                "reconnecting with backoff",
                node=self.name,
                why=why,
            )
        else:
            log.warn(
                "{node} unreachable ({why}): its keys go to the server until it "
                "answers; retrying with backoff",
                node=self.name,
                why=why,
            )

    # --- commands ---

    def send(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d``, a command just sent, until it is answered."""
        self.outstanding += 1

        def answered(result: object) -> object:
            self.outstanding -= 1
            return result

        return d.addBoth(answered)

    def available(self) -> MemCacheProtocol | None:
        """The connection, when the node is up and not overloaded."""
        if self.generation is None or self.outstanding >= MAX_OUTSTANDING:
            return None
        return self.protocol

    def refresh_generation(self) -> None:
        """Read the namespace generation, creating it when the node has none
        (a fresh or restarted memcached): wall-clock seconds, so a recreated
        generation never brings back entries of an older one."""
        proto = self.protocol
        if proto is None:
            return

        def got(result: tuple[int, bytes | None]) -> defer.Deferred | None:
            value = result[1]
            if value is not None:
                self.set_generation(value)
                return None
            created = str(int(self.clock.seconds())).encode()
            return self.send(proto.add(self.genkey, created)).addCallback(lambda _: again())

        def again() -> defer.Deferred | None:
            if self.protocol is not proto:
                return None
            return self.send(proto.get(self.genkey)).addCallback(
                lambda result: self.set_generation(result[1])
            )

        self.send(proto.get(self.genkey)).addCallback(got).addErrback(lambda _: None)

    def set_generation(self, value: bytes | None, *, ours: bool = False) -> None:
        """Take ``value`` as the node's generation if it is a number; a
        change from the known generation that is not ``ours`` is a purge."""
        self.generation = value.strip() if value and value.strip().isdigit() else None
        if self.generation is None:
            return
        was, self.known = self.known, self.generation
        if was is not None and self.generation != was and not ours:
            self.purged()

    def bump(self, proto: MemCacheProtocol) -> defer.Deferred:
        """Purge the node: a new generation hides every entry. Fires with 1
        once done, 0 if the command failed."""

        def bumped(value: int | bool) -> int:
            if value is False:
                # No generation there: nothing under it can be read, and the
                # one created now (wall-clock seconds) is newer than any.
                self.refresh_generation()
            else:
                # Our own purge: the caller has emptied the memory cache.
                self.set_generation(str(value).encode(), ours=True)
            return 1

        return self.send(proto.increment(self.genkey)).addCallbacks(bumped, lambda _: 0)


# --- the tier ------------------------------------------------------------------------


@implementer(ISharedTier)
class SharedCache:
    """Answers shared through memcached nodes: `get` and `put` for the proxy
    on its L1 misses, `purge` to hide every entry, and the counters."""

    def __init__(
        self,
        nodes: Sequence[tuple[str, int]],
        clock: IReactorTime,
        *,
        reactor: Any = None,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
        lock_wait: float = 0.0,
    ) -> None:
        """``nodes`` are (host, port) pairs; ``clock`` times the lookups and
        gives the wall-clock time (the reactor in production); ``reactor``
        connects (default: the global one); ``timeout`` is the most one
        lookup may take, in seconds, after which it is a miss.

        With ``lock_wait`` (seconds, 0: off), the first proxy to miss a key
        takes a short-lived lock entry (memcached ``add``) and asks the
        server; others that miss it meanwhile wait up to ``lock_wait`` for
        its answer to appear instead of asking the server too."""
        self.clock = clock
        self.reactor = reactor
        self.prefix = check_prefix(prefix)
        self.genkey = self.prefix + b"gen"
        self.timeout = timeout
        self.lock_wait = lock_wait
        # A dead connection is noticed after this long without an answer.
        command_timeout = max(1.0, 20 * timeout)
        self.nodes = [
            Node(host, port, clock, self.genkey, command_timeout=command_timeout)
            for host, port in nodes
        ]
        self.ring: Ring[Node] = Ring(self.nodes, [f"{host}:{port}" for host, port in nodes])
        self.lookups = self.hits = self.timeouts = self.rejected = self.unavailable = 0
        self.stores = self.locks = self.lock_waits = self.lock_hits = 0
        #: Called when a node's generation moves on (a purge anywhere): the
        #: proxy empties its memory cache, whose entries may be purged ones.
        self.purged: Callable[[], None] = lambda: None
        for node in self.nodes:
            node.purged = self._purged
        self._generations = task.LoopingCall(self._read_generations)
        self._generations.clock = clock

    def _purged(self) -> None:
        self.purged()

    def _read_generations(self) -> None:
        for node in self.nodes:
            node.refresh_generation()

    def start(self) -> None:
        """Connect to every node, and read their generations every `GENERATION_POLL`."""
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        for node in self.nodes:
            node.start(reactor)
        self._generations.start(GENERATION_POLL, now=False)

    def stop(self) -> None:
        """Disconnect from every node."""
        if self._generations.running:
            self._generations.stop()
        for node in self.nodes:
            node.stop()

    def counters(self) -> dict[str, int]:
        """What the tier has done so far, for logs and tests."""
        return {
            "l2_lookups": self.lookups,
            "l2_hits": self.hits,
            "l2_timeouts": self.timeouts,
            "l2_rejected": self.rejected,
            "l2_unavailable": self.unavailable,
            "l2_stores": self.stores,
            "l2_locks": self.locks,
            "l2_lock_waits": self.lock_waits,
            "l2_lock_hits": self.lock_hits,
        }

    def _place(self, key: bytes) -> tuple[Node, bytes]:
        digest = hashlib.sha256(key).hexdigest().encode()
        return self.ring.node_for(digest), digest

    def memcached_key(self, node: Node, key: bytes) -> bytes | None:
        """The memcached key of our ``key`` on ``node`` (None: generation unknown)."""
        if node.generation is None:
            return None
        return self.prefix + node.generation + b":" + hashlib.sha256(key).hexdigest().encode()

    def node_for(self, key: bytes) -> Node:
        """The node that holds ``key``'s entry."""
        return self._place(key)[0]

    def get(self, key: bytes) -> defer.Deferred[Entry | None]:
        """A Deferred firing with the stored entry for ``key`` or None (a miss:
        not there, not ours, the node down, or no answer within the
        timeout). It never fails."""
        self.lookups += 1
        node, digest = self._place(key)
        proto = node.available()
        if proto is None or node.generation is None:
            self.unavailable += 1
            return defer.succeed(None)
        generation = node.generation
        mkey = self.prefix + generation + b":" + digest
        result: defer.Deferred[Entry | None] = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._gave_up, result)
        asked = node.send(proto.getMultiple([self.genkey, mkey]))
        # A failed command (the connection lost or timed out) is a miss; the
        # node logs its own state.
        asked.addCallbacks(
            self._answered, lambda _: _FAILED, callbackArgs=(node, generation, key, mkey)
        )
        asked.addErrback(self._broken)
        asked.addCallback(self._settle, result, timer, node, key, mkey)
        return result

    def _broken(self, reason: Failure) -> None:
        log.failure("Unexpected failure reading the shared cache", reason)

    def _gave_up(self, result: defer.Deferred) -> None:
        self.timeouts += 1
        result.callback(None)

    def _settle(
        self,
        entry: Entry | None,
        result: defer.Deferred,
        timer: Any,
        node: Node,
        key: bytes,
        mkey: bytes,
    ) -> None:
        if not timer.active():
            return
        timer.cancel()
        if entry is _FAILED:  # the connection went during the lookup
            self.unavailable += 1
            entry = None
        if entry is _ABSENT:
            if self.lock_wait:
                self._lock(node, key, mkey, result)
                return
            entry = None
        if entry is not None:
            self.hits += 1
        result.callback(entry)

    # --- the lock: one proxy asks the server, the others wait for its answer ---

    def _lock(self, node: Node, key: bytes, mkey: bytes, result: defer.Deferred) -> None:
        proto = node.available()
        if proto is None:
            result.callback(None)
            return
        deadline = self.clock.callLater(self.lock_wait, result.callback, None)
        lkey = self.prefix + b"lock:" + mkey[len(self.prefix) :]
        taken = node.send(proto.add(lkey, b"1", expireTime=LOCK_EXPIRY))
        taken.addCallbacks(
            self._locked, lambda _: True, callbackArgs=(node, key, mkey, result, deadline)
        )
        taken.addErrback(self._broken)

    def _locked(
        self,
        ours: bool,
        node: Node,
        key: bytes,
        mkey: bytes,
        result: defer.Deferred,
        deadline: Any,
    ) -> None:
        if not deadline.active():
            return
        if ours:  # (or the lock could not be asked for): this proxy asks the server
            self.locks += 1
            deadline.cancel()
            result.callback(None)
            return
        self.lock_waits += 1
        self.clock.callLater(LOCK_POLL, self._poll, node, key, mkey, result, deadline)

    def _poll(
        self, node: Node, key: bytes, mkey: bytes, result: defer.Deferred, deadline: Any
    ) -> None:
        if not deadline.active():
            return
        proto = node.available()
        if proto is None:
            deadline.cancel()
            result.callback(None)
            return

        def got(answer: tuple[int, bytes | None]) -> None:
            if not deadline.active():
                return
            flags, value = answer
            entry = decode_entry(key, value) if value is not None and flags == FLAGS else None
            if entry is not None:
                self.hits += 1
                self.lock_hits += 1
                deadline.cancel()
                result.callback(entry)
            else:
                self.clock.callLater(LOCK_POLL, self._poll, node, key, mkey, result, deadline)

        asked = node.send(proto.get(mkey))
        asked.addCallbacks(got, lambda _: None)
        asked.addErrback(self._broken)

    def _answered(
        self,
        values: dict[bytes, tuple[int, bytes | None]],
        node: Node,
        generation: bytes,
        key: bytes,
        mkey: bytes,
    ) -> Entry | None:
        current = values.get(self.genkey, (0, None))[1]
        if current is None:
            # Evicted or the node restarted: recreate it.
            node.generation = None
            node.refresh_generation()
            return None
        if current.strip() != generation:
            # Purged meanwhile (or another proxy's view is newer): what we
            # asked for belongs to an older generation.
            node.set_generation(current)
            return None
        flags, value = values.get(mkey, (0, None))
        if value is None:
            return _ABSENT
        entry = decode_entry(key, value) if flags == FLAGS else None
        if entry is None:
            self.rejected += 1
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        """Store ``entry`` for every proxy (replacing any older one), with an
        expiry no longer than its remaining lifetime; nothing when its node
        is down. Errors are dropped: the shared tier is only ever a hint."""
        where = self._writable(key)
        expire = expiry(entry, self.clock.seconds())
        if where is None or expire is None:
            return
        node, proto, mkey = where
        self.stores += 1
        value = encode_entry(key, entry)
        node.send(proto.set(mkey, value, flags=FLAGS, expireTime=expire)).addErrback(lambda _: None)

    def _writable(self, key: bytes) -> tuple[Node, MemCacheProtocol, bytes] | None:
        """``key``'s node, its connection and the memcached key, when the
        node is up with a known generation; else None."""
        node, _ = self._place(key)
        proto = node.available()
        mkey = self.memcached_key(node, key)
        return None if proto is None or mkey is None else (node, proto, mkey)

    def purge(self) -> defer.Deferred:
        """Hide every shared entry, by bumping each node's generation (other
        users' keys on the same memcached are untouched); a node that is down
        is bumped once it is back. Fires with the number of nodes purged now."""
        done = []
        for node in self.nodes:
            proto = node.protocol
            if proto is None:
                node.purge_pending = True
                log.warn("{node} is down: it is purged once it is back", node=node.name)
                continue
            done.append(node.bump(proto))
        return defer.gatherResults(done).addCallback(sum)

    def delete(self, keys: Iterable[bytes]) -> defer.Deferred:
        """Remove the shared entries of ``keys`` (those on nodes that are up).
        Fires with how many there were. Other proxies may still hold copies
        in memory until their lifetime ends."""
        deleting = []
        for key in keys:
            if (where := self._writable(key)) is not None:
                node, proto, mkey = where
                deleting.append(node.send(proto.delete(mkey)).addErrback(lambda _: False))
        return defer.gatherResults(deleting).addCallback(lambda found: sum(map(bool, found)))


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:11211`` for IPv6) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"not a port number: {port!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port must be 1..65535, not {number}")
    return host, number
