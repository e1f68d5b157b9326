"""Calculator servers of our own that stand in for the real one, over real
TCP on 127.0.0.1: `StandIn`, in threads, misbehaves on purpose (late
batches, duplicated answers, a course server's one-``recv`` reading);
`CountingServer`, on the reactor, counts every connection, request and
answer and can hold answers back."""

from __future__ import annotations

import socket
import threading
import time

from processes import HOST, raw, read_message
from twisted.internet import defer, protocol

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.server import CalculatorServerFactory
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.framing import FrameReceiver

#: The result of the answer a `StandIn` with ``speaks_first`` sends unasked.
STRAY = 424242


class StandIn:
    """A calculator server in a thread that misbehaves on purpose. Every
    answer is computed right (by our own evaluator) for the request it
    answers; what goes wrong is when and how often it is sent:

    - ``framed``: set L and echo tags (our server) or not (a course server);
    - ``duplicate``: send every answer a second time ``duplicate`` s later;
    - ``hold``: answer the first request of a connection at once, then keep
      its answers and send them all in one write ``hold`` seconds after the
      first of them arrived;
    - ``course``: read one ``recv`` as one message, as the course server
      does (never L), and note in ``violations`` every ``recv`` that did not
      hold exactly one whole request and every second request on a connection;
    - ``speaks_first``: as each of its first ``speaks_first`` connections
      opens, send an answer nobody asked for (L, tag 1, result `STRAY`);
    - ``status``: send every answer with this status code instead;
    - ``gate``: count each request as it arrives, then answer none until
      the event is set (misses held in flight for as long as a test needs).
    """

    def __init__(
        self,
        *,
        framed: bool,
        duplicate: float = 0.0,
        hold: float = 0.0,
        course: bool = False,
        speaks_first: int = 0,
        status: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.framed = framed and not course
        self.duplicate = duplicate
        self.hold = hold
        self.course = course
        self.speaks_first = speaks_first
        self.status = status
        self.gate = gate
        self.violations: list[str] = []
        self.calculator = CalculatorServerFactory()
        self.requests = 0
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self._spawn(self._serve, conn)

    def answer(self, header: wire.Header, data: bytes) -> bytes:
        answer = self.calculator.answer(header, data, codec.encoding_of(data), int(time.time()))
        if self.status is not None:
            answer = wire.rewrite(answer, flags=wire.make_flags(request=False, status=self.status))
        return answer if self.framed else answer[:10] + b"\x00\x00" + answer[12:]

    def _serve_course(self, conn: socket.socket) -> None:
        """One ``recv`` is one message; a connection is meant for one request."""
        conn.settimeout(0.2)
        received = 0
        with conn:
            while not self.stopping:
                try:
                    chunk = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                received += 1
                if received > 1:
                    self.violations.append(f"request {received} on one connection")
                header = wire.decode_header(chunk)
                if header.length != len(chunk):
                    self.violations.append(
                        f"one recv of {len(chunk)} bytes, {header.length} framed"
                    )
                self.requests += 1
                try:
                    conn.sendall(self.answer(header, chunk[wire.HEADER_SIZE : header.length]))
                except OSError:
                    return

    def _serve(self, conn: socket.socket) -> None:
        if self.course:
            self._serve_course(conn)
            return
        held: list[bytes] = []
        deadline = None
        answered = 0
        conn.settimeout(0.002 if self.hold else 0.2)
        with conn:
            if self.speaks_first > 0:
                self.speaks_first -= 1
                payload = codec.encode_result(codec.TEXT, STRAY, [])
                flags = wire.make_flags(request=False, status=wire.OK, cache=True)
                stray = wire.encode(int(time.time()), flags, wire.FOREVER, payload, 1 | 1 << 3)
                conn.sendall(stray)
            while not self.stopping:
                try:
                    header, data = read_message(conn)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        conn.sendall(b"".join(held))
                        held, deadline = [], None
                    continue
                except OSError:
                    return
                self.requests += 1
                if self.gate is not None:
                    self.gate.wait()
                answered += 1
                answer = self.answer(header, data)
                if self.hold and answered > 1:
                    held.append(answer)
                    deadline = deadline or time.monotonic() + self.hold
                    continue
                try:
                    conn.sendall(answer)
                    if self.duplicate:
                        time.sleep(self.duplicate)
                        conn.sendall(answer)
                except OSError:
                    return

    def close(self) -> None:
        self.stopping = True
        if self.gate is not None:
            self.gate.set()
        self.listener.close()
        for t in self.threads:
            t.join(2)


class CountingProtocol(FrameReceiver):
    """One connection to a `CountingServer`."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections += 1

    answered = 0

    def frameReceived(self, header: wire.Header, data: bytes) -> None:
        f = self.factory
        f.requests.append(raw((header, data)))
        if f.answers_per_connection and self.answered >= f.answers_per_connection:
            # As if this connection had been closed while idle, just before the request.
            self.transport.loseConnection()
            return
        self.answered += 1
        now = int(f.clock.seconds())
        frame = f.calculator.answer(header, data, codec.TEXT, now)
        f.sent.append(frame[:10] + b"\x00\x00" + frame[12:])
        if f.held is not None:
            f.held.append((self.transport, frame))
            if len(f.held) >= f.hold_until:
                held, f.held = f.held, None
                for transport, answer in held:
                    transport.write(answer)
        elif f.delay:
            f.clock.callLater(f.delay, self.transport.write, frame)
        else:
            self.transport.write(frame)


class CountingServer(protocol.Factory):
    """A calculator server that records every connection, request and answer,
    and can hold each answer back for ``delay`` seconds, or (`hold`) every
    answer until it has a given number of them."""

    protocol = CountingProtocol

    def __init__(self, delay: float = 0.0, answers_per_connection: int = 0) -> None:
        from twisted.internet import reactor

        self.clock = reactor
        self.delay = delay
        self.held: list[tuple] | None = None
        self.hold_until = 0
        self.answers_per_connection = answers_per_connection
        self.calculator = CalculatorServerFactory(clock=reactor)
        self.connections = 0
        self.requests: list[bytes] = []
        self.sent: list[bytes] = []
        self.port = None

    def hold(self, count: int) -> None:
        """Send no answer until ``count`` more are ready, then all of them."""
        self.held, self.hold_until = [], count

    def listen(self) -> int:
        from twisted.internet import reactor

        self.port = reactor.listenTCP(0, self, interface=HOST)
        return self.port.getHost().port

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)
