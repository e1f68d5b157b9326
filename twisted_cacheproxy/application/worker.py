"""A worker process of ``--workers N`` (started by the parent, `parent`, as
``python -m twisted_cacheproxy.application.worker``): the whole service of
one process, built by the composition root with a listener that accepts from
the socket the parent bound and handed in as file descriptor 3.

Its log events go to the parent as JSON lines on standard output; SIGTERM
makes it stop accepting, answer what it has read and exit; so does the
parent's going away.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel, formatEvent, globalLogBeginner

from ..transport.endpoint import AdoptedPort
from .parent import LISTEN_FD, READY
from .tap import ENTRIES


class AdoptedListening(service.Service):
    """A worker's listener: accepts from the parent's socket, logs once it
    does; `drain` stops accepting and lets every connection finish."""

    def __init__(
        self, reactor: Any, family: socket.AddressFamily, factory: Any, namespace: str
    ) -> None:
        self.reactor = reactor
        self.family = family
        self.factory = factory
        self.log = Logger(namespace=namespace)
        self.port: AdoptedPort | None = None
        self._held = False

    def startService(self) -> None:
        super().startService()
        reactor = self.reactor
        self.port = AdoptedPort._fromListeningDescriptor(
            reactor, LISTEN_FD, self.family, self.factory
        )
        os.close(LISTEN_FD)  # `fromfd` made a copy
        self.port.startListening()
        # Said once the reactor runs: only then does this worker take connections.
        reactor.callWhenRunning(self.log.info, READY)

    def drain(self) -> None:
        """Accept no more; each connection answers what it has read, then closes."""
        if self.port is not None:
            # Keep the factory started (the proxy's upstream pool and shared
            # tier) until the connections are done: a port that stops
            # listening stops its factory once no other port holds it.
            self.factory.numPorts += 1
            self._held = True
            self.port.stopListening()
            self.port = None
        self.factory.drain()

    def stopService(self) -> None:
        super().stopService()
        self.drain()
        if self._held:
            self._held = False
            self.factory.doStop()


def _print(event: dict[str, Any]) -> None:
    """A worker's log event as one JSON line, for the parent to log again."""
    text = formatEvent(event)
    if "log_failure" in event:
        text += "\n" + event["log_failure"].getTraceback()
    level = event.get("log_level", LogLevel.info)
    line = {"level": level.name, "namespace": event.get("log_namespace"), "text": text.rstrip()}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str]) -> None:
    """Serve on the inherited socket until SIGTERM (or the parent is gone).
    ``argv``: the address family, the worker's number, the parent's pid, the
    subcommand and its options as JSON (`options.CommonOptions.portable`);
    standard input: the secret ones, as JSON (`options.CommonOptions.secrets`)."""
    from twisted.internet import reactor as installed  # the default one, installed now

    reactor: Any = installed  # typed loosely: its interfaces are zope's

    # First: a SIGTERM from now on drains (run once the reactor runs).
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(lambda: drain()))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
    # Passed on by the parent for logrotate: the access log, if any, takes it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    family = socket.AF_INET6 if argv[0] == "6" else socket.AF_INET
    number, parent, entry = int(argv[1]), int(argv[2]), ENTRIES[argv[3]]
    # The secret options come on standard input, never on the command line.
    values = {**json.loads(argv[4]), **json.loads(sys.stdin.buffer.read() or b"{}")}
    config = entry.Options.restore(values, number)
    grace = config["shutdown-grace"]
    globalLogBeginner.beginLoggingTo([cast(Any, _print)], redirectStandardIO=False)
    listeners: list[AdoptedListening] = []

    def adopt(config: Any, factory: Any, settings: str) -> AdoptedListening:
        listeners.append(AdoptedListening(reactor, family, factory, config.tapname))
        return listeners[0]

    top = service.IService(entry.make(config, reactor, adopt))
    top.privilegedStartService()
    top.startService()
    (listener,) = listeners
    draining: list[bool] = []

    def drain() -> None:
        if draining:
            return
        draining.append(True)
        listener.drain()
        deadline = reactor.seconds() + grace

        def check() -> None:
            if listener.factory.connectionCount <= 0 or reactor.seconds() >= deadline:
                defer.maybeDeferred(top.stopService).addBoth(lambda _: reactor.stop())
            else:
                reactor.callLater(0.05, check)

        check()

    def orphaned() -> None:
        if os.getppid() != parent:
            drain()

    task.LoopingCall(orphaned).start(1.0, now=False)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
