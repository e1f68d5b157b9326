"""The installed package's programs, run as users run them (``pip install .``
first): where the console scripts are, free ports on 127.0.0.1, and one
``twistd -n`` process, stopped by its PID."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

from twisted_cacheproxy.transport.frameclient import FrameClient

HOST = "127.0.0.1"
#: The repository's top folder.
ROOT = pathlib.Path(__file__).resolve().parent.parent
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
        self.proc = subprocess.Popen(
            command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + wait
        while not accepting(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd {self.args} exited:\n{self.text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"twistd {self.args} did not listen:\n{self.text()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not end in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text() if self.log.exists() else "(no log)"


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
