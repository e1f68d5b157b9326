"""The proxy under test with fakes at both ends: `Harness`, a proxy factory
over one upstream pool on a `task.Clock`, with its clients (`Client`) and
the pool's connections (`FakeConnector`); `Fleet`, fake servers each behind
a pool, behind one balancer; and the expressions the proxy tests ask."""

from __future__ import annotations

from helpers import T0, FakeConnector, Peer, headers, request_frame, untagged
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_cacheproxy.operations.metrics import ProxyMetrics
from twisted_cacheproxy.proxy.balancer import Balancer
from twisted_cacheproxy.proxy.cache import MemoryCache
from twisted_cacheproxy.proxy.factory import CacheProxyFactory, CacheProxyProtocol
from twisted_cacheproxy.proxy.interfaces import IFetcher
from twisted_cacheproxy.proxy.upstream import UpstreamPool
from twisted_cacheproxy.transport import wire

X = b"1 + 2"
Y = b"2 * 3"
Z = b"max(2, 3) + 3"


# --- one proxy over one upstream pool ---------------------------------------------


class Client:
    """One client connection to the proxy."""

    def __init__(self, factory: CacheProxyFactory, n: int) -> None:
        self.wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + n))
        assert isinstance(self.wrapper, CacheProxyProtocol)
        self.transport = StringTransport()
        self.wrapper.makeConnection(self.transport)
        self.marks: list[int] = []
        self.tags: list[int] = []

    def send(self, *frames: bytes) -> None:
        self.wrapper.dataReceived(b"".join(frames))

    def take(self) -> bytes:
        """Everything written to this client since the last take, with the
        extension words zeroed: each must carry L, and its cache marks (H,
        G) and tag are kept in `marks` and `tags`."""
        value = self.transport.value()
        self.transport.clear()
        for header in headers(value):
            assert header.framed, header
            self.marks.append(header.ext & (wire.EXT_FROM_CACHE | wire.EXT_GRACE))
            self.tags.append(header.tag)
        return untagged(value, keep=0)

    def disconnect(self) -> None:
        self.wrapper.connectionLost(Failure(error.ConnectionDone()))


class Harness:
    """A proxy factory on a fake reactor, its clients and its upstream connections."""

    def __init__(
        self,
        *,
        cache_size: int = 64 << 20,
        stale_if_error: float = 0.0,
        balanced: bool = False,
        **options,
    ) -> None:
        """``balanced``: the proxy reaches its one server through a `Balancer`
        (as with several ``--server``s) instead of the pool alone."""
        self.reactor = task.Clock()
        self.reactor.advance(T0)
        self.connector = FakeConnector(self.reactor)
        self.accept = self.connector.accept
        self.refuse = self.connector.refuse
        cache = MemoryCache(cache_size, self.reactor, grace=stale_if_error)
        # The proxy's options as application.compose shares them out: the upstream ones to the pool.
        pool_options = {
            name: options.pop(name)
            for name in ("retries", "retry_delay", "timeout")
            if name in options
        }
        if "upstream_connections" in options:
            pool_options["max_connections"] = options.pop("upstream_connections")
        if "upstream_pipeline" in options:
            pool_options["pipeline"] = options.pop("upstream_pipeline")
        if balanced:
            # As the composition root builds several servers: one attempt per
            # fetch on the pool, the balancer doing the rounds.
            rounds = pool_options.pop("retries", 5)
            pool = UpstreamPool(self.connector, self.reactor, retries=1, **pool_options)
            balancer = {"rounds": rounds, **pool_options}
            balancer.pop("max_connections", None)
            balancer.pop("pipeline", None)
            fetcher: IFetcher = Balancer([pool], self.reactor, **balancer)
        else:
            fetcher = UpstreamPool(self.connector, self.reactor, **pool_options)
        options.setdefault("idle_timeout", None)
        self.factory = CacheProxyFactory(cache, fetcher, clock=self.reactor, **options)
        self.metrics = ProxyMetrics(self.factory)
        self.factory.observer = self.metrics
        self._clients = 0

    def client(self) -> Client:
        self._clients += 1
        return Client(self.factory, self._clients)

    @property
    def attempts(self) -> int:
        """Connection attempts made to the server so far."""
        return len(self.connector.attempts)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def now(self) -> float:
        return self.reactor.seconds()

    def counters(self) -> dict[str, int]:
        """Answers by cache status (as the proxy's metrics count them),
        failed upstream attempts, and the cache's figures."""
        cache = self.factory.cache
        failures = sum(sum(s.tally.failures.values()) for s in self.factory.pool.servers)
        return {
            **self.metrics.requests,
            "failures": failures,
            "evictions": cache.evictions,
            "entries": cache.entries,
            "bytes": cache.bytes,
        }

    def assert_quiet(self) -> None:
        """No timer is left behind (retry, timeout) once everything is answered."""
        assert self.reactor.getDelayedCalls() == []

    def miss(self, client: Client, frame: bytes, reply: bytes, upstream: Peer | None = None):
        """Send ``frame`` as a miss, check it went upstream unchanged, answer it."""
        client.send(frame)
        if upstream is None:
            upstream = self.accept()
        assert upstream.take() == frame
        assert client.take() == b""
        upstream.reply(reply)
        assert client.take() == reply
        return upstream


# --- several servers behind a balancer ----------------------------------------------


REQUEST = request_frame(b"1+1", ts=0)
ANSWER = wire.encode(
    0, wire.make_flags(request=False, status=wire.OK, cache=True), wire.FOREVER, b'{"result": 2}'
)


class Fleet:
    """``count`` fake servers, each behind its own pool, behind one balancer."""

    def __init__(self, count: int = 2, **options) -> None:
        self.clock = task.Clock()
        self.connectors = []
        pools = []
        for i in range(count):
            connector = FakeConnector(self.clock)
            connector.address = f"127.0.0.1:{9001 + i}"
            self.connectors.append(connector)
            pools.append(UpstreamPool(connector, self.clock, retries=1, timeout=10.0))
        options.setdefault("retry_delay", 0.5)
        options.setdefault("timeout", 10.0)
        self.balancer = Balancer(pools, self.clock, **options)
        self.pools = pools
        self.peers: list[list] = [[] for _ in range(count)]

    def attempts(self) -> list[int]:
        return [len(c.attempts) for c in self.connectors]

    def answer(self, server: int, framed: bool = True) -> int:
        """Let the server's open attempts connect, and answer every request
        waiting on its connections; how many it answered."""
        connector = self.connectors[server]
        for d in connector.attempts:
            if not d.called:
                self.peers[server].append(connector.accept(connector.attempts.index(d), framed))
        answered = 0
        for peer in self.peers[server]:
            peer.take()
            # Each request once (a course server's Peer keeps its tags).
            waiting = len(peer.seen) - getattr(peer, "answered", 0)
            for _ in range(waiting):
                peer.reply(ANSWER)
            peer.answered = len(peer.seen)
            answered += waiting
        return answered

    def refuse(self, server: int) -> None:
        """Refuse the server's open attempts."""
        connector = self.connectors[server]
        for i, d in enumerate(connector.attempts):
            if not d.called:
                connector.refuse(i)
