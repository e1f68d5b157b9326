"""The answers any service of ours words itself, whatever the calculator
says: the 400 for a stream that cannot be resynchronised, the 400 for a
message that is not a request, the proxy's 500. Each is in the encoding of
its request and carries the extension word of an answer of ours (L, and the
request's tag when there is one)."""

from __future__ import annotations

from . import wire
from .payload import encode_error, encoding_of


def _error(status: int, kind: str, message: str, encoding: str, ext: int, now: int) -> bytes:
    data = encode_error(encoding, kind, message)
    return wire.encode(now, wire.make_flags(request=False, status=status), 0, data, ext)


def bad_frame(reason: str, first: bytes, now: int) -> bytes:
    """The one 400 sent before closing a stream that cannot be resynchronised,
    in the encoding its first data byte suggests (text when it has not come)."""
    encoding = encoding_of(first)
    return _error(wire.BAD_REQUEST, "ValueError", reason, encoding, wire.EXT_FRAMED, now)


def not_a_request(header: wire.Header, data: bytes, now: int) -> bytes:
    """The 400 for a message sent with T=0 (a response) to a service."""
    message = "not a request: the T flag is 0"
    ext = wire.answer_ext(header)
    return _error(wire.BAD_REQUEST, "ValueError", message, encoding_of(data), ext, now)


def unreachable(header: wire.Header, data: bytes, message: str, now: int) -> bytes:
    """The proxy's 500 when the server could not give an answer."""
    ext = wire.answer_ext(header)
    return _error(wire.SERVER_ERROR, "ConnectionError", message, encoding_of(data), ext, now)
