"""The proxy's and server's metrics, access log and admin resources, driven
by fakes: the proxy harness (StringTransports and a
`MemoryReactorClock`), `DummyRequest`s for the web resources, and a real
access-log file written by its thread (read after `close`, never by sleeping)."""

from __future__ import annotations

import json

import pytest
from helpers import TS, answer, error_answer, request_frame, scrape, success_of
from proxyharness import REQUEST, Fleet, Harness, X, Y, Z
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.template import flattenString
from twisted.web.test.requesthelper import DummyRequest

from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.operations import accesslog, site, statuspage
from twisted_cacheproxy.operations.accesslog import AccessLog
from twisted_cacheproxy.operations.metrics import ProxyMetrics, ServerMetrics
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.wire import FOREVER

pytestmark = pytest.mark.usefixtures("proxy_log")


class Observed(Harness):
    """The proxy harness with metrics and an access log in ``path``."""

    def __init__(self, path=None, **options) -> None:
        super().__init__(**options)
        self.log = None
        if path is not None:
            self.log = AccessLog(str(path), self.reactor)
            self.log.start()
            self.metrics.request_logs.append(self.log)

    def lines(self) -> list[str]:
        assert self.log is not None
        self.log.close()
        with open(self.log.path) as f:
            return f.read().splitlines()


def status_html(page) -> str:
    """A status page element flattened, as ``/status`` sends it."""
    return success_of(flattenString(None, page)).decode()


def cache_counts(samples) -> dict[str, float]:
    return {
        dict(labels)["cache"]: value
        for (name, labels), value in samples.items()
        if name == "cacheproxy_requests_total"
    }


def every_status(h: Observed):
    """One request of each cache status, in a known order; the upstream connection."""
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3))  # MISS
    c.take()
    c.send(request_frame(X, ts=TS))  # HIT
    c.send(request_frame(X, max_age=0, ts=TS))  # RELOAD
    up.take()
    up.reply(answer(3))
    c.send(request_frame(Y, cache=False, max_age=FOREVER, ts=TS))  # BYPASS
    up.take()
    up.reply(answer(6, cache=False, max_age=0))
    # COALESCED: two identical misses pipelined, one upstream request.
    c.send(request_frame(Z, steps=True, ts=TS), request_frame(Z, steps=True, ts=TS))
    assert up.take() == request_frame(Z, steps=True, ts=TS)  # asked for once
    up.reply(answer(6, steps=["max(2, 3) + 3", "6"]))
    c.take()
    return c, up


def test_each_cache_status_is_counted_and_timed(tmp_path):
    h = Observed(tmp_path / "access.log")
    every_status(h)
    assert h.metrics.requests == {
        "hit": 1,
        "shared": 0,
        "miss": 2,
        "coalesced": 1,
        "stale": 0,
        "bypass": 1,
        "reload": 1,
    }
    samples = scrape(h.metrics)
    assert cache_counts(samples) == h.metrics.requests
    assert samples["cacheproxy_responses_total", (("status", "200"),)] == 6
    assert samples["cacheproxy_upstream_requests_total", ()] == 4
    assert samples["cacheproxy_cache_entries", ()] == 2
    assert samples["cacheproxy_client_connections", ()] == 1
    assert samples["cacheproxy_upstream_connections", (("state", "idle"),)] == 1
    assert samples["cacheproxy_request_duration_seconds_count", (("cache", "hit"),)] == 1
    assert samples["cacheproxy_cache_capacity_bytes", ()] == 64 << 20
    lines = h.lines()
    assert [line.split()[5] for line in lines] == [
        "MISS",
        "HIT",
        "RELOAD",
        "BYPASS",
        "COALESCED",  # the waiter is answered as the fetch ends, before the fetcher
        "MISS",
    ]


def test_stale_and_failures_by_reason(tmp_path):
    h = Observed(tmp_path / "access.log", stale_if_error=30, retries=1)
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3, max_age=10))
    up.close()
    h.advance(15)
    c.send(request_frame(X, ts=TS))
    h.refuse()  # STALE: served past its lifetime, marked G
    c.send(request_frame(Y, ts=TS))
    h.refuse()  # a 500
    c.take()
    assert h.metrics.requests["stale"] == 1
    assert h.metrics.requests["miss"] == 2
    upstream = h.metrics.figures()["upstream"]
    assert upstream["failures"]["unreachable"] == 2
    assert upstream["last_failure_time"] == h.now()
    assert h.metrics.responses["500"] == 1
    assert upstream["state"] == "down"
    samples = scrape(h.metrics)
    assert samples["cacheproxy_upstream_failures_total", (("reason", "unreachable"),)] == 2
    lines = h.lines()
    stale, failed = lines[1].split(), lines[2].split()
    assert stale[5:7] == ["STALE", "200"] and stale[9] == "-"
    assert failed[5:7] == ["MISS", "500"] and failed[9] == "-"


