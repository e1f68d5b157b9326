"""The admin site as a browser or a script meets it, through a real
`twisted.web` site over `StringTransport`: whose requests it serves (Host
names, tokens), ``/healthz`` across a drain, the status page's escaping, and
the admin options (token files, ``--admin-listen``, port clashes)."""

from __future__ import annotations

import json
import os
import socket
import xml.etree.ElementTree as ET

import pytest
from helpers import built, success_of
from processes import free_ports_in_a_row
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.web.template import flattenString

from twisted_cacheproxy.application import options as opts
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.operations import services
from twisted_cacheproxy.operations.metrics import ProxyMetrics, ServerMetrics
from twisted_cacheproxy.operations.site import Access, AdminSite, host_name, site
from twisted_cacheproxy.operations.statuspage import Index, ProxyStatus, ServerStatus
from twisted_cacheproxy.proxy.cache import MemoryCache
from twisted_cacheproxy.proxy.factory import CacheProxyFactory
from twisted_cacheproxy.proxy.upstream import TCPConnector, UpstreamPool

TOKEN = b"s3cret-T0ken"
SCRIPT = "<script>alert(1)</script>"


class Purges:
    """A stand-in for the proxy's purge: records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def __call__(self, expressions):
        self.calls.append(expressions)
        return defer.succeed({"purged": 3, "shared": 0})


def proxy_metrics(server_host: str = "127.0.0.1") -> ProxyMetrics:
    """A real proxy factory's metrics, its server at ``server_host`` (never reached)."""
    clock = Clock()
    clock.advance(1_800_000_000)
    pool = UpstreamPool(TCPConnector(clock, server_host, 9999), clock)
    factory = CacheProxyFactory(MemoryCache(1 << 20, clock), pool, clock=clock)
    return ProxyMetrics(factory)


OPEN = Access()


def admin(access: Access = OPEN, purge=None, factory=None) -> AdminSite:
    """A calculator server's admin site (with ``purge``, a proxy's ``/purge``)."""
    factory = factory or CalculatorServerFactory(clock=Clock())
    metrics = ServerMetrics(factory)
    web = site(metrics, lambda: ServerStatus(metrics, "t"), factory, access, purge)
    web.timeOut = None  # no idle timer on the real reactor
    return web


def fetch(web, method: str, path: str, *headers: str, client=("127.0.0.1", 5000)):
    """(status, headers, body) of one HTTP/1.0 request through the real site."""
    peer = (IPv6Address if ":" in client[0] else IPv4Address)("TCP", *client)
    channel = web.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 9100))
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.0", *headers, "Content-Length: 0", "", ""]
    channel.dataReceived("\r\n".join(lines).encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *fields = head.decode().split("\r\n")
    found = {name.lower(): value for name, value in (f.split(": ", 1) for f in fields)}
    return int(status.split()[1]), found, body


def test_host_names():
    assert host_name(b"127.0.0.1:9100") == "127.0.0.1"
    assert host_name(b"[::1]:9100") == "::1"
    assert host_name(b"[0:0::1]") == "::1"
    assert host_name(b"LocalHost") == "localhost"
    assert host_name(b"admin.example.org:80") == "admin.example.org"
    for bad in (b"evil.example@127.0.0.1", b"[::1", b"::1", b"a b", b"[zz::1]", b"x:99999999"):
        assert host_name(bad) is None, bad


@pytest.mark.parametrize(
    "request_line",
    [
        ("GET", "/stats.json"),
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("GET", "/nowhere"),
        ("POST", "/purge"),
        ("HEAD", "/"),
        ("GET", "/healthz"),
    ],
)
def test_a_request_for_another_name_is_refused_whatever_it_asks(request_line):
    """DNS rebinding: a web page at evil.example whose name now leads to this
    host sends its own name as Host; the site answers it with nothing."""
    purge = Purges()
    web = admin(purge=purge)
    status, headers, body = fetch(web, *request_line, "Host: evil.example:9100")
    assert status == 421
    assert headers["content-type"] == "application/json"
    if request_line[0] != "HEAD":
        assert json.loads(body) == {"error": "not a name of this admin site (see --admin-host)"}
    assert purge.calls == []


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:9100", "localhost:9100", "LOCALHOST", "[::1]:9100", "192.0.2.7:9100", None],
)
def test_a_plain_local_post_purges(host):
    """What curl sends (the address typed, or localhost), or no Host at all (HTTP/1.0)."""
    purge = Purges()
    web = admin(purge=purge)
    headers = [f"Host: {host}"] if host else []
    status, _, body = fetch(web, "POST", "/purge", *headers)
    assert (status, json.loads(body)) == (200, {"purged": 3, "shared": 0})
    assert purge.calls == [None]


