"""The plugins' options in process, no twistd: defaults, usage errors, the
start-up settings line, several servers, ``--workers`` and the options'
hand-over to the workers (`portable`/`restore`), and the services the
composition root builds from them (built, never started)."""

from __future__ import annotations

import json

import pytest
from helpers import built, options
from processes import free_ports_in_a_row
from twisted.python import usage

from twisted_cacheproxy.application import options as opts
from twisted_cacheproxy.application import settings
from twisted_cacheproxy.application.parent import WorkersService
from twisted_cacheproxy.proxy.balancer import Balancer

# --- the start-up settings line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            [],
            "answers cacheable for ever; messages up to 8192 bytes, idle timeout 60 s, "
            "at most 10000 connections",
        ),
        (
            ["--max-age", "60", "--idle-timeout", "0", "--max-connections", "5"],
            "answers cacheable for 60 s; messages up to 8192 bytes, idle timeout off, "
            "at most 5 connections",
        ),
        (
            ["--no-cache"],
            "answers not cacheable; messages up to 8192 bytes, idle timeout 60 s, "
            "at most 10000 connections",
        ),
    ],
)
def test_server_settings_line(argv, line):
    assert settings.server_settings(options(*argv)) == line


def test_proxy_settings_line():
    config = opts.ProxyOptions()
    config.parseOptions(
        [
            "--server-host",
            "::1",
            "--server-port",
            "7000",
            "--cache-size",
            "1000",
            "--stale-if-error",
            "30",
            "--upstream-pipeline",
            "8",
            "--retries",
            "2",
        ]
    )
    assert settings.proxy_settings(config) == (
        "in front of the server at [::1]:7000 (32 connections, pipelining 8 deep, 2 attempts, "
        "timeout 10 s); cache 1000 bytes, stale-if-error 30 s; "
        "messages up to 8192 bytes, idle timeout 60 s, at most 10000 connections"
    )


# --- the server's options ------------------------------------------------------------------


def test_server_options_defaults():
    config = options()
    assert (config["port"], config["interface"], config["max-message-size"]) == (
        9999,
        "127.0.0.1",
        8192,
    )
    assert (config["idle-timeout"], config["max-age"], config["no-cache"]) == (60.0, 65535, 0)
    assert config["max-connections"] == 10_000
    assert config["backlog"] == 511


def test_server_options_build_the_service():
    config = options(
        "--port",
        "4567",
        "--interface",
        "0.0.0.0",
        "--max-age",
        "30",
        "--max-message-size",
        "1000",
        "--idle-timeout",
        "0",
        "--no-cache",
        "--max-connections",
        "5",
        "--backlog",
        "2048",
    )
    service = built(config).main
    factory = service.factory
    ((endpoint, _),) = service.listeners
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (4567, "0.0.0.0", 2048)
    assert (factory.max_age, factory.cacheable, factory.max_message_size) == (30, False, 1000)
    assert (factory.idle_timeout, factory.connectionLimit) == (None, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "--port must be 1..65535, not 0"),
        (["--port", "65536"], "--port must be 1..65535, not 65536"),
        (["--max-message-size", "255"], "--max-message-size must be 256..65535"),
        (["--max-message-size", "65536"], "--max-message-size must be 256..65535"),
        (["--idle-timeout", "-1"], "--idle-timeout cannot be negative"),
        (["--max-connections", "0"], "--max-connections must be at least 1"),
        (["--backlog", "0"], "--backlog must be at least 1"),
        (["--max-age", "65536"], "--max-age must be 0..65535"),
        (["--max-age", "-1"], "--max-age must be 0..65535"),
        (["--port", "abc"], "--port: not a number: 'abc'"),
        (["--idle-timeout", "x"], "--idle-timeout: not a number: 'x'"),
    ],
)
def test_server_options_refuse_bad_values(argv, message):
    with pytest.raises(usage.UsageError) as info:
        options(*argv)
    assert str(info.value) == message


