"""Stand-in implementations for the calc-check tests: a calculator server
and a caching proxy written the way a student might, on plain blocking
sockets with a thread per connection, correct by PROTOCOL.md sections 1-5
and without section 6; and subclasses, each with one deliberate bug.

Each listens on an ephemeral port of 127.0.0.1 from ``start`` (or ``with``)
until ``stop``. The arithmetic is the package's, so what calc-check judges
in them is the protocol around it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.expression import (
    CalculationError,
    evaluate,
    evaluate_with_steps,
    is_deterministic,
)
from twisted_cacheproxy.transport import wire

HOST = "127.0.0.1"
LIMIT = wire.MAX_MESSAGE_SIZE


def recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None if the peer closes first."""
    chunks = []
    while size:
        chunk = conn.recv(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class Server:
    """A calculator server, one thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.conns: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.stopped = threading.Event()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):
        self._thread(self.accept_loop)
        return self

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in list(self.conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(5)

    def _thread(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._thread(self.guarded, conn)

    def guarded(self, conn: socket.socket) -> None:
        self.conns.add(conn)
        try:
            self.serve(conn)
        except OSError:
            pass
        finally:
            self.conns.discard(conn)
            conn.close()

    def serve(self, conn: socket.socket) -> None:
        while (message := self.receive(conn)) is not None:
            conn.sendall(self.answer(*message))

    def receive(self, conn: socket.socket) -> tuple[wire.Header, bytes] | None:
        """The next request by its total length; a 400 and None (close) for
        an impossible length."""
        head = recv_exactly(conn, wire.HEADER_SIZE)
        if head is None:
            return None
        header = wire.decode_header(head)
        if not wire.HEADER_SIZE <= header.length <= LIMIT:
            conn.sendall(self.error(header, codec.TEXT, "ValueError", "impossible length"))
            return None
        data = recv_exactly(conn, header.length - wire.HEADER_SIZE)
        return None if data is None else (header, data)

    def answer(self, header: wire.Header, data: bytes) -> bytes:
        encoding = codec.encoding_of(data)
        if not header.request:
            return self.error(header, encoding, "ValueError", "not a request")
        try:
            node = codec.decode_request(data)
            if header.steps:
                value, steps = evaluate_with_steps(node, 1 << 16)
            else:
                value, steps = evaluate(node), []
        except CalculationError as e:
            return self.error(header, encoding, e.kind, str(e))
        cache = is_deterministic(node)
        payload = codec.encode_result(encoding, value, steps)
        return self.message(header, wire.OK, payload, steps=header.steps, cache=cache)

    def error(self, header: wire.Header, encoding: str, kind: str, message: str) -> bytes:
        payload = codec.encode_error(encoding, kind, message)
        return self.message(header, self.error_status, payload)

    error_status = wire.BAD_REQUEST

    def message(
        self, request: wire.Header, status: int, payload: bytes, *, steps=False, cache=False
    ) -> bytes:
        flags = wire.make_flags(request=False, status=status, cache=cache, steps=steps)
        max_age = wire.FOREVER if cache else 0
        return wire.encode(self.stamp(), flags, max_age, payload, self.ext(request))

    def stamp(self) -> int:
        return int(time.time())

    def ext(self, request: wire.Header) -> int:
        """Bytes 10-11 of an answer: padding, as the course programs send it."""
        return 0


# --- servers with one bug each ------------------------------------------------------


class OneRecvServer(Server):
    """framing: takes one recv(4096) as one message, as the course server does."""

    def receive(self, conn):
        chunk = conn.recv(4096)
        if not chunk:
            return None
        if len(chunk) < wire.HEADER_SIZE:
            return wire.Header(0, len(chunk), wire.FLAG_REQUEST, 0), chunk
        return wire.decode_header(chunk), chunk[wire.HEADER_SIZE :]


class AlwaysStepsServer(Server):
    """payload: sends the steps whether asked or not."""

    def answer(self, header, data):
        return super().answer(header._replace(flags=header.flags | wire.FLAG_STEPS), data)


class PickleOnlyServer(Server):
    """payload: reads only pickles, the course client's encoding (text is a 400)."""

    def answer(self, header, data):
        if codec.encoding_of(data) == codec.TEXT:
            return self.error(header, codec.TEXT, "ValueError", "unsupported payload")
        return super().answer(header, data)


class EnumsByValueServer(Server):
    """payload: its restricted unpickler admits ``getattr`` only for rand, so
    an Associativity pickled by name (as on Debian 12's Python) is a 400."""

    def answer(self, header, data):
        if b"\x8c\x07getattr" in data and b"\x8c\x07uniform" not in data:
            return self.error(header, codec.LEGACY, "ValueError", "getattr is only for rand")
        return super().answer(header, data)


class ErrorsAre200Server(Server):
    """errors: answers errors with status 200."""

    error_status = wire.OK


class ZeroStampServer(Server):
    """header: stamps every answer 0."""

    def stamp(self):
        return 0


class OneClientServer(Server):
    """connection: serves one connection at a time, in the accepting thread."""

    def accept_loop(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.guarded(conn)


class UntaggedServer(Server):
    """ext: sets L but never echoes the request's tag."""

    def ext(self, request):
        return wire.EXT_FRAMED


class SilentServer(Server):
    """Reads everything and never answers."""

    def serve(self, conn):
        while conn.recv(4096):
            pass


# --- the caching proxy ------------------------------------------------------------


class Proxy(Server):
    """A caching proxy in front of 127.0.0.1:``upstream_port``: one new
    server connection per miss (5 s timeout), answers stored by data and S."""

    timeout = 5.0

    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream = (HOST, upstream_port)
        self.cache: dict[tuple[bool, bytes], tuple[bytes, float, int]] = {}
        self.lock = threading.Lock()

    def answer(self, header, data):
        if not header.request:
            return self.error(header, codec.encoding_of(data), "ValueError", "not a request")
        key = (header.steps, data)
        if header.cache and header.max_age:
            hit = self.lookup(key, header.max_age)
            if hit is not None:
                return hit
        try:
            answer = self.fetch(header, data)
        except OSError as e:
            answer = self.unreachable(header, data, e)
        if header.cache:
            self.store(key, answer)
        return answer

    def lookup(self, key, max_age: int) -> bytes | None:
        with self.lock:
            entry = self.cache.get(key)
        if entry is None:
            return None
        answer, stored, lifetime = entry
        age = time.monotonic() - stored
        if lifetime != wire.FOREVER and age >= lifetime:
            return None
        if max_age != wire.FOREVER and age >= max_age:
            return None
        return self.restamp(answer, age, lifetime)

    def restamp(self, answer: bytes, age: float, lifetime: int) -> bytes:
        if lifetime == wire.FOREVER:
            return answer
        return wire.rewrite(answer, max_age=max(1, int(lifetime - age)))

    def store(self, key, answer: bytes) -> None:
        header = wire.decode_header(answer)
        if self.storable(header):
            with self.lock:
                self.cache[key] = (answer, time.monotonic(), self.lifetime(header))

    def storable(self, header: wire.Header) -> bool:
        return header.cache and header.max_age > 0 and header.status < wire.SERVER_ERROR

    def lifetime(self, header: wire.Header) -> int:
        return header.max_age

    def fetch(self, header, data) -> bytes:
        with socket.create_connection(self.upstream, timeout=self.timeout) as s:
            s.sendall(wire.HEADER.pack(*header) + data)
            head = recv_exactly(s, wire.HEADER_SIZE)
            if head is None:
                raise ConnectionError("the server closed the connection without answering")
            body = recv_exactly(s, wire.decode_header(head).length - wire.HEADER_SIZE)
            if body is None:
                raise ConnectionError("the server closed the connection in mid-answer")
            return head + body

    def unreachable(self, header, data, why: OSError) -> bytes:
        payload = codec.encode_error(codec.encoding_of(data), "ConnectionError", str(why))
        return self.message(header, wire.SERVER_ERROR, payload)


# --- proxies with one bug each --------------------------------------------------------


class StoresNoCacheProxy(Proxy):
    """cache: stores answers marked C=0 (it only looks at the cache control)."""

    def storable(self, header):
        return header.max_age > 0 and header.status < wire.SERVER_ERROR


class NoRewriteProxy(Proxy):
    """cache: serves hits with the lifetime the server gave, however old."""

    def restamp(self, answer, age, lifetime):
        return answer


class KeepsForeverProxy(Proxy):
    """cache: keeps every answer for ever, past its lifetime and past the
    age a request accepts."""

    def lifetime(self, header):
        return wire.FOREVER

    def lookup(self, key, max_age):
        return super().lookup(key, wire.FOREVER)


class StoresEverythingProxy(Proxy):
    """cache: keeps every answer below 500 for a minute, whatever its C bit
    and lifetime, and serves it even to a request for a fresh one (max-age 0)."""

    def answer(self, header, data):
        if header.cache and header.max_age == 0:
            hit = self.lookup((header.steps, data), wire.FOREVER)
            if hit is not None:
                return hit
        return super().answer(header, data)

    def storable(self, header):
        return header.status < wire.SERVER_ERROR

    def lifetime(self, header):
        return 60


class CachesErrorsProxy(Proxy):
    """cache: keeps every error answer for a minute, its own 500s included."""

    def storable(self, header):
        return header.status >= wire.BAD_REQUEST or super().storable(header)

    def lifetime(self, header):
        return header.max_age if header.status == wire.OK else 60


class HangsWhenDownProxy(Proxy):
    """cache: retries a server that refuses connections, forever."""

    def fetch(self, header, data):
        while True:
            try:
                return super().fetch(header, data)
            except ConnectionRefusedError:
                if self.stopped.wait(0.5):
                    raise
