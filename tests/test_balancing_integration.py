"""Several servers behind one real ``twistd cacheproxy`` on 127.0.0.1: the
load shared, a server killed mid-run and started again, a stalled server
ejected, the active probe. The servers are real ``twistd cacheserver``
processes, or counting stand-ins in threads (tests/standins.py)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from helpers import request_frame
from processes import HOST, ask_each, free_port, in_threads, read_message, start_proxy, wait_for

pytestmark = pytest.mark.integration


def servers_args(*ports: int) -> list[str]:
    return [arg for port in ports for arg in ("--server", f"{HOST}:{port}")]


def start_server(twistd, port: int | None = None):
    port = port or free_port()
    return twistd("cacheserver", "--port", str(port), port=port)


def test_two_servers_share_the_load(twistd, stand_in):
    a, b = stand_in(framed=True), stand_in(framed=True)
    proxy = start_proxy(twistd, a.port, *servers_args(a.port, b.port))
    wrong = in_threads(
        4, lambda i: ask_each(proxy.port, range(i * 50, i * 50 + 50), lambda k: False)
    )
    assert not wrong
    assert a.requests + b.requests == 200
    # Least outstanding, ties in turn: neither gets much more than the other.
    assert min(a.requests, b.requests) >= 60, (a.requests, b.requests)
    assert "in front of the servers at" in proxy.text()


def test_a_server_killed_mid_run_costs_no_client_an_answer(twistd):
    """SIGKILL one of two servers while distinct misses flow: every answer
    right, no 500; started again, it is used again (shown by killing the
    other one afterwards)."""
    a, b = start_server(twistd), start_server(twistd)
    proxy = start_proxy(twistd, a.port, *servers_args(a.port, b.port), "--timeout", "5")

    killed = threading.Event()

    def kill_a_later() -> list[str]:
        time.sleep(0.2)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        killed.set()
        return []

    def work(i: int) -> list[str]:
        if i == 4:
            return kill_a_later()
        # Each k once, so every request is a miss, until 100 after the kill.
        wrong: list[str] = []
        after = 0
        for k in range(i * 10_000, i * 10_000 + 3_000):
            wrong += ask_each(proxy.port, [k], lambda k: k % 2 == 0)
            after += killed.is_set()
            if after >= 100:
                break
        return wrong + ([] if after >= 100 else [f"client {i} ended before the kill"])

    assert not in_threads(5, work)
    assert wait_for(lambda: "calculator server" in proxy.text() and "taken out" in proxy.text())
    a.start()  # the same port again
    assert wait_for(lambda: "is back" in proxy.text(), 15)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(5)
    assert not ask_each(proxy.port, range(90_000, 90_100), lambda k: False)


def test_a_stalled_server_is_ejected_and_its_requests_time_out(twistd):
    """SIGSTOP one of two servers: what was sent to it times out (a 500
    naming it, after --timeout: a request a server accepted is not sent to
    another without --retry-timeouts); after three such failures it is out
    and every request goes to the other. Continued, the active probe puts it
    back."""
    a, b = start_server(twistd), start_server(twistd)
    proxy = start_proxy(
        twistd,
        a.port,
        *servers_args(a.port, b.port),
        "--timeout",
        "1.5",
        "--health-interval",
        "0.5",
    )
    assert not ask_each(proxy.port, range(10), lambda k: False)  # both up
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        results: list[tuple[int, bytes, float]] = []

        def one(k: int) -> list[str]:
            started = time.monotonic()
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                sock.sendall(request_frame(f"{k} * 7 + 1"))
                header, data = read_message(sock)
            results.append((header.status, data, time.monotonic() - started))
            return []

        in_threads(8, lambda i: one(1000 + i))
        failed = [r for r in results if r[0] != 200]
        assert failed, "nothing was sent to the stalled server"
        for status, data, took in failed:
            assert status == 500 and f"{HOST}:{a.port}" in data.decode(), data
            assert took >= 1.4
        for status, data, _took in results:
            if status == 200:
                assert data.startswith(b'{"result"')
        assert wait_for(lambda: "taken out" in proxy.text(), 10)
        # Out: every request now goes to the other server, at once (one sent
        # to the stalled server would wait out the timeout, then be a 500).
        for k in range(2000, 2020):
            started = time.monotonic()
            assert not ask_each(proxy.port, [k], lambda k: False)
            assert time.monotonic() - started < 1.4
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert wait_for(lambda: f"{HOST}:{a.port} is back" in proxy.text(), 10)


def test_every_server_down_gives_a_500_naming_them(twistd):
    ports = [free_port(), free_port()]
    proxy = start_proxy(twistd, ports[0], *servers_args(*ports), "--retries", "2")
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(request_frame("1 + 1"))
        header, data = read_message(sock)
    assert header.status == 500
    for port in ports:
        assert f"{HOST}:{port}" in data.decode()


def test_a_mixed_fleet_course_server_and_ours(twistd, stand_in):
    """A course-style server (no L: one request per connection) and ours
    (L: pipelined) behind one proxy: both serve and every answer is right."""
    course, ours = stand_in(framed=False), stand_in(framed=True)
    proxy = start_proxy(
        twistd, course.port, *servers_args(course.port, ours.port), "--upstream-pipeline", "8"
    )
    wrong = in_threads(
        4, lambda i: ask_each(proxy.port, range(i * 40, i * 40 + 40), lambda k: k % 3 == 0)
    )
    assert not wrong
    assert course.requests and ours.requests, (course.requests, ours.requests)