# --- the proxy's options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "٩٩٩٨"], "--port: not a number: '٩٩٩٨'"),
        (
            ["--server-port", "\uff19\uff19\uff19\uff19"],
            "--server-port: not a number: '\uff19\uff19\uff19\uff19'",
        ),
        (["--retries", " 5"], "--retries: not a number: ' 5'"),
        (["--upstream-pipeline", "1_6"], "--upstream-pipeline: not a number: '1_6'"),
        (["--timeout", "nan"], "--timeout: not a number: 'nan'"),
        (["--idle-timeout", "inf"], "--idle-timeout: not a number: 'inf'"),
        (["--stats-interval", "1e999"], "--stats-interval: number out of range: '1e999'"),
        (["--stale-if-error", "٣٠"], "--stale-if-error: not a number: '٣٠'"),
        (
            ["--cache-size", "\uff16\uff14M"],
            "--cache-size: not a size: '\uff16\uff14M' (use e.g. 512K, 64M, 1G)",
        ),
        (["--cache-size", "inf"], "--cache-size: not a size: 'inf' (use e.g. 512K, 64M, 1G)"),
        (["--cache-size", "1e308G"], "--cache-size: not a size: '1e308G' (use e.g. 512K, 64M, 1G)"),
        (["--server", "localhost:٩٩٩٩"], "--server: not a port number: '٩٩٩٩'"),
        (["--memcached", "localhost:1_1211"], "--memcached: not a port number: '1_1211'"),
    ],
)
def test_proxy_options_take_numbers_in_ascii_digits_only(argv, message):
    """What ``int()`` or ``float()`` would take but Python's grammar would
    not (other scripts' digits, blanks, underscores, ``inf``, ``nan``) is
    refused in words, never taken nor a traceback."""
    with pytest.raises(usage.UsageError) as info:
        opts.ProxyOptions().parseOptions(argv)
    assert str(info.value) == message


def test_proxy_options_take_plain_numbers():
    config = opts.ProxyOptions()
    config.parseOptions(["--retries", "+3", "--timeout", "2.5", "--retry-delay", ".25"])
    assert (config["retries"], config["timeout"], config["retry-delay"]) == (3, 2.5, 0.25)
    config = opts.ProxyOptions()
    config.parseOptions(["--cache-size", "1.5M", "--stale-if-error", "1e2"])
    assert (config["cache-size"], config["stale-if-error"]) == (1536 << 10, 100.0)


@pytest.mark.parametrize("value", ["0", "65536"])
def test_proxy_options_refuse_a_server_port_out_of_range(value):
    with pytest.raises(usage.UsageError) as info:
        opts.ProxyOptions().parseOptions(["--server-port", value])
    assert str(info.value) == f"--server-port must be 1..65535, not {value}"


@pytest.mark.parametrize("name", ["--upstream-connections", "--upstream-pipeline"])
def test_proxy_options_refuse_fewer_than_one_upstream(name):
    with pytest.raises(usage.UsageError) as info:
        opts.ProxyOptions().parseOptions([name, "0"])
    assert str(info.value) == f"{name} must be at least 1"


def test_proxy_options_pipelining_is_on_by_default_and_reaches_the_pool():
    """8 deep by default (only ever on connections that said L);
    ``--upstream-pipeline 1`` turns it off."""
    for argv, depth, on in (
        ([], 8, True),
        (["--upstream-pipeline", "16"], 16, True),
        (["--upstream-pipeline", "1"], 1, False),
    ):
        config = opts.ProxyOptions()
        config.parseOptions(argv)
        pool = built(config).factory.pool
        assert (pool.pipeline, pool.pipelining) == (depth, on)


# --- several servers -----------------------------------------------------------------------


def test_repeated_server_options():
    config = opts.ProxyOptions()
    config.parseOptions(
        ["--server", "127.0.0.1:7001", "--server", "[::1]:7002", "--health-interval", "2"]
    )
    assert config.servers == [opts.Server("127.0.0.1", 7001), opts.Server("::1", 7002)]
    assert settings.proxy_settings(config).startswith(
        "in front of the servers at 127.0.0.1:7001, [::1]:7002 (32 connections each, "
        "pipelining 8 deep, 5 attempts, timeout 10 s, health checks every 2 s, "
        "timeouts not retried); "
    )


def test_one_server_by_host_and_port_still():
    config = opts.ProxyOptions()
    config.parseOptions(["--server-host", "10.0.0.1", "--server-port", "7000"])
    assert config.servers == [opts.Server("10.0.0.1", 7000)]


@pytest.mark.parametrize("value", ["7000", "host:", "host:0", "host:70000", ":7000"])
def test_bad_server_option(value):
    with pytest.raises(usage.UsageError, match="--server: "):
        opts.ProxyOptions().parseOptions(["--server", value])


def test_the_same_server_twice_is_refused():
    with pytest.raises(usage.UsageError, match="--server: the same server is given twice"):
        opts.ProxyOptions().parseOptions(
            ["--server", "127.0.0.1:7001", "--server", "127.0.0.1:7001"]
        )


def test_several_servers_make_a_balancer():
    config = opts.ProxyOptions()
    config.parseOptions(
        ["--server", "127.0.0.1:7001", "--server", "127.0.0.1:7002", "--retries", "3"]
    )
    balancer = built(config).factory.pool
    assert isinstance(balancer, Balancer)
    assert [s.name for s in balancer.servers] == [
        "calculator server 127.0.0.1:7001",
        "calculator server 127.0.0.1:7002",
    ]
    assert balancer.rounds == 3
    assert all(s.pool.attempts == 1 for s in balancer.servers)  # the balancer retries


# --- --workers and the hand-over to the workers --------------------------------------------


