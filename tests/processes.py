"""The installed package's programs, run as users run them (``pip install .``
first): where the console scripts are, free ports on 127.0.0.1, one
``twistd -n`` process and one memcached, each stopped by its PID; clients
over real sockets (blocking, and on the reactor); and what /proc says of
``--workers`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from helpers import request_frame
from twisted.internet import defer

from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.frameclient import FrameClient

HOST = "127.0.0.1"
#: Seconds any single wait for a process may take.
WAIT = 15.0


def script(name: str) -> str:
    """The console script installed beside this Python, else the one on PATH."""
    here = pathlib.Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install .)"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive free ports (``--admin-port`` of
    ``--workers count``)."""
    while True:
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    s = held.enter_context(socket.socket())
                    s.bind((HOST, port))
            except OSError:
                continue
        return first


#: TCP states as /proc/net/tcp numbers them.
ESTABLISHED, CLOSE_WAIT = 0x01, 0x08


def tcp_states_to(port: int) -> list[int]:
    """The states of this host's IPv4 TCP sockets connected to ``port`` on
    127.0.0.1 (the client ends of connections to a service on ``port``)."""
    states = []
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, remote = fields[2].split(":")
        if address == "0100007F" and int(remote, 16) == port:
            states.append(int(fields[3], 16))
    return states


def open_ends(port: int) -> list[int]:
    """The states of the client ends of connections to ``port`` that their
    owner has not closed yet (established, or half-closed by the service)."""
    return [state for state in tcp_states_to(port) if state in (ESTABLISHED, CLOSE_WAIT)]


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class Twistd:
    """One ``twistd -n`` process of the installed plugins, logging to a file
    of its own; `start` returns once it accepts connections on ``port``."""

    def __init__(self, args: list[str], port: int, log: pathlib.Path, cwd: pathlib.Path):
        self.args = args
        self.port = port
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self, wait: float = WAIT) -> Twistd:
        command = [script("twistd"), "-n", "--pidfile=", f"--logfile={self.log}", *self.args]
        if "--shutdown-grace" not in self.args:
            # The test's own connections may be left open, and nobody reads
            # them once it ends: the stop waits a second for them, not 15.
            command += ["--shutdown-grace", "1"]
        self.proc = subprocess.Popen(
            command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + wait
        while not all(map(accepting, self._ports())):
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd {self.args} exited:\n{self.text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"twistd {self.args} did not listen:\n{self.text()}")
            time.sleep(0.05)
        return self

    def _ports(self) -> list[int]:
        """The TCP ports it is started once it accepts on: its service's, and
        its admin site's (a single process's; each worker's is its own)."""
        ports = [self.port]
        if "--admin-port" in self.args and "--workers" not in self.args:
            admin = int(self.args[self.args.index("--admin-port") + 1])
            if admin:
                ports.append(admin)
        return ports

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc)

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text() if self.log.exists() else "(no log)"


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it does not end in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT)


def start_proxy(twistd, server_port: int, *extra: str) -> Twistd:
    """A ``twistd cacheproxy`` on a free port in front of ``server_port``,
    retrying quickly (``--retry-delay 0.05``), through the ``twistd`` fixture."""
    port = free_port()
    return twistd(
        "cacheproxy",
        "--port",
        str(port),
        "--server-port",
        str(server_port),
        "--retry-delay",
        "0.05",
        *extra,
        port=port,
    )


def within(d, seconds: float = 10.0):
    """``d``, failed with a timeout if it has not fired within ``seconds``."""
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


def connect(port: int, protocol_class=None):
    """A Deferred firing with a new connection to 127.0.0.1:``port`` (a
    `FrameClient` unless told otherwise), opened within 5 s."""
    from twisted.internet import protocol, reactor

    creator = protocol.ClientCreator(reactor, protocol_class or FrameClient)
    return within(creator.connectTCP(HOST, port, timeout=5), 5.0)