def test_names_given_with_admin_host_are_served_and_no_others():
    web = admin(Access(hosts=frozenset({"proxy1.internal"})))
    assert fetch(web, "GET", "/healthz", "Host: proxy1.internal:9100")[0] == 200
    assert fetch(web, "GET", "/healthz", "Host: proxy2.internal:9100")[0] == 421
    assert fetch(web, "GET", "/healthz", "Host: a", "Host: proxy1.internal")[0] == 421


def test_the_rebinding_post_is_refused_even_with_the_token():
    purge = Purges()
    web = admin(Access(TOKEN), purge=purge)
    authorization = f"Authorization: Bearer {TOKEN.decode()}"
    status, _, _ = fetch(web, "POST", "/purge", "Host: evil.example", authorization)
    assert status == 421 and purge.calls == []
    assert fetch(web, "POST", "/purge", "Host: 127.0.0.1:9100", authorization)[0] == 200


def test_with_the_token_for_reads_every_page_but_healthz_needs_it():
    web = admin(Access(TOKEN, reads=True), purge=Purges())
    authorization = f"Authorization: Bearer {TOKEN.decode()}"
    for path in ("/", "/status", "/metrics", "/stats.json", "/nowhere"):
        status, headers, _ = fetch(web, "GET", path, "Host: 127.0.0.1")
        assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="cacheproxy admin"')
        wrong = fetch(web, "GET", path, "Host: 127.0.0.1", "Authorization: Bearer nope")
        assert wrong[0] == 401
        assert fetch(web, "GET", path, "Host: 127.0.0.1", authorization)[0] in (200, 404)
    assert fetch(web, "GET", "/healthz", "Host: 127.0.0.1")[:3:2] == (200, b"ok\n")
    # Without the option, the token guards POSTs only.
    web = admin(Access(TOKEN), purge=Purges())
    assert fetch(web, "GET", "/stats.json")[0] == 200
    assert fetch(web, "POST", "/purge")[0] == 401


def test_healthz_says_ok_while_serving_and_503_once_draining():
    factory = CalculatorServerFactory(clock=Clock())
    web = admin(factory=factory)
    status, headers, body = fetch(web, "GET", "/healthz")
    assert (status, body, headers["cache-control"]) == (200, b"ok\n", "no-store")
    factory.drain()  # what a stopping worker calls
    assert factory.draining
    status, headers, body = fetch(web, "GET", "/healthz")
    assert (status, body, headers["content-type"]) == (
        503,
        b"draining\n",
        "text/plain; charset=utf-8",
    )
    assert fetch(web, "GET", "/stats.json")[0] == 200  # the other pages go on