def odd_status() -> bytes:
    return wire.rewrite(answer(3), flags=wire.make_flags(request=False, status=999))


@pytest.mark.parametrize(
    ("stage", "kind"),
    [
        (lambda h, up: h.refuse(), "unreachable"),
        (lambda h, up: (h.accept(), h.advance(10)), "timeout"),
        (lambda h, up: h.accept().close(), "closed"),
        (lambda h, up: h.accept().reply(odd_status()), "invalid"),
    ],
    ids=["unreachable", "timeout", "closed", "invalid"],
)
def test_failures_are_counted_by_the_kind_the_pool_gives_them(stage, kind):
    """By what happened, never by the wording of the message."""
    h = Observed(retries=1, timeout=10)
    c = h.client()
    c.send(request_frame(X, ts=TS))
    stage(h, None)
    c.take()
    samples = scrape(h.metrics)
    failures = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "cacheproxy_upstream_failures_total"
    }
    assert failures == {k: (1 if k == kind else 0) for k in failures}
    assert h.metrics.responses["500"] == 1


# --- the access log ---------------------------------------------------------------


def test_access_log_line_fields(tmp_path):
    h = Observed(tmp_path / "access.log")
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    h.advance(0.25)
    c.send(request_frame(X, ts=TS))
    (miss, hit) = h.lines()
    fields = hit.split(" ")
    assert fields[0] == "2023-11-14T22:13:20.250Z"
    assert fields[1:6] == ["192.168.1.1:54321", "text", "-C", "65535", "HIT"]
    assert fields[6] == "200" and int(fields[7]) == len(answer(3))
    assert fields[8] == "0.000" and fields[9] == "-"
    assert " ".join(fields[10:]) == '"1 + 2"'
    assert miss.split(" ")[5] == "MISS"


def test_access_log_asks_a_connection_for_its_peer_once(tmp_path):
    """An address object per request is costly: each connection's is worked out once."""
    h = Observed(tmp_path / "access.log")
    c = h.client()
    asked = []
    peer = c.transport.getPeer
    c.transport.getPeer = lambda: asked.append(1) or peer()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    c.send(request_frame(X, ts=TS), request_frame(X, ts=TS))
    lines = h.lines()
    assert [line.split(" ")[1] for line in lines] == ["192.168.1.1:54321"] * 3
    assert asked == [1]


def test_access_log_shows_a_dash_for_a_peer_without_host_and_port(tmp_path):
    """A client on a UNIX socket has no host and port: its lines say ``-``."""
    h = Observed(tmp_path / "access.log")
    c = h.client()
    c.transport.getPeer = lambda: UNIXAddress(None)
    h.miss(c, request_frame(X, ts=TS), answer(3))
    assert [line.split(" ")[1] for line in h.lines()] == ["-"]


def test_access_log_quotes_what_could_split_or_forge_a_line(tmp_path):
    h = Observed(tmp_path / "access.log")
    c = h.client()
    nasty = (
        b'1 + "2"\n2023-11-14T22:13:20.000Z 10.0.0.1:1 text SC 65535 HIT 200 1 0 - "x"'
        b"\r\\ \xe2\x80\xa8\xff"
    )
    h.miss(c, request_frame(nasty, ts=TS), error_answer("SyntaxError", "bad"))
    (line,) = h.lines()
    assert line.count('"') == 2 + line.count('\\"')
    expression = line.split(" ", 10)[10]
    assert json.loads(expression) == nasty.decode("utf-8", "backslashreplace")
    assert expression.isascii() and "\\n" in expression and "\\u2028" in expression
    assert line.split()[5:7] == ["MISS", "400"]


