"""The shared cache tier (L2): answers kept in memcached, for every proxy
pointed at the same nodes.

One connection per node (`sharednode.Node`), keys spread over the nodes by
`ring.Ring`, each answer stored as a signed entry (`sharedentry`). The tier
never fails a request: a node that is down, slow or stalled, or a value
that is not ours or not signed by our site, is an L2 miss, and the proxy
asks the server.

The memcached key of an entry is a fixed-length digest,
``<prefix><generation>:<sha256 of our key, hex>``; the generation is a
number kept on each node under ``<prefix>gen``, read along with every
lookup, so bumping it (`SharedCache.purge`, or ``incr <prefix>gen 1`` by
hand) hides every entry at once without ``flush_all``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.memcache import MemCacheProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .entry import Entry
from .interfaces import ISharedTier
from .ring import Ring
from .sharedentry import FLAGS, BadEntryError, EntryCodec, UnverifiedEntryError, expiry
from .sharednode import Node

log = Logger()

#: Default ``--memcached-timeout``: the most one L2 lookup may take, in ms.
DEFAULT_TIMEOUT_MS = 50
#: Default ``--memcached-prefix``.
DEFAULT_PREFIX = "cacheproxy:"
#: Longest prefix: with the generation and the digest a key stays under
#: memcached's 250 bytes.
MAX_PREFIX = 100

#: How often a proxy waiting on another's lock looks for its answer, in seconds.
LOCK_POLL = 0.005
#: Lifetime of a lock entry in memcached, in seconds (its clock ticks in
#: whole seconds: 2 holds it at least one).
LOCK_EXPIRY = 2
#: How often each node's generation is read, in seconds, so that a purge
#: by another proxy empties this one's memory cache within about as long.
GENERATION_POLL = 1.0
#: Entries whose MAC does not verify are logged at most this often, in seconds.
UNVERIFIED_LOG_INTERVAL = 60.0


def check_prefix(prefix: str) -> bytes:
    """``prefix`` as memcached key bytes; ValueError when memcached cannot take it."""
    raw = prefix.encode("utf-8")
    if len(raw) > MAX_PREFIX:
        raise ValueError(f"at most {MAX_PREFIX} bytes")
    if any(b <= 32 or b == 127 for b in raw):
        raise ValueError("no spaces or control characters (memcached keys cannot hold them)")
    return raw


class _Lookup:
    """One `SharedCache.get` on its way: our key, its node, the generation
    and memcached key it asks under, and the timer that ends it (the
    lookup's timeout, then, while it waits on another proxy's lock, the lock wait)."""

    __slots__ = ("d", "generation", "key", "mkey", "node", "poll", "timer")

    def __init__(self, key: bytes, node: Node, generation: bytes, mkey: bytes) -> None:
        self.key = key
        self.node = node
        self.generation = generation
        self.mkey = mkey
        self.timer: IDelayedCall | None = None
        #: The next look for the answer of the proxy holding the lock.
        self.poll: IDelayedCall | None = None
        self.d: defer.Deferred[Entry | None] = defer.Deferred()

    @property
    def done(self) -> bool:
        """Whether it has fired (answered, timed out, or given up)."""
        return self.d.called

    def settle(self, entry: Entry | None) -> None:
        """Fire with ``entry`` (None: a miss), stopping its timers."""
        for call in (self.timer, self.poll):
            if call is not None and call.active():
                call.cancel()
        self.timer = self.poll = None
        self.d.callback(entry)


@implementer(ISharedTier)
class SharedCache:
    """Answers shared through memcached nodes: `get` and `put` for the proxy
    on its L1 misses, `purge` and `delete` to hide entries, and the counters."""

    def __init__(
        self,
        nodes: Sequence[tuple[str, int]],
        clock: IReactorTime,
        *,
        reactor: Any = None,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
        lock_wait: float = 0.0,
        secrets: Sequence[bytes] = (),
    ) -> None:
        """``nodes`` are (host, port) pairs; ``clock`` times the lookups and
        gives the wall-clock time (the reactor in production); ``reactor``
        connects (default: the global one); ``timeout`` is the most one
        lookup may take, in seconds, after which it is a miss; ``secrets``
        sign the entries (the first) and verify them (any).

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
        self.codec = EntryCodec(secrets)
        # A dead connection is noticed after this long without an answer.
        command_timeout = max(1.0, 20 * timeout)
        self.nodes = [
            Node(host, port, clock, self.genkey, command_timeout=command_timeout)
            for host, port in nodes
        ]
        self.ring: Ring[Node] = Ring(self.nodes, [f"{host}:{port}" for host, port in nodes])
        self.lookups = self.hits = self.timeouts = self.rejected = self.unavailable = 0
        self.unverified = self.stores = self.locks = self.lock_waits = self.lock_hits = 0
        #: When an unverified entry was last logged (None: never).
        self._unverified_logged: float | None = None
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
            "l2_unverified": self.unverified,
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

    # --- the lookup ---

    def get(self, key: bytes) -> defer.Deferred[Entry | None]:
        """A Deferred firing with the stored entry for ``key`` or None (a miss:
        not there, not ours, not signed by our site, the node down, or no
        answer within the timeout). It never fails."""
        self.lookups += 1
        node, digest = self._place(key)
        proto = node.available()
        generation = node.generation
        if proto is None or generation is None:
            self.unavailable += 1
            return defer.succeed(None)
        lookup = _Lookup(key, node, generation, self.prefix + generation + b":" + digest)
        lookup.timer = self.clock.callLater(self.timeout, self._gave_up, lookup)
        asked = node.send(proto.getMultiple([self.genkey, lookup.mkey]))
        self._then(asked, self._answered, lookup)
        return lookup.d

    def _then(self, asked: defer.Deferred, answered: Callable[..., None], lookup: _Lookup) -> None:
        """Go on with ``lookup`` in ``answered`` once the command ``asked``
        is answered; a failed command is a miss."""
        asked.addCallbacks(answered, self._failed, callbackArgs=(lookup,), errbackArgs=(lookup,))
        asked.addErrback(self._broken)

    def _gave_up(self, lookup: _Lookup) -> None:
        self.timeouts += 1
        lookup.settle(None)

    def _failed(self, reason: Failure, lookup: _Lookup) -> None:
        """A command of ``lookup`` failed: its connection went (the node logs
        its own state). A miss."""
        if not lookup.done:
            self.unavailable += 1
            lookup.settle(None)

    def _broken(self, reason: Failure) -> None:
        log.failure("Unexpected failure reading the shared cache", reason)

    def _answered(self, values: dict[bytes, tuple[int, bytes | None]], lookup: _Lookup) -> None:
        """The node answered the generation and the entry (perhaps after the
        timeout: what it says of the generation is used all the same)."""
        if not self._current(values.get(self.genkey, (0, None))[1], lookup):
            self._settle(lookup, None)
            return
        flags, value = values.get(lookup.mkey, (0, None))
        if value is not None:
            self._settle(lookup, self._decode(lookup, value, flags))
        elif self.lock_wait and not lookup.done:
            self._lock(lookup)
        else:
            self._settle(lookup, None)

    def _current(self, generation: bytes | None, lookup: _Lookup) -> bool:
        """Whether ``generation``, read with the lookup, is the one it asked
        under; if not, the node's is brought up to date."""
        node = lookup.node
        if generation is None:
            # Evicted or the node restarted: recreate it.
            node.generation = None
            node.refresh_generation()
            return False
        if generation.strip() != lookup.generation:
            # Purged meanwhile (or another proxy's view is newer): what we
            # asked for belongs to an older generation.
            node.set_generation(generation)
            return False
        return True

    def _decode(self, lookup: _Lookup, value: bytes, flags: int) -> Entry | None:
        """The entry in ``value``, or None (counted) for one that is not ours."""
        try:
            return self.codec.decode(lookup.key, value, flags)
        except UnverifiedEntryError:
            self._unverified_entry(lookup.node)
        except BadEntryError:
            self.rejected += 1
        return None

    def _unverified_entry(self, node: Node) -> None:
        """Count an entry whose MAC did not verify; say so at most once a minute."""
        self.unverified += 1
        now = self.clock.seconds()
        last = self._unverified_logged
        if last is not None and now < last + UNVERIFIED_LOG_INTERVAL:
            return
        self._unverified_logged = now
        log.warn(
            "{node} holds entries whose signature does not verify (forged, altered, or "
            "signed with a secret this proxy lacks): they are misses, answered by the "
            "server; {count} so far (said at most once a minute). Check that every proxy "
            "of the site has the same --memcached-secret-file first.",
            node=node.name,
            count=self.unverified,
        )

    def _settle(self, lookup: _Lookup, entry: Entry | None) -> None:
        """Fire ``lookup`` with ``entry`` unless it has already given up."""
        if lookup.done:
            return
        if entry is not None:
            self.hits += 1
        lookup.settle(entry)

    # --- the lock: one proxy asks the server, the others wait for its answer ---

    def _lock(self, lookup: _Lookup) -> None:
        """``lookup`` missed: take its key's lock, or wait for the holder's answer."""
        node = lookup.node
        proto = node.available()
        if proto is None:
            lookup.settle(None)
            return
        if lookup.timer is not None:
            lookup.timer.cancel()  # the lookup's timeout: the lock wait replaces it
        lookup.timer = self.clock.callLater(self.lock_wait, lookup.settle, None)
        lkey = self.prefix + b"lock:" + lookup.mkey[len(self.prefix) :]
        taken = node.send(proto.add(lkey, b"1", expireTime=LOCK_EXPIRY))
        self._then(taken, self._locked, lookup)

    def _locked(self, ours: bool, lookup: _Lookup) -> None:
        if lookup.done:
            return
        if ours:  # this proxy asks the server
            self.locks += 1
            lookup.settle(None)
            return
        self.lock_waits += 1
        lookup.poll = self.clock.callLater(LOCK_POLL, self._poll, lookup)

    def _poll(self, lookup: _Lookup) -> None:
        """Look for the answer of the proxy holding ``lookup``'s lock."""
        lookup.poll = None
        proto = lookup.node.available()
        if proto is None:
            lookup.settle(None)
            return
        asked = lookup.node.send(proto.get(lookup.mkey))
        self._then(asked, self._polled, lookup)

    def _polled(self, answer: tuple[int, bytes | None], lookup: _Lookup) -> None:
        if lookup.done:
            return
        flags, value = answer
        entry = None if value is None else self._decode(lookup, value, flags)
        if entry is None:
            lookup.poll = self.clock.callLater(LOCK_POLL, self._poll, lookup)
            return
        self.lock_hits += 1
        self._settle(lookup, entry)

    # --- storing and purging ---

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
        value = self.codec.encode(key, entry)
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
