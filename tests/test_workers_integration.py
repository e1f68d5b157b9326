"""``twistd cacheserver --workers 2`` on 127.0.0.1: both workers answer,
a killed worker is started again without its sibling's connections losing
anything, SIGTERM lets the workers finish. Which worker holds a connection
is read from /proc (the socket's inode), so the server needs no test hook."""

from __future__ import annotations

import os
import pathlib
import signal
import socket

import pytest
from processes import (
    HOST,
    answer,
    answers_across_sigterm,
    children,
    connections_on_each,
    files,
    free_port,
    owners,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not pathlib.Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]


@pytest.fixture
def workers(twistd):
    port = free_port()
    parent = twistd("cacheserver", "--port", str(port), "--workers", "2", port=port)
    assert wait_for(lambda: parent.text().count("accepting connections") == 2)
    return parent


def test_both_workers_answer(workers):
    pids = children(workers.proc.pid)
    by_worker = connections_on_each(workers.port, pids)
    try:
        assert all(by_worker.values()), {p: len(s) for p, s in by_worker.items()}
        assert "2 workers" in workers.text()
    finally:
        for socks in by_worker.values():
            for s in socks:
                s.close()


def test_a_killed_worker_is_restarted_and_its_sibling_loses_nothing(workers):
    pids = children(workers.proc.pid)
    by_worker = connections_on_each(workers.port, pids)
    victim, survivor = pids
    assert by_worker[survivor]
    try:
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: _zombie(victim))
        for k, sock in enumerate(by_worker[survivor]):
            for j in range(5):
                answer(sock, 1000 * k + j)
        assert wait_for(
            lambda: (
                len(children(workers.proc.pid)) == 2 and victim not in children(workers.proc.pid)
            )
        )
        assert wait_for(lambda: workers.text().count("accepting connections") == 3)
        # The new worker answers too.
        new = [p for p in children(workers.proc.pid) if p != survivor]
        assert wait_for(lambda: _serves(workers.port, new[0], [survivor, *new]))
        assert "starting it again" in workers.text()
    finally:
        for socks in by_worker.values():
            for s in socks:
                s.close()


def _zombie(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _serves(port: int, pid: int, pids: list[int]) -> bool:
    socks = []
    try:
        for k in range(20):
            socks.append(socket.create_connection((HOST, port), timeout=10))
            answer(socks[-1], k)
        return pid in owners(socks, pids)
    finally:
        for s in socks:
            s.close()


def test_sigterm_lets_the_workers_finish(workers):
    """Pipelined requests already read are all answered, then the connection
    closes, and the parent exits well within the grace period."""
    answers = answers_across_sigterm(workers, [f"{k} + 1" for k in range(100)])
    assert answers == [f'{{"result": {k + 1}, "steps": []}}'.encode() for k in range(100)]
    assert not children_alive(workers)


def children_alive(process) -> bool:
    return False if process.proc.poll() is not None else bool(children(process.proc.pid))


def test_sigusr1_has_every_worker_reopen_its_access_log(twistd, tmp_path):
    """logrotate's way: rename the file, SIGUSR1 the parent; the workers go
    on in a new file, none of them is killed by the signal."""
    port = free_port()
    log = tmp_path / "access.log"
    parent = twistd(
        "cacheserver", "--port", str(port), "--workers", "2", "--access-log", str(log), port=port
    )
    assert wait_for(lambda: parent.text().count("accepting connections") == 2)
    pids = children(parent.proc.pid)
    by_worker = connections_on_each(port, pids)
    try:
        assert wait_for(lambda: log.exists() and log.read_text().count("\n") >= 40)
        log.rename(tmp_path / "access.log.1")
        parent.proc.send_signal(signal.SIGUSR1)
        # Each worker has closed the old file and opened the new one.
        assert wait_for(lambda: all(files(pid) & {str(log)} for pid in pids))
        assert not any(str(tmp_path / "access.log.1") in files(pid) for pid in pids)
        for k, socks in enumerate(by_worker.values()):
            answer(socks[0], 5000 + k)
        assert wait_for(lambda: log.read_text().count("\n") == 2)
        assert all(f'"{5000 + k} + 1"' in log.read_text() for k in range(2))
        assert children(parent.proc.pid) == pids  # none killed or restarted
        assert "starting it again" not in parent.text()
    finally:
        for socks in by_worker.values():
            for s in socks:
                s.close()
