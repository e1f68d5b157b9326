"""``--workers N`` of both services: N worker processes answering on the
same listening sockets.

The parent listens on every endpoint itself (``--listen``, or ``--port`` on
``--interface``: a TCP port, a UNIX socket, or a socket systemd passed it),
accepts nothing from them, and starts each worker with them as its file
descriptors 3, 4, ...; a worker adopts them (`endpoint.AdoptedEndpoint`:
TCP with the send-at-once connections of `endpoint`, or UNIX) and accepts
from them. An ``ssl:`` endpoint's socket is a plain TCP one, handed on the
same way: TLS is per connection, and each worker wraps its connections in TLS
with the key and certificate files the description names, read by the
worker itself (`endpoint.adopted_endpoint`). Why shared sockets rather than
``SO_REUSEPORT`` (a socket per worker, the kernel hashing each connection to
one of them):

- a connection waiting in a dying worker's own ``SO_REUSEPORT`` queue is
  reset with it; with one shared queue, whatever the kernel has queued is
  accepted by the workers still alive, so a crash loses only the
  connections the dead worker had accepted, and a restart none;
- the port is bound once, by the parent, so a port that cannot be bound is
  the same one-line error at start-up as with one process, and no other
  process can join the group by binding the same port;
- a busy worker accepts less (it returns to its event loop less often), so
  connections go to idle workers, where hashing ignores load.

Each worker is the whole service of one process (``twistd cacheproxy`` or
``cacheserver`` with the same options), built by `compose`, whose listener adopts
the sockets; worker N's admin site, if any, is on ``--admin-port`` + N - 1 or
on ``--admin-listen`` with N for ``{worker}``.
The parent supervises: a worker that exits is started again, at once if it
had run for `STABLE` seconds, else after a wait that doubles from
`RESTART_FIRST` up to `RESTART_MAX`. On SIGHUP it replaces the workers one
at a time (an upgrade: a new worker runs the code installed now): the new
worker N accepts before the old one is told to stop; a replacement that
exits before it accepts leaves the old worker serving and ends the round.
On SIGTERM the parent asks each worker to stop (SIGTERM); a worker stops
accepting and reading, answers every request it has already read, closes
each connection once those answers are written, and exits when they are
closed or after the grace period; a worker still there a second after that
is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Generator
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python.failure import Failure

from ..operations.units import plural
from .startup import StartupError, listening_at

#: The first listening socket's descriptor in a worker (the others follow).
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
    at its level and in its namespace. `ready` fires once it accepts
    connections, `gone` once it has exited."""

    def __init__(
        self, parent: WorkersService, number: int, started: float, replacing: bool = False
    ) -> None:
        self.parent = parent
        self.number = number
        self.started = started
        #: Started on SIGHUP to replace the worker of its number.
        self.replacing = replacing
        self.pid: int | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()
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
        Logger(namespace=namespace).emit(
            level,
            "worker {number} (pid {pid}): {line}",
            number=self.number,
            pid=self.pid,
            line=line,
        )
        if line == READY:
            self.parent.served.add(self.number)
            if not self.ready.called:
                self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.parent.ended(self, reason)
        self.gone.callback(None)


class _Unused(protocol.Factory):
    """The parent's own factory on the sockets it hands on: it never accepts."""

    noisy = False

    def logPrefix(self) -> str:
        """What Twisted's own lines call it (a UNIX port's ``starting on``)."""
        return "the workers' socket"


