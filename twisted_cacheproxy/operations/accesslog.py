"""The access log: one line per answered request, written off the reactor thread.

Lines are collected in the reactor thread and handed, a batch at a time, to
one writer thread that owns the file, so a slow disk never blocks the
reactor; past `MAX_BACKLOG` bytes waiting for the disk, lines are dropped
(and counted) rather than held without bound. `reopen` (SIGUSR1, as
logrotate expects) closes and opens the path again, in order with the writes.

A proxy line (README, "Operating the proxy")::

    2026-12-01T14:50:01.123Z 127.0.0.1:53412 text SC 65535 HIT 200 66 0.041 - "max(2, 3) + 3"

time (UTC), client, encoding, S and C flags (``-`` when clear), the
request's max-age, the cache status, the answer's status and size in bytes,
total and upstream time in milliseconds (``-``: not asked upstream), and the
text expression as a JSON string of ASCII characters (``-`` for legacy
pickles), cut to `MAX_EXPRESSION` characters: a request can never split a
line or forge another one. The server's lines have ``-`` for the cache
status and the upstream time.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import IO, Any

from twisted.logger import Logger

from ..calculator.events import Served
from ..proxy.events import Answered
from ..transport import payload, wire

log = Logger()

#: Longest expression written, in characters (then "..." marks the cut).
MAX_EXPRESSION = 200
#: Bytes that may wait for the disk before lines are dropped.
MAX_BACKLOG = 8 << 20
#: Seconds lines gather in the reactor thread before they go to the writer.
FLUSH_DELAY = 0.1

_REOPEN = object()
_STOP = object()


def quote(data: bytes) -> str:
    """A text expression as one JSON string of printable ASCII: quotes,
    backslashes, newlines and every other control or non-ASCII character
    escaped, cut to `MAX_EXPRESSION` characters."""
    text = data.decode("utf-8", "backslashreplace")
    if len(text) > MAX_EXPRESSION:
        text = text[:MAX_EXPRESSION] + "..."
    return json.dumps(text, ensure_ascii=True)


class _Stamp:
    """ISO 8601 UTC time stamps with milliseconds, the seconds part cached."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((now - second) * 1000):03d}Z"


def _flags(header: wire.Header) -> str:
    flags = header.flags
    return ("S" if flags & wire.FLAG_STEPS else "-") + ("C" if flags & wire.FLAG_CACHE else "-")


def _expression(encoding: str, data: bytes) -> str:
    return quote(data) if encoding == payload.TEXT else "-"


def proxy_fields(now: float, event: Answered) -> str:
    """A proxy line after its time stamp: client, encoding, flags, max-age,
    cache status, answer status and size, total and upstream milliseconds,
    the text expression."""
    data, header, answer, up = event.data, event.header, event.answer, event.upstream
    encoding = payload.encoding_of(data)
    upstream = "-" if up is None else f"{up * 1000:.3f}"
    return (
        f"{event.client.peer} {encoding} {_flags(header)} {header.max_age} "
        f"{event.status.upper()} {wire.status_of(answer)} {len(answer)} "
        f"{(now - event.started) * 1000:.3f} {upstream} {_expression(encoding, data)}"
    )


def server_fields(now: float, event: Served) -> str:
    """A server line after its time stamp: as a proxy's, with ``-`` for the
    cache status and the upstream time."""
    header, answer, encoding = event.header, event.answer, event.encoding
    return (
        f"{event.client.peer} {encoding} {_flags(header)} {header.max_age} "
        f"- {wire.status_of(answer)} {len(answer)} {(now - event.started) * 1000:.3f} - "
        f"{_expression(encoding, event.data)}"
    )


class AccessLog:
    """Buffered access-log lines for ``path`` (``-``: standard output)."""

    def __init__(self, path: str, reactor: Any, max_backlog: int = MAX_BACKLOG) -> None:
        self.path = path
        self.reactor = reactor
        self.max_backlog = max_backlog
        self.dropped = 0
        self._stamp = _Stamp()
        self._lines: list[str] = []
        self._size = 0
        # Bytes handed to the writer (counted by the reactor thread) and
        # written (by the writer thread): each counter has one writer.
        self._handed = 0
        self._written = 0
        self._flushCall: Any = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file: IO[bytes] | None = None

    # --- the reactor thread ---------------------------------------------------

    def open(self) -> None:
        """Open the file: before twistd daemonizes, so a bad path is one error line."""
        self._file = self._open()

    def start(self) -> None:
        """Start the writer thread (after any fork); opens the file if not yet open."""
        if self._file is None:
            self.open()
        self._thread = threading.Thread(target=self._write, name="access-log", daemon=True)
        self._thread.start()

    def proxyRequest(self, now: float, event: Answered) -> None:
        """The line of one request the proxy answered."""
        self.line(f"{self._stamp(now)} {proxy_fields(now, event)}\n")

    def serverRequest(self, now: float, event: Served) -> None:
        """The line of one request the server answered."""
        self.line(f"{self._stamp(now)} {server_fields(now, event)}\n")

    def line(self, text: str) -> None:
        """Queue one whole line (ending in a newline)."""
        if self._handed - self._written + self._size > self.max_backlog:
            self.dropped += 1
            return
        self._lines.append(text)
        self._size += len(text)
        if self._flushCall is None:
            self._flushCall = self.reactor.callLater(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer thread."""
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if not self._lines:
            return
        chunk = "".join(self._lines).encode("ascii", "backslashreplace")
        self._lines.clear()
        self._size = 0
        self._handed += len(chunk)
        self._queue.put(chunk)
        if self.dropped:
            log.warn(
                "access log {path}: {count} lines dropped, the disk is too slow",
                path=self.path,
                count=self.dropped,
            )
            self.dropped = 0

    def reopen(self) -> None:
        """Close and open the file again, after the lines already written (logrotate)."""
        self.flush()
        self._queue.put(_REOPEN)

    def close(self) -> None:
        """Write what is left and stop the writer (at shutdown; waits for the disk)."""
        self.flush()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(10)
            self._thread = None
        else:
            self._closeFile()  # opened, never started

    # --- the writer thread ------------------------------------------------------

    def _open(self) -> IO[bytes]:
        if self.path == "-":
            return open(1, "ab", buffering=0, closefd=False)
        return open(self.path, "ab")

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    self._closeFile()
                    return
                if item is _REOPEN:
                    if self.path != "-":
                        self._closeFile()
                        self._file = self._open()
                    continue
                if self._file is not None:
                    self._file.write(item)
                    self._file.flush()
                self._written += len(item)
            except OSError as e:
                self.reactor.callFromThread(
                    log.error, "access log {path}: {error}", path=self.path, error=e
                )

    def _closeFile(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


#: Where ``--verbose`` logs (a Logger on a class would take the class's name).
_verbose = Logger(namespace="cacheproxy.requests")


class VerboseLog:
    """``--verbose``: the access log's line of each request, without its time
    stamp (the log adds its own), logged at debug level."""

    def proxyRequest(self, now: float, event: Answered) -> None:
        _verbose.debug("{line}", line=proxy_fields(now, event))

    def serverRequest(self, now: float, event: Served) -> None:
        _verbose.debug("{line}", line=server_fields(now, event))
