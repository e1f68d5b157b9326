"""The caching proxy: `CacheProxyProtocol` / `CacheProxyFactory`.

The proxy never reads payloads: the cache key is the request data plus its S
flag, and the first data byte only picks the encoding of the proxy's own
error answers. The cache rules are PROTOCOL.md section 2 plus what caching
proxies such as Varnish and nginx do: coalescing, retries, stale-if-error.
Its observer (`interfaces.IProxyObserver`) is told of every answer with the
cache status the proxy decided (`events`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..transport import answers, wire
from ..transport.service import ServiceFactory, ServiceProtocol
from .entry import Entry
from .events import BYPASS, COALESCED, HIT, MISS, RELOAD, SHARED, STALE, Answered
from .failures import UpstreamError
from .interfaces import Answer, ICache, IFetcher, IProxyObserver, ISharedTier

log = Logger()

#: One answer's place in a client's line: its bytes once they are known.
_Slot = list[bytes | None]

_STEPS_KEY = (b"\x00", b"\x01")


def cache_keys(data: bytes) -> tuple[bytes, bytes]:
    """The cache keys of one request ``data``, without and with steps (a purge)."""
    return _STEPS_KEY[0] + data, _STEPS_KEY[1] + data


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


class _Request(Answered):
    """A request whose answer is not known at once: the `events.Answered`
    its observer will be told, and the Deferred its client waits on."""

    __slots__ = ("d",)

    def __init__(
        self, status: str, started: float, header: wire.Header, data: bytes, client: Any
    ) -> None:
        super().__init__(status, started, header, data, client)
        self.d: defer.Deferred[bytes] = defer.Deferred()

    @property
    def asking(self) -> str:
        """Its status when it asks the server itself: a reload when it
        accepts no stored answer, else a miss."""
        return MISS if self.header.max_age else RELOAD


class CacheProxyFactory(ServiceFactory):
    """The cache, the way to the servers, the misses in flight, and the
    observer that is told of every answer."""

    protocol = CacheProxyProtocol

    def __init__(
        self,
        cache: ICache,
        pool: IFetcher,
        *,
        clock: IReactorTime | None = None,
        max_message_size: int = wire.MAX_MESSAGE_SIZE,
        idle_timeout: float | None = 60.0,
        max_connections: int | None = 10_000,
        shared: ISharedTier | None = None,
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
        self.shared = shared
        #: The requests waiting for each miss in flight, by key (Varnish's waiting list).
        self.inflight: dict[bytes, list[_Request]] = {}
        #: Told of every answer (`operations.metrics.ProxyMetrics`); None: nobody.
        self.observer: IProxyObserver | None = None
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
        if self.observer is not None:
            self.observer.purged(count)
        return count

    def _purgedElsewhere(self) -> None:
        """The shared tier's generation moved on (another proxy purged it, or
        memcached restarted): what memory holds may be purged answers."""
        count = self._forget(None)
        log.info(
            "the shared cache was purged or restarted: {count} answers dropped from memory",
            count=count,
        )

    # --- the request path ---------------------------------------------------

    def answer(
        self, header: wire.Header, data: bytes, client: CacheProxyProtocol
    ) -> bytes | defer.Deferred[bytes]:
        """The answer to one request: bytes at once, or a Deferred firing with bytes."""
        started = self.clock.seconds()
        flags = header.flags
        if not flags & wire.FLAG_REQUEST:
            answer = answers.not_a_request(header, data, int(started))
            self._told(Answered(BYPASS, started, header, data, client, answer))
            return answer
        if not flags & wire.FLAG_CACHE:
            request = _Request(BYPASS, started, header, data, client)
            self._fetch(request, None)
            return request.d
        key = _STEPS_KEY[bool(flags & wire.FLAG_STEPS)] + data
        accept = header.max_age
        if accept:
            entry = self.cache.get(key)
            if entry is not None:
                age = entry.servable(started, accept)
                if age is not None:
                    answer = _restamp(entry, age, header)
                    if self.observer is not None:
                        self.observer.answered(Answered(HIT, started, header, data, client, answer))
                    return answer
        waiting = self.inflight.get(key)
        if waiting is not None:
            request = _Request(COALESCED, started, header, data, client)
            waiting.append(request)
            return request.d
        request = _Request(MISS if accept else RELOAD, started, header, data, client)
        self.inflight[key] = []
        if self.shared is not None and accept:  # a reload skips it
            self.shared.get(key).addCallback(self._sharedAnswered, request, key)
        else:
            self._fetch(request, key)
        return request.d

    def _told(self, event: Answered) -> None:
        if self.observer is not None:
            self.observer.answered(event)

    def _settle(self, request: _Request, answer: bytes) -> None:
        """Tell the observer how ``request`` was answered, then its client."""
        request.answer = answer
        self._told(request)
        request.d.callback(answer)

    def _sharedAnswered(self, entry: Entry | None, request: _Request, key: bytes) -> None:
        """After the shared tier's lookup of a miss: its entry if the request
        accepts it (copied into memory), else the server's answer."""
        age = (
            None if entry is None else entry.servable(self.clock.seconds(), request.header.max_age)
        )
        if entry is None or age is None:
            self._fetch(request, key)
            return
        request.status = SHARED
        self.cache.put(key, entry)
        for waiter in self.inflight.pop(key):
            if not waiter.client.connected:
                continue
            if waiter.header.max_age and _accepts(waiter.header.max_age, age):
                self._settle(waiter, _restamp(entry, age, waiter.header))
            elif key in self.inflight:  # another waiter wanting a younger answer asks
                self.inflight[key].append(waiter)
            else:
                waiter.status = waiter.asking
                self.inflight[key] = []
                self._fetch(waiter, key)
        self._settle(request, _restamp(entry, age, request.header))

    def _fetch(self, request: _Request, key: bytes | None) -> None:
        """Ask the server; store the answer per the rules when ``key`` is given
        (a C=1 request), then answer the requester and every waiter."""
        header = request.header
        frame = wire.encode(
            header.timestamp, header.flags & ~wire.RESERVED_MASK, header.max_age, request.data
        )  # the extension word is the pool's: it tags each request itself
        self.pool.fetch(frame).addCallback(self._fetched, request, key).addErrback(
            self._failed, request, key
        )

    def _fetched(self, result: Answer, request: _Request, key: bytes | None) -> None:
        answer_header, answer_data, sent = result
        request.upstream = self.clock.seconds() - sent
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
            self._settle(request, wire.with_tag(answer, request.header))
            return
        waiting = self.inflight.pop(key)
        failed = (answer_header.flags & wire.STATUS_MASK) >= wire.SERVER_ERROR
        cacheable = answer_header.flags & wire.FLAG_CACHE and answer_header.max_age
        if cacheable and not failed:
            entry = Entry(wire.rewrite(answer, ext=_HIT), sent, answer_header.max_age)
            self.cache.put(key, entry)
            if self.shared is not None:
                self.shared.put(key, entry)
        for waiter in waiting:
            if not waiter.client.connected:
                continue
            if cacheable or failed:
                self._settle(waiter, wire.with_tag(answer, waiter.header))
            else:
                # Not cacheable (e.g. rand): sharing it would be caching it, so
                # each waiter asks the server for its own answer.
                waiter.status = waiter.asking
                self._fetch(waiter, None)
        self._settle(request, wire.with_tag(answer, request.header))

    def _failed(self, reason: Failure, request: _Request, key: bytes | None) -> None:
        error = reason.value
        if isinstance(error, UpstreamError):
            log.warn("{error}", error=str(error))
        else:
            log.failure("Unexpected failure fetching an answer", reason)
            error = UpstreamError("internal proxy error", "internal")
        request.failure = error
        message = str(error)
        waiting = self.inflight.pop(key, []) if key is not None else []
        stale = self.cache.get(key) if key is not None and self.cache.grace else None
        for asker in (*(w for w in waiting if w.client.connected), request):
            now = self.clock.seconds()
            h = asker.header
            if (
                stale is not None
                and h.flags & wire.FLAG_CACHE
                and h.max_age
                and _accepts(h.max_age, stale.age(now))
            ):
                asker.status = STALE
                self._settle(asker, _stale(stale, h))
                continue
            self._settle(asker, answers.unreachable(h, asker.data, message, int(now)))


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
