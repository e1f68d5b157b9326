"""``twistd cacheserver --workers 2`` on 127.0.0.1: both workers answer,
a killed worker is started again without its sibling's connections losing
anything, SIGTERM lets the workers finish. Which worker holds a connection
is read from /proc (the socket's inode), so the server needs no test hook."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import time

import pytest
from processes import HOST, free_port, wait_for
from test_reliability_tcp import read_message, request

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not pathlib.Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]


def children(pid: int) -> list[int]:
    text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def files(pid: int) -> set[str]:
    """The paths of the files ``pid`` has open."""
    found = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.add(fd.readlink().as_posix())
        except OSError:
            continue
    return found


def _socket_inodes(pid: int) -> set[str]:
    return {f[8:-1] for f in files(pid) if f.startswith("socket:[")}


def owners(socks: list[socket.socket], pids: list[int]) -> list[int | None]:
    """The worker holding the server end of each client socket (one read of
    /proc/net/tcp, which is long on a busy host)."""
    wanted = {(s.getpeername()[1], s.getsockname()[1]): i for i, s in enumerate(socks)}
    inodes: dict[int, str] = {}
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].split(":")[1], 16)
        remote = int(fields[2].split(":")[1], 16)
        if (local, remote) in wanted:
            inodes[wanted[local, remote]] = fields[9]
    held = {pid: _socket_inodes(pid) for pid in pids}
    return [
        next((pid for pid in pids if inodes.get(i) in held[pid]), None) for i in range(len(socks))
    ]


def answer(sock: socket.socket, k: int) -> int:
    sock.sendall(request(f"{k} + 1"))
    header, data = read_message(sock)
    assert header.status == 200 and data.startswith(f'{{"result": {k + 1},'.encode()), data
    return header.status


@pytest.fixture
def workers(twistd):
    port = free_port()
    parent = twistd("cacheserver", "--port", str(port), "--workers", "2", port=port)
    assert wait_for(lambda: parent.text().count("accepting connections") == 2)
    return parent


def connections_on_each(port: int, pids: list[int], burst: int = 40, bursts: int = 5):
    """Open connections, each with one answer, in bursts until every worker
    holds some (at most ``bursts`` bursts), by the worker holding each.

    The kernel queues a burst and each worker takes one connection per
    wakeup, so a burst is usually shared; but connections that stay idle
    may all go to whichever worker wakes first, so a lopsided burst is
    followed by another."""
    by_worker: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    for _ in range(bursts):
        socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(burst)]
        for k, sock in enumerate(socks):
            answer(sock, k)
        for sock, pid in zip(socks, owners(socks, pids), strict=True):
            assert pid in by_worker, (pid, pids)
            by_worker[pid].append(sock)
        if all(by_worker.values()):
            break
    return by_worker


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


def answers_across_sigterm(parent, texts: list[str]) -> list[bytes]:
    """Pipeline ``texts`` on one connection, SIGTERM the parent after the
    first answer, and read until the connection closes: every answer's data
    (each a 200). The parent must exit well within the grace period."""
    sock = socket.create_connection((HOST, parent.port), timeout=10)
    with sock:
        sock.sendall(b"".join(request(text) for text in texts))
        header, data = read_message(sock)
        assert header.status == 200
        started = time.monotonic()
        parent.proc.send_signal(signal.SIGTERM)
        answers = [data]
        while True:
            try:
                header, data = read_message(sock)
            except ConnectionError:
                break
            assert header.status == 200
            answers.append(data)
    # twistd ends as the signal it stopped for ends a process.
    assert parent.proc.wait(10) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 5
    return answers


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
