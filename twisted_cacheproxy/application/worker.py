"""A worker process of ``--workers N`` (started by the parent, `parent`, as
``python -m twisted_cacheproxy.application.worker``): the whole service of
one process, built by the composition root with a listener that accepts from
the sockets the parent listens on, handed in as file descriptors 3, 4, ...

Its log events go to the parent as JSON lines on standard output; SIGTERM
makes it stop accepting, answer what it has read and exit (its listener's
drain, `startup.ListeningService`); so does the parent's going away.
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

from .compose import adopted_listeners
from .parent import LISTEN_FD, READY
from .startup import ListeningService
from .tap import ENTRIES


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
    """Serve on the inherited sockets until SIGTERM (or the parent is gone).
    ``argv``: how many sockets, the worker's number, the parent's pid, the
    subcommand and its options as JSON (`options.CommonOptions.portable`);
    standard input: the secret ones, as JSON (`options.CommonOptions.secrets`)."""
    from twisted.internet import reactor as installed  # the default one, installed now

    reactor: Any = installed  # typed loosely: its interfaces are zope's

    # First: a SIGTERM from now on drains (run once the reactor runs).
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(lambda: stop()))
    # The parent decides: Ctrl-C and a terminal's hangup reach it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Passed on by the parent for logrotate: the access log, if any, takes it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    count, number, parent, entry = int(argv[0]), int(argv[1]), int(argv[2]), ENTRIES[argv[3]]
    # The secret options come on standard input, never on the command line.
    values = {**json.loads(argv[4]), **json.loads(sys.stdin.buffer.read() or b"{}")}
    config = entry.Options.restore(values, number)
    globalLogBeginner.beginLoggingTo([cast(Any, _print)], redirectStandardIO=False)
    sockets = [socket.socket(fileno=LISTEN_FD + i) for i in range(count)]

    def adopt(config: Any, factory: Any, settings: str) -> ListeningService:
        return ListeningService(
            adopted_listeners(config, reactor, sockets),
            factory,
            config.tapname,
            settings,
            grace=config["shutdown-grace"],
            clock=reactor,
            announce=False,
        )

    top = service.IService(entry.make(config, reactor, adopt))
    top.privilegedStartService()
    top.startService()
    # Said once the reactor runs: only then does this worker take connections.
    reactor.callWhenRunning(Logger(namespace=config.tapname).info, READY)
    stopping: list[bool] = []

    def stop() -> None:
        if stopping:
            return
        stopping.append(True)
        defer.maybeDeferred(top.stopService).addBoth(lambda _: reactor.stop())

    def orphaned() -> None:
        if os.getppid() != parent:
            stop()

    task.LoopingCall(orphaned).start(1.0, now=False)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
