"""Running the services as infrastructure, with real processes and real
components: ``--listen`` on a UNIX socket and on IPv6; TLS on every hop
(calc-client -> proxy -> server) with a CA made by the docs' own ``openssl``
commands, a plain-text client and an unknown certificate refused; systemd
socket activation through ``systemd-socket-activate`` and the unit files of
``contrib/systemd`` checked by ``systemd-analyze verify``; SIGHUP under
steady load (every answer checked, every worker new, no reset); SIGTERM with
misses in flight (all answered, ``/healthz`` 503 meanwhile)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import threading

import pytest
from helpers import ROOT, in_ci, request_frame, require_tool
from processes import (
    HOST,
    WAIT,
    Twistd,
    accepting,
    answers_across_sigterm,
    children,
    connections_on_each,
    free_port,
    http,
    read_message,
    script,
    sighup_under_load,
    terminate,
    tls_wrap,
    wait_for,
)

pytestmark = pytest.mark.integration


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT * 2, **kwargs)


def result_of(data: bytes):
    return json.loads(data)["result"]


def ask(sock: socket.socket, k: int) -> int:
    """Ask ``k * 3 + 1`` on ``sock``; the answer's status (its result checked)."""
    sock.sendall(request_frame(f"{k} * 3 + 1"))
    header, data = read_message(sock)
    assert header.status == 200 and result_of(data) == k * 3 + 1, (header, data)
    return header.status


# --- listening on any endpoint --------------------------------------------------------------


def free_port6() -> int:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        if in_ci():
            pytest.fail("this host has no IPv6 loopback (::1); CI must run the IPv6 listener test")
        pytest.skip("this host has no IPv6 loopback (::1)")


def test_a_request_over_a_unix_socket_and_over_ipv6(twistd, tmp_path):
    port, port6, path = free_port(), free_port6(), tmp_path / "calc.sock"
    server = twistd(
        "cacheserver",
        "--listen",
        f"tcp:{port}:interface={HOST}",
        "--listen",
        f"unix:{path}",
        "--listen",
        rf"tcp6:{port6}:interface=\:\:1",
        port=port,
    )
    # The fixture waits for the first listener; the other two may come a moment later.
    listening = re.compile(r"listening on (\S+), ")
    assert wait_for(lambda: len(listening.findall(server.text())) == 3)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        ask(sock, 1)
    with socket.create_connection(("::1", port6), timeout=WAIT) as sock:
        ask(sock, 2)
    lines = listening.findall(server.text())
    assert lines == [f"127.0.0.1:{port}", f"unix:{path}", f"[::1]:{port6}"]
    proxy_port = free_port()
    twistd(
        "cacheproxy",
        "--port",
        str(proxy_port),
        "--server",
        f"[::1]:{port6}",
        port=proxy_port,
    )
    client = run([script("calc-client"), "--port", str(proxy_port), "--no-steps", "6 * 7"])
    assert client.stdout.startswith("Expression: 6 * 7\nResult: 42  (computed by the server")
    server.stop()
    assert not path.exists()  # removed on the way out


# --- TLS on every hop ---------------------------------------------------------------------


def docs_block(page: str, marker: str) -> str:
    """The ``sh`` code block of docs/``page`` that holds ``marker``."""
    text = (ROOT / "docs" / page).read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        if marker in block:
            return block
    raise AssertionError(f"no sh block with {marker!r} in docs/{page}")


