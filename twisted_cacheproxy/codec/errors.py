"""Error answer data in either encoding, without the calculator: a JSON
object, or a pickled builtin exception that any Python can read. What every
service needs to word its own errors (bad frame, not a request, proxy 500)."""

from __future__ import annotations

import builtins
import json
import pickle

from .base import LEGACY, PROTOCOL


def _builtin_exception(kind: str) -> type[BaseException]:
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return ValueError


def encode_error(encoding: str, kind: str, message: str) -> bytes:
    """Response data for an error, in the encoding of its request."""
    if encoding == LEGACY:
        return pickle.dumps(_builtin_exception(kind)(message), PROTOCOL)
    return json.dumps({"error": message, "type": kind}, ensure_ascii=False).encode()