def wait_for(predicate, seconds: float = 10.0) -> bool:
    """Whether ``predicate()`` came true within ``seconds`` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def deferLater(seconds: float) -> defer.Deferred:
    """A Deferred firing ``seconds`` from now on the global reactor."""
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


def raw(message: tuple[wire.Header, bytes]) -> bytes:
    """The message as it came over the wire, less its extension word (what
    the course programs read of it; its bits are checked apart)."""
    header, data = message
    return wire.encode(header.timestamp, header.flags, header.max_age, data)


@defer.inlineCallbacks
def exchange(port: int, *frames: bytes):
    """Send ``frames`` pipelined on one new connection; their (header, data) answers."""
    conn = yield connect(port)
    try:
        answers = yield within(defer.gatherResults([conn.sendRequest(f) for f in frames]))
    finally:
        conn.transport.loseConnection()
    return answers


# --- blocking clients -------------------------------------------------------------


def read_message(sock: socket.socket) -> tuple[wire.Header, bytes]:
    """One whole message from a blocking socket."""
    head = _read_exactly(sock, wire.HEADER_SIZE)
    header = wire.decode_header(head)
    return header, _read_exactly(sock, header.length - wire.HEADER_SIZE)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def expected(k: int, steps: bool) -> tuple[int, list[str]]:
    """The answer to ``k * 7 + 1``."""
    return k * 7 + 1, ([f"({k} * 7) + 1", f"{k * 7} + 1", f"{k * 7 + 1}"] if steps else [])


def ask_each(port: int, ks, steps_of) -> list[str]:
    """Ask ``k * 7 + 1`` for every k, one request at a time on one connection
    per k; what was wrong, as text (nothing when every answer was right)."""
    wrong = []
    for k in ks:
        steps = steps_of(k)
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(request_frame(f"{k} * 7 + 1", steps=steps))
            header, data = read_message(sock)
        got = json.loads(data)
        want = expected(k, steps)
        if header.status != 200 or (got.get("result"), got.get("steps")) != want:
            wrong.append(f"{k}: {header.status} {got} instead of {want}")
        if bool(header.steps) != steps:
            wrong.append(f"{k}: S={header.steps} for a request with S={steps}")
    return wrong


def in_threads(count: int, work) -> list[str]:
    """Run ``work(i)`` in ``count`` threads; everything they found wrong."""
    found: list[str] = []
    threads = [threading.Thread(target=lambda i=i: found.extend(work(i))) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return found


def http(port: int, path: str, method: str = "GET", token: str | None = None):
    """(status, body) of one admin request."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        request.data = b""
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- --workers processes, as /proc shows them -------------------------------------


def children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s child processes."""
    text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


class Load:
    """Clients in threads, each asking ``k * 3 + 1`` for k = 0, 1, ... on a
    persistent connection, every answer checked. A connection the service
    closes before answering (an end-of-file after its last answer: a worker
    draining) is opened again and the request sent again, as calc-client
    does; anything else (a reset, a refused connection, a wrong answer) is
    recorded as lost."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.answered = 0
        self.reconnects = 0
        self.lost: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        k = i * 1_000_000
        sock = None
        try:
            while not self.stopping.is_set():
                if sock is None:
                    sock = socket.create_connection((HOST, self.port), timeout=WAIT)
                try:
                    sock.sendall(request_frame(f"{k} * 3 + 1"))
                    header, data = read_message(sock)
                except ConnectionError as e:
                    if type(e) is not ConnectionError:  # reset, broken pipe: lost
                        raise
                    sock.close()  # "closed": an end-of-file before the answer
                    sock = None
                    self.reconnects += 1
                    continue
                if header.status != 200 or json.loads(data)["result"] != k * 3 + 1:
                    self.lost.append(f"{k}: {header.status} {data!r}")
                self.answered += 1
                k += 1
        except Exception as e:
            self.lost.append(f"client {i}: {e!r}")
        finally:
            if sock is not None:
                sock.close()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(WAIT)


def sighup_under_load(parent) -> None:
    """SIGHUP a ``--workers 2`` parent while `Load` runs against it: every
    worker is replaced (new PIDs, the old ones exit 0, none killed), once,
    no request is lost, before or after, and a client is sent an end-of-file
    (and asks again) at most once per old worker."""
    before = set(children(parent.pid))
    load = Load(parent.port)
    try:
        assert wait_for(lambda: load.answered > 200 or bool(load.lost))
        parent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "every worker replaced" in parent.text(), WAIT * 2)
        at_replacement = load.answered
        assert wait_for(lambda: load.answered > at_replacement + 200 or bool(load.lost))
    finally:
        load.stop()
    assert not load.lost, load.lost[:5]
    # Each old worker's drain ends a client's connection at most once.
    assert load.reconnects <= 2 * len(load.threads), load.reconnects
    after = set(children(parent.pid))
    assert len(after) == 2 and not before & after
    text = parent.text()
    assert text.count("SIGHUP: replacing the 2 workers one at a time") == 1
    for pid in before:
        assert f"(pid {pid}) exited with status 0" in text
    assert "starting it again" not in text and "killed" not in text


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
    """Ask ``k + 1`` on ``sock`` and check the answer; its status."""
    sock.sendall(request_frame(f"{k} + 1"))
    header, data = read_message(sock)
    assert header.status == 200 and data.startswith(f'{{"result": {k + 1},'.encode()), data
    return header.status