def test_metrics_carry_the_process_collectors():
    status, headers, body = fetch(admin(), "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        (sample,) = [s for s in families[name.removesuffix("_total")].samples if s.name == name]
        assert sample.value > 0, name
    (info,) = families["python_info"].samples
    assert info.labels["major"] == "3"
    assert "cacheserver_requests" in families


def test_the_index_lists_the_pages_and_the_purge_only_on_a_proxy():
    body = fetch(admin(purge=Purges()), "GET", "/")[2].decode()
    for path in ("/status", "/metrics", "/stats.json", "/healthz"):
        assert f'<a href="{path}">{path}</a>' in body
    assert "POST <code>/purge</code>" in body
    assert "/purge" not in fetch(admin(), "GET", "/")[2].decode()
    assert success_of(flattenString(None, Index(False))).startswith(b"<html")


def page_tree(body: bytes) -> ET.Element:
    """The page parsed as XML: it must be well-formed (doctype aside)."""
    doctype, _, document = body.partition(b"\n")
    assert doctype == b"<!DOCTYPE html>"
    return ET.fromstring(document)


def test_the_status_page_is_well_formed_and_shows_names_as_text():
    metrics = proxy_metrics(server_host=SCRIPT)
    web = site(metrics, lambda: ProxyStatus(metrics, f"cacheproxy {SCRIPT}"), None, Access())
    web.timeOut = None
    status, headers, body = fetch(web, "GET", "/status")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert headers["cache-control"] == "no-store"
    tree = page_tree(body)
    assert not [e for e in tree.iter() if e.tag.lower().endswith("script")]
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body and SCRIPT.encode() not in body
    by_id = {e.get("id"): e for e in tree.iter() if e.get("id")}
    assert by_id["upstream-server"].text == f"{SCRIPT}:9999"
    assert tree.find("head/title").text == f"cacheproxy {SCRIPT}"
    assert by_id["hit-ratio"].text == "-" and by_id["requests-hit"].text == "0"
    assert by_id["upstream-state"][0].attrib == {"class": "unknown"}
    assert [e.get("id") for e in tree.iter() if e.tag.endswith("svg")] == ["chart", None]
    refresh = tree.find("head/meta[@http-equiv='refresh']")
    assert refresh.get("content") == "5"


def test_the_server_status_page_has_no_hit_ratio_nor_cache():
    factory = CalculatorServerFactory(clock=Clock())
    metrics = ServerMetrics(factory)
    body = success_of(flattenString(None, ServerStatus(metrics, "cacheserver 127.0.0.1:9999")))
    ids = {e.get("id") for e in page_tree(b"<!DOCTYPE html>\n" + body).iter()}
    assert {"requests-total", "rate", "client-connections", "responses-200", "chart"} <= ids
    assert not {i for i in ids if i and i.startswith(("hit", "cache", "upstream"))}


class Sampled:
    """A proxy's metrics with a chart history of our choosing."""

    def __init__(self, series) -> None:
        self.metrics = proxy_metrics()
        self.clock = self.metrics.clock
        self._series = series

    def figures(self):
        return self.metrics.figures()

    def series(self):
        return self._series


def test_the_chart_draws_the_rate_and_hit_ratio_of_each_sample():
    observed = Sampled([])
    now = observed.clock.seconds()
    observed._series = [(now - 5, 2.0, 0.0), (now, 4.0, 0.5)]
    body = success_of(flattenString(None, ProxyStatus(observed, "t")))
    chart = page_tree(b"<!DOCTYPE html>\n" + body).find(".//*[@id='chart']")
    lines = {e.get("class"): e.get("points") for e in chart if e.tag.endswith("polyline")}
    # The last two of 120 five-second intervals (x), 2/s and 4/s (the peak), 0% and 50% (y).
    assert lines == {"rate-line": "583.5,84.0 588.0,12.0", "hits-line": "583.5,156.0 588.0,84.0"}
    labels = [e.text for e in chart if e.tag.endswith("text")]
    assert labels == ["4/s", "0", "100%", "0%", "-10 min", "now"]
    assert chart.get("aria-label") == "requests per second and hit ratio over the last 10 minutes"
    empty = success_of(flattenString(None, ServerStatus(Sampled([]), "t")))
    chart = page_tree(b"<!DOCTYPE html>\n" + empty).find(".//*[@id='chart']")
    assert [e.text for e in chart if e.tag.endswith("text")][-1] == (
        "the first point comes 5 s after start"
    )
    assert not [e for e in chart if e.tag.endswith("polyline")]


def test_the_style_survives_the_flattener():
    """A browser reads <style> without unescaping: the flattener must leave it as it is."""
    from twisted_cacheproxy.operations.statuspage import _STYLE

    assert not set("<>&") & set(_STYLE)


# --- the admin options ----------------------------------------------------------------


def secret_file(tmp_path, text: str = TOKEN.decode() + "\n", mode: int = 0o600):
    path = tmp_path / "admin.token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_the_token_from_a_file(tmp_path):
    config = opts.ServerOptions()
    config.parseOptions(["--admin-port", "9100", "--admin-token-file", secret_file(tmp_path)])
    assert config.adminToken == TOKEN
    assert config["admin-token"] is None


@pytest.mark.parametrize(
    ("mode", "text", "message"),
    [
        (0o644, "t", "is open to others (mode 0644): make it the owner's alone (chmod 600 "),
        (0o640, "t", "is open to others (mode 0640)"),
        (0o600, "\n", "is empty"),
        (0o600, "two words", "--admin-token-file: a token is printable ASCII without spaces"),
    ],
)
def test_a_token_file_others_can_read_or_without_a_token_is_refused(tmp_path, mode, text, message):
    path = secret_file(tmp_path, text, mode)
    with pytest.raises(usage.UsageError, match="--admin-token-file: ") as info:
        opts.ServerOptions().parseOptions(["--admin-token-file", path])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_token_file_is_one_line(tmp_path):
    with pytest.raises(usage.UsageError) as info:
        opts.ServerOptions().parseOptions(["--admin-token-file", str(tmp_path / "nope")])
    assert str(info.value) == (
        f"--admin-token-file: cannot read {tmp_path / 'nope'}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--admin-port", "9100", "--admin-listen", "tcp:9101"], "give --admin-port or --admin-"),
        (["--admin-token", "a", "--admin-token-file", "f"], "give --admin-token or --admin-"),
        (["--admin-token-for-reads"], "--admin-token-for-reads needs --admin-token-file"),
        (["--port", "9100", "--admin-port", "9100"], "--admin-port 9100 is --port too: the "),
        (["--admin-token", "é"], "--admin-token: a token is printable ASCII without spaces"),
        (
            ["--workers", "2", "--admin-listen", "unix:/tmp/a.sock"],
            "--admin-listen with --workers 2: each worker needs an admin site of its own: "
            "put {worker} in it (unix:/run/cacheproxy/admin-{worker}.sock)",
        ),
    ],
)
def test_admin_options_that_cannot_go_together(argv, message):
    with pytest.raises(usage.UsageError) as info:
        opts.ServerOptions().parseOptions(argv)
    assert str(info.value).startswith(message)


