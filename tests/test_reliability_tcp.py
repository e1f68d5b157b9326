"""Never a wrong answer, never unbounded memory, over real TCP on 127.0.0.1:
real ``twistd`` services (the installed package) and misbehaving stand-in
servers in threads of this process (late batches, duplicated answers, with
and without the ``L`` bit), half-closing clients, a fast pipelining reader,
the listen backlog."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
from helpers import request_frame
from processes import HOST, ask_each, expected, free_port, in_threads, read_message, start_proxy
from standins import STRAY

from twisted_cacheproxy.transport import wire

pytestmark = pytest.mark.integration


def read_all(sock: socket.socket) -> list[tuple[wire.Header, bytes]]:
    """Every message until the far end closes."""
    raw = b""
    while chunk := sock.recv(1 << 16):
        raw += chunk
    out = []
    while raw:
        header = wire.decode_header(raw)
        out.append((header, raw[wire.HEADER_SIZE : header.length]))
        raw = raw[header.length :]
    return out


@pytest.mark.parametrize(
    ("framed", "extra"),
    [(False, ()), (True, ("--upstream-pipeline", "8"))],
    ids=["course-server-no-L", "L-pipelined"],
)
def test_a_server_that_answers_twice_never_gives_anyone_a_wrong_answer(
    twistd, stand_in, framed, extra
):
    """Each answer is sent again 50 ms later: without L the proxy takes one
    answer per connection, with L the tags show the copy for what it is.
    180 requests from six clients, then the same again from the cache."""
    server = stand_in(framed=framed, duplicate=0.05)
    proxy = start_proxy(twistd, server.port, *extra)

    def work(i: int) -> list[str]:
        return ask_each(proxy.port, range(i * 30, i * 30 + 30), lambda k: k % 3 == 0)

    assert in_threads(6, work) == []
    reached = server.requests
    assert reached >= 180
    assert in_threads(6, work) == []  # served from the cache, all right
    assert server.requests == reached


@pytest.mark.parametrize("hold", [0.490, 0.495])
def test_a_late_batch_racing_the_timeout_gives_no_wrong_answer(twistd, stand_in, hold):
    """The server holds every answer of a connection and sends them in one
    write just before the proxy's timeout: the proxy handles such a batch over
    several fairness turns, timeouts fire between them, and the connection
    they abort must deliver nothing more. 1,008 pipelined misses from 16 clients."""
    server = stand_in(framed=True, hold=hold)
    proxy = start_proxy(
        twistd,
        server.port,
        "--timeout",
        "0.5",
        "--upstream-pipeline",
        "1024",
        "--upstream-connections",
        "1",
        "--retries",
        "1",
    )
    # The proxy's one connection brings an answer with L first: then it pipelines.
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(request_frame("0 * 7 + 1"))
        assert read_message(sock)[0].status == 200

    answered: dict[int, int] = {}

    def work(i: int) -> list[str]:
        ks = range(1 + i * 63, 1 + i * 63 + 63)
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(b"".join(request_frame(f"{k} * 7 + 1", steps=True) for k in ks))
            answers = [read_message(sock) for _ in ks]
        wrong = []
        for k, (header, data) in zip(ks, answers, strict=True):
            answered[k] = header.status
            got = json.loads(data)
            if header.status == 200 and (got["result"], got["steps"]) != expected(k, True):
                wrong.append(f"{k}: {got}")
        return wrong

    assert in_threads(16, work) == []
    assert len(answered) == 1008
    assert set(answered.values()) <= {200, 500}
    # What was answered is stored, and right; nothing else reaches the server.
    reached = server.requests
    stored = [k for k, status in answered.items() if status == 200][:50]
    assert ask_each(proxy.port, stored, lambda k: True) == []
    assert server.requests == reached


@pytest.mark.parametrize("service", ["server", "proxy"])
def test_a_half_closing_client_gets_every_answer(twistd, service):
    """``nc -N``: send the requests, shut down the sending side, read to the end."""
    server_port = free_port()
    twistd("cacheserver", "--port", str(server_port), port=server_port)
    port = server_port if service == "server" else start_proxy(twistd, server_port).port
    count = 10_000 if service == "server" else 3
    frames = [request_frame(f"{k} * 7 + 1") for k in range(count)]
    with socket.create_connection((HOST, port), timeout=20) as sock:
        sock.sendall(b"".join(frames))
        sock.shutdown(socket.SHUT_WR)
        answers = read_all(sock)
    assert [json.loads(data)["result"] for _, data in answers] == [k * 7 + 1 for k in range(count)]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_client_pipelining_as_fast_as_it_reads_keeps_the_server_small(twistd):
    """A writer thread sends as fast as the socket takes, a reader drains the
    answers, for 4 s: the server stops reading while its backlog is above the
    bound, so its memory stays flat instead of growing with the backlog."""
    port = free_port()
    server = twistd("cacheserver", "--port", str(port), port=port)
    pid = server.proc.pid
    batch = request_frame("1 + 1") * 2000
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request_frame("1 + 1"))
        read_message(sock)
        before = rss_kb(pid)
        stop = time.monotonic() + 4
        answered = [0]

        def reader() -> None:
            while time.monotonic() < stop + 2:
                try:
                    answered[0] += len(sock.recv(1 << 20))
                except OSError:
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        peak = before
        sent = 0
        while time.monotonic() < stop:
            sock.sendall(batch)
            sent += len(batch)
            peak = max(peak, rss_kb(pid))
        grown_mb = (peak - before) / 1024
        sock.shutdown(socket.SHUT_WR)
        t.join(10)
    assert sent > 1_000_000, sent  # it really was a flood (40,000 requests and more)
    assert answered[0] > 0
    assert grown_mb < 20, f"the server grew by {grown_mb:.1f} MB"


@pytest.mark.parametrize("plugin", ["cacheserver", "cacheproxy"])
def test_the_listen_backlog_absorbs_a_storm_by_default(twistd, plugin):
    """The kernel shows a listening socket's backlog as its Send-Q."""
    port = free_port()
    twistd(plugin, "--port", str(port), port=port)
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    backlog = int(out.split()[2])
    with open("/proc/sys/net/core/somaxconn") as f:
        assert backlog == min(511, int(f.read()))


