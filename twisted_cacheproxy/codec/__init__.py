"""Payload encodings: request data to an expression, answers to response data.

Two encodings, told apart by the first byte of the request data: ``0x80`` (a
pickle PROTO opcode) is the course programs' legacy pickle encoding
(`legacy`, after the opcode pre-scan of `prescan`), anything else is UTF-8
text answered with JSON (`text`). These are the entry points the rest of the
package uses. What a service needs to word its own errors (`encoding_of`,
`encode_error`) loads at once; the rest, which needs the calculator's
expression model, loads on first use, so that the proxy never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import LEGACY, TEXT, RemoteError, encoding_of
from .errors import encode_error

if TYPE_CHECKING:
    from . import legacy, prescan, shapes, text
    from .entry import decode_request, decode_response, encode_request, encode_result
    from .legacy import Associativity
    from .prescan import MAX_OPCODES, MAX_REDUCES
    from .shapes import ShapeMemo

__all__ = [
    "LEGACY",
    "MAX_OPCODES",
    "MAX_REDUCES",
    "TEXT",
    "Associativity",
    "RemoteError",
    "ShapeMemo",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
    "encoding_of",
    "legacy",
    "prescan",
    "shapes",
    "text",
]

#: Where each name loaded on first use lives.
_LATER = {
    "decode_request": "entry",
    "decode_response": "entry",
    "encode_request": "entry",
    "encode_result": "entry",
    "Associativity": "legacy",
    "ShapeMemo": "shapes",
    "MAX_OPCODES": "prescan",
    "MAX_REDUCES": "prescan",
}


def __getattr__(name: str) -> Any:
    """Load an entry point (or an encoding's module) on first use."""
    if name in ("legacy", "prescan", "shapes", "text", "entry"):
        return importlib.import_module(f".{name}", __name__)
    if name in _LATER:
        value = getattr(importlib.import_module(f".{_LATER[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