def test_access_log_cuts_long_expressions_and_skips_pickles(tmp_path):
    h = Observed(tmp_path / "access.log")
    c = h.client()
    long = b"1 + " * 100 + b"1"
    up = h.miss(c, request_frame(long, ts=TS), answer(101))
    legacy = b"\x80\x04junk"
    h.miss(c, request_frame(legacy, ts=TS), error_answer("ValueError", "unsupported payload"), up)
    first, second = h.lines()
    expression = json.loads(first.split(" ", 10)[10])
    assert expression == long.decode()[: accesslog.MAX_EXPRESSION] + "..."
    assert second.split()[2] == "legacy" and second.split()[-1] == "-"


def test_access_log_reopen_and_drop_when_the_disk_falls_behind(tmp_path):
    path = tmp_path / "a.log"
    clock = Clock()
    log = AccessLog(str(path), clock, max_backlog=60)
    log.start()
    log.line("one\n")
    log.flush()
    path.rename(tmp_path / "a.log.1")  # as logrotate does: rename, then signal
    log.reopen()
    log.line("two\n")
    for _ in range(20):
        log.line("x" * 9 + "\n")  # past the backlog bound: dropped, not queued
    assert log.dropped > 0
    log.close()
    assert (tmp_path / "a.log.1").read_text() == "one\n"
    assert path.read_text().startswith("two\n")
    assert len(path.read_text()) <= 60 + 10


def test_lines_wait_in_the_reactor_thread_until_flushed(tmp_path):
    clock = Clock()
    log = AccessLog(str(tmp_path / "a.log"), clock)
    log.start()
    log.line("one\n")
    assert clock.getDelayedCalls() and log._handed == 0
    clock.advance(accesslog.FLUSH_DELAY)
    assert log._handed == 4 and not clock.getDelayedCalls()
    log.close()
    assert (tmp_path / "a.log").read_text() == "one\n"


# --- the server --------------------------------------------------------------------------


def test_server_metrics_by_encoding_and_status(tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    factory = CalculatorServerFactory(clock=clock, idle_timeout=None)
    metrics = ServerMetrics(factory)
    factory.observer = metrics
    log = AccessLog(str(tmp_path / "s.log"), clock)
    log.start()
    metrics.request_logs.append(log)
    p = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
    p.makeConnection(StringTransport())
    p.dataReceived(
        request_frame(b"1 + 2", ts=TS)
        + request_frame(b"1 / 0", ts=TS)
        + request_frame(b"\x80\x04junk", ts=TS)
    )
    samples = scrape(metrics)
    key = "cacheserver_requests_total"
    assert samples[key, (("encoding", "text"), ("status", "200"))] == 1
    assert samples[key, (("encoding", "text"), ("status", "400"))] == 1
    assert samples[key, (("encoding", "legacy"), ("status", "400"))] == 1
    assert samples["cacheserver_request_duration_seconds_count", ()] == 3
    assert samples["cacheserver_client_connections", ()] == 1
    log.close()
    lines = (tmp_path / "s.log").read_text().splitlines()
    assert [line.split()[5:7] for line in lines] == [["-", "200"], ["-", "400"], ["-", "400"]]
    assert "3 requests, 2 errors" in metrics.statsLine()


# --- the stats line and the history --------------------------------------------------------


def test_stats_line_covers_the_interval_and_the_total():
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    c.send(request_frame(X, ts=TS), request_frame(X, ts=TS))
    h.advance(60)
    first = h.metrics.statsLine()
    assert first.startswith("stats: last 60 s: 3 requests, hit ratio 66.7%, 1 miss, ")
    assert "since start: 3 requests" in first and "cache 1 entry," in first
    c.send(request_frame(X, ts=TS))
    h.advance(60)
    second = h.metrics.statsLine(final=True)
    assert second.startswith("final stats: last 60 s: 1 request, hit ratio 100.0%, 0 misses")
    assert "since start: 4 requests, hit ratio 75.0%" in second


def test_no_stats_line_for_an_idle_interval_but_always_a_final_one():
    h = Observed()
    h.advance(60)
    assert h.metrics.statsLine() is None
    h.advance(60)
    assert h.metrics.statsLine(final=True).startswith(
        "final stats: last 120 s: 0 requests, hit ratio -, 0 misses, 0 upstream errors, 0.0/s;"
    )


def test_series_gives_rate_and_hit_ratio_per_sample():
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    c.send(request_frame(X, ts=TS))
    h.advance(5)
    h.metrics.sample()
    h.advance(5)
    h.metrics.sample()
    (_, rate1, ratio1), (_, rate2, ratio2) = h.metrics.series()
    assert (rate1, ratio1) == (2 / 5, 0.5)
    assert (rate2, ratio2) == (0.0, None)


# --- purge and who may POST ----------------------------------------------------------


def post(resource, args=None, client=("127.0.0.1", 5000), headers=()):
    request = DummyRequest([b""])
    request.method = b"POST"
    host, port = client
    request.client = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    request.args = args or {}
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    body = resource.render_POST(request)
    if body == server.NOT_DONE_YET:
        assert request.finished
        body = b"".join(request.written)
    return request.responseCode or 200, json.loads(body)


def test_purge_everything_then_the_next_request_reaches_the_server():
    h = Observed()
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3))
    h.miss(c, request_frame(Y, ts=TS), answer(6), up)
    purge = site.PurgeResource(h.factory.purge, site.Access())
    assert post(purge) == (200, {"purged": 2, "shared": 0})
    assert h.factory.cache.entries == 0 and h.metrics.purged_answers == 2
    c.send(request_frame(X, ts=TS))
    assert up.take() == request_frame(X, ts=TS)  # a miss: asked upstream again
    assert scrape(h.metrics)["cacheproxy_purged_total", ()] == 2


