"""The C allocator's share of the cache's memory bound.

glibc serves a request of 128 KiB or more with a mapping of its own, which
``free`` hands back to the system. But each time it frees such a block it
raises that threshold to the block's size (up to 32 MiB), so from then on
blocks of that size come from its heap, which keeps what is freed. The
cache's table (a few MiB) is rebuilt every few ten thousand stores as
entries come and go: its old copy stayed in the heap, and the process grew
by a whole table more than the cache held (1.3 times ``--cache-size 16M``
with tiny answers). A fixed threshold gives each copy back when it is freed.
"""

from __future__ import annotations

import ctypes
import functools

#: ``M_MMAP_THRESHOLD``, glibc's ``mallopt`` parameter (malloc.h).
_M_MMAP_THRESHOLD = -3
#: The threshold, in bytes: glibc's own starting value.
MMAP_THRESHOLD = 128 << 10


@functools.cache
def unmap_large_blocks() -> bool:
    """Have the C allocator map every block of `MMAP_THRESHOLD` bytes or
    more on its own, so that freeing it gives it back to the system; False
    where the C library has no such setting (it is glibc's). Once a process
    is enough."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
