"""``twistd cacheproxy --workers 2 --memcached ...`` on 127.0.0.1, in front
of a real ``twistd cacheserver`` and a real memcached: both workers answer,
an answer one worker fetched is a cache hit on the other, a purge through
one worker's admin site empties both workers' memory, and SIGTERM lets the
misses already read be answered. Which worker holds a connection is read
from /proc (processes.owners)."""

from __future__ import annotations

import json
import pathlib
import socket

import pytest
from helpers import request_frame
from processes import (
    WAIT,
    answers_across_sigterm,
    children,
    connections_on_each,
    free_port,
    free_ports_in_a_row,
    http,
    read_message,
    sighup_under_load,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not pathlib.Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]


@pytest.fixture
def proxy_workers(twistd, memcached):
    node = memcached()
    server_port = free_port()
    twistd("cacheserver", "--port", str(server_port), port=server_port)
    port, admin = free_port(), free_ports_in_a_row(2)
    while port in (admin, admin + 1):
        port = free_port()
    parent = twistd(
        "cacheproxy",
        "--port",
        str(port),
        "--server-port",
        str(server_port),
        "--workers",
        "2",
        "--memcached",
        node.address,
        "--admin-port",
        str(admin),
        port=port,
    )
    assert wait_for(lambda: parent.text().count("accepting connections") == 2, WAIT * 2), (
        parent.text()
    )
    assert wait_for(lambda: parent.text().count("shared cache tier on") == 2)
    parent.admin, parent.node = admin, node
    return parent


ANSWER = b'{"result": 7778, "steps": []}'


def ask(sock: socket.socket, text: str) -> tuple[bool, bytes]:
    """(served from a cache, data) of one request of ``text`` on ``sock``."""
    sock.sendall(request_frame(text))
    header, data = read_message(sock)
    assert header.status == 200, data
    return header.from_cache, data


def entries(admin_port: int) -> int:
    status, body = http(admin_port, "/stats.json")
    assert status == 200
    return json.loads(body)["cache"]["entries"]


def test_workers_share_answers_and_a_purge_reaches_both(proxy_workers):
    pids = children(proxy_workers.proc.pid)
    by_worker = connections_on_each(proxy_workers.port, pids)
    try:
        first, second = (socks[0] for socks in by_worker.values())
        stored = proxy_workers.node.keys_stored()
        assert ask(first, "7777 + 1") == (False, ANSWER)
        # The store is not waited for by the answer: wait for it here.
        assert wait_for(lambda: proxy_workers.node.keys_stored() > stored)
        # The other worker has never seen it: it comes from memcached.
        assert ask(second, "7777 + 1") == (True, ANSWER)
        admins = [proxy_workers.admin, proxy_workers.admin + 1]
        assert all(entries(a) > 0 for a in admins)
        for number, port in enumerate(admins, 1):
            assert f"cacheproxy 127.0.0.1:{proxy_workers.port}, worker {number}" in (
                http(port, "/status")[1].decode()
            )
        status, body = http(admins[0], "/purge", "POST")
        assert status == 200 and json.loads(body)["shared"] == 1
        # The other worker reads the new generation within a second or so.
        assert wait_for(lambda: all(entries(a) == 0 for a in admins))
        stored = proxy_workers.node.keys_stored()
        assert ask(second, "7777 + 1") == (False, ANSWER)
        assert wait_for(lambda: proxy_workers.node.keys_stored() > stored)
        assert ask(first, "7777 + 1") == (True, ANSWER)
    finally:
        for socks in by_worker.values():
            for s in socks:
                s.close()


def test_sigterm_answers_every_miss_already_read(proxy_workers):
    answers = answers_across_sigterm(proxy_workers, [f"{k} * 3" for k in range(100)])
    assert answers == [f'{{"result": {k * 3}, "steps": []}}'.encode() for k in range(100)]


def test_sighup_under_load_replaces_both_workers_and_loses_no_miss(twistd, memcached):
    """Every request a miss, each one in flight through a worker that is
    being replaced, none lost."""
    server_port, port = free_port(), free_port()
    twistd("cacheserver", "--port", str(server_port), port=server_port)
    parent = twistd(
        "cacheproxy",
        "--port",
        str(port),
        "--server-port",
        str(server_port),
        "--workers",
        "2",
        "--memcached",
        memcached().address,
        "--shutdown-grace",
        "15",
        port=port,
    )
    # Two workers start on one core beside a busy one: give them time, and say what they logged.
    both = wait_for(lambda: parent.text().count("accepting connections") == 2, WAIT * 2)
    assert both, parent.text()
    sighup_under_load(parent)
