"""What the services have done, counted cheaply on the request path and
exported on demand: Prometheus collectors, a JSON summary and the stats line.

`ProxyMetrics` and `ServerMetrics` are the factories' observers (see
``observer`` in proxy.py and server.py). They keep plain integers and bucket
lists, so counting one request costs a few additions; `prometheus_client`
sees them only when ``/metrics`` is scraped, through a custom collector
rendered in the reactor thread. The exported names are stable (README,
"Operating the proxy").
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Iterator
from itertools import pairwise
from typing import Any, Protocol

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from twisted.python.failure import Failure

from ..proxy.factory import BYPASS, COALESCED, HIT, MISS, RELOAD, SHARED, STALE
from ..proxy.upstream import UpstreamError
from ..transport import wire
from ..transport.addresses import address

#: The cache statuses of the proxy, in the order they are shown.
CACHE_STATUSES = (HIT, SHARED, MISS, COALESCED, STALE, BYPASS, RELOAD)
#: Why a request to the server failed (the ``reason`` label).
FAILURE_REASONS = ("refused", "timeout", "reset", "bad_answer", "overloaded")
#: Answer status labels; any other code a server sends counts as "other".
STATUSES = ("200", "400", "500")
_STATUS_LABEL = {200: "200", 400: "400", 500: "500"}
#: Histogram bucket bounds, in seconds: a hit takes microseconds, a miss
#: a round trip, a failing server up to the proxy's timeout.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: The status page's history: one sample every `SAMPLE_EVERY` s, `SAMPLES` kept.
SAMPLE_EVERY = 5.0
SAMPLES = 120


class AccessLogger(Protocol):
    """What the metrics hand each answered request to (accesslog.AccessLog)."""

    def proxyRequest(
        self,
        now: float,
        client: Any,
        header: wire.Header,
        data: bytes,
        cache: str,
        answer: bytes,
        total: float,
        upstream: float | None,
    ) -> None: ...

    def serverRequest(
        self,
        now: float,
        client: Any,
        header: wire.Header,
        data: bytes,
        encoding: str,
        answer: bytes,
        total: float,
    ) -> None: ...


class Histogram:
    """Counts of observations per bucket (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus wants them: ``le`` bound, observations up to it."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def failure_reason(reason: Failure) -> str:
    """Which `FAILURE_REASONS` label a failed upstream request counts under."""
    if not reason.check(UpstreamError):
        return "bad_answer"
    text = str(reason.value)
    if "overloaded" in text:
        return "overloaded"
    if "did not answer within" in text or "unreachable within" in text or "timed out" in text:
        return "timeout"
    if "unreachable" in text:
        return "refused"
    if "closed the connection" in text:
        return "reset"
    return "bad_answer"


class _Sample:
    """Totals at one moment (for the stats line and the status page's chart)."""

    __slots__ = ("errors", "hits", "misses", "requests", "time")

    def __init__(self, time: float, requests: int, hits: int, misses: int, errors: int) -> None:
        self.time = time
        self.requests = requests
        self.hits = hits
        self.misses = misses
        self.errors = errors


class _Metrics:
    """What both services' metrics share: the clock, history, the stats line."""

    kind = ""

    def __init__(self, factory: Any, clock: Any = None) -> None:
        self.factory = factory
        self.clock: Any = clock if clock is not None else factory.clock
        self.access_log: AccessLogger | None = None
        #: Answers by status code (at most 1024 codes fit in the field).
        self.codes: defaultdict[int, int] = defaultdict(int)
        self._seconds = self.clock.seconds
        self.started = self.clock.seconds()
        self.history: deque[_Sample] = deque(maxlen=SAMPLES + 1)
        self._lastStats = self.snapshot()
        self.history.append(self._lastStats)

    @property
    def responses(self) -> dict[str, int]:
        """Answers by status label (`STATUSES`, then "other")."""
        out = dict.fromkeys((*STATUSES, "other"), 0)
        for code, count in self.codes.items():
            out[_STATUS_LABEL.get(code, "other")] += count
        return out

    # Overridden: the totals the history and the stats line are made of.
    def totals(self) -> tuple[int, int, int, int]:
        """Requests, hits, misses and errors since the start."""
        raise NotImplementedError

    def snapshot(self) -> _Sample:
        return _Sample(self.clock.seconds(), *self.totals())

    def sample(self) -> None:
        """Note the totals now, for the status page's chart (every `SAMPLE_EVERY` s)."""
        self.history.append(self.snapshot())

    def series(self) -> list[tuple[float, float, float | None]]:
        """Per sample interval: its end time, requests per second and hit
        ratio (None when it had no request)."""
        out = []
        for before, after in pairwise(self.history):
            span = after.time - before.time
            requests = after.requests - before.requests
            if span <= 0:
                continue
            hits = after.hits - before.hits
            out.append((after.time, requests / span, hits / requests if requests else None))
        return out

    def registry(self) -> CollectorRegistry:
        """A registry holding this service's metrics and its process's (memory,
        open files, CPU time, the Python version), for ``/metrics``."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        return registry

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError

    def statsLine(self, final: bool = False) -> str:
        """The periodic summary: the interval since the last line, and the totals."""
        now = self.snapshot()
        last, self._lastStats = self._lastStats, now
        span = max(now.time - last.time, 1e-9)
        requests = now.requests - last.requests
        interval = _summary(
            requests,
            now.hits - last.hits,
            now.misses - last.misses,
            now.errors - last.errors,
            self.kind,
        )
        rate = requests / span
        total = _summary(now.requests, now.hits, now.misses, now.errors, self.kind)
        head = "final stats" if final else "stats"
        return (
            f"{head}: last {span:.0f} s: {interval}, {rate:.1f}/s; "
            f"since start: {total}{self.extraStats()}"
        )

    def extraStats(self) -> str:
        return ""


def _summary(requests: int, hits: int, misses: int, errors: int, kind: str) -> str:
    if kind == "proxy":
        ratio = f"{100 * hits / requests:.1f}%" if requests else "-"
        return f"{requests} requests, hit ratio {ratio}, {misses} misses, {errors} upstream errors"
    return f"{requests} requests, {errors} errors"


class ProxyMetrics(_Metrics):
    """The proxy's observer: counts per cache status, answer status and
    upstream outcome, and hands each answer to the access log if there is one."""

    kind = "proxy"

    def __init__(self, factory: Any, clock: Any = None) -> None:
        self.durations = {status: Histogram() for status in CACHE_STATUSES}
        self.upstream_requests = 0
        self.upstream_failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.upstream_duration = Histogram()
        self.purged = 0
        self.last_ok: float | None = None
        self.last_failure: tuple[float, str] | None = None
        self._upstreamTime: float | None = None
        super().__init__(factory, clock)

    @property
    def requests(self) -> dict[str, int]:
        """Answers by cache status (the duration histograms count them)."""
        return {status: h.count for status, h in self.durations.items()}

    def totals(self) -> tuple[int, int, int, int]:
        requests = self.requests
        misses = requests[MISS] + requests[RELOAD]
        return sum(requests.values()), requests[HIT], misses, sum(self.upstream_failures.values())

    # --- the observer (called by CacheProxyFactory) ---------------------------

    def requestDone(
        self,
        cache: str,
        answer: bytes,
        started: float,
        header: wire.Header,
        data: bytes,
        client: Any,
        upstream: float | None = None,
    ) -> None:
        """One answer was decided: count it, time it, log it."""
        # Inlined: this runs for every hit (the budget: < 5 %).
        now = self._seconds()
        took = now - started
        h = self.durations[cache]
        h.counts[bisect_left(BUCKETS, took)] += 1
        h.sum += took
        self.codes[((answer[6] & 3) << 8) | answer[7]] += 1
        log = self.access_log
        if log is not None:
            log.proxyRequest(now, client, header, data, cache, answer, now - started, upstream)

    def answered(
        self,
        answer: bytes,
        cache: str,
        started: float,
        header: wire.Header,
        data: bytes,
        client: Any,
    ) -> bytes:
        """A Deferred answer fired: a MISS or COALESCED answer marked G is
        STALE; a MISS marked H was answered by the shared tier (SHARED), with
        no upstream time; who fetched it gets the upstream time of the fetch
        that just ended."""
        upstream = None
        marks = answer[11]
        if marks & wire.EXT_GRACE:
            cache = STALE
        elif cache != COALESCED:
            # The fetch that just ended, unless the answer came from a cache
            # (the shared tier) without one.
            upstream, self._upstreamTime = self._upstreamTime, None
            if marks & wire.EXT_FROM_CACHE:
                upstream = None
                cache = SHARED if cache == MISS else cache
        self.requestDone(cache, answer, started, header, data, client, upstream)
        return answer

    def upstreamDone(self, sent: float) -> None:
        now = self.clock.seconds()
        self.upstream_requests += 1
        self._upstreamTime = now - sent
        self.upstream_duration.observe(now - sent)
        self.last_ok = now

    def upstreamFailed(self, reason: Failure) -> None:
        why = failure_reason(reason)
        self.upstream_requests += 1
        self.upstream_failures[why] += 1
        self._upstreamTime = None
        self.last_failure = (self.clock.seconds(), str(reason.value))

    def purgedAnswers(self, count: int) -> None:
        """A purge removed ``count`` entries."""
        self.purged += count

    # --- what is exported -------------------------------------------------------

    def upstreamState(self) -> str:
        """``up`` (its last answer came after any failure), ``down`` or ``unknown``."""
        if self.last_failure is not None and (
            self.last_ok is None or self.last_failure[0] >= self.last_ok
        ):
            return "down"
        return "up" if self.last_ok is not None else "unknown"

    def figures(self) -> dict[str, Any]:
        """Everything ``/stats.json`` and ``/status`` show."""
        factory = self.factory
        cache, pool = factory.cache, factory.pool
        total = sum(self.requests.values())
        idle = pool.idle
        return {
            "service": "cacheproxy",
            "uptime_seconds": self.clock.seconds() - self.started,
            "requests": dict(self.requests),
            "requests_total": total,
            "hit_ratio": self.requests[HIT] / total if total else None,
            "responses": dict(self.responses),
            "client_connections": factory.connectionCount,
            "cache": {
                "entries": cache.entries,
                "bytes": cache.bytes,
                "capacity_bytes": cache.max_bytes,
                "evictions": cache.evictions,
                "purged": self.purged,
            },
            "upstream": {
                "server": _server_of(pool),
                "state": self.upstreamState(),
                "framed": pool.framed,
                "pipelining": pool.pipelining,
                "connections": {"idle": idle, "busy": max(0, pool.connections - idle)},
                "requests": self.upstream_requests,
                "failures": dict(self.upstream_failures),
                "last_failure": self.last_failure[1] if self.last_failure else None,
                "servers": [
                    {
                        "server": server.name,
                        "up": server.healthy,
                        "outstanding": server.outstanding,
                        "answers": server.answers,
                        "failures": server.failures,
                        "ejections": server.ejected,
                    }
                    for server in getattr(pool, "servers", ())
                ],
            },
            "shared": _shared_figures(factory.shared),
            "history": [
                {"time": t, "requests_per_second": rate, "hit_ratio": ratio}
                for t, rate, ratio in self.series()
            ],
        }

    def extraStats(self) -> str:
        cache = self.factory.cache
        return f"; cache {cache.entries} entries, {cache.bytes} bytes"

    def collect(self) -> Iterator[Metric]:
        """The Prometheus metric families (a `prometheus_client` collector)."""
        factory = self.factory
        cache, pool = factory.cache, factory.pool
        requests = CounterMetricFamily(
            "cacheproxy_requests", "Requests answered, by cache status.", labels=["cache"]
        )
        for status in CACHE_STATUSES:
            requests.add_metric([status], self.requests[status])
        yield requests
        yield _responses("cacheproxy_responses", self.responses)
        durations = HistogramMetricFamily(
            "cacheproxy_request_duration_seconds",
            "Time from a request's arrival to its answer, by cache status.",
            labels=["cache"],
        )
        for status in CACHE_STATUSES:
            h = self.durations[status]
            durations.add_metric([status], h.cumulative(), h.sum)
        yield durations
        yield CounterMetricFamily(
            "cacheproxy_upstream_requests",
            "Requests sent to the calculator server (counted when they end).",
            value=self.upstream_requests,
        )
        failures = CounterMetricFamily(
            "cacheproxy_upstream_failures",
            "Requests to the calculator server that got no answer, by reason.",
            labels=["reason"],
        )
        for why in FAILURE_REASONS:
            failures.add_metric([why], self.upstream_failures[why])
        yield failures
        upstream = HistogramMetricFamily(
            "cacheproxy_upstream_duration_seconds",
            "Time from sending a request to the server to its answer.",
        )
        upstream.add_metric([], self.upstream_duration.cumulative(), self.upstream_duration.sum)
        yield upstream
        yield GaugeMetricFamily("cacheproxy_cache_entries", "Answers stored.", cache.entries)
        yield GaugeMetricFamily(
            "cacheproxy_cache_bytes",
            "Bytes the stored answers count against the capacity.",
            cache.bytes,
        )
        yield GaugeMetricFamily(
            "cacheproxy_cache_capacity_bytes",
            "The cache's capacity (--cache-size).",
            cache.max_bytes,
        )
        yield CounterMetricFamily(
            "cacheproxy_cache_evictions",
            "Answers evicted to stay within the capacity.",
            value=cache.evictions,
        )
        yield CounterMetricFamily(
            "cacheproxy_purged", "Answers removed by purges.", value=self.purged
        )
        yield GaugeMetricFamily(
            "cacheproxy_client_connections", "Open client connections.", factory.connectionCount
        )
        idle = pool.idle
        conns = GaugeMetricFamily(
            "cacheproxy_upstream_connections",
            "Connections to the calculator server, by state (busy includes connecting).",
            labels=["state"],
        )
        conns.add_metric(["idle"], idle)
        conns.add_metric(["busy"], max(0, pool.connections - idle))
        yield conns
        yield from _per_server(getattr(pool, "servers", ()))
        if factory.shared is not None:
            yield from _shared_tier(factory.shared)


class ServerMetrics(_Metrics):
    """The server's observer: counts per encoding and status, and timings."""

    kind = "server"

    def __init__(self, factory: Any, clock: Any = None) -> None:
        self.by_encoding: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.duration = Histogram()
        super().__init__(factory, clock)

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Answers by encoding and status label."""
        out: defaultdict[tuple[str, str], int] = defaultdict(int)
        for (encoding, code), count in self.by_encoding.items():
            out[encoding, _STATUS_LABEL.get(code, "other")] += count
        return dict(out)

    def totals(self) -> tuple[int, int, int, int]:
        requests = self.duration.count
        return requests, 0, 0, requests - self.codes[200]

    def requestDone(
        self,
        encoding: str,
        answer: bytes,
        started: float,
        header: wire.Header,
        data: bytes,
        client: Any,
    ) -> None:
        """One answer was sent: count it, time it, log it."""
        now = self._seconds()
        code = ((answer[6] & 3) << 8) | answer[7]
        self.codes[code] += 1
        self.by_encoding[encoding, code] += 1
        self.duration.observe(now - started)
        log = self.access_log
        if log is not None:
            log.serverRequest(now, client, header, data, encoding, answer, now - started)

    def figures(self) -> dict[str, Any]:
        total = sum(self.requests.values())
        return {
            "service": "cacheserver",
            "uptime_seconds": self.clock.seconds() - self.started,
            "requests_total": total,
            "requests": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
            "responses": dict(self.responses),
            "client_connections": self.factory.connectionCount,
            "history": [
                {"time": t, "requests_per_second": rate, "hit_ratio": None}
                for t, rate, _ in self.series()
            ],
        }

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cacheserver_requests",
            "Requests answered, by payload encoding and answer status.",
            labels=["encoding", "status"],
        )
        for (encoding, status), count in sorted(self.requests.items()):
            requests.add_metric([encoding, status], count)
        yield requests
        duration = HistogramMetricFamily(
            "cacheserver_request_duration_seconds",
            "Time to compute and send one answer.",
        )
        duration.add_metric([], self.duration.cumulative(), self.duration.sum)
        yield duration
        yield GaugeMetricFamily(
            "cacheserver_client_connections",
            "Open client connections.",
            self.factory.connectionCount,
        )


def _per_server(servers: Any) -> Iterator[Metric]:
    """With several ``--server``: each one's health and totals, by its address."""
    families = [
        (GaugeMetricFamily, "up", "1 while the server is in, 0 while taken out.", "healthy"),
        (GaugeMetricFamily, "outstanding", "Requests sent, not yet answered.", "outstanding"),
        (CounterMetricFamily, "answers", "Answers, health probes included.", "answers"),
        (CounterMetricFamily, "failures", "Requests and probes that failed.", "failures"),
        (CounterMetricFamily, "ejections", "Times the server was taken out.", "ejected"),
    ]
    for kind, name, text, attribute in families if servers else ():
        family = kind(f"cacheproxy_server_{name}", text, labels=["server"])
        for server in servers:
            family.add_metric([_server_of(server.pool)], int(getattr(server, attribute)))
        yield family


#: The shared tier's counters (`SharedCache.counters`) as metrics.
_SHARED_COUNTERS = [
    ("l2_lookups", "lookups", "Memory-cache misses looked up in memcached."),
    ("l2_hits", "hits", "Lookups that found a usable answer."),
    ("l2_timeouts", "timeouts", "Lookups that took longer than --memcached-timeout."),
    ("l2_rejected", "rejected", "Values found that were not a whole entry of ours for the key."),
    (
        "l2_unavailable",
        "unavailable",
        "Lookups skipped or lost: the key's node was down, overloaded or disconnected.",
    ),
    ("l2_stores", "stores", "Answers stored in memcached."),
]


def _shared_figures(shared: Any) -> dict[str, Any] | None:
    """The shared tier in ``/stats.json`` (None without ``--memcached``)."""
    if shared is None:
        return None
    counters = shared.counters()
    return {
        **{name: counters[key] for key, name, _ in _SHARED_COUNTERS},
        "nodes": {address(node.host, node.port): node.state for node in shared.nodes},
    }


def _shared_tier(shared: Any) -> Iterator[Metric]:
    """With ``--memcached``: what the shared tier did, and which nodes are up."""
    counters = shared.counters()
    for key, name, text in _SHARED_COUNTERS:
        yield CounterMetricFamily(f"cacheproxy_shared_{name}", text, value=counters[key])
    up = GaugeMetricFamily(
        "cacheproxy_shared_node_up", "1 while the memcached node answers.", labels=["node"]
    )
    for node in shared.nodes:
        up.add_metric([address(node.host, node.port)], int(node.state == "up"))
    yield up


def _server_of(pool: Any) -> str:
    """``host:port`` of the pool's server when its connector says, else its name."""
    connector: Any = getattr(pool, "connector", None)
    host = getattr(connector, "host", None)
    return str(pool.name) if host is None else address(host, connector.port)


def _responses(name: str, responses: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, "Answers sent, by status code.", labels=["status"])
    for status in STATUSES:
        family.add_metric([status], responses[status])
    if responses["other"]:
        family.add_metric(["other"], responses["other"])
    return family