def test_workers_option():
    config = options("--workers", "3")
    assert config["workers"] == 3
    with pytest.raises(usage.UsageError, match="--workers must be at least 1"):
        options("--workers", "0")


def test_proxy_workers_need_the_shared_tier():
    with pytest.raises(usage.UsageError, match="--workers needs --memcached"):
        opts.ProxyOptions().parseOptions(["--workers", "2"])
    config = opts.ProxyOptions()
    config.parseOptions(["--workers", "2", "--memcached", "127.0.0.1:11211"])
    assert config["workers"] == 2


def test_workers_admin_ports_must_fit():
    with pytest.raises(usage.UsageError, match="ports up to 65536"):
        options("--workers", "2", "--admin-port", "65535")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--port", "9100", "--admin-port", "9099"],
            "--admin-port 9099 with --workers 2: the workers' admin sites take ports "
            "9099..9100, which include --port 9100",
        ),
        (["--access-log", "-"], "--access-log - cannot go with --workers: give a file"),
    ],
)
def test_what_workers_cannot_go_with(argv, message):
    with pytest.raises(usage.UsageError) as info:
        options("--workers", "2", *argv)
    assert str(info.value) == message
    options("--workers", "1", *argv)  # one process: fine


def test_a_worker_restores_the_parents_options_with_its_own_admin_port():
    """What a worker process is handed: the parent's options through JSON,
    one process, its admin site on --admin-port + its number - 1."""
    config = opts.ProxyOptions()
    argv = "--workers 3 --memcached 127.0.0.1:11211 --memcached [::1]:11212"
    argv += " --server 127.0.0.1:7001 --server [::1]:7002 --admin-port 9100"
    argv += " --server tls:localhost:7003:trustRoots=/etc/ca.pem"
    config.parseOptions([*argv.split(), "--cache-size", "1M", "--retry-timeouts"])
    restored = opts.ProxyOptions.restore(json.loads(json.dumps(config.portable())), 3)
    assert restored.servers == [
        opts.Server("127.0.0.1", 7001),
        opts.Server("::1", 7002),
        opts.Server("localhost", 7003, True, "/etc/ca.pem"),
    ]
    assert restored["memcached"] == [("127.0.0.1", 11211), ("::1", 11212)]
    assert (restored["workers"], restored["admin-port"]) == (1, 9102)
    assert (restored["cache-size"], restored["retry-timeouts"]) == (1 << 20, 1)
    assert {k: v for k, v in restored.items() if k not in ("workers", "admin-port")} == {
        k: v for k, v in config.items() if k not in ("workers", "admin-port")
    }
    server = opts.ServerOptions.restore(options("--workers", "2", "--max-age", "7").portable(), 1)
    assert (server["workers"], server["max-age"], server["admin-port"]) == (1, 7, 0)


def test_proxy_workers_make_a_parent_that_hands_its_options_on():
    config = opts.ProxyOptions()
    config.parseOptions(
        [
            "--workers",
            "2",
            "--memcached",
            "127.0.0.1:11211",
            "--admin-port",
            str(free_ports_in_a_row(2)),
        ]
    )
    parent = built(config)
    assert isinstance(parent, WorkersService)
    assert parent.count == 2 and parent.arguments[0] == "cacheproxy"
    assert json.loads(parent.arguments[1]) == json.loads(json.dumps(config.portable()))


@pytest.mark.parametrize("Options", [opts.ServerOptions, opts.ProxyOptions])
def test_help_has_no_runs_of_spaces_nor_defaults_in_bytes(Options):
    """--help reads as written: an opt_ method's docstring on one line,
    --cache-size's default as the option takes it."""
    config = Options()
    for name, doc in config.docs.items():
        assert "  " not in doc, name
    text = str(config)
    assert "[default: 67108864]" not in text
    if Options is opts.ProxyOptions:
        assert "[default: 64M]" in " ".join(text.split())


# --- --listen --------------------------------------------------------------------------------


def test_listen_is_repeatable_and_replaces_the_port():
    config = options("--listen", "unix:/run/c.sock", "--listen", r"tcp6:9999:interface=\:\:1")
    assert config.listens() == ["unix:/run/c.sock", r"tcp6:9999:interface=\:\:1"]


