#!/usr/bin/env python3
"""A naive threaded caching proxy, a peer for the benchmark: written the way
the exercise's proxy is (a thread per client connection, blocking sockets, a
dict cache), framing by length as `naive_wire` says.

The cache is keyed by the request's data and its S flag and honours the
protocol's cache rules simply: only C=1 requests are served from it or
stored, an answer is kept if it says C=1 with a cache control above 0 and
for at most that many seconds, and a request's cache control is the oldest
answer it accepts (0: fetch afresh). Misses go to the server over one
blocking connection per client thread, opened at the first miss. No size
bound, no pipelining, no metrics.

    python3 benchmarks/peers/naive_proxy.py --port 9998 --server-port 9999
"""

from __future__ import annotations

import argparse
import socket
import time

import naive_wire as w

from twisted_cacheproxy.transport.payload import encode_error, encoding_of

#: (request data, S flag) -> (answer, when stored, its cache control).
cache: dict[tuple[bytes, int], tuple[bytes, float, int]] = {}


def cached(key: tuple[bytes, int], oldest: int) -> bytes | None:
    """The stored answer for ``key`` if it is fresh and no older than ``oldest``."""
    entry = cache.get(key)
    if entry is None:
        return None
    answer, stored, max_age = entry
    age = time.time() - stored
    if max_age != w.FOREVER and age >= max_age:
        cache.pop(key, None)
        return None
    if oldest != w.FOREVER and age >= oldest:
        return None
    return answer


def unreachable(request: bytes, reason: str) -> bytes:
    """The 500 answer sent when the server gave none."""
    payload = encode_error(encoding_of(request[w.HEADER_SIZE :]), "ConnectionError", reason)
    header = w.HEADER.pack(int(time.time()), w.HEADER_SIZE + len(payload), w.SERVER_ERROR, 0)
    return header + payload


class Upstream:
    """One client thread's blocking connection to the server."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.answers = iter(())

    def ask(self, request: bytes) -> bytes:
        """The server's answer to ``request``, or a 500 if it gave none."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address)
                self.answers = w.messages(self.sock)
            self.sock.sendall(request)
            answer = next(self.answers, None)
        except OSError as e:
            answer, reason = None, str(e)
        else:
            reason = "the server closed the connection"
        if answer is None:
            self.close()
            return unreachable(request, reason)
        return answer

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def handler(server: tuple[str, int]):
    """What each client connection's thread runs."""

    def handle(conn: socket.socket) -> None:
        upstream = Upstream(server)
        try:
            for request in w.messages(conn):
                _, _, flags, oldest = w.HEADER.unpack_from(request)
                key = (request[w.HEADER_SIZE :], flags & w.STEPS)
                answer = cached(key, oldest) if flags & w.CACHE else None
                if answer is None:
                    answer = upstream.ask(request)
                    _, _, answer_flags, max_age = w.HEADER.unpack_from(answer)
                    if flags & w.CACHE and answer_flags & w.CACHE and max_age > 0:
                        cache[key] = (answer, time.time(), max_age)
                conn.sendall(answer)
        finally:
            upstream.close()

    return handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9998)
    ap.add_argument("--server-host", default="127.0.0.1")
    ap.add_argument("--server-port", type=int, default=9999)
    a = ap.parse_args()
    w.serve(a.port, handler((a.server_host, a.server_port)))


if __name__ == "__main__":
    main()