#: A client socket as a test uses it: as connected, or wrapped in TLS (`tls_wrap`).
Wrap = Callable[[socket.socket], socket.socket]


def plain(sock: socket.socket) -> socket.socket:
    """A connection as it is: plain text."""
    return sock


def tls_wrap(cafile: str) -> Wrap:
    """Wraps a connection to 127.0.0.1 in TLS (the handshake done at once),
    trusting the CA in ``cafile``."""
    context = ssl.create_default_context(cafile=cafile)
    return lambda sock: context.wrap_socket(sock, server_hostname=HOST)


def connections_on_each(
    port: int, pids: list[int], burst: int = 40, bursts: int = 5, wrap: Wrap = plain
):
    """Open connections (each through ``wrap``), each with one answer, in
    bursts until every worker holds some (at most ``bursts`` bursts), by the
    worker holding each.

    The kernel queues a burst and each worker takes one connection per
    wakeup, so a burst is usually shared; but connections that stay idle
    may all go to whichever worker wakes first, so a lopsided burst is
    followed by another."""
    by_worker: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    for _ in range(bursts):
        socks = [wrap(socket.create_connection((HOST, port), timeout=10)) for _ in range(burst)]
        for k, sock in enumerate(socks):
            answer(sock, k)
        for sock, pid in zip(socks, owners(socks, pids), strict=True):
            assert pid in by_worker, (pid, pids)
            by_worker[pid].append(sock)
        if all(by_worker.values()):
            break
    return by_worker


def answers_across_sigterm(parent, texts: list[str], wrap: Wrap = plain) -> list[bytes]:
    """Pipeline ``texts`` on one connection (through ``wrap``), SIGTERM the
    parent after the first answer, and read until the connection closes:
    every answer's data (each a 200). The parent must exit well within the
    grace period."""
    sock = wrap(socket.create_connection((HOST, parent.port), timeout=10))
    with sock:
        sock.sendall(b"".join(request_frame(text) for text in texts))
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


# --- memcached --------------------------------------------------------------------


class Memcached:
    """One memcached process on ``port``: started, stopped (by PID), paused."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        command = [self.binary, "-l", HOST, "-p", str(self.port), "-U", "0", "-m", "16"]
        command += ["-t", "1", "-c", "256"]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + WAIT
        while not accepting(self.port):
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "memcached did not listen"
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # if it was paused
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP, and wait until every thread has stopped: until then, on a
        busy machine, memcached may still answer what reaches it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + WAIT
        while not self.stopped():
            assert time.monotonic() < deadline, "memcached did not stop"
            time.sleep(0.005)

    def stopped(self) -> bool:
        """Whether every thread of memcached is stopped (state T in /proc)."""
        assert self.proc is not None
        tasks = pathlib.Path(f"/proc/{self.proc.pid}/task")
        states = [(t / "stat").read_text().rpartition(")")[2].split()[0] for t in tasks.iterdir()]
        return all(state == "T" for state in states)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def command(self, line: bytes) -> bytes:
        """One command on a new connection; memcached's answer."""
        with socket.create_connection((HOST, self.port), timeout=WAIT) as s:
            s.sendall(line)
            answer = b""
            while not answer.endswith(b"\r\n"):
                chunk = s.recv(65536)
                assert chunk
                answer += chunk
            return answer

    def keys_stored(self) -> int:
        stats = self.command(b"stats\r\n")
        while not stats.endswith(b"END\r\n"):
            time.sleep(0.01)
            stats = self.command(b"stats\r\n")
        for line in stats.split(b"\r\n"):
            if line.startswith(b"STAT curr_items "):
                return int(line.split()[2])
        raise AssertionError(stats)
