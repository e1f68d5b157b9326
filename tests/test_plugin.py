"""Integration: ``twistd -n cacheserver`` over real TCP on 127.0.0.1, and ``calc-client``.

One server process serves the whole module; every wait is bounded. The
options themselves, parsed in process, are tested in test_options.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import time

import pytest
from helpers import VECTORS, built, doc_commands, options, request_frame, vector_value
from processes import free_port, read_message, script

from twisted_cacheproxy.calculator.parser import parse

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the most any single wait here may take


def run(args, *, input=None, timeout=WAIT, cwd=None):
    return subprocess.run(
        args,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def cacheserver(tmp_path_factory):
    """A running ``twistd -n cacheserver``; yields its port."""
    workdir = tmp_path_factory.mktemp("twistd")
    port = free_port()
    log = (workdir / "twistd.log").open("w")
    proc = subprocess.Popen(
        [script("twistd"), "-n", "--pidfile=", "cacheserver", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"twistd exited with {proc.returncode}:\n{read(workdir)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"twistd did not listen within {WAIT} s:\n{read(workdir)}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT)
        log.close()
    # twistd re-raises the SIGTERM it handled, after a clean shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), read(workdir)
    text = read(workdir)
    assert "Server Shut Down." in text
    assert "Traceback" not in text and "Unhandled" not in text, text


def read(workdir) -> str:
    return (workdir / "twistd.log").read_text()


# --- raw TCP helpers -----------------------------------------------------------------------


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return sock


# --- the six vectors over TCP --------------------------------------------------------------


def test_vector_text_over_tcp(cacheserver, vector):
    with connect(cacheserver) as sock:
        sock.sendall(request_frame(vector["text"].encode(), steps=True))
        h, body = read_message(sock)
    assert (h.status, h.cache, h.steps, h.request, h.max_age) == (200, True, True, False, 65535)
    answer = json.loads(body)
    assert answer["steps"] == vector["steps"]
    assert repr(answer["result"]) == vector["result_repr"]
    assert type(answer["result"]).__name__ == vector["result_type"]
    assert abs(h.timestamp - time.time()) < 60


@pytest.mark.parametrize("protocol", [2, 4])
def test_vector_legacy_over_tcp(cacheserver, vector, course, protocol):
    with connect(cacheserver) as sock:
        sock.sendall(request_frame(course.dumps(parse(vector["text"]), protocol), steps=True))
        h, body = read_message(sock)
    assert (h.status, h.cache, h.steps, h.max_age) == (200, True, True, 65535)
    assert body == pickle.dumps((vector_value(vector), vector["steps"]), 4)


def test_pipelined_requests_over_tcp(cacheserver, course):
    frames = []
    for v in VECTORS:
        frames.append(request_frame(v["text"].encode(), steps=True))
        frames.append(request_frame(course.dumps(parse(v["text"])), steps=False))
    frames.insert(5, request_frame(b"1 / 0", steps=True))
    with connect(cacheserver) as sock:
        sock.sendall(b"".join(frames))
        answers = [read_message(sock) for _ in frames]
    assert answers[5][0].status == 400
    assert json.loads(answers[5][1]) == {"error": "division by zero", "type": "ZeroDivisionError"}
    del answers[5]
    for i, v in enumerate(VECTORS):
        (h1, text_body), (h2, legacy_body) = answers[2 * i], answers[2 * i + 1]
        assert (h1.status, h1.steps, h2.status, h2.steps) == (200, True, 200, False)
        assert json.loads(text_body)["steps"] == v["steps"]
        assert legacy_body == pickle.dumps((vector_value(v), []), 4)


def test_one_message_in_many_tiny_writes(cacheserver):
    frame = request_frame(b"max(2, 3) + 3", steps=True)
    with connect(cacheserver) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(frame), 3):
            sock.sendall(frame[i : i + 3])
        h, body = read_message(sock)
    assert (h.status, body) == (200, b'{"result": 6, "steps": ["max(2, 3) + 3", "3 + 3", "6"]}')


def test_deep_nesting_over_tcp(cacheserver):
    with connect(cacheserver) as sock:
        sock.sendall(request_frame(("sqrt(" * 199 + "4" + ")" * 199).encode(), steps=False))
        h, body = read_message(sock)
    assert (h.status, body) == (200, b'{"result": 1.0, "steps": []}')


def test_impossible_header_over_tcp_gets_one_400_then_close(cacheserver):
    with connect(cacheserver) as sock:
        sock.sendall(struct.pack("!LHHHxx", 0, 3, 0x0400, 0) + b"1 + 1")
        h, body = read_message(sock)
        assert h.status == 400
        assert json.loads(body) == {
            "error": "impossible message length 3 (must be 12..8192); closing the connection",
            "type": "ValueError",
        }
        assert sock.recv(100) == b""  # closed, nothing more


# --- calc-client against the server ------------------------------------------------------------


def test_calc_client_result(cacheserver):
    proc = run([script("calc-client"), "--port", str(cacheserver), "max(2, 3) + 3"])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "Expression: max(2, 3) + 3\n"
        "          = 3 + 3\n"
        "          = 6\n"
        "Result: 6  (computed by the server, cacheable for ever)\n"
    )


def test_calc_client_legacy_without_steps(cacheserver):
    proc = run(
        [
            script("calc-client"),
            "--port",
            str(cacheserver),
            "--legacy",
            "--no-steps",
            VECTORS[0]["text"],
        ]
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        f"Expression: {VECTORS[0]['text']}\n"
        "Result: -0.38748277824137206  (computed by the server, cacheable for ever)\n"
    )


def test_calc_client_legacy_rand(cacheserver):
    proc = run(
        [script("calc-client"), "--port", str(cacheserver), "--legacy", "--no-steps", "rand(5, 6)"]
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    first, second, end = proc.stdout.split("\n")
    assert (first, end) == ("Expression: rand(5, 6)", "")
    value = float(
        second.removeprefix("Result: ").removesuffix("  (computed by the server, not cacheable)")
    )
    assert 5 <= value <= 6


def test_calc_client_error_answer_exits_1(cacheserver):
    proc = run([script("calc-client"), "--port", str(cacheserver), "sqrt(-1)"])
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "Error 400 (ValueError): math domain error\n"


def test_calc_client_nothing_listening_exits_2():
    port = free_port()
    proc = run([script("calc-client"), "--port", str(port), "1 + 1"])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith(f"Error: cannot connect to 127.0.0.1:{port}: ")
    assert proc.stderr.count("\n") == 1


def test_calc_client_menu_nothing_listening_exits_2():
    port = free_port()
    proc = run([script("calc-client"), "--port", str(port)], input="2\n")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith(f"Error: cannot connect to 127.0.0.1:{port}: ")


def test_calc_client_words_are_one_expression(cacheserver):
    proc = run([script("calc-client"), "--port", str(cacheserver), "--no-steps", "sin", "(pi/2)"])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "Expression: sin (pi/2)\nResult: 1.0  (computed by the server, cacheable for ever)\n"
    )


def test_calc_client_port_out_of_range_is_a_usage_error():
    proc = run([script("calc-client"), "--port", "70000", "1"])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.endswith(
        "calc-client: error: argument --port: port must be 1..65535, not 70000\n"
    )


def test_calc_client_menu_with_piped_input(cacheserver):
    session = "2\n9\n7\n1/0\nm\n\nq\n"
    proc = run([script("calc-client"), "--port", str(cacheserver)], input=session)
    assert (proc.returncode, proc.stderr) == (0, "")
    out = proc.stdout
    assert out.startswith(f"Connected to 127.0.0.1:{cacheserver}.\n")
    assert out.count("Choose an expression") == 2  # at start and for "m", not after answers
    # Piped lines are echoed after their prompt; "9" is not a menu entry: an expression.
    assert (
        "choice> 2\nExpression: max(2, 3) + 3\n          = 3 + 3\n          = 6\nResult: 6" in out
    )
    assert "choice> 9\nExpression: 9\nResult: 9  (computed by the server" in out
    assert "choice> 7\nexpression> 1/0\nError 400 (ZeroDivisionError): division by zero\n" in out
    assert out.endswith("choice> \nchoice> q\n")


def test_calc_client_menu_end_of_input_quits(cacheserver):
    proc = run([script("calc-client"), "--port", str(cacheserver)], input="5\n")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "Result: 9.92290301275212e-08" in proc.stdout


# --- twistd command line -----------------------------------------------------------------------


def test_twistd_help_lists_cacheserver():
    proc = run([script("twistd"), "--help"])
    assert proc.returncode == 0
    commands = proc.stdout.split("Commands:")[1]
    assert any(line.split()[:1] == ["cacheserver"] for line in commands.splitlines())


def test_twistd_cacheserver_help_lists_the_options():
    proc = run([script("twistd"), "cacheserver", "--help"])
    assert proc.returncode == 0, proc.stderr
    for option in (
        "--port=",
        "--interface=",
        "--max-message-size=",
        "--idle-timeout=",
        "--max-age=",
        "--no-cache",
    ):
        assert option in proc.stdout, option


@pytest.mark.parametrize(
    ("plugin", "argv", "message"),
    [
        ("cacheserver", ["--port", "0"], "--port must be 1..65535, not 0"),
        ("cacheserver", ["--port", "abc"], "--port: not a number: 'abc'"),
        ("cacheserver", ["--idle-timeout", "soon"], "--idle-timeout: not a number: 'soon'"),
        ("cacheproxy", ["--cache-size", "12Q"], "--cache-size: not a size: '12Q'"),
        ("cacheproxy", ["--bogus"], "option --bogus not recognized"),
    ],
)
def test_twistd_bad_option_says_the_error_first(tmp_path, plugin, argv, message):
    proc = run([script("twistd"), "-n", "--pidfile=", plugin, *argv], cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    first, second = proc.stderr.splitlines()
    assert first.startswith(f"{plugin}: {message}")
    assert second == f"Run 'twistd {plugin} --help' for the options."


@pytest.mark.parametrize("plugin", ["cacheserver", "cacheproxy"])
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_twistd_taken_port_is_one_line_and_exit_1(tmp_path, plugin, daemon):
    mode = ["--pidfile", "t.pid", "--logfile", "t.log"] if daemon else ["-n", "--pidfile="]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = run([script("twistd"), *mode, plugin, "--port", port], cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"{plugin}: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not (tmp_path / "t.pid").exists()


def test_twistd_missing_interface_is_one_line(tmp_path):
    argv = ["-n", "--pidfile=", "cacheproxy", "--interface", "192.0.2.1", "--port", "9"]
    proc = run([script("twistd"), *argv], cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert (
        proc.stderr == "cacheproxy: cannot listen on 192.0.2.1:9: cannot assign requested address\n"
    )


def test_listening_failure_after_the_check_is_one_line(monkeypatch):
    """A port taken between the check and the listening itself still ends
    twistd with the one line, not a traceback."""
    config = options("--port", str(free_port()))
    service = built(config)  # checked: free
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", config["port"]))
        taken.listen()
        with pytest.raises(SystemExit) as info:
            service.privilegedStartService()
    assert str(info.value) == (
        f"cacheserver: cannot listen on 127.0.0.1:{config['port']}: address already in use"
    )


@pytest.mark.parametrize("plugin", ["cacheserver", "cacheproxy"])
def test_twistd_plugin_version_is_ours(plugin):
    from importlib.metadata import version

    proc = run([script("twistd"), plugin, "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{plugin} (twisted-cacheproxy) {version('twisted-cacheproxy')},")


def test_twistd_help_says_where_the_plugins_listen():
    proc = run([script("twistd"), "--help"])
    commands = " ".join(proc.stdout.split("Commands:")[1].split())
    assert "cacheserver A calculator server for the course protocol (default: 127.0.0.1:9999)." in (
        commands
    )
    assert (
        "cacheproxy A caching proxy for the calculator protocol "
        "(default: 127.0.0.1:9998, in front of 127.0.0.1:9999)."
    ) in commands


def test_startup_log_is_one_line_with_the_settings(tmp_path):
    """No "<Factory> starting on <port>" nor "Starting factory <... at 0x...>":
    one line with the address, the upstream, the cache and the limits."""
    port = free_port()
    log = tmp_path / "proxy.log"
    argv = ["-n", "--pidfile=", f"--logfile={log}", "cacheproxy", "--port", str(port)]
    proc = subprocess.Popen([script("twistd"), *argv, "--cache-size", "16M"])
    try:
        deadline = time.monotonic() + WAIT
        while "listening on" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)
    text = log.read_text()
    assert "starting on" not in text and "Starting factory" not in text
    lines = [line for line in text.splitlines() if "[cacheproxy#info] listening" in line]
    assert len(lines) == 1
    assert lines[0].endswith(
        f"[cacheproxy#info] listening on 127.0.0.1:{port}, in front of the server at "
        "127.0.0.1:9999 (32 connections, pipelining 8 deep, 5 attempts, timeout 10 s); "
        "cache 16M, stale-if-error off; "
        "messages up to 8192 bytes, idle timeout 60 s, at most 10000 connections"
    )


# --- docs/running.md's commands, as written ------------------------------------------------


def test_running_page_daemon_commands_work_one_after_another(tmp_path):
    """docs/running.md's daemon example, from one directory, on ports of our own."""
    server_port, proxy_port = free_port(), free_port()
    commands = doc_commands("docs/running.md", "twistd")
    daemons = list(dict.fromkeys(c for c in commands if "-n" not in c.split() and "--pidfile" in c))
    assert [c.split()[-1] for c in daemons] == ["cacheserver", "cacheproxy"]
    extra = {
        "cacheserver": ["--port", str(server_port)],
        "cacheproxy": ["--port", str(proxy_port), "--server-port", str(server_port)],
    }
    started = []
    try:
        for command in daemons:
            argv = command.split()
            proc = run([script("twistd"), *argv[1:], *extra[argv[-1]]], cwd=tmp_path)
            assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout
            started.append(argv[argv.index("--pidfile") + 1])
        answer = run([script("calc-client"), "--port", str(proxy_port), "--no-steps", "6 * 7"])
        assert answer.stdout.startswith("Expression: 6 * 7\nResult: 42  (")
    finally:
        for name in started:
            pidfile = tmp_path / name
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while any((tmp_path / name).exists() for name in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((tmp_path / name).exists() for name in started)  # removed on the way out


def test_workers_stop_at_once_on_an_access_log_they_cannot_open(tmp_path):
    port = free_port()
    argv = ["--port", str(port), "--workers", "2", "--access-log", str(tmp_path / "no" / "a.log")]
    proc = run([script("twistd"), "-n", "--pidfile=", "cacheserver", *argv])
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        f"cacheserver: cannot open --access-log {tmp_path / 'no' / 'a.log'}: "
        "No such file or directory"
    )
