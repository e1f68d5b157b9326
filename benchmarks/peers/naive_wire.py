"""What the naive threaded peers share, in the style of the exercise's own
programs: the header packed with ``struct``, blocking sockets, and a thread
per connection.

One thing differs from the course programs on purpose: a message is read by
its total length, however the bytes arrive, where they read one ``recv`` as
one message. Under the benchmark's load (and on any busy machine) a message
can come in two reads or two in one, and a peer that answers wrongly is no
yardstick. Each connection keeps one buffer and reads 64 KB at a time, so a
message still costs one ``recv`` in the usual case, as in the course.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

#: Time stamp, total length, flags, cache control, two bytes of padding.
HEADER = struct.Struct("!LHHHxx")
HEADER_SIZE = HEADER.size
CACHE = 1 << 12
STEPS = 1 << 11
REQUEST = 1 << 10
STATUS = 0x3FF
FOREVER = 65535
OK, BAD_REQUEST, SERVER_ERROR = 200, 400, 500


def flags(status: int, cache: bool, steps: bool) -> int:
    """The flags word of an answer."""
    return status | (CACHE if cache else 0) | (STEPS if steps else 0)


def messages(sock: socket.socket) -> Iterator[bytes]:
    """The whole messages arriving on ``sock``, header included, until the
    peer closes it (or sends a length below the header's, which cannot be
    framed)."""
    buffer = b""
    while True:
        while len(buffer) >= HEADER_SIZE:
            length = HEADER.unpack_from(buffer)[1]
            if length < HEADER_SIZE:
                return
            if len(buffer) < length:
                break
            message, buffer = buffer[:length], buffer[length:]
            yield message
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffer += chunk


def serve(port: int, handle: Callable[[socket.socket], None]) -> None:
    """Accept connections on 127.0.0.1:``port`` for ever, each handled by
    ``handle`` in a thread of its own that closes it afterwards."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(socket.SOMAXCONN)

    def run(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # OSError: the client went away
            handle(conn)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()
