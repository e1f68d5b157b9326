#!/usr/bin/env python3
"""A naive threaded calculator server, a peer for the benchmark: written the
way the exercise's server is (a thread per connection, blocking sockets, the
answer computed where the request is read), framing by length as
`naive_wire` says.

It reads, evaluates and encodes with this package's calculator, as the
course server uses its own ``calculator`` module, so that what it costs
beside ours is the serving, not the arithmetic. Each connection keeps its own
`ShapeMemo`, so a pickle of a shape it has read before is built from its
numbers, as our server does. No limits, no idle timeout, no metrics.

    python3 benchmarks/peers/naive_server.py --port 9999
"""

from __future__ import annotations

import argparse
import socket
import time

import naive_wire as w

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.expression import (
    CalculationError,
    evaluate,
    evaluate_with_steps,
    is_deterministic,
)

#: Room for the steps in an 8192-byte answer, as our server keeps by default.
STEPS_BUDGET = 8192 - w.HEADER_SIZE - 256


def answer(request: bytes, shapes: codec.ShapeMemo) -> bytes:
    """The whole answer to one request message."""
    steps = bool(w.HEADER.unpack_from(request)[2] & w.STEPS)
    data = request[w.HEADER_SIZE :]
    encoding = codec.encoding_of(data)
    try:
        node = codec.decode_request(data, shapes=shapes)
        if steps:
            value, step_list = evaluate_with_steps(node, STEPS_BUDGET)
        else:
            value, step_list = evaluate(node), []
        payload = codec.encode_result(encoding, value, step_list)
        status, cache = w.OK, is_deterministic(node)
    except CalculationError as e:
        payload = codec.encode_error(encoding, e.kind, str(e))
        status, cache, steps = w.BAD_REQUEST, False, False
    except Exception as e:  # the course server answers whatever goes wrong
        payload = codec.encode_error(encoding, "RuntimeError", str(e))
        status, cache, steps = w.SERVER_ERROR, False, False
    header = w.HEADER.pack(
        int(time.time()),
        w.HEADER_SIZE + len(payload),
        w.flags(status, cache, steps),
        w.FOREVER if cache else 0,
    )
    return header + payload


def handle(conn: socket.socket) -> None:
    """Answer every request on one connection, in order."""
    shapes = codec.ShapeMemo()
    for request in w.messages(conn):
        conn.sendall(answer(request, shapes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9999)
    w.serve(ap.parse_args().port, handle)


if __name__ == "__main__":
    main()
