"""What can go wrong on the way to a server: `UpstreamError` and its kinds,
which the proxy decides on, its observer is told of and the figures count."""

from __future__ import annotations

#: What can go wrong on the way to a server (`UpstreamError.kind`), in the
#: order figures show them.
FAILURE_KINDS = ("unreachable", "timeout", "closed", "invalid", "overloaded", "internal")


class UpstreamError(Exception):
    """The server could not give an answer; the message says why, for the client.

    ``kind`` says what went wrong, for a balancer choosing whether another
    server may be tried and for the figures: ``unreachable`` (no
    connection), ``timeout`` (sent, no answer in time), ``closed`` (closed
    before answering), ``invalid`` (a broken, out-of-step or impossible
    answer), ``overloaded`` (too many waiting here) or ``internal`` (a fault
    of the proxy's own)."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind
