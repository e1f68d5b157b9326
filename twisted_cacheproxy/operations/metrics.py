"""What the services have done, counted cheaply on the request path and
exported on demand: Prometheus collectors, a JSON summary and the stats line.

`ProxyMetrics` and `ServerMetrics` are the factories' observers
(`proxy.interfaces.IProxyObserver`, `calculator.events.IServerObserver`):
each answer arrives as an event saying what happened (the cache status the
proxy decided, the upstream time, the failure), and they keep plain integers
and bucket lists, so counting one request costs a few additions.
`prometheus_client` sees them only when ``/metrics`` is scraped, through a
custom collector rendered in the reactor thread. The exported names are
stable (docs/operating.md).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
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
from zope.interface import implementer

from ..calculator.events import IServerObserver, Served
from ..calculator.server import CalculatorServerFactory
from ..proxy.events import CACHE_STATUSES, HIT, MISS, RELOAD, SHARED, Answered
from ..proxy.factory import CacheProxyFactory
from ..proxy.failures import FAILURE_KINDS
from ..proxy.interfaces import IProxyObserver, ISharedTier, IUpstreamServer
from ..transport.addresses import address
from ..transport.service import ServiceFactory
from ..transport.wire import status_of
from .units import plural

#: Answer status labels; any other code counts as "other".
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


class RequestLog(Protocol):
    """What the metrics hand each answered request to: the access log
    (`accesslog.AccessLog`) and ``--verbose``'s log lines (`accesslog.VerboseLog`)."""

    def proxyRequest(self, now: float, event: Answered) -> None: ...

    def serverRequest(self, now: float, event: Served) -> None: ...


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


class _Sample:
    """Totals at one moment (for the stats line and the status page's chart)."""

    __slots__ = ("errors", "hits", "misses", "requests", "shared", "time")

    def __init__(
        self, time: float, requests: int, hits: int, shared: int, misses: int, errors: int
    ) -> None:
        self.time = time
        self.requests = requests
        #: Hits of either kind (memory or the shared tier), and the shared tier's.
        self.hits = hits
        self.shared = shared
        self.misses = misses
        self.errors = errors


