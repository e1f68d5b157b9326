#!/usr/bin/env python3
"""The framework's ceiling, a peer for the benchmark: the simplest Twisted
server for the protocol. It frames requests by their total length and
answers each with the same fixed 60-byte answer as the load kit's C
yardstick (``kit/limit_server.c``): a course server's answer to
``max(2, 3) + 3`` with steps. It reads nothing else and computes nothing, so
what a request costs it is Twisted's own handling of a read and a write.

By default it listens with Twisted's own TCP transport, whose writes wait
for the reactor's next turn. ``--send-at-once`` listens on this package's
``sendatonce:`` endpoint instead, whose writes go out at once, as our
services' do: the ceiling of a Twisted service on the same transport as ours.

    python3 benchmarks/peers/canned_twisted.py --port 9999 [--send-at-once]
"""

from __future__ import annotations

import argparse
import pickle
import struct
import sys
import time

from twisted.internet import endpoints, protocol

#: C=1 S=1 T=0 status 200, cache control 65535, and a protocol-4 pickle of
#: ``(6, ['max(2, 3) + 3', '3 + 3', '6'])``: 60 bytes, as the C yardstick's.
PAYLOAD = pickle.dumps((6, ["max(2, 3) + 3", "3 + 3", "6"]), protocol=4)
ANSWER = struct.pack("!LHHHxx", int(time.time()), 12 + len(PAYLOAD), 0x1800 | 200, 65535) + PAYLOAD
HEADER_SIZE = 12


class Canned(protocol.Protocol):
    """Answers every whole request in what has arrived, in one write."""

    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        count = start = 0
        while len(buffer) - start >= HEADER_SIZE:
            length = int.from_bytes(buffer[start + 4 : start + 6], "big")
            if length < HEADER_SIZE:
                self.transport.loseConnection()
                return
            if len(buffer) - start < length:
                break
            start += length
            count += 1
        self.buffer = buffer[start:]
        if count:
            self.transport.write(ANSWER * count)


def main() -> None:
    from twisted.internet import reactor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9999)
    ap.add_argument("--send-at-once", action="store_true", help="the sendatonce: endpoint")
    a = ap.parse_args()
    kind = "sendatonce" if a.send_at_once else "tcp"
    endpoint = endpoints.serverFromString(reactor, f"{kind}:{a.port}:interface=127.0.0.1")
    failures: list = []
    endpoint.listen(protocol.Factory.forProtocol(Canned)).addErrback(failures.append)
    if failures:  # a TCP port listens, or fails to, at once
        sys.exit(f"canned_twisted: {failures[0].getErrorMessage()}")
    reactor.run()


if __name__ == "__main__":
    main()
