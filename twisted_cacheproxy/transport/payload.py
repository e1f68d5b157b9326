"""The two payload encodings as the transport sees them, without the
calculator: their names, how a request tells which it uses (its first data
byte), and the error answers every service words itself in either one."""

from __future__ import annotations

import builtins
import json
import pickle

TEXT = "text"
LEGACY = "legacy"
#: The first byte of legacy data: a pickle PROTO opcode.
LEGACY_MARK = b"\x80"
#: Pickle protocol of our legacy answers and requests (Python 3.4+ reads it).
PROTOCOL = 4


def encoding_of(data: bytes) -> str:
    """The encoding of a request, from its first byte."""
    return LEGACY if data[:1] == LEGACY_MARK else TEXT


def _builtin_exception(kind: str) -> type[BaseException]:
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return ValueError


def encode_error(encoding: str, kind: str, message: str) -> bytes:
    """Response data for an error, in the encoding of its request: a JSON
    object, or a pickled builtin exception that any Python can read."""
    if encoding == LEGACY:
        return pickle.dumps(_builtin_exception(kind)(message), PROTOCOL)
    return json.dumps({"error": message, "type": kind}, ensure_ascii=False).encode()