def test_purge_one_expression_with_and_without_steps():
    h = Observed()
    c = h.client()
    up = h.miss(c, request_frame(X, ts=TS), answer(3))
    h.miss(c, request_frame(X, steps=True, ts=TS), answer(3, steps=["1 + 2", "3"]), up)
    h.miss(c, request_frame(Y, ts=TS), answer(6), up)
    purge = site.PurgeResource(h.factory.purge, site.Access())
    assert post(purge, {b"expr": [X]}) == (200, {"purged": 2, "shared": 0})
    assert post(purge, {b"expr": [X]}) == (200, {"purged": 0, "shared": 0})
    assert h.factory.cache.entries == 1
    c.send(request_frame(Y, ts=TS))
    assert up.take() == b""  # still a hit
    c.send(request_frame(X, ts=TS))
    assert up.take() == request_frame(X, ts=TS)


@pytest.mark.parametrize("client", [("10.1.2.3", 4000), ("2001:db8::1", 4000)])
def test_purge_from_another_host_is_refused_without_a_token(client):
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    purge = site.PurgeResource(h.factory.purge, site.Access())
    code, body = post(purge, client=client)
    assert code == 403 and "loopback" in body["error"]
    assert h.factory.cache.entries == 1


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
    ],
)
def test_loopback_addresses(host, loopback):
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 1)
    assert site.is_loopback(address) is loopback


def test_purge_with_a_token_needs_it_from_everyone():
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    purge = site.PurgeResource(h.factory.purge, site.Access(b"s3cret"))
    code, _ = post(purge)  # loopback is not enough
    assert code == 401
    code, _ = post(purge, headers=[(b"Authorization", b"Bearer wrong")])
    assert code == 401
    assert h.factory.cache.entries == 1
    ok = post(purge, client=("10.1.2.3", 1), headers=[(b"Authorization", b"Bearer s3cret")])
    assert ok == (200, {"purged": 1, "shared": 0})


def test_a_cross_site_post_is_refused():
    """A web page the operator visits must not purge the cache by posting to the admin site."""
    h = Observed()
    purge = site.PurgeResource(h.factory.purge, site.Access())
    code, body = post(
        purge, headers=[(b"Origin", b"http://evil.example"), (b"Host", b"127.0.0.1:9100")]
    )
    assert code == 403 and "cross-site" in body["error"]
    same = [(b"Origin", b"http://127.0.0.1:9100"), (b"Host", b"127.0.0.1:9100")]
    assert post(purge, headers=same) == (200, {"purged": 0, "shared": 0})


def test_status_page_and_stats_json_show_the_figures():
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    c.send(request_frame(X, ts=TS), request_frame(X, ts=TS), request_frame(X, ts=TS))
    page = status_html(statuspage.ProxyStatus(h.metrics, "cacheproxy 127.0.0.1:9998"))
    assert '<td class="n" id="requests-hit">3</td>' in page
    assert '<div class="big" id="hit-ratio">75.0%</div>' in page
    assert '<meta http-equiv="refresh"' in page and "<svg" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    request_ = DummyRequest([b""])
    figures = json.loads(site.StatsResource(h.metrics).render_GET(request_))
    assert figures["requests"]["hit"] == 3 and figures["hit_ratio"] == 0.75
    assert figures["cache"]["entries"] == 1


# --- the options and the services beside the listener -----------------------------------


