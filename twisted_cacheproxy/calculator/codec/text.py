"""The text encoding (PROTOCOL.md 3.1): infix expressions in, JSON answers out."""

from __future__ import annotations

import json
import math
from typing import Any

from ..expression import CalculationError, Node, Real, format_node
from ..parser import parse
from .base import RemoteError, shown


def decode_request(data: bytes) -> Node:
    """The expression of text request data; `CalculationError` if refused."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalculationError(f"request is not UTF-8 text: {e.reason}") from None
    return parse(text)


def encode_request(node: Node) -> bytes:
    """Text request data for ``node``."""
    return format_node(node).encode()


def _json_number(value: Real) -> Real | str:
    if type(value) is float and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    return value


def encode_result(value: Real, steps: list[str]) -> bytes:
    """JSON answer data for a successful calculation."""
    return json.dumps({"result": _json_number(value), "steps": steps}, ensure_ascii=False).encode()


def decode_answer(data: bytes) -> Any:
    """A JSON answer as ``(result, steps)`` (or whatever else it holds, for
    the caller to refuse); `RemoteError` for an error answer or bad JSON."""
    try:
        answer = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise RemoteError("UnreadableAnswer", f"cannot read the answer: {e}") from None
    if isinstance(answer, dict) and "error" in answer:
        raise RemoteError(shown(answer.get("type", "Error")), shown(answer["error"]))
    if isinstance(answer, dict) and "result" in answer:
        return (answer["result"], answer.get("steps", []))
    return answer
