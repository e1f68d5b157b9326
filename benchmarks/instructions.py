#!/usr/bin/env python3
"""Count the instructions one request costs, under callgrind: a figure that
does not move with the machine's load, for comparing two versions of the
code (end-to-end CPU time is in ``run.py``).

The services are built by the composition root
(`twisted_cacheproxy.application.compose`), as twistd builds them, and
driven in this one process:

- ``hit-data``: the proxy's protocol fed one hit request at a time through
  ``dataReceived`` on a transport that drops what it is given (our code
  alone, without the reactor or the socket);
- ``hit``, ``allmiss``, ``server``: over loopback TCP with the real reactor
  (the read path, the send-at-once transport, the pool to the server), one
  client connection sending its next request once the answer is in;
- ``canned``: the same client against the peers' canned Twisted server on
  the ``sendatonce:`` endpoint, the floor for ``hit``;
- add ``--operated`` for the proxy with its metrics and an access log
  (``--access-log``), as an operated proxy runs.

Each workload runs twice under ``valgrind --tool=callgrind``, with N requests
and with none; the difference over N is the cost of one request, the
client's share included (the same in both versions compared)::

    python3 benchmarks/instructions.py hit-data hit allmiss server   # needs valgrind
    python3 benchmarks/instructions.py --run hit 2000                # one run, no valgrind

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "kit"))
import mkframes  # noqa: E402  (the kit's request frames, as the course client pickles them)

WORKLOADS = ("hit-data", "hit", "canned", "allmiss", "server")
#: Where the services listen: a free port on loopback.
LOOPBACK = "tcp:0:interface=127.0.0.1"


def hit_frame() -> bytes:
    """``max(2, 3) + 3``, S=1 C=1, any age: the load kit's hit request."""
    return mkframes.frame(mkframes.NAMED["ex2"][1](), True, True, 65535, ts=0)


def miss_frames(n: int) -> list[bytes]:
    """``n`` distinct requests of the hit's shape: every one a miss."""
    return [mkframes.frame(e, True, True, 65535, ts=0) for e in mkframes.random_exprs(n, 2, "max")]


def proxy_options(server_port: int, operated: bool) -> object:
    from twisted_cacheproxy.application.options import ProxyOptions

    config = ProxyOptions()
    args = ["--listen", LOOPBACK, "--server-port", str(server_port)]
    if operated:
        args += ["--access-log", os.devnull]
    config.parseOptions(args)
    return config


class NullTransport:
    """A connected TCP transport that drops what is written to it."""

    disconnecting = False
    connected = True
    TLS = False

    def __init__(self) -> None:
        from twisted.internet.address import IPv4Address

        self.written = 0
        self.address = IPv4Address("TCP", "127.0.0.1", 40000)

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def getPeer(self) -> object:
        return self.address

    getHost = getPeer

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True


def run_hit_data(n: int, operated: bool) -> None:
    """Hits through ``dataReceived``: the proxy's own code on the hit path."""
    from twisted.internet import reactor

    from twisted_cacheproxy.application.compose import makeProxyService

    built = {}

    def listen(config, factory, settings):
        built["factory"] = factory
        from twisted.application import service

        return service.Service()

    makeProxyService(proxy_options(1, operated), reactor, listen)
    factory = built["factory"]
    frame = hit_frame()
    # The answer a hit sends, stored as a miss would have stored it.
    from twisted_cacheproxy.calculator.server import CalculatorServerFactory
    from twisted_cacheproxy.proxy.entry import Entry
    from twisted_cacheproxy.proxy.factory import cache_keys
    from twisted_cacheproxy.transport import wire

    server = CalculatorServerFactory(clock=reactor).buildProtocol(None)
    answered = []
    server.sendMessage = answered.append
    server.makeConnection(NullTransport())
    server.dataReceived(frame)
    (answer,) = answered
    header = wire.decode_header(answer)
    stored = wire.rewrite(answer, ext=wire.EXT_FRAMED | wire.EXT_FROM_CACHE)
    factory.cache.put(cache_keys(frame[12:])[1], Entry(stored, reactor.seconds(), header.max_age))
    client = factory.buildProtocol(None)
    transport = NullTransport()
    client.makeConnection(transport)
    received = client.dataReceived
    for _ in range(n):
        received(frame)
    if n and transport.written != n * len(answer):
        sys.exit(f"expected {n} answers of {len(answer)} bytes, got {transport.written} bytes")