def test_operating_options_and_services(tmp_path):
    from helpers import built
    from twisted.python import usage

    from twisted_cacheproxy.application.options import ProxyOptions, ServerOptions

    config = ProxyOptions()
    config.parseOptions(["--stats-interval", "0"])
    assert (config["admin-port"], config["admin-interface"], config["access-log"]) == (
        0,
        "127.0.0.1",
        None,
    )
    service = built(config)
    assert not hasattr(service, "main")  # nothing to watch: the listener alone
    assert service.factory.observer is None

    config = ProxyOptions()
    config.parseOptions(["--access-log", str(tmp_path / "a.log")])
    service = built(config)
    assert isinstance(service.main.factory.observer, ProxyMetrics)
    names = sorted(type(s).__name__ for s in service)
    assert names == ["AccessLogService", "ListeningService", "StatsService"]
    (log,) = service.main.factory.observer.request_logs
    log.close()  # opened, never started
    for argv, message in (
        (["--admin-port", "70000"], "--admin-port must be 1..65535, not 70000"),
        (["--stats-interval", "-1"], "--stats-interval cannot be negative"),
    ):
        with pytest.raises(usage.UsageError, match=message):
            ServerOptions().parseOptions(argv)


def test_a_busy_admin_port_or_a_bad_log_path_is_one_line(tmp_path):
    import socket

    from helpers import built

    from twisted_cacheproxy.application.options import ServerOptions

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ServerOptions()
        config.parseOptions(["--admin-port", str(port)])
        with pytest.raises(SystemExit, match=rf"cacheserver: cannot listen on 127.0.0.1:{port}"):
            built(config)
    config = ServerOptions()
    config.parseOptions(["--access-log", str(tmp_path / "no" / "such" / "dir")])
    with pytest.raises(SystemExit, match="cacheserver: cannot open --access-log"):
        built(config)


class _SharedTier:
    """A shared tier holding one entry, answering at once."""

    def __init__(self, key: bytes, entry) -> None:
        self.key, self.entry = key, entry

    def get(self, key: bytes):
        from twisted.internet import defer

        return defer.succeed(self.entry if key == self.key else None)

    def put(self, key: bytes, entry) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def purge(self):
        from twisted.internet import defer

        return defer.succeed(0)

    def delete(self, keys):
        from twisted.internet import defer

        return defer.succeed(0)

    def counters(self) -> dict[str, int]:
        return dict.fromkeys(
            (
                "l2_lookups",
                "l2_hits",
                "l2_timeouts",
                "l2_rejected",
                "l2_unverified",
                "l2_unavailable",
                "l2_stores",
            ),
            0,
        )

    nodes = ()
    purged = None


def test_a_miss_answered_by_the_shared_tier_is_shared_without_upstream_time(tmp_path):
    from twisted_cacheproxy.proxy.entry import Entry
    from twisted_cacheproxy.proxy.factory import cache_keys

    stored = wire.rewrite(answer(6), ext=wire.EXT_FRAMED | wire.EXT_FROM_CACHE)
    h = Observed(tmp_path / "access.log")
    h.factory.shared = _SharedTier(cache_keys(Y)[0], Entry(stored, h.now(), wire.FOREVER))
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))  # fetched: the shared tier has not got it
    c.send(request_frame(Y, ts=TS))  # the shared tier's answer, no server
    assert c.take() and h.attempts == 1
    first, second = h.lines()
    assert first.split()[5] == "MISS" and first.split()[9] != "-"
    assert second.split()[5] == "SHARED" and second.split()[9] == "-"
    assert h.metrics.upstream_duration.count == 1
    assert (h.metrics.requests["miss"], h.metrics.requests["shared"]) == (1, 1)
    assert h.metrics.figures()["hit_ratio"] == 0.5  # a shared hit is a hit
    assert h.metrics.figures()["shared_hit_ratio"] == 0.5


