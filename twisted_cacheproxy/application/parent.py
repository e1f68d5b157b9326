"""``--workers N`` of both services: N worker processes answering on one port.

The parent binds and listens on the one socket itself, then starts each
worker with that socket as its file descriptor 3; a worker adopts it
(`reactor.adoptStreamPort`'s way, with the send-at-once connections of
`endpoint`) and accepts from it. Why one shared socket rather than
``SO_REUSEPORT`` (a socket per worker, the kernel hashing each connection to
one of them):

- a connection waiting in a dying worker's own ``SO_REUSEPORT`` queue is
  reset with it; with one shared queue, whatever the kernel has queued is
  accepted by the workers still alive, so a crash loses only the
  connections the dead worker had accepted;
- the port is bound once, by the parent, so a port that cannot be bound is
  the same one-line error at start-up as with one process, and no other
  process can join the group by binding the same port;
- a busy worker accepts less (it returns to its event loop less often), so
  connections go to idle workers, where hashing ignores load.

Each worker is the whole service of one process (``twistd cacheproxy`` or
``cacheserver`` with the same options), built by tap.py, whose listener adopts
the socket; worker N's admin site, if any, is on ``--admin-port`` + N - 1 or
on ``--admin-listen`` with N for ``{worker}``.
The parent supervises: a worker that exits is started again, at once if it
had run for `STABLE` seconds, else after a wait that doubles from
`RESTART_FIRST` up to `RESTART_MAX`. On SIGTERM the parent asks each worker
to stop (SIGTERM); a worker stops accepting and reading, answers every request
it has already read, closes each connection once those answers are written,
and exits when they are closed or after the grace period;
a worker still there a second after that is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure

from .startup import bound_socket

#: The listening socket's descriptor in a worker.
LISTEN_FD = 3
#: A worker that ran this long is restarted at once when it exits.
STABLE = 10.0
#: Else the wait before a restart: doubled for each quick exit, capped.
RESTART_FIRST = 0.5
RESTART_MAX = 10.0


#: What a worker says once it takes connections.
READY = "accepting connections"


class _Worker(protocol.ProcessProtocol):
    """One worker process as the parent sees it: each of its log events
    (a JSON line on its standard output, see `_print`) is logged again here,
    at its level and in its namespace."""

    def __init__(self, parent: WorkersService, number: int, started: float) -> None:
        self.parent = parent
        self.number = number
        self.started = started
        self.pid: int | None = None
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.pid = transport.pid
        transport.write(self.parent.handover)
        transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._buffers[fd] = (self._buffers.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._line(line.decode("utf-8", "replace"), LogLevel.info if fd == 1 else LogLevel.warn)

    def _line(self, line: str, level: LogLevel) -> None:
        namespace = self.parent.log.namespace
        try:
            event = json.loads(line)
            line, namespace = event["text"], event["namespace"] or namespace
            # Twisted's legacy log events, shown as twistd shows them.
            namespace = "-" if namespace == "log_legacy" else namespace
            level = LogLevel.levelWithName(event["level"])
        except (ValueError, KeyError, TypeError, InvalidLogLevelError):
            pass  # not one of ours (a library writing to stdout or stderr): as it is
        if line == READY:
            self.parent.served.add(self.number)
        Logger(namespace=namespace).emit(
            level,
            "worker {number} (pid {pid}): {line}",
            number=self.number,
            pid=self.pid,
            line=line,
        )

    def processEnded(self, reason: Failure) -> None:
        self.parent.ended(self, reason)


class WorkersService(service.Service):
    """Binds the port, runs ``count`` workers on it and keeps them running."""

    def __init__(
        self,
        reactor: Any,
        interface: str,
        port: int,
        backlog: int,
        count: int,
        arguments: list[str],
        *,
        handover: bytes = b"",
        grace: float = 5.0,
        on_listening: Callable[[tuple[str, int]], None] | None = None,
        cannot_listen: Callable[[OSError], str] = str,
    ) -> None:
        #: Spawns the workers and times their restarts (typed loosely: the
        #: reactor's interfaces are zope's, and it is several of them).
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.backlog = backlog
        self.count = count
        #: What a worker is told after its number: the subcommand and its options.
        self.arguments = arguments
        #: What a worker reads on its standard input: what its command line,
        #: which every user of the host can read, must not carry.
        self.handover = handover
        self.log = Logger(namespace=arguments[0])
        self.grace = grace
        #: Called with the bound socket's (host, port) once it listens.
        self.on_listening = on_listening
        #: The one line to stop with when the port cannot be bound.
        self.cannot_listen = cannot_listen
        self.socket: socket.socket | None = None
        self.workers: dict[int, _Worker] = {}
        #: The worker numbers that have said `READY` at least once.
        self.served: set[int] = set()
        self._quick: dict[int, int] = {}  # quick exits in a row, per worker number
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._usr1: Any = None

    def privilegedStartService(self) -> None:
        try:
            skt = bound_socket(self.interface, self.port)
        except OSError as e:
            raise SystemExit(self.cannot_listen(e)) from None
        try:
            skt.listen(self.backlog)
        except OSError as e:
            skt.close()
            raise SystemExit(self.cannot_listen(e)) from None
        skt.setblocking(False)
        self.socket = skt
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        assert self.socket is not None
        if self.on_listening is not None:
            self.on_listening(self.socket.getsockname()[:2])
        for number in range(1, self.count + 1):
            self._spawn(number)
        self._usr1 = signal.signal(signal.SIGUSR1, self._rotate)

    def _rotate(self, signum: int, frame: Any) -> None:
        """SIGUSR1 (logrotate): each worker reopens its access log; twistd's
        own handler, if any, rotates the parent's log."""
        for worker in list(self.workers.values()):
            _signal(worker, signal.SIGUSR1)
        if callable(self._usr1):
            self._usr1(signum, frame)

    def _spawn(self, number: int) -> None:
        reactor = self.reactor
        self._restarts.pop(number, None)
        assert self.socket is not None
        worker = _Worker(self, number, reactor.seconds())
        self.workers[number] = worker
        family = "6" if self.socket.family == socket.AF_INET6 else "4"
        argv = [
            sys.executable,
            "-m",
            "twisted_cacheproxy.application.worker",
            family,
            str(number),
            str(os.getpid()),
            *self.arguments,
        ]
        reactor.spawnProcess(
            worker,
            sys.executable,
            argv,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.socket.fileno()},
        )
        self.log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: start it again unless stopping."""
        reactor = self.reactor
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        how = _exit(reason)
        if self._stopping:
            self.log.info(
                "worker {number} (pid {pid}) {how}", number=worker.number, pid=worker.pid, how=how
            )
            if not self.workers and self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        if worker.number not in self.served:
            # Never took a connection: its options cannot work (an admin
            # port taken, say), and starting it again would only loop.
            self.log.critical(
                "worker {number} (pid {pid}) {how} before it could serve; stopping",
                number=worker.number,
                pid=worker.pid,
                how=how,
            )
            reactor.stop()
            return
        if reactor.seconds() - worker.started >= STABLE:
            self._quick[worker.number] = 0
            wait = 0.0
        else:
            quick = self._quick.get(worker.number, 0)
            wait = min(RESTART_MAX, RESTART_FIRST * 2**quick)
            self._quick[worker.number] = quick + 1
        self.log.warn(
            "worker {number} (pid {pid}) {how}; starting it again in {wait:g} s",
            number=worker.number,
            pid=worker.pid,
            how=how,
            wait=wait,
        )
        self._restarts[worker.number] = reactor.callLater(wait, self._spawn, worker.number)

    def stopService(self) -> defer.Deferred[None]:
        """Ask every worker to finish; fires when all have exited."""
        reactor = self.reactor
        super().stopService()
        self._stopping = True
        if self._usr1 is not None:
            signal.signal(signal.SIGUSR1, self._usr1)
            self._usr1 = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._stopped = defer.Deferred()
        if not self.workers:
            self._stopped.callback(None)
        for worker in list(self.workers.values()):
            _signal(worker, "TERM")
        killer = reactor.callLater(self.grace + 1.0, self._kill)

        def done(result: None) -> None:
            if killer.active():
                killer.cancel()
            if self.socket is not None:
                self.socket.close()
                self.socket = None

        self._stopped.addCallback(done)
        return self._stopped

    def _kill(self) -> None:
        for worker in list(self.workers.values()):
            self.log.warn(
                "worker {number} (pid {pid}) still running: killed",
                number=worker.number,
                pid=worker.pid,
            )
            _signal(worker, "KILL")


def _signal(worker: _Worker, name: str | int) -> None:
    transport: Any = worker.transport
    with contextlib.suppress(error.ProcessExitedAlready):
        transport.signalProcess(name)


def _exit(reason: Failure) -> str:
    e = reason.value
    if isinstance(e, error.ProcessTerminated) and e.signal is not None:
        return f"killed by signal {e.signal}"
    code = getattr(e, "exitCode", 0)
    return f"exited with status {code}"
