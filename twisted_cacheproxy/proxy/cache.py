"""The proxy's answer cache: encoded answers by key, bounded by bytes, LRU.

Nothing here knows about sockets or payloads: keys (the S flag byte and the
request data) and answers are bytes, time is whatever clock the owner passes
in (tests use ``task.Clock``). What an entry is charged is what it really
takes (`ENTRY_OVERHEAD`), so that the process grows by no more than the
bound (docs/limits.md).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..transport.wire import FOREVER
from .allocator import unmap_large_blocks
from .entry import Entry
from .interfaces import ICache


def _block(size: int) -> int:
    """The block CPython's small-object allocator hands out for ``size``
    bytes: a multiple of 16."""
    return -(-size // 16) * 16


#: What one entry takes in memory beyond the lengths of its key and answer,
#: in bytes (424 on 64-bit CPython 3.11), each object counted as the block
#: the allocator gives it: the two bytes objects' headers, each rounded up by
#: as much as 15 bytes; the `Entry`, its time stamp and its lifetime; and
#: the ``OrderedDict``'s linked-list node (32) and table. The table has
#: 28 bytes a slot (an entry of hash, key and value in two slots of three,
#: a 4-byte index and the linked list's pointer to the node) and from 3 to
#: 6 slots an entry, as many as 6 just after it has grown: counted at 6.
ENTRY_OVERHEAD = (
    2 * (sys.getsizeof(b"") + 15)
    + _block(sys.getsizeof(Entry(b"", 0.0, 0)))
    + _block(sys.getsizeof(0.0))
    + _block(sys.getsizeof(FOREVER))
    + 32
    + 6 * 28
)


def cost(key: bytes, answer: bytes) -> int:
    """What storing ``answer`` under ``key`` costs against the byte bound."""
    return len(key) + len(answer) + ENTRY_OVERHEAD


@implementer(ICache)
class MemoryCache:
    """An in-memory LRU bounded by bytes, dropping entries once they are past
    their lifetime plus ``grace`` (the stale-if-error window).

    Its table is rebuilt every few ten thousand stores as entries come and
    go; the C allocator is asked to give each old copy back to the system
    (`allocator.unmap_large_blocks`) rather than keep it in its heap.
    """

    def __init__(self, max_bytes: int, clock: IReactorTime, grace: float = 0.0) -> None:
        unmap_large_blocks()
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