class _Metrics:
    """What both services' metrics share: the clock, history, the stats line."""

    kind = ""

    def __init__(self, factory: ServiceFactory, clock: Any = None) -> None:
        self.factory = factory
        self.clock: Any = clock if clock is not None else factory.clock
        #: Where each answered request is also written (access log, --verbose).
        self.request_logs: list[RequestLog] = []
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
    def totals(self) -> tuple[int, int, int, int, int]:
        """Requests, hits (of either kind), shared-tier hits, misses and errors."""
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

    def statsLine(self, final: bool = False) -> str | None:
        """The periodic summary: the interval since the last line, and the
        totals; None when nothing happened since the last line (a quiet log
        for an idle service), except for the final line."""
        now = self.snapshot()
        if not final and now.requests == self._lastStats.requests:
            return None
        last, self._lastStats = self._lastStats, now
        span = max(now.time - last.time, 1e-9)
        requests = now.requests - last.requests
        interval = self._summary(
            requests,
            now.hits - last.hits,
            now.shared - last.shared,
            now.misses - last.misses,
            now.errors - last.errors,
        )
        total = self._summary(now.requests, now.hits, now.shared, now.misses, now.errors)
        head = "final stats" if final else "stats"
        return (
            f"{head}: last {span:.0f} s: {interval}, {requests / span:.1f}/s; "
            f"since start: {total}{self.extraStats()}"
        )

    def _summary(self, requests: int, hits: int, shared: int, misses: int, errors: int) -> str:
        return f"{plural(requests, 'request')}, {plural(errors, 'error')}"

    def extraStats(self) -> str:
        return ""


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@implementer(IProxyObserver)
class ProxyMetrics(_Metrics):
    """The proxy's observer: counts per cache status and answer status,
    upstream times, and each answer handed to the request logs. What the
    servers did (answers, failures by kind, health) is read from the
    proxy's upstream (`IUpstreamServer`) when the figures are asked for."""

    kind = "proxy"
    factory: CacheProxyFactory

    def __init__(self, factory: CacheProxyFactory, clock: Any = None) -> None:
        self.durations = {status: Histogram() for status in CACHE_STATUSES}
        self.upstream_duration = Histogram()
        #: Answers removed from memory by purges.
        self.purged_answers = 0
        super().__init__(factory, clock)

    @property
    def requests(self) -> dict[str, int]:
        """Answers by cache status (the duration histograms count them)."""
        return {status: h.count for status, h in self.durations.items()}

    def totals(self) -> tuple[int, int, int, int, int]:
        requests = self.requests
        hits = requests[HIT] + requests[SHARED]
        misses = requests[MISS] + requests[RELOAD]
        errors = sum(_failures(self.factory.pool.servers).values())
        return sum(requests.values()), hits, requests[SHARED], misses, errors

    # --- the observer (called by CacheProxyFactory) ---------------------------

    def answered(self, event: Answered) -> None:
        """One answer was decided: count it, time it, log it."""
        # Inlined: this runs for every hit.
        now = self._seconds()
        took = now - event.started
        h = self.durations[event.status]
        h.counts[bisect_left(BUCKETS, took)] += 1
        h.sum += took
        self.codes[status_of(event.answer)] += 1
        if event.upstream is not None:
            self.upstream_duration.observe(event.upstream)
        for log in self.request_logs:
            log.proxyRequest(now, event)

    def purged(self, count: int) -> None:
        """A purge removed ``count`` answers from memory."""
        self.purged_answers += count

    # --- what is exported -------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """Everything ``/stats.json`` and ``/status`` show."""
        factory = self.factory
        cache, pool = factory.cache, factory.pool
        requests = self.requests
        total = sum(requests.values())
        servers = pool.servers
        failures = _failures(servers)
        last = _last_failure(servers)
        idle = pool.idle
        return {
            "service": "cacheproxy",
            "uptime_seconds": self.clock.seconds() - self.started,
            "requests": dict(requests),
            "requests_total": total,
            "hit_ratio": _ratio(requests[HIT] + requests[SHARED], total),
            "shared_hit_ratio": _ratio(requests[SHARED], total),
            "responses": dict(self.responses),
            "client_connections": factory.connectionCount,
            "cache": {
                "entries": cache.entries,
                "bytes": cache.bytes,
                "capacity_bytes": cache.max_bytes,
                "evictions": cache.evictions,
                "purged": self.purged_answers,
            },
            "upstream": {
                "server": ", ".join(s.address for s in servers),
                "state": _state(servers),
                "framed": pool.framed,
                "pipelining": pool.pipelining,
                "connections": {"idle": idle, "busy": max(0, pool.connections - idle)},
                "requests": sum(s.tally.answers for s in servers) + sum(failures.values()),
                "failures": failures,
                "last_failure": None if last is None else last[1],
                "last_failure_time": None if last is None else last[0],
                "servers": [
                    {
                        "server": server.address,
                        "up": server.healthy,
                        "state": _server_state(server),
                        "outstanding": server.outstanding,
                        "answers": server.tally.answers,
                        "failures": sum(server.tally.failures.values()),
                        "ejections": server.ejected,
                    }
                    for server in servers
                ],
            },
            "shared": _shared_figures(factory.shared),
            "history": [
                {"time": t, "requests_per_second": rate, "hit_ratio": ratio}
                for t, rate, ratio in self.series()
            ],
        }

    def _summary(self, requests: int, hits: int, shared: int, misses: int, errors: int) -> str:
        ratio = "-" if not requests else f"{100 * hits / requests:.1f}%"
        if requests and self.factory.shared is not None:
            ratio += f" ({100 * shared / requests:.1f}% from the shared tier)"
        misses_ = plural(misses, "miss", "misses")
        return (
            f"{plural(requests, 'request')}, hit ratio {ratio}, {misses_}, "
            f"{plural(errors, 'upstream error')}"
        )

    def extraStats(self) -> str:
        cache = self.factory.cache
        return f"; cache {plural(cache.entries, 'entry', 'entries')}, {cache.bytes} bytes"

    def collect(self) -> Iterator[Metric]:
        """The Prometheus metric families (a `prometheus_client` collector)."""
        factory = self.factory
        cache, pool = factory.cache, factory.pool
        servers = pool.servers
        requests = CounterMetricFamily(
            "cacheproxy_requests", "Requests answered, by cache status.", labels=["cache"]
        )
        for status, count in self.requests.items():
            requests.add_metric([status], count)
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
        failures = _failures(servers)
        yield CounterMetricFamily(
            "cacheproxy_upstream_requests",
            "Requests sent to the calculator servers, each attempt and health probe "
            "(counted when they end).",
            value=sum(s.tally.answers for s in servers) + sum(failures.values()),
        )
        by_reason = CounterMetricFamily(
            "cacheproxy_upstream_failures",
            "Attempts on a calculator server that got no answer, by reason "
            "(a miss may fail on one server and be answered by another).",
            labels=["reason"],
        )
        for kind, count in failures.items():
            by_reason.add_metric([kind], count)
        yield by_reason
        upstream = HistogramMetricFamily(
            "cacheproxy_upstream_duration_seconds",
            "Time from sending a miss to the server to its answer.",
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
            "cacheproxy_purged", "Answers removed by purges.", value=self.purged_answers
        )
        yield GaugeMetricFamily(
            "cacheproxy_client_connections", "Open client connections.", factory.connectionCount
        )
        idle = pool.idle
        conns = GaugeMetricFamily(
            "cacheproxy_upstream_connections",
            "Connections to the calculator servers, by state (busy includes connecting).",
            labels=["state"],
        )
        conns.add_metric(["idle"], idle)
        conns.add_metric(["busy"], max(0, pool.connections - idle))
        yield conns
        yield from _per_server(servers)
        if factory.shared is not None:
            yield from _shared_tier(factory.shared)


