"""The admin site (``--admin-port``) and the services that watch a running
proxy or server: metrics, status page, purge, access log, stats line.

The site is `twisted.web`, in the same process and reactor as the service it
watches; every page is rendered in the reactor thread from the figures the
factory's observer keeps (metrics.py). Nothing here touches the calculator
protocol: the proxy and server know nothing about HTTP.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from ..transport.addresses import address
from .accesslog import AccessLog
from .metrics import CACHE_STATUSES, SAMPLE_EVERY, SAMPLES, ProxyMetrics, ServerMetrics

log = Logger()

#: Seconds between two loads of the status page by the browser.
REFRESH = 5

#: What ``POST /purge`` calls: the proxy's ``purge`` (all answers, or those
#: of some text expressions), firing with the counts it answers with.
Purge = Callable[[Iterable[bytes] | None], Deferred[dict[str, int]]]


# --- who may POST ------------------------------------------------------------


def is_loopback(address: Any) -> bool:
    """Whether a client address is this host's loopback (``::ffff:127.0.0.1`` too)."""
    host = getattr(address, "host", None)
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def refusal(request: Any, token: bytes | None) -> bytes | None:
    """The error body for a POST that may not go ahead (the response code
    set), or None. With a token: ``Authorization: Bearer <token>`` or a 401.
    Without: loopback clients only, else a 403. A browser's cross-site POST
    (an ``Origin`` that is not this site) is a 403 either way."""
    if token is not None:
        given = request.getHeader(b"authorization") or b""
        if isinstance(given, str):
            given = given.encode("latin-1")
        if not hmac.compare_digest(given, b"Bearer " + token):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="cacheproxy admin"')
            return _json(request, {"error": "a valid Authorization: Bearer token is needed"})
    elif not is_loopback(request.getClientAddress()):
        request.setResponseCode(403)
        return _json(request, {"error": "without --admin-token, only loopback clients may POST"})
    origin = request.getHeader(b"origin")
    if origin:
        if isinstance(origin, bytes):
            origin = origin.decode("latin-1")
        host = request.getHeader(b"host") or b""
        if isinstance(host, bytes):
            host = host.decode("latin-1")
        if urlsplit(origin).netloc != host:
            request.setResponseCode(403)
            return _json(request, {"error": "cross-site request refused"})
    return None


def _json(request: Any, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=1).encode() + b"\n"


# --- the resources -------------------------------------------------------------