def test_several_servers_each_have_their_health_and_totals():
    """Server 0 refuses until it is taken out; server 1 answers every miss.
    Then server 0's probe is answered and it is back in."""
    from twisted_cacheproxy.proxy.balancer import EJECT_FIRST, MAX_FAILS
    from twisted_cacheproxy.proxy.cache import MemoryCache
    from twisted_cacheproxy.proxy.factory import CacheProxyFactory

    fleet = Fleet(2)
    fleet.clock.advance(1_796_688_000)  # 2026-12-08 00:00:00 UTC
    factory = CacheProxyFactory(
        MemoryCache(1 << 20, fleet.clock), fleet.balancer, clock=fleet.clock
    )
    metrics = ProxyMetrics(factory)
    for _ in range(MAX_FAILS):
        d = fleet.balancer.fetch(REQUEST)
        fleet.refuse(0)
        fleet.answer(1)
        assert d.called
    first = (("server", "127.0.0.1:9001"),)
    second = (("server", "127.0.0.1:9002"),)
    m = scrape(metrics)
    assert m["cacheproxy_server_up", first] == 0 and m["cacheproxy_server_up", second] == 1
    assert m["cacheproxy_server_failures_total", first] == MAX_FAILS
    assert m["cacheproxy_server_ejections_total", first] == 1
    assert m["cacheproxy_server_answers_total", second] == MAX_FAILS
    assert m["cacheproxy_server_answers_total", first] == 0
    servers = metrics.figures()["upstream"]["servers"]
    assert [(s["up"], s["failures"], s["answers"]) for s in servers] == [
        (False, MAX_FAILS, 0),
        (True, 0, MAX_FAILS),
    ]
    # The summary agrees with the rows: the failures failed over are counted.
    upstream = metrics.figures()["upstream"]
    assert upstream["failures"]["unreachable"] == MAX_FAILS
    assert upstream["state"] == "up" and upstream["requests"] == 2 * MAX_FAILS
    assert m["cacheproxy_upstream_failures_total", (("reason", "unreachable"),)] == MAX_FAILS
    page = status_html(statuspage.ProxyStatus(metrics, "t"))
    assert f"taken out</span>, 0 outstanding, 0 answers, {MAX_FAILS} failures, 1 times" in page
    assert upstream["last_failure_time"] == 1_796_688_000
    last = f'id="upstream-last-failure">2026-12-08 00:00:00 UTC: {upstream["last_failure"]}<'
    assert last in page
    fleet.clock.advance(EJECT_FIRST)
    fleet.answer(0)  # the probe
    m = scrape(metrics)
    assert m["cacheproxy_server_up", first] == 1
    assert m["cacheproxy_server_answers_total", first] == 1


def test_one_server_has_its_row_and_families_too():
    """Named by its address, as with several."""
    h = Observed()
    c = h.client()
    h.miss(c, request_frame(X, ts=TS), answer(3))
    samples = scrape(h.metrics)
    assert samples["cacheproxy_server_answers_total", (("server", "127.0.0.1:9999"),)] == 1
    (row,) = h.metrics.figures()["upstream"]["servers"]
    assert (row["server"], row["up"], row["state"], row["answers"]) == (
        "127.0.0.1:9999",
        True,
        "up",
        1,
    )


def test_a_purge_that_fails_is_a_500_and_a_logged_failure(proxy_log):
    from twisted.internet import defer

    h = Observed()
    h.factory.purge = lambda expressions: defer.fail(RuntimeError("boom"))
    purge = site.PurgeResource(h.factory.purge, site.Access())
    assert post(purge) == (500, {"error": "the purge failed; see the log"})
    (event,) = [e for e in proxy_log if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError)
    assert event["log_format"] == "purge of {what} failed"
    proxy_log.remove(event)  # expected: the fixture fails a test on any other


def test_two_servers_that_never_answer_count_their_timeouts_as_timeouts():
    """The balancer's own timeout is a timeout on /metrics, not a bad answer."""
    from twisted_cacheproxy.proxy.cache import MemoryCache
    from twisted_cacheproxy.proxy.factory import CacheProxyFactory

    fleet = Fleet(2, timeout=10.0)
    cache = MemoryCache(1 << 20, fleet.clock)
    factory = CacheProxyFactory(cache, fleet.balancer, clock=fleet.clock)
    metrics = ProxyMetrics(factory)
    factory.observer = metrics
    d = fleet.balancer.fetch(REQUEST)
    for connector in fleet.connectors:  # they accept, and never answer
        for i, attempt in enumerate(connector.attempts):
            if not attempt.called:
                connector.accept(i)
    fleet.clock.advance(10.0)
    assert d.called
    d.addErrback(lambda f: None)
    failures = {
        dict(labels)["reason"]: value
        for (name, labels), value in scrape(metrics).items()
        if name == "cacheproxy_upstream_failures_total"
    }
    assert failures["timeout"] == 1 and failures["invalid"] == 0
    assert sum(failures.values()) == 1
