"""Payload encodings: request data to an expression, answers to response data.

Two encodings, told apart by the first byte of the request data
(`transport.payload.encoding_of`): ``0x80`` (a pickle PROTO opcode) is the
course programs' legacy pickle encoding (`legacy`, after the opcode
pre-scan of `prescan`), anything else is UTF-8 text answered with JSON
(`text`). These entry points pick the encoding's module.
"""

from __future__ import annotations

from ...transport.payload import LEGACY, TEXT, encode_error, encoding_of
from ..expression import CalculationError, Node, Real
from . import legacy, text
from .base import RemoteError, brief, shown
from .shapes import ShapeMemo

__all__ = [
    "LEGACY",
    "TEXT",
    "RemoteError",
    "ShapeMemo",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
    "encoding_of",
]


def decode_request(data: bytes, *, shapes: ShapeMemo | None = None) -> Node:
    """The expression carried by request data; `CalculationError` if refused.
    A server passes its `ShapeMemo` so that legacy data of a shape it has
    read before is built directly; without one nothing is remembered."""
    if not data:
        raise CalculationError("empty request", "SyntaxError")
    if encoding_of(data) == LEGACY:
        return legacy.decode_request(data) if shapes is None else shapes.decode(data)
    return text.decode_request(data)


def encode_request(node: Node, encoding: str = TEXT) -> bytes:
    """Request data for ``node``; legacy data is pickled exactly the way the
    course client pickles its ``calculator`` objects."""
    return legacy.encode_request(node) if encoding == LEGACY else text.encode_request(node)


def encode_result(encoding: str, value: Real, steps: list[str]) -> bytes:
    """Response data for a successful calculation."""
    if encoding == LEGACY:
        return legacy.encode_result(value, steps)
    return text.encode_result(value, steps)


def decode_response(data: bytes) -> tuple[Real, list[str]]:
    """The result and steps of an answer; `RemoteError` for an error answer
    or for data that cannot be read."""
    answer = legacy.decode_answer(data) if encoding_of(data) == LEGACY else text.decode_answer(data)
    if type(answer) is not tuple or len(answer) != 2 or not isinstance(answer[1], list):
        raise RemoteError("UnreadableAnswer", f"unexpected answer {brief(answer)}")
    value = answer[0]
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        value = float(value)
    if type(value) not in (int, float):
        raise RemoteError("UnreadableAnswer", f"unexpected answer {brief(answer)}")
    return value, [shown(s) for s in answer[1]]