def test_without_listen_the_port_is_a_tcp_description():
    config = options("--port", "4567", "--interface", "::1", "--backlog", "64")
    assert config.listens() == [r"tcp:4567:interface=\:\:1:backlog=64"]
    service = built(config).main
    ((endpoint, where),) = service.listeners
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (4567, "::1", 64)
    assert where == "[::1]:4567"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "unix:/s", "--port", "1234"], "give --listen or --port, not both"),
        (
            ["--interface", "::1", "--port", "1234", "--listen", "unix:/s"],
            "give --listen or --interface and --port, not both",
        ),
        (
            ["--listen", "9998"],
            "--listen 9998: not an endpoint description (tcp:9998 for a TCP port)",
        ),
        (
            ["--workers", "2", "--listen", "onion:443"],
            "--listen onion:443 cannot go with --workers: the workers can be handed a "
            "listening socket (tcp:, tcp6:, unix:, systemd:, ssl:), not a onion: endpoint",
        ),
    ],
)
def test_listen_refusals(argv, message):
    with pytest.raises(usage.UsageError) as info:
        options(*argv)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "text",
    [
        "tcp:0:interface=127.0.0.1",
        "unix:/tmp/x.sock",
        "systemd:domain=INET:index=0",
        "ssl:0:privateKey=k.pem:certKey=c.pem",
    ],
)
def test_workers_take_the_sockets_they_can_be_handed(text):
    assert options("--workers", "2", "--listen", text)["listen"] == [text]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense:1", "cacheserver: --listen nonsense:1: Unknown endpoint type: 'nonsense'"),
        (
            "ssl:9443:privateKey=/nowhere/k.pem",
            "cacheserver: --listen ssl:9443:privateKey=/nowhere/k.pem: "
            "No such file or directory: /nowhere/k.pem",
        ),
        (
            "systemd:domain=INET:index=0",
            "cacheserver: --listen systemd:domain=INET:index=0: "
            "systemd passed no such socket (LISTEN_FDS, LISTEN_FDNAMES)",
        ),
    ],
)
def test_a_description_that_cannot_work_is_one_line(text, message):
    with pytest.raises(SystemExit) as info:
        built(options("--listen", text))
    assert str(info.value) == message


def test_a_tls_key_that_cannot_be_read_is_one_line_with_workers_too():
    """The parent reads the key before twistd daemonizes, as one process does."""
    text = "ssl:9443:privateKey=/nowhere/k.pem"
    with pytest.raises(SystemExit) as info:
        built(options("--workers", "2", "--listen", text))
    assert str(info.value) == (
        f"cacheserver: --listen {text}: No such file or directory: /nowhere/k.pem"
    )


@pytest.mark.parametrize("kind", ["tcp", "ssl"])
def test_a_taken_tcp_port_is_one_line_before_twistd_goes_on(kind):
    """Before twistd daemonizes: afterwards, a daemon's waiting parent would
    never hear of it. TLS listens on TCP too."""
    import os
    import socket

    import twisted.test

    pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
    keys = f":privateKey={pem}:certKey={pem}" if kind == "ssl" else ""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            built(options("--listen", f"{kind}:{port}:interface=127.0.0.1{keys}"))
    assert str(info.value) == (
        f"cacheserver: cannot listen on 127.0.0.1:{port}: address already in use"
    )


# --- --server over TLS -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "server"),
    [
        ("tls:calc.example:9443", opts.Server("calc.example", 9443, True, None)),
        ("tls:127.0.0.1:9443:trustRoots=/etc/ca", opts.Server("127.0.0.1", 9443, True, "/etc/ca")),
        (r"tls:\:\:1:9443", opts.Server("::1", 9443, True, None)),
        ("tls:[::1]:9443", opts.Server("::1", 9443, True, None)),
    ],
)
def test_server_over_tls(value, server):
    config = opts.ProxyOptions()
    config.parseOptions(["--server", value])
    assert config.servers == [server]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tls:host", "--server tls:host: not tls:HOST:PORT[:trustRoots=PATH]"),
        ("tls:host:0", "--server: port must be 1..65535, not 0"),
        (
            "tls:host:9443:certificate=c.pem",
            "--server tls:host:9443:certificate=c.pem: "
            "unknown argument certificate (trustRoots=PATH)",
        ),
    ],
)
def test_server_over_tls_refusals(value, message):
    with pytest.raises(usage.UsageError) as info:
        opts.ProxyOptions().parseOptions(["--server", value])
    assert str(info.value) == message


def test_a_tls_server_gets_a_connector_over_tls_named_by_its_address(tmp_path):
    config = opts.ProxyOptions()
    config.parseOptions(["--server", "tls:127.0.0.1:9443:trustRoots=/nowhere"])
    with pytest.raises(SystemExit) as info:
        built(config)
    assert str(info.value) == (
        "cacheproxy: --server tls:127.0.0.1:9443: cannot read /nowhere: No such file or directory"
    )
    config = opts.ProxyOptions()
    config.parseOptions(["--server", "tls:127.0.0.1:9443", "--server", "127.0.0.1:9999"])
    first, second = built(config).factory.pool.servers
    assert (first.address, second.address) == ("127.0.0.1:9443", "127.0.0.1:9999")
    assert first.pool.connector.tls is not None and second.pool.connector.tls is None
    assert "servers at 127.0.0.1:9443 over TLS, 127.0.0.1:9999 (" in settings.proxy_settings(config)