class WorkersService(service.Service):
    """Listens on every endpoint, runs ``count`` workers on the sockets and
    keeps them running; SIGHUP replaces them one at a time."""

    def __init__(
        self,
        reactor: Any,
        listeners: list[tuple[IStreamServerEndpoint, str]],
        count: int,
        arguments: list[str],
        *,
        handover: bytes = b"",
        grace: float = 15.0,
        on_listening: Callable[[str], None] | None = None,
        cannot_listen: Callable[[str, object], str] = lambda where, e: str(e),
    ) -> None:
        #: Spawns the workers and times their restarts (typed loosely: the
        #: reactor's interfaces are zope's, and it is several of them).
        self.reactor = reactor
        #: Each endpoint, with where it listens in words (for a message).
        self.listeners = listeners
        self.count = count
        #: What a worker is told after its number: the subcommand and its options.
        self.arguments = arguments
        #: What a worker reads on its standard input: what its command line,
        #: which every user of the host can read, must not carry.
        self.handover = handover
        self.log = Logger(namespace=arguments[0])
        self.grace = grace
        #: Called with where each socket listens, in words, once it does.
        self.on_listening = on_listening
        #: The one line to stop with when an endpoint cannot listen.
        self.cannot_listen = cannot_listen
        #: The listening ports handed to the workers, with where each listens.
        self.ports: list[tuple[Any, str]] = []
        self.workers: dict[int, _Worker] = {}
        #: Workers replaced on SIGHUP, draining until they exit.
        self.retiring: set[_Worker] = set()
        #: The worker numbers that have said `READY` at least once.
        self.served: set[int] = set()
        self._quick: dict[int, int] = {}  # quick exits in a row, per worker number
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._replacing = False
        self._stopped: defer.Deferred[None] | None = None
        self._signals: dict[int, Any] = {}

    def privilegedStartService(self) -> None:
        for endpoint, where in self.listeners:
            outcome: list[Any] = []
            endpoint.listen(_Unused()).addBoth(outcome.append)
            (result,) = outcome  # every endpoint of ours listens at once
            if isinstance(result, Failure):
                raise StartupError(self.cannot_listen(where, result.value))
            result.stopReading()  # the workers accept, never the parent
            self.ports.append((result, where))
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        if self.on_listening is not None:
            for port, where in self.ports:
                self.on_listening(listening_at(port, where))
        for number in range(1, self.count + 1):
            self._spawn(number)
        self._signals = {
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, self._rotate),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self._hangup),
        }

    def _rotate(self, signum: int, frame: Any) -> None:
        """SIGUSR1 (logrotate): each worker reopens its access log; twistd's
        own handler, if any, rotates the parent's log."""
        for worker in [*self.workers.values(), *self.retiring]:
            _signal(worker, signal.SIGUSR1)
        previous = self._signals.get(signal.SIGUSR1)
        if callable(previous):
            previous(signum, frame)

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.replace)

    def replace(self) -> defer.Deferred[None] | None:
        """Replace every worker, one at a time (SIGHUP): the new one accepts
        before the old one is told to stop, and the next waits until the old
        one has exited. Fires once the round is over."""
        if self._stopping:
            return None
        if self._replacing:
            self.log.info("SIGHUP: the workers are already being replaced")
            return None
        self._replacing = True
        self.log.info(
            "SIGHUP: replacing the {count} one at a time", count=plural(self.count, "worker")
        )
        d = self._replaceAll()

        def over(result: Any) -> None:
            self._replacing = False

        return d.addBoth(over)

    @defer.inlineCallbacks
    def _replaceAll(self) -> Generator[defer.Deferred[Any], Any, None]:
        for number in range(1, self.count + 1):
            old = self.workers.get(number)
            if old is None or self._stopping:  # being restarted, or all stopping
                continue
            new = self._spawn(number, replacing=True)
            try:
                yield new.ready
            except NeverReadyError as e:
                self.workers[number] = old
                self.log.error(
                    "worker {number}'s replacement (pid {pid}) {how} before it could serve: "
                    "worker {number} (pid {old}) goes on; the workers left are not replaced",
                    number=number,
                    pid=new.pid,
                    how=e.how,
                    old=old.pid,
                )
                return
            if self._stopping:
                return
            self.retiring.add(old)
            self.log.info(
                "worker {number} (pid {pid}) accepts: worker {number} (pid {old}) stops",
                number=number,
                pid=new.pid,
                old=old.pid,
            )
            _signal(old, "TERM")
            killer = self.reactor.callLater(self.grace + 1.0, self._kill, [old])
            yield old.gone
            if killer.active():
                killer.cancel()
        self.log.info("every worker replaced")

    def _spawn(self, number: int, replacing: bool = False) -> _Worker:
        reactor = self.reactor
        self._restarts.pop(number, None)
        worker = _Worker(self, number, reactor.seconds(), replacing)
        self.workers[number] = worker
        argv = [
            sys.executable,
            "-m",
            "twisted_cacheproxy.application.worker",
            str(len(self.ports)),
            str(number),
            str(os.getpid()),
            *self.arguments,
        ]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for offset, (port, _) in enumerate(self.ports):
            fds[LISTEN_FD + offset] = port.fileno()
        reactor.spawnProcess(worker, sys.executable, argv, env=dict(os.environ), childFDs=fds)
        self.log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)
        return worker

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: start it again unless stopping, replaced, or a
        replacement that never served (`_replaceAll` decides then)."""
        reactor = self.reactor
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        how = _exit(reason)
        if worker in self.retiring or self._stopping:
            self.retiring.discard(worker)
            self.log.info(
                "worker {number} (pid {pid}) {how}", number=worker.number, pid=worker.pid, how=how
            )
            stopped = self._stopped
            if stopped is not None and not stopped.called and not (self.workers or self.retiring):
                stopped.callback(None)
            return
        if worker.replacing and not worker.ready.called:
            # A replacement that never said it accepts: its round is over.
            worker.ready.errback(NeverReadyError(how))
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
        for signum, previous in self._signals.items():
            signal.signal(signum, previous)
        self._signals = {}
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._stopped = defer.Deferred()
        everyone = [*self.workers.values(), *self.retiring]
        if not everyone:
            self._stopped.callback(None)
        for worker in everyone:
            _signal(worker, "TERM")
        killer = reactor.callLater(self.grace + 1.0, self._kill, everyone)

        def done(result: None) -> defer.Deferred[Any]:
            if killer.active():
                killer.cancel()
            ports, self.ports = self.ports, []
            closed = [defer.maybeDeferred(port.stopListening) for port, _ in ports]
            return defer.gatherResults(closed, consumeErrors=True)

        return self._stopped.addCallback(done).addCallback(lambda _: None)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.gone.called:
                continue
            self.log.warn(
                "worker {number} (pid {pid}) still running: killed",
                number=worker.number,
                pid=worker.pid,
            )
            _signal(worker, "KILL")


class NeverReadyError(Exception):
    """A worker exited before it accepted connections; ``how``, in words."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


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