def test_a_worker_gets_the_token_on_stdin_and_its_own_admin_listen(tmp_path):
    """The command line a worker is given (`portable`) has no token; its
    standard input (`secrets`) has it; {worker} becomes its number."""
    config = opts.ServerOptions()
    listen = f"unix:{tmp_path}/admin-{{worker}}.sock"
    argv = ["--workers", "2", "--admin-listen", listen, "--admin-token", TOKEN.decode()]
    config.parseOptions([*argv, "--admin-host", "Proxy.Example", "--admin-token-for-reads"])
    line = json.dumps(config.portable())
    assert TOKEN.decode() not in line and "admin-token" not in json.loads(line)
    assert config.secrets() == {"admin-token": TOKEN.decode()}
    worker = opts.ServerOptions.restore({**json.loads(line), **config.secrets()}, 2)
    assert worker["admin-listen"] == f"unix:{tmp_path}/admin-2.sock"
    assert (worker.adminToken, worker["admin-host"]) == (TOKEN, ["proxy.example"])
    assert worker["admin-token-for-reads"] == 1
    # From a file: the worker reads the file itself.
    config = opts.ServerOptions()
    config.parseOptions(["--workers", "2", "--admin-token-file", secret_file(tmp_path)])
    assert config.secrets() == {}
    assert opts.ServerOptions.restore(config.portable(), 1).adminToken == TOKEN


def test_admin_listen_builds_an_endpoint_service(tmp_path):
    from twisted.internet.endpoints import UNIXServerEndpoint

    config = opts.ServerOptions()
    config.parseOptions(["--admin-listen", f"unix:{tmp_path}/admin.sock", "--stats-interval", "0"])
    top = built(config)
    (listener,) = [s for s in top if isinstance(s, services.AdminService)]
    assert isinstance(listener.endpoint, UNIXServerEndpoint)
    assert [type(s).__name__ for s in top] == ["ListeningService", "AdminService", "Periodic"]


@pytest.mark.parametrize(
    ("listen", "error"),
    [
        ("nosuch:9100", "Unknown endpoint type: 'nosuch'"),
        ("tcp:9100:bogus=1", "unexpected keyword argument 'bogus'"),
    ],
)
def test_an_admin_listen_twisted_cannot_read_is_one_line(listen, error):
    config = opts.ServerOptions()
    config.parseOptions(["--admin-listen", listen])
    with pytest.raises(SystemExit) as info:
        built(config)
    assert str(info.value).startswith(f"cacheserver: --admin-listen {listen}: ")
    assert error in str(info.value) and "\n" not in str(info.value)