@implementer(IServerObserver)
class ServerMetrics(_Metrics):
    """The server's observer: counts per encoding and status, and timings."""

    kind = "server"

    def __init__(self, factory: CalculatorServerFactory, clock: Any = None) -> None:
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

    def totals(self) -> tuple[int, int, int, int, int]:
        requests = self.duration.count
        return requests, 0, 0, 0, requests - self.codes[200]

    def served(self, event: Served) -> None:
        """One answer was sent: count it, time it, log it."""
        now = self._seconds()
        code = status_of(event.answer)
        self.codes[code] += 1
        self.by_encoding[event.encoding, code] += 1
        self.duration.observe(now - event.started)
        for log in self.request_logs:
            log.serverRequest(now, event)

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


# --- the servers behind the proxy ------------------------------------------------


def _failures(servers: Sequence[IUpstreamServer]) -> dict[str, int]:
    """Failed attempts over every server, by kind."""
    out = dict.fromkeys(FAILURE_KINDS, 0)
    for server in servers:
        for kind, count in server.tally.failures.items():
            out[kind] += count
    return out


def _last_failure(servers: Sequence[IUpstreamServer]) -> tuple[float, str] | None:
    """The latest failure of any server: (clock time, message)."""
    failures = [s.tally.last_failure for s in servers if s.tally.last_failure is not None]
    return max(failures, default=None, key=lambda failure: failure[0])


def _server_state(server: IUpstreamServer) -> str:
    """``down`` while taken out, else what its last outcome says."""
    return str(server.tally.state) if server.healthy else "down"


def _state(servers: Sequence[IUpstreamServer]) -> str:
    """``up`` while any server answers, ``down`` when none does."""
    states = [_server_state(s) for s in servers]
    if "up" in states:
        return "up"
    return "down" if all(state == "down" for state in states) else "unknown"


def _per_server(servers: Sequence[IUpstreamServer]) -> Iterator[Metric]:
    """Each server's health and totals, labelled with its address."""
    families = [
        (GaugeMetricFamily, "up", "1 while the server is in, 0 while taken out.", "up"),
        (GaugeMetricFamily, "outstanding", "Requests sent, not yet answered.", "outstanding"),
        (CounterMetricFamily, "answers", "Answers, health probes included.", "answers"),
        (CounterMetricFamily, "failures", "Attempts and probes that failed.", "failures"),
        (CounterMetricFamily, "ejections", "Times the server was taken out.", "ejections"),
    ]
    rows = {
        server.address: {
            "up": int(server.healthy),
            "outstanding": server.outstanding,
            "answers": server.tally.answers,
            "failures": sum(server.tally.failures.values()),
            "ejections": server.ejected,
        }
        for server in servers
    }
    for kind, name, text, field in families:
        family = kind(f"cacheproxy_server_{name}", text, labels=["server"])
        for server, row in rows.items():
            family.add_metric([server], row[field])
        yield family


# --- the shared tier -------------------------------------------------------------


#: The shared tier's counters (`SharedCache.counters`) as metrics.
_SHARED_COUNTERS = [
    ("l2_lookups", "lookups", "Memory-cache misses looked up in memcached."),
    ("l2_hits", "hits", "Lookups that found a usable answer."),
    ("l2_timeouts", "timeouts", "Lookups that took longer than --memcached-timeout."),
    ("l2_rejected", "rejected", "Values found that were not a whole entry of ours for the key."),
    ("l2_unverified", "unverified", "Entries whose signature did not verify: forged or altered."),
    (
        "l2_unavailable",
        "unavailable",
        "Lookups skipped or lost: the key's node was down, overloaded or disconnected.",
    ),
    ("l2_stores", "stores", "Answers stored in memcached."),
]


def _shared_figures(shared: ISharedTier | None) -> dict[str, Any] | None:
    """The shared tier in ``/stats.json`` (None without ``--memcached``)."""
    if shared is None:
        return None
    counters = shared.counters()
    return {
        **{name: counters[key] for key, name, _ in _SHARED_COUNTERS},
        "nodes": {address(node.host, node.port): node.state for node in shared.nodes},
    }


def _shared_tier(shared: ISharedTier) -> Iterator[Metric]:
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


def _responses(name: str, responses: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, "Answers sent, by status code.", labels=["status"])
    for status in STATUSES:
        family.add_metric([status], responses[status])
    if responses["other"]:
        family.add_metric(["other"], responses["other"])
    return family
