"""The admin site (``--admin-port``, ``--admin-listen``): its resources,
and who may use them.

The site is `twisted.web`, in the same process and reactor as the service it
watches; every page is rendered in the reactor thread from the figures the
factory's observer keeps (metrics.py). Nothing here touches the calculator
protocol: the proxy and server know nothing about HTTP.

Who may use it (`Access`): only requests addressed to one of the site's own
names are served, whatever the method, so a web page whose name was rebound
to this host (DNS rebinding) reads and changes nothing; POSTs need the token
(or, without one, a loopback client and no foreign ``Origin``); with
``--admin-token-for-reads`` every page but ``/healthz`` needs the token too.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.pages import notFound
from twisted.web.template import Element, renderElement

from .statuspage import Index

log = Logger()

#: What ``POST /purge`` calls: the proxy's ``purge`` (all answers, or those
#: of some text expressions), firing with the counts it answers with.
Purge = Callable[[Iterable[bytes] | None], Deferred[dict[str, int]]]


class Observed(Protocol):
    """What the machine-read pages read: a service's metrics."""

    def figures(self) -> dict[str, Any]: ...

    def registry(self) -> CollectorRegistry: ...


class Draining(Protocol):
    """What ``/healthz`` reads: the service's factory (`transport.service.ServiceFactory`)."""

    draining: bool


# --- who may use the site ------------------------------------------------------------


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


#: A Host header: a name or an IPv4 address, or an IPv6 address in brackets; then a port.
_HOST = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::[0-9]{1,5})?")


def host_name(value: bytes) -> str | None:
    """The name in a ``Host`` header (no port, no brackets, in lower case),
    or None if the value is not a host."""
    match = _HOST.fullmatch(value.decode("latin-1"))
    if match is None:
        return None
    bracketed, plain = match.groups()
    if bracketed is not None:
        try:
            return str(ipaddress.IPv6Address(bracketed))
        except ValueError:
            return None
    return plain.lower()


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Access:
    """Who the admin site answers.

    A request is served only when its ``Host`` names the site: ``localhost``,
    an IP address (a browser sends an address only when the user typed it: a
    rebinding page has a name of its own) or one of `hosts`. A POST needs
    `token` when there is one, else a loopback client; with `reads`, so does
    every page but ``/healthz`` (a load balancer polls it without one)."""

    token: bytes | None = None
    reads: bool = False
    #: The names given with ``--admin-host``, in lower case.
    hosts: frozenset[str] = frozenset()

    def addressedHere(self, request: Any) -> bool:
        """Whether the request's ``Host`` is one of this site's names (a
        request without one, as HTTP/1.0 allows, comes from no browser)."""
        given = request.requestHeaders.getRawHeaders(b"host")
        if given is None:
            return True
        name = host_name(given[0]) if len(given) == 1 else None
        return name is not None and (name == "localhost" or name in self.hosts or _is_address(name))

    def authorized(self, request: Any) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>``."""
        given = request.getHeader(b"authorization") or b""
        if isinstance(given, str):
            given = given.encode("latin-1")
        return self.token is not None and hmac.compare_digest(given, b"Bearer " + self.token)

    def refusal(self, request: Any) -> bytes | None:
        """The error body for a request that may not go ahead (its response
        code set), or None: the checks every request passes."""
        if not self.addressedHere(request):
            # 421: the request is not refused to this client; it was sent to a
            # name this site does not answer for (RFC 9110, 15.5.20).
            request.setResponseCode(421, b"Misdirected Request")
            return _json(request, {"error": "not a name of this admin site (see --admin-host)"})
        if self.reads and request.path != b"/healthz" and not self.authorized(request):
            return self._unauthorized(request)
        return None

    def postRefusal(self, request: Any) -> bytes | None:
        """The error body for a POST that may not go ahead, or None. With a
        token: the token or a 401. Without: loopback clients only, else a
        403. A browser's cross-site POST (an ``Origin`` that is not this
        site) is a 403 either way."""
        if self.token is not None:
            if not self.authorized(request):
                return self._unauthorized(request)
        elif not is_loopback(request.getClientAddress()):
            request.setResponseCode(403)
            error = "without --admin-token, only loopback clients may POST"
            return _json(request, {"error": error})
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

    @staticmethod
    def _unauthorized(request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="cacheproxy admin"')
        return _json(request, {"error": "a valid Authorization: Bearer token is needed"})


def _json(request: Any, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=1).encode() + b"\n"


# --- the resources -------------------------------------------------------------


class Refused(resource.Resource):
    """A request the site's `Access` refused, whatever its method and path."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> bytes:
        return self.body


class MetricsResource(resource.Resource):
    """``GET /metrics``: the Prometheus text exposition."""

    isLeaf = True

    def __init__(self, metrics: Observed) -> None:
        super().__init__()
        self.registry = metrics.registry()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class StatsResource(resource.Resource):
    """``GET /stats.json``: the status page's figures, for scripts."""

    isLeaf = True

    def __init__(self, metrics: Observed) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        return _json(request, self.metrics.figures())


class HealthResource(resource.Resource):
    """``GET /healthz``: 200 ``ok`` while the service takes requests, 503
    ``draining`` once it is stopping, so that a load balancer stops sending."""

    isLeaf = True

    def __init__(self, service: Draining) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.service.draining:
            request.setResponseCode(503)
            return b"draining\n"
        return b"ok\n"


class PageResource(resource.Resource):
    """A page for a person, rendered anew on each ``GET`` (a `statuspage` element)."""

    isLeaf = True

    def __init__(self, page: Callable[[], Element]) -> None:
        super().__init__()
        self.page = page

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return renderElement(request, self.page())


class PurgeResource(resource.Resource):
    """``POST /purge`` empties the cache; ``POST /purge?expr=<text>`` (or a
    form field ``expr``) removes one text expression's answers, with and
    without steps; both reach the shared tier. Answers
    ``{"purged": <entries in memory>, "shared": <nodes or shared entries>}``."""

    isLeaf = True

    def __init__(self, purge: Purge, access: Access) -> None:
        super().__init__()
        self.purge = purge
        self.access = access

    def render_POST(self, request: Any) -> bytes | int:
        refused = self.access.postRefusal(request)
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


class Root(resource.Resource):
    """The site's top: its pages, and Twisted's escaped 404 page for any other path."""

    def getChild(self, path: bytes, request: Any) -> resource.IResource:
        return notFound()


class AdminSite(server.Site):
    """The admin site: serves what its `access` lets through, and does not
    log each HTTP request (a scrape every few seconds would drown the
    service's own log)."""

    displayTracebacks = False
    noisy = False

    def __init__(self, root: resource.Resource, access: Access) -> None:
        super().__init__(root)
        self.access = access

    def getResourceFor(self, request: Any) -> resource.IResource:
        refused = self.access.refusal(request)
        if refused is not None:
            return Refused(refused)
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        pass

    def logPrefix(self) -> str:
        """So that Twisted's own lines say "admin site", not the class name."""
        return "admin site"


def site(
    metrics: Observed,
    page: Callable[[], Element],
    health: Draining,
    access: Access,
    purge: Purge | None = None,
) -> AdminSite:
    """The admin site of one service: ``page`` makes its status page,
    ``health`` says whether it drains; ``/purge`` when it has a cache to purge."""
    root = Root()
    root.putChild(b"", PageResource(lambda: Index(purge is not None)))
    root.putChild(b"status", PageResource(page))
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"stats.json", StatsResource(metrics))
    root.putChild(b"healthz", HealthResource(health))
    if purge is not None:
        root.putChild(b"purge", PurgeResource(purge, access))
    return AdminSite(root, access)
