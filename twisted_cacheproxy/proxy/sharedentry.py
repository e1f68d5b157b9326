"""The shared tier's entries: what memcached holds for one answer, signed so
that a proxy only ever serves what a proxy of its own site stored.

An entry is a fixed header, the proxy's whole cache key, the stored answer
and an HMAC-SHA256 over all of them::

    magic "TCPX" (4) | version 2 (1) | reserved 0 (1) | lifetime (u16)
    | stored, wall-clock seconds (float64) | key length (u16)
    | answer length (u32) | key | answer | MAC (32)

``stored`` is when the request that fetched the answer was sent, so every
proxy computes the same age. The MAC covers every byte before it (so the
key, lifetime, stored time and answer): the site's secret signs it, and an
entry whose MAC no secret of ours reproduces is never an answer. Without a
secret the MAC is keyed with nothing: it still catches damage, not forgery.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Sequence

from ..transport import wire
from .entry import Entry

MAGIC = b"TCPX"
#: 2: signed. Entries of version 1 (unsigned) are misses.
VERSION = 2
#: The fixed header of a stored entry (see the module's docstring).
ENTRY_HEADER = struct.Struct("!4sBBHdHI")
#: The MAC's digest and its length in bytes.
DIGEST = "sha256"
MAC_SIZE = 32
#: The memcached flags word of our values: a value with other flags is not ours.
FLAGS = 0x7443

#: The extension word of a stored answer: ours (L), from a cache (H).
_HIT = wire.EXT_FRAMED | wire.EXT_FROM_CACHE


class BadEntryError(ValueError):
    """A stored value that is not a whole entry of ours for the key asked for."""


class UnverifiedEntryError(BadEntryError):
    """A whole entry whose MAC no secret of ours reproduces: forged, altered,
    or signed with a secret this proxy does not have."""


class EntryCodec:
    """Entries to and from memcached values: signed with the first of
    ``secrets``, verified with any of them (during a rotation, the new
    secret first and the old one after it). No secrets: an unkeyed MAC."""

    def __init__(self, secrets: Sequence[bytes] = ()) -> None:
        self.keys = list(secrets) or [b""]
        self.signed = bool(secrets)

    def encode(self, key: bytes, entry: Entry) -> bytes:
        """The bytes memcached keeps for ``entry`` under our ``key``."""
        header = ENTRY_HEADER.pack(
            MAGIC, VERSION, 0, entry.lifetime, entry.stored, len(key), len(entry.answer)
        )
        signed = header + key + entry.answer
        return signed + hmac.digest(self.keys[0], signed, DIGEST)

    def decode(self, key: bytes, value: bytes, flags: int = FLAGS) -> Entry:
        """The entry in ``value`` (stored with memcached ``flags``) if it is
        ours, whole, signed by our site and stored for ``key``. Raises
        `UnverifiedEntryError` when the MAC does not verify and `BadEntryError` for
        anything else (garbage, another version, truncated or padded,
        another key under a colliding digest, an answer that may not be cached)."""
        size = ENTRY_HEADER.size
        if flags != FLAGS or len(value) < size + MAC_SIZE:
            raise BadEntryError("not ours")
        magic, version, _, lifetime, stored, key_length, answer_length = ENTRY_HEADER.unpack_from(
            value
        )
        if magic != MAGIC or version != VERSION:
            raise BadEntryError("another format")
        end = size + key_length + answer_length
        if len(value) != end + MAC_SIZE:
            raise BadEntryError("truncated or padded")
        signed, mac = value[:end], value[end:]
        if not any(hmac.compare_digest(hmac.digest(k, signed, DIGEST), mac) for k in self.keys):
            raise UnverifiedEntryError("the MAC does not verify")
        if key_length != len(key) or value[size : size + key_length] != key:
            raise BadEntryError("another key's entry")
        if not math.isfinite(stored):
            raise BadEntryError("no stored time")
        return Entry(_cacheable(value[size + key_length : end], lifetime), stored, lifetime)


def _cacheable(answer: bytes, lifetime: int) -> bytes:
    """``answer`` marked as a hit if it is a whole answer that may be cached
    for ``lifetime``; `BadEntryError` otherwise."""
    if len(answer) < wire.HEADER_SIZE:
        raise BadEntryError("no answer")
    header = wire.decode_header(answer)
    if (
        header.length != len(answer)
        or header.request
        or not header.cache
        or header.max_age != lifetime
        or not lifetime
        or header.status >= wire.SERVER_ERROR
    ):
        raise BadEntryError("not a cacheable answer")
    return answer if header.ext == _HIT else wire.rewrite(answer, ext=_HIT)


def expiry(entry: Entry, now: float) -> int | None:
    """The expiry to give memcached: the answer's remaining lifetime in whole
    seconds (never longer), 0 (none) for answers cacheable for ever; None
    when it has no lifetime left."""
    if entry.lifetime == wire.FOREVER:
        return 0
    left = math.floor(entry.lifetime - entry.age(now))
    return left if left >= 1 else None
