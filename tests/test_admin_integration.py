"""The admin site, access log and stats line of real ``twistd`` processes:
metrics read back over HTTP with prometheus_client's own parser, a purge,
a 500 from a stopped server, the access log reopened on SIGUSR1, and the
status page loaded in headless Chromium.

The twistd processes run the *installed* package (``pip install .`` first).
Without Chromium the browser test is skipped; with ``CI`` set it fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers import request_frame as frame
from helpers import require_tool, samples, status_image
from processes import HOST, accepting, free_port, http, read_message, wait_for

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the most any single wait here may take
TOKEN = "s3cret"


def ask(port: int, *frames: bytes) -> list[tuple[int, int, bytes]]:
    """Send ``frames`` pipelined in one write; (status, extension word, data) of each answer."""
    with socket.create_connection((HOST, port), timeout=WAIT) as s:
        s.sendall(b"".join(frames))
        answers = [read_message(s) for _ in frames]
    return [(header.status, header.ext, data) for header, data in answers]


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    status, body = http(port, "/metrics")
    assert status == 200
    return samples(body.decode())


def start(twistd, kind: str, *args: str):
    """A twistd service with an admin port; (process, admin port)."""
    port, admin = free_port(), free_port()
    p = twistd(kind, "--port", str(port), "--admin-port", str(admin), *args, port=port)
    assert wait_for(lambda: accepting(admin)), f"the admin port of {kind}"
    return p, admin


def lines(path: pathlib.Path) -> list[list[str]]:
    return [line.split(" ", 10) for line in path.read_text().splitlines()]


def test_metrics_purge_and_access_log_of_a_known_sequence(twistd, tmp_path):
    server, server_admin = start(twistd, "cacheserver")
    access = tmp_path / "access.log"
    proxy, admin = start(
        twistd,
        "cacheproxy",
        "--server-port",
        str(server.port),
        "--retries",
        "1",
        "--admin-token",
        TOKEN,
        "--access-log",
        str(access),
    )
    x, z = "1 + 2", "max(2, 3) + 3"
    assert ask(proxy.port, frame(x))[0][:2] == (200, 0x1)  # MISS
    assert [a[1] & 0x2 for a in ask(proxy.port, frame(x), frame(x))] == [2, 2]  # HIT, HIT
    ask(proxy.port, frame(z, steps=True), frame(z, steps=True))  # MISS, COALESCED
    ask(proxy.port, frame("2 * 3", cache=False))  # BYPASS
    ask(proxy.port, frame(x, max_age=0))  # RELOAD
    served = ("cacheserver_requests_total", (("encoding", "text"), ("status", "200")))
    assert metrics(server_admin)[served] == 4

    # Purge: refused without the token, then everything.
    assert http(admin, "/purge", "POST")[0] == 401
    assert http(admin, "/purge", "POST", token="wrong")[0] == 401
    assert http(admin, "/purge", "GET")[0] == 405
    status, body = http(admin, "/purge", "POST", token=TOKEN)
    assert (status, json.loads(body)) == (200, {"purged": 2, "shared": 0})
    assert ask(proxy.port, frame(x))[0][:2] == (200, 0x1)  # a MISS: it reached the server
    assert metrics(server_admin)[served] == 5
    status, body = http(admin, "/purge?expr=1%20%2B%202", "POST", token=TOKEN)
    assert json.loads(body) == {"purged": 1, "shared": 0}

    server.stop()
    (status, _, data) = ask(proxy.port, frame("7 * 7"))[0]
    assert status == 500 and b"unreachable" in data

    m = metrics(admin)
    by_cache = {
        dict(labels)["cache"]: v for (n, labels), v in m.items() if n == "cacheproxy_requests_total"
    }
    assert by_cache == {
        "hit": 2,
        "shared": 0,
        "miss": 4,
        "coalesced": 1,
        "stale": 0,
        "bypass": 1,
        "reload": 1,
    }
    assert m["cacheproxy_responses_total", (("status", "200"),)] == 8
    assert m["cacheproxy_responses_total", (("status", "500"),)] == 1
    assert m["cacheproxy_upstream_requests_total", ()] == 6
    assert m["cacheproxy_upstream_failures_total", (("reason", "unreachable"),)] == 1
    assert m["cacheproxy_upstream_duration_seconds_count", ()] == 5
    assert m["cacheproxy_purged_total", ()] == 3
    assert m["cacheproxy_cache_entries", ()] == 0
    assert m["cacheproxy_request_duration_seconds_count", (("cache", "hit"),)] == 2
    hit_le = m["cacheproxy_request_duration_seconds_bucket", (("cache", "hit"), ("le", "0.01"))]
    assert hit_le == 2  # a hit takes far less than 10 ms

    figures = json.loads(http(admin, "/stats.json")[1])
    assert figures["requests_total"] == 9 and figures["upstream"]["state"] == "down"

    # The access log: one line per answer, in the order they were decided.
    assert wait_for(lambda: len(access.read_text().splitlines()) == 9), "9 access-log lines"
    rows = lines(access)
    assert [r[5] for r in rows] == [
        "MISS",
        "HIT",
        "HIT",
        "COALESCED",
        "MISS",
        "BYPASS",
        "RELOAD",
        "MISS",
        "MISS",
    ]
    assert [r[6] for r in rows][-1] == "500"
    assert rows[1][3:5] == ["-C", "65535"] and rows[6][4] == "0" and rows[5][3] == "--"
    assert rows[0][10] == '"1 + 2"' and rows[3][3] == "SC"

    # logrotate: rename, SIGUSR1, and the next line goes to a new file.
    access.rename(tmp_path / "access.log.1")
    os.kill(proxy.pid, signal.SIGUSR1)
    assert wait_for(access.exists), "the access log to be reopened"
    ask(proxy.port, frame("7 * 7"))
    assert wait_for(lambda: access.read_text().count("\n") == 1), "a line in the new access log"
    assert lines(access)[0][10] == '"7 * 7"'
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 9

    # The final stats line at shutdown.
    proxy.stop()
    log = proxy.text()
    assert "final stats: " in log and "since start: 10 requests, hit ratio 20.0%" in log


def test_status_page_in_headless_chromium(twistd, tmp_path):
    chromium = require_tool("chromium", "chromium", "the status page's browser test")
    server, _ = start(twistd, "cacheserver")
    proxy, admin = start(twistd, "cacheproxy", "--server-port", str(server.port))
    ask(proxy.port, frame("1 + 2"))
    ask(proxy.port, frame("1 + 2"), frame("1 + 2"), frame("1 + 2"))
    ask(proxy.port, frame("2 * 3", cache=False))
    url = f"http://{HOST}:{admin}/status"
    # Started as the script that takes docs/status.png starts it.
    browser = [chromium, *status_image().CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*browser, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    from html.parser import HTMLParser

    class Figures(HTMLParser):
        """The text inside each element with an id (the innermost such element)."""

        def __init__(self) -> None:
            super().__init__()
            self.found: dict[str, str] = {}
            self._ids: list[str | None] = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "link", "br", "rect", "line", "polyline"):
                self._ids.append(dict(attrs).get("id"))

        def handle_endtag(self, tag):
            if tag not in ("meta", "link", "br", "rect", "line", "polyline") and self._ids:
                self._ids.pop()

        def handle_data(self, data):
            ids = [i for i in self._ids if i]
            if ids and data.strip():
                self.found[ids[-1]] = self.found.get(ids[-1], "") + data.strip()

    parser = Figures()
    parser.feed(dom)
    shown = parser.found
    assert shown["requests-total"] == "5"
    assert shown["hit-ratio"] == "60.0%"
    assert (shown["requests-hit"], shown["requests-miss"], shown["requests-bypass"]) == (
        "3",
        "1",
        "1",
    )
    assert shown["responses-200"] == "5"
    assert shown["cache-entries"] == "1"
    assert shown["upstream-state"] == "up"
    assert shown["upstream-server"] == f"127.0.0.1:{server.port}"
    assert "<svg" in dom and 'id="chart"' in dom
    png = tmp_path / "status.png"
    status_image().screenshot(url, png, tmp_path / "profile")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- who may use the admin site, health, process metrics -------------------------------


def admin_request(port: int, method: str, path: str, *headers: str) -> tuple[int, bytes]:
    """(status, body) of one request sent with exactly these extra headers
    (a ``Host:`` among them replaces the one the address gives)."""
    from http.client import HTTPConnection

    connection = HTTPConnection(HOST, port, timeout=WAIT)
    try:
        fields = dict(h.split(": ", 1) for h in headers)
        connection.request(method, path, body=b"" if method == "POST" else None, headers=fields)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_rebinding_page_is_refused_while_a_local_curl_purges(twistd):
    """What a browser sends for a page at evil.example whose name now leads
    to 127.0.0.1 (DNS rebinding): refused for GET and POST, the cache kept;
    ``curl -X POST http://127.0.0.1:PORT/purge`` on the host still purges."""
    curl = require_tool("curl", "curl", "the admin site's plain purge")
    server, _ = start(twistd, "cacheserver")
    proxy, admin = start(twistd, "cacheproxy", "--server-port", str(server.port))
    assert ask(proxy.port, frame("1 + 2"))[0][:2] == (200, 0x1)  # MISS: one entry
    evil = [f"Host: evil.example:{admin}", f"Origin: http://evil.example:{admin}"]
    status, body = admin_request(admin, "POST", "/purge", *evil)
    assert (status, json.loads(body)) == (
        421,
        {"error": "not a name of this admin site (see --admin-host)"},
    )
    assert admin_request(admin, "GET", "/stats.json", *evil)[0] == 421
    assert admin_request(admin, "GET", "/status", f"Host: evil.example:{admin}")[0] == 421
    assert json.loads(http(admin, "/stats.json")[1])["cache"]["entries"] == 1

    purged = subprocess.run(
        [curl, "-s", "-X", "POST", f"http://127.0.0.1:{admin}/purge"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    assert json.loads(purged.stdout) == {"purged": 1, "shared": 0}
    assert ask(proxy.port, frame("1 + 2"))[0][:2] == (200, 0x1)  # a MISS again
    # One line says where the site is; Twisted's own "starting on" line is not repeated.
    log = proxy.text()
    assert log.count("admin site") == 1
    assert f"admin site on http://127.0.0.1:{admin}/\n" in log


def test_healthz_and_the_process_metrics_of_a_real_process(twistd):
    _, admin = start(twistd, "cacheserver")
    assert http(admin, "/healthz") == (200, b"ok\n")
    m = metrics(admin)
    assert m["process_resident_memory_bytes", ()] > 1 << 20
    assert m["process_open_fds", ()] >= 4  # stdin..stderr, the log, two listeners
    assert m["process_cpu_seconds_total", ()] > 0
    assert m["process_start_time_seconds", ()] <= time.time()
    (python,) = [labels for name, labels in m if name == "python_info"]
    assert dict(python)["implementation"] == "CPython"


def children_of(pid: int) -> list[int]:
    return [int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start_workers(twistd, kind: str, *args: str):
    """``--workers 2`` of ``kind`` with admin sites; (parent, first admin port)."""
    from processes import free_ports_in_a_row

    port, first = free_port(), free_ports_in_a_row(2)
    while port in (first, first + 1):
        port = free_port()
    argv = ["--port", str(port), "--workers", "2", "--admin-port", str(first), *args]
    parent = twistd(kind, *argv, port=port)
    assert wait_for(lambda: parent.text().count("accepting connections") == 2), "both workers"
    return parent, first


@pytest.mark.parametrize("how", ["file", "command line"])
def test_the_admin_token_is_on_no_workers_command_line(twistd, tmp_path, how):
    """Read from a file, the token is on no command line at all; given on the
    parent's (which ``ps`` shows: the file is the safer way), it reaches the
    workers on their standard input, never on theirs."""
    token = "w0rker-T0ken"
    if how == "file":
        path = tmp_path / "admin.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        given = ["--admin-token-file", str(path)]
    else:
        given = ["--admin-token", token]
    parent, first = start_workers(twistd, "cacheserver", *given, "--admin-token-for-reads")
    workers = children_of(parent.pid)
    assert len(workers) == 2
    for pid in workers:
        assert token.encode() not in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    on_parent = token.encode() in pathlib.Path(f"/proc/{parent.pid}/cmdline").read_bytes()
    assert on_parent is (how == "command line")
    for admin in (first, first + 1):
        assert http(admin, "/stats.json")[0] == 401
        assert http(admin, "/stats.json", token="wrong")[0] == 401
        assert http(admin, "/stats.json", token=token)[0] == 200
        assert http(admin, "/healthz") == (200, b"ok\n")


def test_healthz_of_a_draining_worker_is_503(twistd):
    """A worker told to stop (SIGTERM, as the parent does) drains: it answers
    the miss it holds (here held by a server that never answers) and its
    /healthz says 503 meanwhile, while the other worker's says 200. Once it
    has exited, the parent starts it again and its /healthz is 200."""
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(64)  # accepts into its queue, never answers
        parent, first = start_workers(
            twistd,
            "cacheproxy",
            "--server-port",
            str(silent.getsockname()[1]),
            "--memcached",
            f"{HOST}:{free_port()}",  # down: every lookup a miss, as without one
            "--retries",
            "1",
            "--timeout",
            "60",
            "--shutdown-grace",
            "60",
        )
        admins = {1: first, 2: first + 1}

        def holding(admin: int) -> int:
            return json.loads(http(admin, "/stats.json")[1])["client_connections"]

        # Whichever worker the kernel hands the connection to is the one told to stop.
        client = socket.create_connection((HOST, parent.port), timeout=WAIT)
        try:
            client.sendall(frame("1 + 1"))
            assert wait_for(lambda: sum(map(holding, admins.values())) == 1), "a worker to take it"
            (worker,) = (n for n, admin in admins.items() if holding(admin))
            (other,) = set(admins) - {worker}
            (pid,) = re.findall(rf"worker {worker} started \(pid (\d+)\)", parent.text())
            os.kill(int(pid), signal.SIGTERM)
            draining = (503, b"draining\n")
            assert wait_for(lambda: http(admins[worker], "/healthz") == draining), "it to drain"
            assert http(admins[other], "/healthz") == (200, b"ok\n")
            assert holding(admins[worker]) == 1  # its miss is still held: it has not stopped
        finally:
            silent.close()  # the miss fails: the worker answers it and exits
            client.close()
        started = f"worker {worker} started"
        assert wait_for(lambda: parent.text().count(started) == 2), "the worker again"
        assert wait_for(
            lambda: accepting(admins[worker]) and http(admins[worker], "/healthz")[0] == 200
        ), "its health"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_admin_port_is_one_line_naming_the_derived_port(tmp_path, workers):
    from processes import free_ports_in_a_row, script

    port, first = free_port(), free_ports_in_a_row(2)
    taken = first + workers - 1
    with socket.socket() as busy:
        busy.bind((HOST, taken))
        busy.listen()
        argv = ["--port", str(port), "--workers", str(workers), "--admin-port", str(first)]
        proc = subprocess.run(
            [script("twistd"), "-n", "--pidfile=", "cacheserver", *argv],
            capture_output=True,
            text=True,
            timeout=WAIT * 3,
            cwd=tmp_path,
        )
    role = "admin site" if workers == 1 else f"admin site of worker 2, --admin-port {first} + 1"
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        f"cacheserver: cannot listen on 127.0.0.1:{taken} ({role}): address already in use\n"
    )


def test_the_status_picture_of_the_docs_is_made_by_its_script(tmp_path):
    """docs/status_image.py makes docs/status.png from real processes."""
    from helpers import ROOT

    require_tool("chromium", "chromium", "the status page's picture")
    out = tmp_path / "status.png"
    script = ROOT / "docs" / "status_image.py"
    subprocess.run(
        [sys.executable, str(script), "--seconds", "1", "--out", str(out)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1000, 800)