def listen_canned() -> int:
    """The canned Twisted server of the peers, on the ``sendatonce:`` endpoint
    as ours listen: what a hit costs a Twisted service that does nothing."""
    from twisted.internet import endpoints, protocol, reactor

    sys.path.insert(0, os.path.join(HERE, "peers"))
    from canned_twisted import Canned

    endpoint = endpoints.serverFromString(reactor, "sendatonce:0:interface=127.0.0.1")
    ports: list = []
    endpoint.listen(protocol.Factory.forProtocol(Canned)).addCallback(ports.append)
    return ports[0].getHost().port


def run_tcp(workload: str, n: int, operated: bool) -> None:
    """One client connection over loopback TCP, a request at a time."""
    from twisted.application import service
    from twisted.internet import protocol, reactor

    from twisted_cacheproxy.application.compose import (
        endpoint_listener,
        makeProxyService,
        makeServerService,
    )
    from twisted_cacheproxy.application.options import ServerOptions
    from twisted_cacheproxy.transport import wire

    top = service.MultiService()
    config = ServerOptions()
    config.parseOptions(["--listen", LOOPBACK])
    server = makeServerService(config, reactor, endpoint_listener(reactor))
    server.setServiceParent(top)
    top.privilegedStartService()
    top.startService()
    target = getattr(server, "main", server).ports[0].getHost().port
    if workload == "canned":
        target = listen_canned()
    elif workload != "server":
        config = proxy_options(target, operated)
        proxy = makeProxyService(config, reactor, endpoint_listener(reactor))
        proxy.setServiceParent(top)
        proxy.privilegedStartService()
        main = getattr(proxy, "main", proxy)
        target = main.ports[0].getHost().port
    frames = miss_frames(n + 1) if workload == "allmiss" else [hit_frame()] * (n + 1)

    class Client(protocol.Protocol):
        """Sends a warm-up request, then ``n`` more, each once the last is answered."""

        def connectionMade(self) -> None:
            self.buffer = b""
            self.sent = 0
            self.next()

        def next(self) -> None:
            if self.sent > n:
                self.transport.loseConnection()
                return
            self.transport.write(frames[self.sent])
            self.sent += 1

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            whole = len(self.buffer) >= 12
            if whole and len(self.buffer) >= wire.decode_header(self.buffer).length:
                status = wire.status_of(self.buffer)
                if status != wire.OK:
                    sys.exit(f"answer {self.sent}: status {status}")
                self.buffer = b""
                self.next()

        def connectionLost(self, reason: object) -> None:
            reactor.stop()

    protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", target)
    reactor.run()


def count(workload: str, n: int, operated: bool) -> int:
    """Instructions callgrind counts for a run of ``n`` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, __file__, "--run", workload, str(n)]
        command += ["--operated"] if operated else []
        environment = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dicts each run
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode:
            sys.exit(f"{workload} {n}: {done.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", done.stderr)
        if not found:
            sys.exit(f"no count in callgrind's output: {done.stderr[-2000:]}")
        return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("workloads", nargs="*", default=list(WORKLOADS), help=", ".join(WORKLOADS))
    ap.add_argument("-n", type=int, default=4000, help="requests in the counted run")
    ap.add_argument("--operated", action="store_true", help="metrics and an access log")
    ap.add_argument("--run", nargs=2, metavar=("WORKLOAD", "N"), help="one run, no valgrind")
    a = ap.parse_args()
    if a.run:
        workload, n = a.run[0], int(a.run[1])
        if workload == "hit-data":
            run_hit_data(n, a.operated)
        else:
            run_tcp(workload, n, a.operated)
        return 0
    for workload in a.workloads:
        if workload not in WORKLOADS:
            ap.error(f"unknown workload {workload}")
        many, none = count(workload, a.n, a.operated), count(workload, 0, a.operated)
        extra = ", operated" if a.operated else ""
        print(f"{workload}{extra}: {(many - none) / a.n:,.0f} instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