def test_a_taken_admin_listen_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = opts.ServerOptions()
        config.parseOptions(["--admin-listen", f"tcp:{port}:interface=127.0.0.1"])
        top = built(config)
        (listener,) = [s for s in top if isinstance(s, services.AdminService)]
        with pytest.raises(SystemExit) as info:
            listener.privilegedStartService()
    assert str(info.value) == (
        f"cacheserver: cannot listen on tcp:{port}:interface=127.0.0.1 (admin site): "
        "address already in use"
    )


def test_an_admin_socket_in_a_missing_folder_is_one_line(tmp_path):
    """A UNIX socket's listen fails with a plain OSError (its lock file), not
    Twisted's CannotListenError: the same one line."""
    path = tmp_path / "missing" / "admin.sock"
    config = opts.ServerOptions()
    config.parseOptions(["--admin-listen", f"unix:{path}"])
    (listener,) = [s for s in built(config) if isinstance(s, services.AdminService)]
    with pytest.raises(SystemExit) as info:
        listener.privilegedStartService()
    assert str(info.value) == (
        f"cacheserver: cannot listen on unix:{path} (admin site): no such file or directory"
    )


def test_a_workers_derived_admin_port_taken_is_named():
    """With --workers 2 --admin-port P, worker 2's site is on P + 1: the
    message says so, since the user never typed that port."""
    first = free_ports_in_a_row(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))
        taken.listen()
        config = opts.ServerOptions()
        config.parseOptions(["--workers", "2", "--admin-port", str(first)])
        with pytest.raises(SystemExit) as info:
            built(config)
    assert str(info.value) == (
        f"cacheserver: cannot listen on 127.0.0.1:{first + 1} "
        f"(admin site of worker 2, --admin-port {first} + 1): address already in use"
    )


class _Port:
    def __init__(self, host) -> None:
        self.host = host

    def getHost(self):
        return self.host


@pytest.mark.parametrize(
    ("host", "line", "warned"),
    [
        (IPv4Address("TCP", "127.0.0.1", 9100), "admin site on http://127.0.0.1:9100/", False),
        (IPv6Address("TCP", "::1", 9100), "admin site on http://[::1]:9100/", False),
        (IPv4Address("TCP", "0.0.0.0", 9100), "admin site on http://0.0.0.0:9100/", True),
        (UNIXAddress(b"/run/a.sock"), "admin site on unix:/run/a.sock", False),
    ],
)
def test_one_line_says_where_and_a_warning_beyond_loopback_without_token(
    proxy_log, host, line, warned
):
    from twisted.logger import LogLevel, formatEvent

    for token, warns in ((None, warned), (TOKEN, False)):
        listener = services.AdminService(None, admin(Access(token)), str)
        proxy_log.clear()
        listener._listening(_Port(host))
        said = [(e["log_level"], formatEvent(e)) for e in proxy_log]
        assert said[0] == (LogLevel.info, line)
        assert len(said) == 1 + warns
        if warns:
            assert said[1] == (
                LogLevel.warn,
                "the admin site listens beyond loopback without a token "
                "(--admin-token-file): anyone who reaches http://0.0.0.0:9100/ reads every page",
            )


def test_a_secret_file_of_another_user_is_refused(tmp_path, monkeypatch):
    """Another user could rewrite it: refused as ssh refuses such a key."""
    from twisted_cacheproxy.application.secretfile import read_secret_file

    path = secret_file(tmp_path, "abc")
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # nobody's
        owner, me = 65534, 0
    else:
        owner, me = os.geteuid(), os.geteuid() + 1
        monkeypatch.setattr(os, "geteuid", lambda: me)
    with pytest.raises(ValueError) as info:
        read_secret_file(path)
    assert str(info.value) == (
        f"{path} belongs to user {owner}, not to this process's user ({me}) nor to root: "
        "chown it to the user the service runs as"
    )


def test_a_secret_file_is_read_as_bytes_without_its_line_end(tmp_path):
    from twisted_cacheproxy.application.secretfile import read_secret_file

    assert read_secret_file(secret_file(tmp_path, "abc\r\n")) == b"abc"
    os.chmod(tmp_path, 0o700)
    with pytest.raises(ValueError, match="is not a file"):
        read_secret_file(str(tmp_path))
