"""The caching proxy: `CacheProxyProtocol` / `CacheProxyFactory`.

The proxy never reads payloads: the cache key is the request data plus its S
flag, and the first data byte only picks the encoding of the proxy's own
error answers. The cache rules are PROTOCOL.md section 2 plus what caching
proxies such as Varnish and nginx do: coalescing, retries, stale-if-error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..transport import answers, wire
from ..transport.service import ServiceFactory, ServiceProtocol
from . import upstream
from .balancer import Fetcher
from .cache import Cache, Entry, SharedTier
from .upstream import UpstreamError

log = Logger()

#: One answer's place in a client's line: its bytes once they are known.
_Slot = list[bytes | None]

_STEPS_KEY = (b"\x00", b"\x01")


def cache_keys(data: bytes) -> tuple[bytes, bytes]:
    """The cache keys of one request ``data``, without and with steps (a purge)."""
    return _STEPS_KEY[0] + data, _STEPS_KEY[1] + data


# --- observing (metrics, access log): which path each request took --------------
HIT, MISS, COALESCED, BYPASS, RELOAD = "hit", "miss", "coalesced", "bypass", "reload"
#: Not decided in `CacheProxyFactory.answer`: a MISS or COALESCED answer that
#: came back marked G (served past its lifetime while the server failed).
STALE = "stale"
#: Nor this: a MISS answered from the shared tier (memcached), marked H.
SHARED = "shared"


class NoObserver:
    """The default `CacheProxyFactory.observer`: sees nothing, costs one call."""

    def requestDone(
        self,
        cache: str,
        answer: bytes,
        started: float,
        header: wire.Header,
        data: bytes,
        client: Any,
    ) -> None:
        """An answer to ``header``/``data`` was decided at once (bytes)."""

    def answered(
        self,
        answer: bytes,
        cache: str,
        started: float,
        header: wire.Header,
        data: bytes,
        client: Any,
    ) -> bytes:
        """A Deferred answer fired with ``answer``; passes it on."""
        return answer

    def upstreamDone(self, sent: float) -> None:
        """The server answered a request sent at ``sent``."""

    def upstreamFailed(self, reason: Any) -> None:
        """A request to the server failed (a `Failure`)."""

    def purgedAnswers(self, count: int) -> None:
        """A purge removed ``count`` answers from memory."""


#: Most answers one client may await at once; past it the proxy stops
#: reading from that client until answers go out (a pipelining client must
#: not make the proxy hold unbounded work for a slow server).
MAX_AWAITED = 64


class CacheProxyProtocol(ServiceProtocol):
    """One client: answers go back in request order, hits at once when no
    earlier answer is still awaited."""

    factory: CacheProxyFactory

    _closing = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._slots: deque[_Slot] = deque()

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        answer = self.factory.answer(header, data, self)
        if type(answer) is bytes and not self._slots:
            self.sendMessage(answer)
            return
        self._queue(answer)

    def _queue(self, answer: bytes | defer.Deferred[bytes]) -> None:
        """Keep an answer's place in line."""
        slot: _Slot = [answer if isinstance(answer, bytes) else None]
        self._slots.append(slot)
        if len(self._slots) >= MAX_AWAITED:
            self.holdInput()
        if not isinstance(answer, bytes):
            answer.addCallback(self._filled, slot)

    def _filled(self, answer: bytes, slot: _Slot) -> None:
        slot[0] = answer
        slots = self._slots
        while slots and (ready := slots[0][0]) is not None:
            slots.popleft()
            self.sendMessage(ready)
        if self._held and len(slots) < MAX_AWAITED and self.connected:
            self.releaseInput()
        if not slots:
            if self._closing:
                self.closeAfterSending()
            else:
                # Idle from its last answer on.
                self.markActive()

    def idle(self) -> None:
        """A client still awaiting an answer is not idle: it gets another
        period (cheaper than stopping the timer for every miss)."""
        if self._slots:
            self.setTimeout(self.idleTimeout)
        else:
            super().idle()

    def endOfInput(self) -> None:
        """Half-closed by the client: close once every awaited answer is sent."""
        if self._slots:
            self._discardInput()
            self._closing = True
        else:
            super().endOfInput()

    def invalidFrame(self, reason: str, first: bytes) -> None:
        """The 400 goes after every answer still awaited, then the close."""
        answer = answers.bad_frame(reason, first, int(self.factory.clock.seconds()))
        if not self._slots:
            self.sendMessage(answer)
            self.closeAfterSending()
            return
        self._closing = True
        self._queue(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._slots.clear()


#: The clients waiting for one in-flight miss (Varnish's waiting list).
_Waiters = list[tuple[CacheProxyProtocol, defer.Deferred[bytes], wire.Header, bytes]]


class CacheProxyFactory(ServiceFactory):
    """The cache, the upstream pool, the in-flight misses and the counters."""

    protocol = CacheProxyProtocol

    def __init__(
        self,
        cache: Cache,
        pool: Fetcher,
        *,
        clock: IReactorTime | None = None,
        max_message_size: int = wire.MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_connections: int | None = 10_000,
        verbose: bool = False,
        shared: SharedTier | None = None,
    ) -> None:
        """``cache`` keeps the answers (its grace is the stale-if-error
        window); ``pool`` (an `UpstreamPool` or a `Balancer`) asks the server
        on a miss; ``shared`` (optional) is a second level asked before the
        server (`sharedcache.SharedCache`)."""
        super().__init__(
            clock=clock,
            max_message_size=max_message_size,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
        self.cache = cache
        self.pool = pool
        self.verbose = verbose
        self.shared = shared
        self.l2_hits = 0
        self.inflight: dict[bytes, _Waiters] = {}
        self.hits = self.misses = self.coalesced = self.stale = self.upstream_errors = 0
        #: Told of every answer and upstream exchange (metrics.ProxyMetrics).
        self.observer: Any = NoObserver()
        if shared is not None:
            shared.purged = self._purgedElsewhere

    def startFactory(self) -> None:
        if self.shared is not None:
            self.shared.start()

    def stopFactory(self) -> None:
        self.pool.close()
        if self.shared is not None:
            self.shared.stop()

    def purge(self, expressions: Iterable[bytes] | None = None) -> defer.Deferred[dict[str, int]]:
        """Remove stored answers: all of them, or those of the text
        ``expressions`` (with and without steps), here and in the shared
        tier. Fires with ``purged`` (answers removed from memory) and
        ``shared`` (memcached nodes purged, or shared entries removed)."""
        keys = None if expressions is None else [k for e in expressions for k in cache_keys(e)]
        count = self._forget(keys)
        if self.shared is None:
            return defer.succeed({"purged": count, "shared": 0})
        shared = self.shared.purge() if keys is None else self.shared.delete(keys)

        def settled(nodes: int) -> dict[str, int]:
            # A lookup answered before the tier was purged may have put a
            # purged answer back in memory meanwhile.
            return {"purged": count + self._forget(keys), "shared": nodes}

        return shared.addCallback(settled)

    def _forget(self, keys: list[bytes] | None) -> int:
        """Remove from memory every answer, or those of ``keys``; how many went."""
        count = self.cache.clear() if keys is None else self.cache.purge(keys)
        self.observer.purgedAnswers(count)
        return count

    def _purgedElsewhere(self) -> None:
        """The shared tier's generation moved on (another proxy purged it, or
        memcached restarted): what memory holds may be purged answers."""
        count = self._forget(None)
        log.info(
            "the shared cache was purged or restarted: {count} answers dropped from memory",
            count=count,
        )

    def counters(self) -> dict[str, int]:
        """What the proxy has done so far, for logs and tests."""
        counters = {
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "stale": self.stale,
            "upstream_errors": self.upstream_errors,
            "evictions": self.cache.evictions,
            "entries": self.cache.entries,
            "bytes": self.cache.bytes,
        }
        if self.shared is not None:
            # Misses answered by the shared tier (``misses`` counts them too).
            counters["l2_hits"] = self.l2_hits
        return counters

    # --- the request path ---------------------------------------------------

    def answer(
        self, header: wire.Header, data: bytes, client: CacheProxyProtocol
    ) -> bytes | defer.Deferred:
        """The answer to one request: bytes at once, or a Deferred firing with bytes."""
        started = self.clock.seconds()
        flags = header.flags
        if not flags & wire.FLAG_REQUEST:
            answer = answers.not_a_request(header, data, int(started))
            return self._observed(BYPASS, answer, started, header, data, client)
        if not flags & wire.FLAG_CACHE:
            self.misses += 1
            return self._observed(
                BYPASS, self._fetch(header, data, None), started, header, data, client
            )
        key = _STEPS_KEY[bool(flags & wire.FLAG_STEPS)] + data
        accept = header.max_age
        if accept:
            entry = self.cache.get(key)
            if entry is not None:
                now = started
                age = entry.age(now)
                if entry.fresh(now) and _accepts(accept, age):
                    self.hits += 1
                    if self.verbose:
                        log.debug("hit {size} bytes, age {age:.1f} s", size=len(data), age=age)
                    answer = _restamp(entry, age, header)
                    self.observer.requestDone(HIT, answer, started, header, data, client)
                    return answer
        waiting = self.inflight.get(key)
        if waiting is not None:
            self.coalesced += 1
            d: defer.Deferred[bytes] = defer.Deferred()
            waiting.append((client, d, header, data))
            return self._observed(COALESCED, d, started, header, data, client)
        self.misses += 1
        if self.verbose:
            log.debug("miss {size} bytes", size=len(data))
        self.inflight[key] = []
        if self.shared is not None and accept:  # a reload skips it
            fetched: defer.Deferred[Any] = self.shared.get(key).addCallback(
                self._shared_answer, header, data, key
            )
        else:
            fetched = self._fetch(header, data, key)
        return self._observed(MISS if accept else RELOAD, fetched, started, header, data, client)

    def _observed(
        self,
        cache: str,
        answer: Any,
        started: float,
        header: wire.Header,
        data: bytes,
        client: CacheProxyProtocol,
    ) -> Any:
        """Tell the observer how ``answer`` was decided (now, or when it fires)."""
        if type(answer) is bytes:
            self.observer.requestDone(cache, answer, started, header, data, client)
        else:
            answer.addCallback(self.observer.answered, cache, started, header, data, client)
        return answer

    def _shared_answer(
        self, entry: Entry | None, header: wire.Header, data: bytes, key: bytes
    ) -> bytes | defer.Deferred[bytes]:
        """After the L2 lookup of a miss: its entry if the request accepts it
        (copied into L1), else the server's answer."""
        now = self.clock.seconds()
        if entry is None or not entry.fresh(now) or not _accepts(header.max_age, entry.age(now)):
            return self._fetch(header, data, key)
        self.l2_hits += 1
        self.cache.put(key, entry)
        waiting = self.inflight.pop(key)
        for client, d, h, waiter_data in waiting:
            if not client.connected:
                continue
            if h.max_age and _accepts(h.max_age, entry.age(now)):
                d.callback(_restamp(entry, entry.age(now), h))
            elif key in self.inflight:  # a waiter wanting a younger answer
                self.inflight[key].append((client, d, h, waiter_data))
            else:
                self.inflight[key] = []
                self._fetch(h, waiter_data, key).chainDeferred(d)
        return _restamp(entry, entry.age(now), header)

    def _fetch(self, header: wire.Header, data: bytes, key: bytes | None) -> defer.Deferred[bytes]:
        """Ask the server; store the answer per the rules when ``key`` is given
        (a C=1 request), then answer the requester and every waiter."""
        frame = wire.encode(
            header.timestamp, header.flags & ~wire.RESERVED_MASK, header.max_age, data
        )  # the extension word is the pool's: it tags each request itself
        return (
            self.pool.fetch(frame)
            .addCallback(self._fetched, header, data, key)
            .addErrback(self._failed, header, data, key)
        )

    def _fetched(
        self, result: upstream.Answer, header: wire.Header, data: bytes, key: bytes | None
    ) -> bytes:
        answer_header, answer_data, sent = result
        self.observer.upstreamDone(sent)
        # L is hop by hop (ours replaces the server's); H and G pass on.
        marks = answer_header.ext & (wire.EXT_FROM_CACHE | wire.EXT_GRACE)
        answer = wire.encode(
            answer_header.timestamp,
            answer_header.flags & ~wire.RESERVED_MASK,
            answer_header.max_age,
            answer_data,
            wire.EXT_FRAMED | marks,
        )
        if key is None:
            return wire.with_tag(answer, header)
        waiting = self.inflight.pop(key)
        failed = (answer_header.flags & wire.STATUS_MASK) >= wire.SERVER_ERROR
        cacheable = answer_header.flags & wire.FLAG_CACHE and answer_header.max_age
        if cacheable and not failed:
            stored = wire.rewrite(answer, ext=_HIT)
            entry = Entry(stored, sent, answer_header.max_age)
            self.cache.put(key, entry)
            if self.shared is not None:
                self.shared.put(key, entry)
        if cacheable or failed:
            self._settle(waiting, lambda h, d: wire.with_tag(answer, h))
        else:
            # Not cacheable (e.g. rand): sharing it would be caching it, so
            # each waiter asks the server for its own answer.
            for client, d, h, waiter_data in waiting:
                if client.connected:
                    self.misses += 1
                    self._fetch(h, waiter_data, None).chainDeferred(d)
        return wire.with_tag(answer, header)

    def _failed(
        self, reason: Failure, header: wire.Header, data: bytes, key: bytes | None
    ) -> bytes:
        self.upstream_errors += 1
        self.observer.upstreamFailed(reason)
        if reason.check(UpstreamError):
            message = str(reason.value)
            log.warn("{error}", error=message)
        else:
            message = "internal proxy error"
            log.failure("Unexpected failure fetching an answer", reason)
        waiting = self.inflight.pop(key, None) if key is not None else None
        stale = self.cache.get(key) if key is not None and self.cache.grace else None

        def fallback(h: wire.Header, d: bytes) -> bytes:
            now = self.clock.seconds()
            if (
                stale is not None
                and h.flags & wire.FLAG_CACHE
                and h.max_age
                and _accepts(h.max_age, stale.age(now))
            ):
                self.stale += 1
                return _stale(stale, h)
            return answers.unreachable(h, d, message, int(now))

        if waiting is not None:
            self._settle(waiting, fallback)
        return fallback(header, data)

    def _settle(self, waiting: _Waiters, answer_for: Callable[[wire.Header, bytes], bytes]) -> None:
        """Answer every waiter still connected; those who left are dropped."""
        for client, d, h, data in waiting:
            if client.connected:
                d.callback(answer_for(h, data))


def _accepts(max_age: int, age: float) -> bool:
    """Whether a request's max-age (65535: any age) accepts an answer this old."""
    return max_age == wire.FOREVER or age < max_age


#: The extension word of a stored answer: ours (L), from the cache (H).
_HIT = wire.EXT_FRAMED | wire.EXT_FROM_CACHE


def _restamp(entry: Entry, age: float, request: wire.Header) -> bytes:
    """A stored answer for ``request``: its cache control set to its
    remaining lifetime, the request's tag echoed."""
    answer = entry.answer
    if entry.lifetime == wire.FOREVER:
        return wire.with_tag(answer, request)
    left = max(1, int(entry.lifetime - age))
    return wire.rewrite(answer, max_age=left, ext=wire.answer_ext(request, wire.EXT_FROM_CACHE))


def _stale(entry: Entry, request: wire.Header) -> bytes:
    """A stored answer past its lifetime: sent with C=0, so nobody keeps it,
    and marked G (PROTOCOL.md 6)."""
    answer = entry.answer
    flags = wire.decode_header(answer).flags & ~wire.FLAG_CACHE
    ext = wire.answer_ext(request, wire.EXT_FROM_CACHE | wire.EXT_GRACE)
    return wire.rewrite(answer, flags=flags, max_age=0, ext=ext)