def test_a_course_server_gets_one_request_at_a_time_from_a_default_proxy(twistd, stand_in):
    """Pipelining is on by default, but only where a server said L: a course
    server, which reads one ``recv`` as one message and never says L, gets
    exactly one whole request per connection. Eight clients pipeline 20
    distinct misses each (160 in flight, more than the 32 upstream
    connections) through a proxy with default options; every one is answered
    right."""
    server = stand_in(framed=False, course=True)
    port = free_port()
    proxy = twistd("cacheproxy", "--port", str(port), "--server-port", str(server.port), port=port)

    def work(i: int) -> list[str]:
        ks = range(i * 20, i * 20 + 20)
        with socket.create_connection((HOST, proxy.port), timeout=20) as sock:
            sock.sendall(b"".join(request_frame(f"{k} * 7 + 1", steps=True) for k in ks))
            answers = [read_message(sock) for _ in ks]
        wrong = []
        for k, (header, data) in zip(ks, answers, strict=True):
            got = json.loads(data)
            if header.status != 200 or (got.get("result"), got.get("steps")) != expected(k, True):
                wrong.append(f"{k}: {header.status} {got}")
        return wrong

    assert in_threads(8, work) == []
    assert server.violations == []
    assert server.requests == 160


def test_an_answer_a_server_sends_unasked_is_never_delivered_nor_stored(twistd, stand_in):
    """A server that speaks first on its first connections, with an L answer
    tagged 1: each upstream connection starts its tags at random, so the
    stray answer is out of step, never taken for the first request's, and
    the request goes again on another connection."""
    server = stand_in(framed=True, speaks_first=3)
    proxy = start_proxy(twistd, server.port, "--upstream-connections", "4")

    def work(i: int) -> list[str]:
        return ask_each(proxy.port, range(i * 20, i * 20 + 20), lambda k: False)

    assert in_threads(6, work) == []
    assert server.speaks_first == 0  # it did speak first, three times
    # And nothing stray was stored: asked again, every answer is still right.
    assert ask_each(proxy.port, range(120), lambda k: False) == []


def test_a_server_that_always_speaks_first_gets_500s_never_its_stray_answer(twistd, stand_in):
    server = stand_in(framed=True, speaks_first=1000)
    proxy = start_proxy(twistd, server.port, "--retries", "2")
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(request_frame("6 * 7"))
        header, data = read_message(sock)
    assert header.status == 500
    assert "answered out of step: answer tagged 1 for the request tagged" in data.decode()
    assert str(STRAY) not in data.decode()


def test_a_status_other_than_200_400_500_reaches_the_client_as_a_500(twistd, stand_in):
    """The course client loses an answer with any other code: the proxy
    answers 500 instead, and stores nothing."""
    server = stand_in(framed=True, status=999)
    proxy = start_proxy(twistd, server.port, "--retries", "1")
    for _ in range(2):
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(request_frame("6 * 7"))
            header, data = read_message(sock)
        assert header.status == 500 and not header.cache
        assert json.loads(data) == {
            "error": f"calculator server 127.0.0.1:{server.port} sent an invalid answer: "
            "status 999 is not 200, 400 or 500",
            "type": "ConnectionError",
        }
    assert server.requests == 2  # not stored: asked again
