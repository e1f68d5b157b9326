"""The calculator wire format: the 12-byte header and its vocabulary.

Every message is ``!LHHHH`` (time stamp, total length, flags, cache control,
extension word) followed by its data; the total length is the only framing.
The course programs pack the extension word as padding and never read it; we
carry hop capabilities, cache marks and a request tag there (PROTOCOL.md 6).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

HEADER = struct.Struct("!LHHHH")
HEADER_SIZE = HEADER.size

#: The cache-control value meaning "no limit" (a response) or "any age" (a request).
FOREVER = 65535
#: Default largest message, header included.
MAX_MESSAGE_SIZE = 8192
#: The largest message the 16-bit length field can describe.
LENGTH_LIMIT = 65535

#: Bits 15-13 of the flags word: sent as 0, ignored on receipt.
RESERVED_MASK = 0xE000
FLAG_CACHE = 1 << 12
FLAG_STEPS = 1 << 11
FLAG_REQUEST = 1 << 10
STATUS_MASK = 0x3FF

#: Extension word, answers: "I frame by length, answer in order, echo tags" (hop by hop).
EXT_FRAMED = 0x0001
#: Extension word, answers: served from a cache's store (end to end).
EXT_FROM_CACHE = 0x0002
#: Extension word, answers: served past its lifetime (stale-if-error), with H and C=0.
EXT_GRACE = 0x0004
#: Extension word, requests and answers: the 13-bit request tag (0: none).
TAG_SHIFT = 3
TAG_MASK = 0xFFF8
MAX_TAG = TAG_MASK >> TAG_SHIFT

OK = 200
BAD_REQUEST = 400
SERVER_ERROR = 500
#: The only status codes an answer may carry: the course client loses any other.
STATUSES = (OK, BAD_REQUEST, SERVER_ERROR)


class Header(NamedTuple):
    """A decoded message header; the flag bits are read through properties."""

    timestamp: int
    length: int
    flags: int
    max_age: int
    ext: int = 0

    @property
    def cache(self) -> bool:
        return bool(self.flags & FLAG_CACHE)

    @property
    def steps(self) -> bool:
        return bool(self.flags & FLAG_STEPS)

    @property
    def request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @property
    def status(self) -> int:
        return self.flags & STATUS_MASK

    @property
    def framed(self) -> bool:
        """The sender frames by length and echoes tags (the ``L`` bit)."""
        return bool(self.ext & EXT_FRAMED)

    @property
    def from_cache(self) -> bool:
        """The answer came from a cache's store (the ``H`` bit)."""
        return bool(self.ext & EXT_FROM_CACHE)

    @property
    def grace(self) -> bool:
        """The answer was served past its lifetime (the ``G`` bit)."""
        return bool(self.ext & EXT_GRACE)

    @property
    def tag(self) -> int:
        """The request tag carried in the extension word (0: none)."""
        return self.ext >> TAG_SHIFT


def make_flags(*, request: bool, status: int = 0, cache: bool = False, steps: bool = False) -> int:
    """Pack the flag bits and status code into the flags word (reserved bits 0)."""
    if not 0 <= status <= STATUS_MASK:
        raise ValueError(f"status {status} does not fit in 10 bits")
    return (
        (FLAG_CACHE if cache else 0)
        | (FLAG_STEPS if steps else 0)
        | (FLAG_REQUEST if request else 0)
        | status
    )


def encode(timestamp: int, flags: int, max_age: int, data: bytes, ext: int = 0) -> bytes:
    """Build one whole message: header plus data."""
    total = HEADER_SIZE + len(data)
    if total > LENGTH_LIMIT:
        raise ValueError(f"message of {total} bytes exceeds the {LENGTH_LIMIT}-byte limit")
    return HEADER.pack(timestamp & 0xFFFFFFFF, total, flags, max_age, ext) + data


def tag_bits(tag: int) -> int:
    """The extension-word bits that carry request tag ``tag`` (0..8191)."""
    return (tag << TAG_SHIFT) & TAG_MASK


def answer_ext(request: Header, marks: int = 0) -> int:
    """The extension word of an answer by a side of ours to ``request``: ``L``,
    the request's tag echoed, and any cache ``marks`` (`EXT_FROM_CACHE`, `EXT_GRACE`)."""
    return EXT_FRAMED | (request.ext & TAG_MASK) | marks


def rewrite(
    message: bytes, *, flags: int | None = None, max_age: int | None = None, ext: int | None = None
) -> bytes:
    """``message`` with some of its header words replaced (time stamp, length
    and data kept): how a proxy re-marks a stored or forwarded answer."""
    _, _, old_flags, old_age, old_ext = HEADER.unpack_from(message)
    return (
        message[:6]
        + _WORDS.pack(
            old_flags if flags is None else flags,
            old_age if max_age is None else max_age,
            old_ext if ext is None else ext,
        )
        + message[HEADER_SIZE:]
    )


_WORDS = struct.Struct("!HHH")


def with_tag(answer: bytes, request: Header) -> bytes:
    """``answer`` with ``request``'s tag in its extension word (the same
    bytes when it is already there)."""
    ext = int.from_bytes(answer[10:12], "big")
    tag = request.ext & TAG_MASK
    if ext & TAG_MASK == tag:
        return answer
    return rewrite(answer, ext=(ext & ~TAG_MASK) | tag)


def status_of(message: bytes) -> int:
    """The status code of a whole message, read from its flags word."""
    return ((message[6] << 8) | message[7]) & STATUS_MASK


#: A `Header` of the five words `HEADER` unpacks: what ``Header._make`` does,
#: without its Python call (framing makes one for every message).
make_header: Callable[[tuple[int, int, int, int, int]], Header] = partial(tuple.__new__, Header)


def decode_header(buf: bytes, offset: int = 0) -> Header:
    """Read the header that starts at ``offset`` of ``buf``."""
    return make_header(HEADER.unpack_from(buf, offset))