class MetricsResource(resource.Resource):
    """``GET /metrics``: the Prometheus text exposition."""

    isLeaf = True

    def __init__(self, metrics: ProxyMetrics | ServerMetrics) -> None:
        super().__init__()
        self.registry = metrics.registry()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class StatsResource(resource.Resource):
    """``GET /stats.json``: the status page's figures, for scripts."""

    isLeaf = True

    def __init__(self, metrics: ProxyMetrics | ServerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        return _json(request, self.metrics.figures())


class StatusResource(resource.Resource):
    """``GET /status``: one self-refreshing HTML page for a person."""

    isLeaf = True

    def __init__(self, metrics: ProxyMetrics | ServerMetrics, title: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.title = title

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return status_page(self.metrics, self.title).encode()


class PurgeResource(resource.Resource):
    """``POST /purge`` empties the cache; ``POST /purge?expr=<text>`` (or a
    form field ``expr``) removes one text expression's answers, with and
    without steps; both reach the shared tier. Answers
    ``{"purged": <entries in memory>, "shared": <nodes or shared entries>}``."""

    isLeaf = True

    def __init__(self, purge: Purge, token: bytes | None) -> None:
        super().__init__()
        self.purge = purge
        self.token = token

    def render_POST(self, request: Any) -> bytes | int:
        refused = refusal(request, self.token)
        if refused is not None:
            return refused
        expressions = request.args.get(b"expr")
        if expressions is None:
            what = "everything"
        else:
            what = ", ".join(repr(e.decode("utf-8", "replace")) for e in expressions)

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def done(counts: dict[str, int]) -> None:
            log.info(
                "purge of {what}: {count} entries removed",
                what=what,
                count=counts["purged"],
            )
            answer(counts)

        def failed(reason: Failure) -> None:
            log.failure("purge of {what} failed", reason, what=what)
            request.setResponseCode(500)
            answer({"error": "the purge failed; see the log"})

        def answer(body: dict[str, Any]) -> None:
            if not gone:
                request.write(_json(request, body))
                request.finish()

        self.purge(expressions).addCallbacks(done, failed)
        return server.NOT_DONE_YET


class IndexResource(resource.Resource):
    """``GET /``: the list of pages."""

    isLeaf = True

    def __init__(self, proxy: bool) -> None:
        super().__init__()
        self.proxy = proxy

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        purge = "<li>POST <code>/purge</code>, <code>/purge?expr=...</code></li>"
        purge = purge if self.proxy else ""
        return (
            "<!doctype html><meta charset=utf-8><title>admin</title><ul>"
            '<li><a href="/status">/status</a></li><li><a href="/metrics">/metrics</a></li>'
            f'<li><a href="/stats.json">/stats.json</a></li>{purge}</ul>'
        ).encode()


class _QuietSite(server.Site):
    """A site that does not log each HTTP request (a scrape every few seconds
    would drown the service's own log)."""

    def log(self, request: Any) -> None:
        pass

    def logPrefix(self) -> str:
        """So that the log says "admin site starting on N", not the class name."""
        return "admin site"


def site(
    metrics: ProxyMetrics | ServerMetrics,
    title: str,
    token: bytes | None = None,
    purge: Purge | None = None,
) -> server.Site:
    """The admin site of one service; ``/purge`` when it has a cache to purge."""
    root: Any = resource.Resource()
    root.putChild(b"", IndexResource(purge is not None))
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"stats.json", StatsResource(metrics))
    root.putChild(b"status", StatusResource(metrics, title))
    if purge is not None:
        root.putChild(b"purge", PurgeResource(purge, token))
    s = _QuietSite(root)
    s.displayTracebacks = False
    s.noisy = False
    return s


# --- the status page -------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def chart(series: list[tuple[float, float, float | None]], now: float, hits: bool) -> str:
    """An SVG chart of requests per second (and the hit ratio) over the
    last ``SAMPLES * SAMPLE_EVERY`` seconds."""
    width, height, left, right, top, bottom = 640, 180, 44, 52, 12, 24
    span = SAMPLES * SAMPLE_EVERY
    inner_w, inner_h = width - left - right, height - top - bottom
    peak = max([rate for _, rate, _ in series] + [1.0])

    def x(t: float) -> float:
        return left + inner_w * max(0.0, 1 - (now - t) / span)

    def y(fraction: float) -> float:
        return top + inner_h * (1 - fraction)

    rate_points = " ".join(f"{x(t):.1f},{y(r / peak):.1f}" for t, r, _ in series)
    ratio_points = " ".join(f"{x(t):.1f},{y(h):.1f}" for t, _, h in series if h is not None)
    parts = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="requests per second'
        f'{" and hit ratio" if hits else ""} over the last {span / 60:.0f} minutes">',
        f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" class="plot"/>',
    ]
    for fraction in (0.25, 0.5, 0.75):
        parts.append(
            f'<line x1="{left}" x2="{left + inner_w}" y1="{y(fraction):.1f}" '
            f'y2="{y(fraction):.1f}" class="grid"/>'
        )
    parts.append(f'<text x="{left - 4}" y="{top + 10}" class="axis rate" text-anchor="end">')
    parts.append(f"{peak:.0f}/s</text>")
    parts.append(f'<text x="{left - 4}" y="{top + inner_h}" class="axis rate" text-anchor="end">')
    parts.append("0</text>")
    if hits:
        at = left + inner_w + 4
        parts.append(f'<text x="{at}" y="{top + 10}" class="axis hits">100%</text>')
        parts.append(f'<text x="{at}" y="{top + inner_h}" class="axis hits">0%</text>')
    parts.append(
        f'<text x="{left}" y="{height - 6}" class="axis">-{span / 60:.0f} min</text>'
        f'<text x="{left + inner_w}" y="{height - 6}" class="axis" text-anchor="end">now</text>'
    )
    if rate_points:
        parts.append(f'<polyline points="{rate_points}" class="rate-line"/>')
    if hits and ratio_points:
        parts.append(f'<polyline points="{ratio_points}" class="hits-line"/>')
    if not series:
        parts.append(
            f'<text x="{left + inner_w / 2}" y="{top + inner_h / 2}" class="axis" '
            f'text-anchor="middle">the first point comes {SAMPLE_EVERY:.0f} s after start</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em}
.muted{color:#666}table{border-collapse:collapse}td,th{padding:2px 12px 2px 0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:2em;font-weight:600}.grid{stroke:#ddd}.plot{fill:#fff;stroke:#bbb}
.axis{font-size:11px;fill:#666}.rate{fill:#1f6fb2}.hits{fill:#2a8a3a}
.rate-line{fill:none;stroke:#1f6fb2;stroke-width:2}
.hits-line{fill:none;stroke:#2a8a3a;stroke-width:2;stroke-dasharray:5 3}
.bar{fill:#e4e4e4}.fill{fill:#1f6fb2}.up{color:#2a8a3a}.down{color:#b22222}
.cols{display:flex;gap:3em;flex-wrap:wrap}
"""


def _row(label: str, value: str, ident: str) -> str:
    return f'<tr><th>{html.escape(label)}</th><td class="n" id="{ident}">{value}</td></tr>'


def status_page(metrics: ProxyMetrics | ServerMetrics, title: str) -> str:
    """The HTML of ``/status``: no script, no external asset."""
    figures = metrics.figures()
    now = metrics.clock.seconds()
    series = metrics.series()
    proxy = isinstance(metrics, ProxyMetrics)
    rate_now = series[-1][1] if series else 0.0
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">up {_duration(figures["uptime_seconds"])}; '
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))}; "
        f"this page reloads every {REFRESH} s</p>",
        '<div class="cols">',
    ]
    if proxy:
        body.append(
            '<div><div class="muted">hit ratio</div>'
            f'<div class="big" id="hit-ratio">{_ratio(figures["hit_ratio"])}</div></div>'
        )
    body.append(
        '<div><div class="muted">requests</div>'
        f'<div class="big" id="requests-total">{figures["requests_total"]}</div></div>'
        '<div><div class="muted">requests/s (last 5 s)</div>'
        f'<div class="big" id="rate">{rate_now:.1f}</div></div>'
        '<div><div class="muted">client connections</div>'
        f'<div class="big" id="client-connections">{figures["client_connections"]}</div></div>'
        "</div>"
    )
    legend = "requests/s (blue)" + (", hit ratio (green, dashed)" if proxy else "")
    body.append(f"<h2>Last {SAMPLES * SAMPLE_EVERY / 60:.0f} minutes: {legend}</h2>")
    body.append(chart(series, now, proxy))
    body.append('<div class="cols"><div><h2>Requests</h2><table>')
    if proxy:
        for status in CACHE_STATUSES:
            count = figures["requests"][status]
            body.append(_row(status.upper(), str(count), f"requests-{status}"))
    else:
        for key, count in figures["requests"].items():
            body.append(_row(key, str(count), "requests-" + key.replace(" ", "-")))
    body.append("</table></div><div><h2>Answers</h2><table>")
    for status, count in figures["responses"].items():
        if status != "other" or count:
            body.append(_row(status, str(count), f"responses-{status}"))
    body.append("</table></div>")
    if proxy:
        body.append(_cache_section(figures["cache"]))
        body.append(_upstream_section(figures["upstream"]))
        if figures["shared"] is not None:
            body.append(_shared_section(figures["shared"]))
    body.append("</div>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>" + "".join(body) + "</body></html>"
    )


def _cache_section(cache: dict[str, int]) -> str:
    capacity = cache["capacity_bytes"]
    fraction = cache["bytes"] / capacity if capacity else 0.0
    width = 240
    return (
        "<div><h2>Cache</h2>"
        f'<svg width="{width}" height="14" role="img" aria-label="cache fill">'
        f'<rect width="{width}" height="14" class="bar"/>'
        f'<rect width="{width * min(1.0, fraction):.1f}" height="14" class="fill"/></svg>'
        "<table>"
        + _row("fill", f"{100 * fraction:.1f}%", "cache-fill")
        + _row("entries", str(cache["entries"]), "cache-entries")
        + _row("bytes", f"{cache['bytes']} ({_size(cache['bytes'])})", "cache-bytes")
        + _row("capacity", f"{capacity} ({_size(capacity)})", "cache-capacity")
        + _row("evictions", str(cache["evictions"]), "cache-evictions")
        + _row("purged", str(cache["purged"]), "cache-purged")
        + "</table></div>"
    )


def _upstream_section(upstream: dict[str, Any]) -> str:
    state = upstream["state"]
    conns = upstream["connections"]
    failures = ", ".join(f"{k} {v}" for k, v in upstream["failures"].items() if v) or "none"
    last = upstream["last_failure"]
    mode = "length-framed" if upstream["framed"] else "one request per connection or unknown"
    return (
        "<div><h2>Upstream</h2><table>"
        + _row("server", html.escape(upstream["server"]), "upstream-server")
        + _row("state", f'<span class="{state}">{state}</span>', "upstream-state")
        + _row("framing", mode, "upstream-framing")
        + _row("pipelining", "yes" if upstream["pipelining"] else "no", "upstream-pipelining")
        + _row("connections", f"{conns['busy']} busy, {conns['idle']} idle", "upstream-conns")
        + _row("requests", str(upstream["requests"]), "upstream-requests")
        + _row("failures", failures, "upstream-failures")
        + (_row("last failure", html.escape(last), "upstream-last-failure") if last else "")
        + "".join(_server_row(k, server) for k, server in enumerate(upstream["servers"], 1))
        + "</table></div>"
    )


def _shared_section(shared: dict[str, Any]) -> str:
    """The memcached tier: its nodes and what it did."""
    lookups = shared["lookups"]
    ratio = shared["hits"] / lookups if lookups else None
    rows = [_row("hit ratio", _ratio(ratio), "shared-hit-ratio")]
    for name in ("lookups", "hits", "timeouts", "unavailable", "stores"):
        rows.append(_row(name, str(shared[name]), f"shared-{name}"))
    for k, (node, state) in enumerate(shared["nodes"].items(), 1):
        css = "up" if state == "up" else "down"
        rows.append(_row(node, f'<span class="{css}">{state}</span>', f"shared-node-{k}"))
    return "<div><h2>Shared tier (memcached)</h2><table>" + "".join(rows) + "</table></div>"


def _server_row(number: int, server: dict[str, Any]) -> str:
    """One of several servers: in or out, and its totals."""
    state = "up" if server["up"] else "down"
    text = (
        f'<span class="{state}">{"in" if server["up"] else "taken out"}</span>, '
        f"{server['outstanding']} outstanding, {server['answers']} answers, "
        f"{server['failures']} failures, {server['ejections']} times taken out"
    )
    return _row(server["server"], text, f"upstream-server-{number}")


# --- the services ------------------------------------------------------------------


class AdminService(service.Service):
    """Listens with the admin site; samples the figures for the status chart."""

    def __init__(self, site: server.Site, port: int, interface: str, metrics: Any) -> None:
        self.site = site
        self.port = port
        self.interface = interface
        self.metrics = metrics
        self._listening: Any = None
        self._sampler: task.LoopingCall | None = None

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        tcp: Any = reactor
        self._listening = tcp.listenTCP(self.port, self.site, interface=self.interface)
        host = self._listening.getHost()
        where = address(host.host, host.port)
        log.info("admin site on http://{where}/ (status, metrics, stats.json)", where=where)
        self._sampler = task.LoopingCall(self.metrics.sample)
        self._sampler.clock = self.metrics.clock
        self._sampler.start(SAMPLE_EVERY, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        listening, self._listening = self._listening, None
        if listening is not None:
            return listening.stopListening()
        return None


class AccessLogService(service.Service):
    """Opens the access log at start, reopens it on SIGUSR1, closes it at stop."""

    def __init__(self, access_log: AccessLog) -> None:
        self.access_log = access_log
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self.access_log.start()
        self._previous = signal.signal(signal.SIGUSR1, self._signalled)

    def _signalled(self, signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        threads: Any = reactor
        threads.callFromThread(self.access_log.reopen)
        # twistd rotates its own log file on SIGUSR1: keep doing that too.
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
        self.access_log.close()


class StatsService(service.Service):
    """One summary line in the log every ``interval`` seconds, and at shutdown."""

    def __init__(self, metrics: ProxyMetrics | ServerMetrics, interval: float, name: str) -> None:
        self.metrics = metrics
        self.interval = interval
        self.log = Logger(namespace=name)
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop = task.LoopingCall(self._line)
            self._loop.clock = self.metrics.clock
            self._loop.start(self.interval, now=False)

    def _line(self, final: bool = False) -> None:
        line = self.metrics.statsLine(final)
        if line is not None:  # None: nothing happened since the last line
            self.log.info("{line}", line=line)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.interval > 0:
            self._line(final=True)