def make_certificates(folder: pathlib.Path) -> pathlib.Path:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1, made
    by the openssl commands of docs/running.md, run as written."""
    openssl = require_tool("openssl", "openssl", "the TLS tests")
    folder.mkdir()
    commands = docs_block("running.md", "openssl req -x509")
    env = {**os.environ, "PATH": f"{pathlib.Path(openssl).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-e"], input=commands, cwd=folder, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture
def pki(tmp_path):
    """Two unrelated CAs, each with its own server certificate."""
    return make_certificates(tmp_path / "pki"), make_certificates(tmp_path / "other")


def tls_listen(port: int, folder: pathlib.Path) -> str:
    key, cert = folder / "server.key", folder / "server.pem"
    return f"ssl:{port}:interface={HOST}:privateKey={key}:certKey={cert}"


def tls_service(twistd, plugin: str, folder: pathlib.Path, *extra: str) -> Twistd:
    port = free_port()
    return twistd(plugin, "--listen", tls_listen(port, folder), *extra, port=port)


def calc_client(port: int, *argv: str) -> subprocess.CompletedProcess:
    return run([script("calc-client"), "--port", str(port), "--timeout", "10", *argv])


@pytest.mark.parametrize("option", ["--listen", "--admin-listen"])
def test_a_daemon_that_cannot_listen_reports_it_and_exits(tmp_path, option):
    """Daemonized (no -n), a listener that fails only once twistd has forked
    still ends the start with an error, never a wait for ever, and the log
    has the one line."""
    where, log = f"unix:{tmp_path / 'missing' / 'calc.sock'}", tmp_path / "twistd.log"
    argv = [script("twistd"), f"--pidfile={tmp_path / 'twistd.pid'}", f"--logfile={log}"]
    port = ["--port", str(free_port())] if option == "--admin-listen" else []
    argv += ["cacheserver", *port, option, where]
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 1
    assert "An error has occurred" in done.stderr and "StartupError" in done.stderr
    role = " (admin site)" if option == "--admin-listen" else ""
    line = f"cacheserver: cannot listen on {where}{role}: no such file or directory"
    # The daemon writes it as it exits, after telling the parent, which may end first.
    assert wait_for(lambda: line in log.read_text())


def test_tls_from_the_client_through_the_proxy_to_the_server(twistd, pki):
    ours, _ = pki
    server = tls_service(twistd, "cacheserver", ours)
    upstream = f"tls:{HOST}:{server.port}:trustRoots={ours / 'ca.pem'}"
    proxy = tls_service(twistd, "cacheproxy", ours, "--server", upstream)
    cafile = str(ours / "ca.pem")
    first = calc_client(proxy.port, "--tls", "--cafile", cafile, "--no-steps", "6 * 7")
    assert (
        first.stdout
        == "Expression: 6 * 7\nResult: 42  (computed by the server, cacheable for ever)\n"
    )
    again = calc_client(proxy.port, "--tls", "--cafile", cafile, "--no-steps", "6 * 7")
    assert (
        again.stdout
        == "Expression: 6 * 7\nResult: 42  (from the proxy's cache, cacheable for ever)\n"
    )
    named = calc_client(
        proxy.port, "--host", "localhost", "--tls", "--cafile", cafile, "--no-steps", "1 + 1"
    )
    assert named.returncode == 0 and "Result: 2  (" in named.stdout
    assert f"over TLS, in front of the server at 127.0.0.1:{server.port} over TLS (" in proxy.text()


def test_a_plain_text_client_on_a_tls_port_gets_no_answer(twistd, pki):
    ours, _ = pki
    server = tls_service(twistd, "cacheserver", ours)
    plain = calc_client(server.port, "1 + 1")
    assert (plain.returncode, plain.stdout) == (2, "")
    assert plain.stderr == (
        f"Error: 127.0.0.1:{server.port} closed the connection before the answer came\n"
    )
    with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
        sock.sendall(request_frame("1 + 1"))
        assert sock.recv(100) == b""  # not one byte of an answer


def test_a_certificate_that_does_not_verify_is_one_clear_error(twistd, pki):
    ours, other = pki
    server = tls_service(twistd, "cacheserver", other)  # signed by a CA we do not trust
    refused = calc_client(server.port, "--tls", "--cafile", str(ours / "ca.pem"), "1 + 1")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (
        f"Error: 127.0.0.1:{server.port}: TLS handshake failed: certificate verify failed\n"
    )
    upstream = f"tls:{HOST}:{server.port}:trustRoots={ours / 'ca.pem'}"
    proxy_port = free_port()
    proxy = twistd("cacheproxy", "--port", str(proxy_port), "--server", upstream, port=proxy_port)
    answer = calc_client(proxy_port, "1 + 1")
    assert answer.returncode == 1
    message = (
        f"calculator server 127.0.0.1:{server.port} unreachable after 1 attempt: "
        "TLS handshake failed: certificate verify failed"
    )
    assert answer.stderr == f"Error 500 (ConnectionError): {message}\n"
    assert wait_for(lambda: message in proxy.text())
    assert "Result" not in answer.stdout


def test_a_protocol_error_inside_tls_is_one_400_then_close(twistd, pki):
    ours, _ = pki
    server = tls_service(twistd, "cacheserver", ours)
    context = ssl.create_default_context(cafile=str(ours / "ca.pem"))
    raw = socket.create_connection((HOST, server.port), timeout=WAIT)
    with context.wrap_socket(raw, server_hostname=HOST) as sock:
        sock.sendall(b"\x00\x00\x00\x01\x00\x05" + b"\x00" * 6)  # length 5: impossible
        header, data = read_message(sock)
        assert header.status == 400 and b"impossible message length 5" in data
        assert sock.recv(100) == b""  # then the close


def tls_workers(twistd, folder: pathlib.Path) -> Twistd:
    """``cacheserver --workers 2`` on an ``ssl:`` listener, both workers accepting."""
    parent = tls_service(twistd, "cacheserver", folder, "--workers", "2")
    assert wait_for(lambda: parent.text().count("accepting connections") == 2)
    return parent


def test_workers_on_a_tls_port_each_answer_over_tls_and_never_in_plain_text(twistd, pki):
    ours, _ = pki
    parent = tls_workers(twistd, ours)
    cafile = str(ours / "ca.pem")
    pids = children(parent.pid)
    assert len(pids) == 2
    by_worker = connections_on_each(parent.port, pids, wrap=tls_wrap(cafile))
    try:
        assert all(by_worker.values()), {p: len(s) for p, s in by_worker.items()}
    finally:
        for socks in by_worker.values():
            for sock in socks:
                sock.close()
    done = calc_client(parent.port, "--tls", "--cafile", cafile, "--no-steps", "6 * 7")
    assert done.returncode == 0 and "Result: 42  (" in done.stdout
    plain = calc_client(parent.port, "1 + 1")
    assert (plain.returncode, plain.stdout) == (2, "")
    with socket.create_connection((HOST, parent.port), timeout=WAIT) as sock:
        sock.sendall(request_frame("1 + 1"))
        assert sock.recv(100) == b""  # not one byte of an answer
    assert f"listening on 127.0.0.1:{parent.port} over TLS, 2 workers;" in parent.text()


def test_sighup_replaces_the_workers_of_a_tls_port_with_the_files_as_they_are_now(twistd, pki):
    """The new workers read the key and certificate again: a renewed
    certificate (here one of another CA) is served once they replace the old."""
    ours, other = pki
    parent = tls_workers(twistd, ours)
    before = set(children(parent.pid))
    for name in ("server.key", "server.pem"):
        (ours / name).write_bytes((other / name).read_bytes())
    parent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "every worker replaced" in parent.text(), WAIT * 2)
    after = set(children(parent.pid))
    assert len(after) == 2 and not before & after
    done = calc_client(
        parent.port, "--tls", "--cafile", str(other / "ca.pem"), "--no-steps", "1 + 2"
    )
    assert done.returncode == 0 and "Result: 3  (" in done.stdout
    refused = calc_client(parent.port, "--tls", "--cafile", str(ours / "ca.pem"), "1 + 2")
    assert refused.returncode == 2 and "certificate verify failed" in refused.stderr


def test_sigterm_lets_the_workers_of_a_tls_port_finish(twistd, pki):
    """Pipelined requests already read are all answered over TLS, then the
    connection closes."""
    ours, _ = pki
    parent = tls_workers(twistd, ours)
    texts = [f"{k} + 1" for k in range(50)]
    answers = answers_across_sigterm(parent, texts, wrap=tls_wrap(str(ours / "ca.pem")))
    assert answers == [f'{{"result": {k + 1}, "steps": []}}'.encode() for k in range(50)]


# --- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activate_launches_the_service(tmp_path, workers):
    """systemd-socket-activate listens, and starts twistd (with the socket as
    file descriptor 3, LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES) at the first
    connection; that connection, waiting in the socket's queue, is answered."""
    launcher = require_tool("systemd-socket-activate", "systemd", "the socket activation test")
    port, log = free_port(), tmp_path / "twistd.log"
    argv = [launcher, "-l", f"{HOST}:{port}", "--fdname=calc"]
    argv += [script("twistd"), "-n", "--pidfile=", f"--logfile={log}", "cacheserver"]
    argv += ["--listen", "systemd:domain=INET:name=calc", "--workers", str(workers)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert wait_for(lambda: accepting(port) or proc.poll() is not None, WAIT)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with socket.create_connection((HOST, port), timeout=WAIT) as sock:
            ask(sock, 5)
        text = log.read_text()
        assert f"listening on 127.0.0.1:{port} (a socket from systemd), " in text
        if workers > 1:
            assert wait_for(lambda: len(children(proc.pid)) == workers)
    finally:
        terminate(proc)


def test_the_unit_files_verify(tmp_path):
    """contrib/systemd's units, with ExecStart pointing at the installed
    twistd, pass ``systemd-analyze verify``. Skipped where systemd-analyze
    cannot load units at all (some containers), failing only on our units."""
    analyze = require_tool("systemd-analyze", "systemd", "the unit files' check")
    units = sorted((ROOT / "contrib" / "systemd").glob("*.s*"))
    assert [u.name for u in units] == [
        "cacheproxy.service",
        "cacheproxy.socket",
        "cacheserver.service",
        "cacheserver.socket",
    ]
    for unit in units:
        text = unit.read_text().replace("/usr/local/bin/twistd", script("twistd"))
        (tmp_path / unit.name).write_text(text)
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    if run([analyze, "verify", str(probe)]).returncode != 0:
        pytest.skip("systemd-analyze verify cannot run here (no systemd to load units)")
    done = run([analyze, "verify", *(str(tmp_path / u.name) for u in units)])
    assert done.returncode == 0, done.stderr
    complaints = [
        line for line in done.stderr.splitlines() if "cacheproxy" in line or "cacheserver" in line
    ]
    assert not complaints, done.stderr


# --- restarts that lose nothing -------------------------------------------------------------


def test_sighup_under_load_replaces_every_worker_and_loses_nothing(twistd):
    port = free_port()
    parent = twistd(
        "cacheserver", "--port", str(port), "--workers", "2", "--shutdown-grace", "15", port=port
    )
    assert wait_for(lambda: parent.text().count("accepting connections") == 2)
    sighup_under_load(parent)


def test_sigterm_answers_the_misses_in_flight_and_healthz_says_503(twistd, stand_in):
    """A single process: SIGTERM with five misses waiting for a slow server;
    it stops accepting, /healthz says 503, and once the server answers every
    client gets its 200 before the proxy exits."""
    gate = threading.Event()
    server = stand_in(framed=True, gate=gate)
    port, admin = free_port(), free_port()
    proxy = twistd(
        "cacheproxy",
        "--port",
        str(port),
        "--server-port",
        str(server.port),
        "--admin-port",
        str(admin),
        "--shutdown-grace",
        "15",
        port=port,
    )
    assert http(admin, "/healthz") == (200, b"ok\n")
    clients = [socket.create_connection((HOST, port), timeout=WAIT) for _ in range(5)]
    try:
        for k, sock in enumerate(clients):
            sock.sendall(request_frame(f"{k} * 3 + 1"))
        assert wait_for(lambda: server.requests == 5)
        proxy.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: not accepting(port))
        assert http(admin, "/healthz") == (503, b"draining\n")
        gate.set()
        for k, sock in enumerate(clients):
            header, data = read_message(sock)
            assert header.status == 200 and result_of(data) == k * 3 + 1
            assert sock.recv(100) == b""  # then its end-of-file
    finally:
        gate.set()
        for sock in clients:
            sock.close()
    assert proxy.proc.wait(WAIT) in (0, -signal.SIGTERM)
    text = proxy.text()
    waiting = "stopping: no more connections accepted; waiting up to 15 s for the answers of"
    assert text.count(waiting) == 1
    assert "stopped: every request read was answered" in text
