"""What the proxy tells its observer (`interfaces.IProxyObserver`): one
`Answered` per request, saying how the proxy decided its answer.

The cache status is decided where the proxy decides it, never recovered
afterwards from the answer's bytes:

- ``hit``: a fresh stored answer, from memory;
- ``shared``: a miss in memory answered by the shared tier (memcached);
- ``miss``: asked of the server;
- ``coalesced``: waited for an identical miss already on its way;
- ``stale``: the server could not answer, a stored answer past its
  lifetime was served (``--stale-if-error``);
- ``bypass``: asked with C=0, or not a request: the cache was not used;
- ``reload``: asked with max-age 0: fetched fresh, the stored one replaced.
"""

from __future__ import annotations

from typing import Any

from ..transport.wire import Header
from .failures import UpstreamError

HIT, SHARED, MISS, COALESCED, STALE, BYPASS, RELOAD = (
    "hit",
    "shared",
    "miss",
    "coalesced",
    "stale",
    "bypass",
    "reload",
)
#: Every cache status, in the order figures show them.
CACHE_STATUSES = (HIT, SHARED, MISS, COALESCED, STALE, BYPASS, RELOAD)


class Answered:
    """One request the proxy answered, and how.

    ``upstream`` is how long this request's own trip to the server took
    (None when it made none: a hit, or a waiter on another's miss);
    ``failure`` is why that trip got no answer (None when it did)."""

    __slots__ = ("answer", "client", "data", "failure", "header", "started", "status", "upstream")

    def __init__(
        self,
        status: str,
        started: float,
        header: Header,
        data: bytes,
        client: Any,
        answer: bytes = b"",
    ) -> None:
        self.status = status
        #: When the request arrived, on the proxy's clock.
        self.started = started
        self.header = header
        self.data = data
        #: The client's protocol (`ServiceProtocol.peer` is its address).
        self.client = client
        self.answer = answer
        self.upstream: float | None = None
        self.failure: UpstreamError | None = None
