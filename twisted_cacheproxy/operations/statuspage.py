"""The admin site's pages for a person: the status page (``/status``) and
the index (``/``), rendered with `twisted.web.template`.

Every figure and name reaches the page through the template flattener, which
escapes it: a server named ``<script>`` is shown as text. The status page has
no script and no external asset; it reloads itself every `REFRESH` seconds.
It is built per service kind (`ProxyStatus`, `ServerStatus`): the
composition root, which knows what it built, chooses the class.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.template import Element, Flattenable, Tag, XMLString, renderer, tags

from .metrics import CACHE_STATUSES, SAMPLE_EVERY, SAMPLES
from .units import format_size

#: Seconds between two loads of the status page by the browser.
REFRESH = 5

#: A row of a figures table: its label, its value and the value's element id.
Row = tuple[str, Flattenable, str]


class Observed(Protocol):
    """What the status page reads: a service's metrics (`metrics.ProxyMetrics`
    or `metrics.ServerMetrics`)."""

    clock: IReactorTime

    def figures(self) -> dict[str, Any]: ...

    def series(self) -> list[tuple[float, float, float | None]]: ...


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
# The flattener escapes text, and a browser reads <style> unescaped: no "<", ">" or "&" above.


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _state(css: str, text: str) -> Tag:
    """A word coloured by its ``up`` or ``down`` class."""
    return tags.span(text, class_=css)


class Big(Element):
    """One headline figure: a label above a large number."""

    loader = XMLString(
        '<div xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" t:render="big">'
        '<div class="muted"><t:slot name="label" /></div>'
        '<div class="big"><t:attr name="id"><t:slot name="id" /></t:attr>'
        '<t:slot name="value" /></div></div>'
    )

    def __init__(self, label: str, value: str, ident: str) -> None:
        super().__init__()
        self.label, self.value, self.ident = label, value, ident

    @renderer
    def big(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(label=self.label, value=self.value, id=self.ident)


class FillBar(Element):
    """How full something is, as a bar (the cache's fill)."""

    loader = XMLString(
        '<svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" '
        'width="240" height="14" role="img" t:render="bar">'
        '<t:attr name="aria-label"><t:slot name="label" /></t:attr>'
        '<rect width="100%" height="14" class="bar" />'
        '<rect height="14" class="fill"><t:attr name="width"><t:slot name="fill" /></t:attr>'
        "</rect></svg>"
    )

    def __init__(self, label: str, fraction: float) -> None:
        super().__init__()
        self.label, self.fraction = label, fraction

    @renderer
    def bar(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(label=self.label, fill=f"{100 * min(1.0, self.fraction):.1f}%")


class Table(Element):
    """A section: a heading, optionally a picture, and a table of figures,
    each value in an element with an id (scripts and tests find them)."""

    loader = XMLString(
        '<div xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" t:render="table">'
        '<h2><t:slot name="heading" /></h2><t:slot name="picture" /><table>'
        '<tr t:render="rows"><th><t:slot name="label" /></th>'
        '<td class="n"><t:attr name="id"><t:slot name="id" /></t:attr>'
        '<t:slot name="value" /></td></tr></table></div>'
    )

    def __init__(self, heading: str, rows: Iterable[Row], picture: Flattenable = "") -> None:
        super().__init__()
        self.heading, self.entries, self.picture = heading, list(rows), picture

    @renderer
    def table(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(heading=self.heading, picture=self.picture)

    @renderer
    def rows(self, request: IRequest | None, tag: Tag) -> list[Tag]:
        return [
            tag.clone().fillSlots(label=label, value=value, id=ident)
            for label, value, ident in self.entries
        ]


class Chart(Element):
    """An SVG chart of requests per second, and of the hit ratio when
    `hits`, over the last ``SAMPLES * SAMPLE_EVERY`` seconds."""

    loader = XMLString(
        '<svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" '
        'id="chart" role="img" t:render="chart" />'
    )
    width, height = 640, 180
    left, right, top, bottom = 44, 52, 12, 24
    span = SAMPLES * SAMPLE_EVERY

    def __init__(
        self, series: Sequence[tuple[float, float, float | None]], now: float, hits: bool
    ) -> None:
        super().__init__()
        self.series, self.now, self.hits = series, now, hits
        self.inner_w = self.width - self.left - self.right
        self.inner_h = self.height - self.top - self.bottom

    def x(self, t: float) -> float:
        return self.left + self.inner_w * max(0.0, 1 - (self.now - t) / self.span)

    def y(self, fraction: float) -> float:
        return self.top + self.inner_h * (1 - fraction)

    @renderer
    def chart(self, request: IRequest | None, tag: Tag) -> Tag:
        minutes = f"{self.span / 60:.0f}"
        what = "requests per second" + (" and hit ratio" if self.hits else "")
        return tag(
            *self.parts(minutes),
            width=str(self.width),
            height=str(self.height),
            viewBox=f"0 0 {self.width} {self.height}",
            **{"aria-label": f"{what} over the last {minutes} minutes"},
        )

    def parts(self, minutes: str) -> Iterable[Tag]:
        """The frame, grid, axis labels and lines."""
        left, top, inner_w, inner_h = self.left, self.top, self.inner_w, self.inner_h
        right_edge, bottom_edge = left + inner_w, top + inner_h
        peak = max([rate for _, rate, _ in self.series] + [1.0])
        yield _svg("rect", x=left, y=top, width=inner_w, height=inner_h, class_="plot")
        for fraction in (0.25, 0.5, 0.75):
            at = f"{self.y(fraction):.1f}"
            yield _svg("line", x1=left, x2=right_edge, y1=at, y2=at, class_="grid")
        yield _label(f"{peak:.0f}/s", left - 4, top + 10, "axis rate", "end")
        yield _label("0", left - 4, bottom_edge, "axis rate", "end")
        if self.hits:
            yield _label("100%", right_edge + 4, top + 10, "axis hits")
            yield _label("0%", right_edge + 4, bottom_edge, "axis hits")
        yield _label(f"-{minutes} min", left, self.height - 6, "axis")
        yield _label("now", right_edge, self.height - 6, "axis", "end")
        rates = [(self.x(t), self.y(rate / peak)) for t, rate, _ in self.series]
        if rates:
            yield _svg("polyline", points=_points(rates), class_="rate-line")
        ratios = [(self.x(t), self.y(h)) for t, _, h in self.series if h is not None]
        if self.hits and ratios:
            yield _svg("polyline", points=_points(ratios), class_="hits-line")
        if not self.series:
            text = f"the first point comes {SAMPLE_EVERY:.0f} s after start"
            yield _label(text, left + inner_w / 2, top + inner_h / 2, "axis", "middle")


def _svg(name: str, **attributes: object) -> Tag:
    """An SVG element (`tags` knows only HTML's), its attributes as text."""
    return Tag(name)(**{key: str(value) for key, value in attributes.items()})


def _label(text: str, x: float, y: float, css: str, anchor: str = "start") -> Tag:
    return _svg("text", x=x, y=y, class_=css, **{"text-anchor": anchor})(text)


def _points(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)


class StatusPage(Element):
    """What both services' status pages show: uptime, headline figures, the
    chart, requests and answers. A subclass per service kind adds its own."""

    loader = XMLString(
        """<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" lang="en"
 t:render="page"><head><meta charset="utf-8" />
<meta http-equiv="refresh"><t:attr name="content"><t:slot name="refresh" /></t:attr></meta>
<link rel="icon" href="data:," /><title><t:slot name="title" /></title>
<style><t:slot name="style" /></style></head>
<body><h1><t:slot name="title" /></h1>
<p class="muted">up <t:slot name="uptime" />; <t:slot name="time" />;
this page reloads every <t:slot name="refresh" /> s</p>
<div class="cols" t:render="headline" />
<h2>Last <t:slot name="minutes" /> minutes: <t:slot name="legend" /></h2>
<t:transparent t:render="chart" />
<div class="cols" t:render="sections" />
</body></html>"""
    )
    #: Whether the page shows a hit ratio (a proxy's), in the headline and the chart.
    hits = False

    def __init__(self, metrics: Observed, title: str) -> None:
        super().__init__()
        self.title = title
        self.figures = metrics.figures()
        self.series = metrics.series()
        self.now = metrics.clock.seconds()

    @renderer
    def page(self, request: IRequest | None, tag: Tag) -> Tag:
        legend = "requests/s (blue)" + (", hit ratio (green, dashed)" if self.hits else "")
        return tag.fillSlots(
            title=self.title,
            style=_STYLE,
            refresh=str(REFRESH),
            uptime=_duration(self.figures["uptime_seconds"]),
            time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.now)),
            minutes=f"{Chart.span / 60:.0f}",
            legend=legend,
        )

    @renderer
    def headline(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag(*(Big(label, value, ident) for label, value, ident in self.headlines()))

    def headlines(self) -> list[tuple[str, str, str]]:
        """The large figures at the top: (label, value, id)."""
        figures = self.figures
        rate = self.series[-1][1] if self.series else 0.0
        return [
            ("requests", str(figures["requests_total"]), "requests-total"),
            ("requests/s (last 5 s)", f"{rate:.1f}", "rate"),
            ("client connections", str(figures["client_connections"]), "client-connections"),
        ]

    @renderer
    def chart(self, request: IRequest | None, tag: Tag) -> Chart:
        return Chart(self.series, self.now, self.hits)

    @renderer
    def sections(self, request: IRequest | None, tag: Tag) -> Tag:
        answers = [
            (status, str(count), f"responses-{status}")
            for status, count in self.figures["responses"].items()
            if status != "other" or count
        ]
        requests = Table("Requests", self.requestRows())
        return tag(requests, Table("Answers", answers), *self.moreSections())

    def requestRows(self) -> list[Row]:
        """The requests table: what the service counts its requests by."""
        raise NotImplementedError

    def moreSections(self) -> list[Table]:
        """Sections of this kind of service only."""
        return []


class ServerStatus(StatusPage):
    """The calculator server's status page: requests by encoding and status."""

    def requestRows(self) -> list[Row]:
        return [
            (key, str(count), "requests-" + key.replace(" ", "-"))
            for key, count in self.figures["requests"].items()
        ]


class ProxyStatus(StatusPage):
    """The proxy's status page: the hit ratio, requests by cache status, the
    cache, the way to the servers and the shared tier."""

    hits = True

    def headlines(self) -> list[tuple[str, str, str]]:
        ratio = ("hit ratio", _ratio(self.figures["hit_ratio"]), "hit-ratio")
        return [ratio, *super().headlines()]

    def requestRows(self) -> list[Row]:
        counts = self.figures["requests"]
        return [(s.upper(), str(counts[s]), f"requests-{s}") for s in CACHE_STATUSES]

    def moreSections(self) -> list[Table]:
        figures = self.figures
        sections = [_cache(figures["cache"]), _upstream(figures["upstream"])]
        if figures["shared"] is not None:
            sections.append(_shared(figures["shared"]))
        return sections


def _cache(cache: dict[str, int]) -> Table:
    capacity = cache["capacity_bytes"]
    fraction = cache["bytes"] / capacity if capacity else 0.0
    rows: list[Row] = [
        ("fill", f"{100 * fraction:.1f}%", "cache-fill"),
        ("entries", str(cache["entries"]), "cache-entries"),
        ("bytes", f"{cache['bytes']} ({format_size(cache['bytes'])})", "cache-bytes"),
        ("capacity", f"{capacity} ({format_size(capacity)})", "cache-capacity"),
        ("evictions", str(cache["evictions"]), "cache-evictions"),
        ("purged", str(cache["purged"]), "cache-purged"),
    ]
    return Table("Cache", rows, FillBar("cache fill", fraction))


def _upstream(upstream: dict[str, Any]) -> Table:
    state, conns, last = upstream["state"], upstream["connections"], upstream["last_failure"]
    failures = ", ".join(f"{k} {v}" for k, v in upstream["failures"].items() if v) or "none"
    framing = "length-framed" if upstream["framed"] else "one request per connection or unknown"
    rows: list[Row] = [
        ("server", upstream["server"], "upstream-server"),
        ("state", _state(state, state), "upstream-state"),
        ("framing", framing, "upstream-framing"),
        ("pipelining", "yes" if upstream["pipelining"] else "no", "upstream-pipelining"),
        ("connections", f"{conns['busy']} busy, {conns['idle']} idle", "upstream-conns"),
        ("requests", str(upstream["requests"]), "upstream-requests"),
        ("failures", failures, "upstream-failures"),
    ]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(upstream["last_failure_time"]))
        rows.append(("last failure", f"{when}: {last}", "upstream-last-failure"))
    rows += [_server(k, server) for k, server in enumerate(upstream["servers"], 1)]
    return Table("Upstream", rows)


def _server(number: int, server: dict[str, Any]) -> Row:
    """One of several servers: in or out, and its totals."""
    up = server["up"]
    totals = (
        f", {server['outstanding']} outstanding, {server['answers']} answers, "
        f"{server['failures']} failures, {server['ejections']} times taken out"
    )
    state = _state("up", "in") if up else _state("down", "taken out")
    return (server["server"], [state, totals], f"upstream-server-{number}")


def _shared(shared: dict[str, Any]) -> Table:
    """The memcached tier: what it did, and its nodes."""
    lookups = shared["lookups"]
    rows: list[Row] = [
        ("hit ratio", _ratio(shared["hits"] / lookups if lookups else None), "shared-hit-ratio")
    ]
    for name in ("lookups", "hits", "timeouts", "unavailable", "stores"):
        rows.append((name, str(shared[name]), f"shared-{name}"))
    for k, (node, state) in enumerate(shared["nodes"].items(), 1):
        rows.append((node, _state("up" if state == "up" else "down", state), f"shared-node-{k}"))
    return Table("Shared tier (memcached)", rows)


class Index(Element):
    """``GET /``: the list of the site's pages (and, on the proxy, the purge)."""

    loader = XMLString(
        '<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" lang="en">'
        '<head><meta charset="utf-8" /><title>admin</title></head><body><ul>'
        '<li t:render="pages"><a><t:attr name="href"><t:slot name="path" /></t:attr>'
        '<t:slot name="path" /></a></li>'
        '<li t:render="purge">POST <code>/purge</code>, <code>/purge?expr=...</code></li>'
        "</ul></body></html>"
    )
    #: The pages a GET reads.
    PAGES = ("/status", "/metrics", "/stats.json", "/healthz")

    def __init__(self, purge: bool) -> None:
        super().__init__()
        self.withPurge = purge

    @renderer
    def pages(self, request: IRequest | None, tag: Tag) -> list[Tag]:
        return [tag.clone().fillSlots(path=path) for path in self.PAGES]

    @renderer
    def purge(self, request: IRequest | None, tag: Tag) -> Flattenable:
        return tag if self.withPurge else ""
