"""Every seam's implementations provide its declared interface, checked with
``verifyObject`` as twisted.names checks its resolvers: the methods with
their signatures and the attributes, on real instances."""

from __future__ import annotations

import pytest
from helpers import FakeConnector
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from twisted_cacheproxy.calculator.events import IServerObserver
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.operations.metrics import ProxyMetrics, ServerMetrics
from twisted_cacheproxy.proxy.balancer import Balancer
from twisted_cacheproxy.proxy.cache import MemoryCache
from twisted_cacheproxy.proxy.factory import CacheProxyFactory
from twisted_cacheproxy.proxy.interfaces import (
    ICache,
    IFetcher,
    IProxyObserver,
    ISharedTier,
    IUpstreamServer,
)
from twisted_cacheproxy.proxy.sharedcache import SharedCache
from twisted_cacheproxy.proxy.upstream import IConnector, TCPConnector, UpstreamPool


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


def pool(clock) -> UpstreamPool:
    return UpstreamPool(FakeConnector(clock), clock)


def test_the_memory_cache_is_a_cache(clock):
    assert verifyObject(ICache, MemoryCache(1 << 20, clock))


def test_the_memcached_tier_is_a_shared_tier(clock):
    assert verifyObject(ISharedTier, SharedCache([("127.0.0.1", 11211)], clock))


def test_a_pool_and_a_balancer_are_fetchers_and_their_servers_are_servers(clock):
    one = pool(clock)
    assert verifyObject(IFetcher, one)
    balancer = Balancer([pool(clock), pool(clock)], clock)
    assert verifyObject(IFetcher, balancer)
    for server in (*one.servers, *balancer.servers):
        assert verifyObject(IUpstreamServer, server)


def test_connectors_open_connections(clock):
    assert verifyObject(IConnector, TCPConnector(MemoryReactorClock(), "127.0.0.1", 9999))
    assert verifyObject(IConnector, FakeConnector(clock))  # the tests' own stand-in too


def test_the_metrics_observe_the_services(clock):
    proxy = CacheProxyFactory(MemoryCache(1 << 20, clock), pool(clock), clock=clock)
    assert verifyObject(IProxyObserver, ProxyMetrics(proxy))
    server = CalculatorServerFactory(clock=clock)
    assert verifyObject(IServerObserver, ServerMetrics(server))
