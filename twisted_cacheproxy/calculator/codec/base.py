"""What both payload encodings share beyond the transport's view of them
(`transport.payload`): the error a client reads back, and how values from a
peer are shown."""

from __future__ import annotations

import reprlib
from typing import Any


class RemoteError(Exception):
    """An error answer read back by a client: its type name and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3  # a nest of shared tuples costs at most 6 ** 3 items
_SHORT.maxdict = 0  # reprlib sorts all of a dict's keys to show a few


def brief(value: Any) -> str:
    """A short ``repr`` of something from a peer, at a bounded cost (the
    plain ``repr`` of a nest of shared tuples takes forever)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's int-to-string limit
        return f"<{type(value).__name__}>"


def shown(value: Any) -> str:
    """A string as itself, anything else as `brief` shows it."""
    return value if type(value) is str else brief(value)
