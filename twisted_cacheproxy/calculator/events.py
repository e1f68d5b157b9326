"""What the server tells its observer: one `Served` per request, and the
interface an observer provides (`IServerObserver`; the operations layer's
`ServerMetrics` is one)."""

from __future__ import annotations

from typing import Any

from zope.interface import Interface

from ..transport.wire import Header


class Served:
    """One request the server answered: in which encoding, since when, and
    with which answer."""

    __slots__ = ("answer", "client", "data", "encoding", "header", "started")

    def __init__(
        self,
        encoding: str,
        started: float,
        header: Header,
        data: bytes,
        client: Any,
        answer: bytes,
    ) -> None:
        self.encoding = encoding
        #: When the request arrived, on the server's clock.
        self.started = started
        self.header = header
        self.data = data
        #: The client's protocol (`ServiceProtocol.peer` is its address).
        self.client = client
        self.answer = answer


class IServerObserver(Interface):
    """Told of every answer the server sends."""

    def served(event: Served) -> None:
        """The server sent the answer to one request."""
