"""The proxy's answer cache: encoded answers by key, bounded by bytes, LRU.

Nothing here knows about sockets or payloads: keys (the S flag byte and the
request data) and answers are bytes, time is whatever clock the owner passes
in (tests use ``task.Clock``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..transport.wire import FOREVER
from .interfaces import ICache

#: What one entry costs in memory beyond the lengths of its key and answer,
#: in bytes, as ``tracemalloc`` measures it on CPython 3.11 (64-bit): the two
#: bytes objects' headers (2 x 33), the `Entry` (64) and its time stamp (24),
#: and the ``OrderedDict``'s slot, index and linked-list node, which vary
#: with the table's fill (90 to 160). Counted at the top of that range.
ENTRY_OVERHEAD = 320


def cost(key: bytes, answer: bytes) -> int:
    """What storing ``answer`` under ``key`` costs against the byte bound."""
    return len(key) + len(answer) + ENTRY_OVERHEAD


class Entry:
    """One stored answer: its bytes, when it was fetched and for how long it is fresh."""

    __slots__ = ("answer", "lifetime", "stored")

    def __init__(self, answer: bytes, stored: float, lifetime: int) -> None:
        self.answer = answer
        self.stored = stored
        self.lifetime = lifetime

    def age(self, now: float) -> float:
        """Seconds since the answer was fetched (never negative)."""
        return max(0.0, now - self.stored)

    def fresh(self, now: float, grace: float = 0.0) -> bool:
        """Whether the answer is within its freshness lifetime (plus ``grace``)."""
        return self.lifetime == FOREVER or now - self.stored < self.lifetime + grace


@implementer(ICache)
class MemoryCache:
    """An in-memory LRU bounded by bytes, dropping entries once they are past
    their lifetime plus ``grace`` (the stale-if-error window)."""

    def __init__(self, max_bytes: int, clock: IReactorTime, grace: float = 0.0) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.grace = grace
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Entry | None:
        """The entry for ``key``, fresh or within its grace, as most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.fresh(self.clock.seconds(), self.grace):
            self.delete(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        """Store ``entry``, replacing any older one, then evict down to the bound."""
        size = cost(key, entry.answer)
        self.delete(key)
        if size > self.max_bytes:
            return
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.bytes -= cost(old_key, old.answer)
            self.evictions += 1

    def delete(self, key: bytes) -> None:
        """Forget ``key`` if it is stored."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= cost(key, entry.answer)

    def clear(self) -> int:
        """Forget every entry (a purge); how many there were."""
        count = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return count

    def purge(self, keys: Iterable[bytes]) -> int:
        """Forget the entries stored under ``keys``; how many of them there were."""
        count = 0
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.bytes -= cost(key, entry.answer)
                count += 1
        return count
