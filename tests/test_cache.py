"""`MemoryCache` and `Entry`: LRU order, the byte bound, replacement, deletion,
expiry with the stale-if-error grace, all on an injected `task.Clock`."""

from __future__ import annotations

import os
import sys

import pytest
from helpers import T0, examples
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from twisted_cacheproxy.proxy.cache import ENTRY_OVERHEAD, MemoryCache
from twisted_cacheproxy.proxy.entry import Entry
from twisted_cacheproxy.transport.wire import FOREVER


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


def size_of(key: bytes, answer: bytes) -> int:
    """What one entry counts against the bound."""
    return len(key) + len(answer) + ENTRY_OVERHEAD


def entry(clock, answer: bytes = b"answer", lifetime: int = FOREVER) -> Entry:
    return Entry(answer, clock.seconds(), lifetime)


def stored(cache: MemoryCache, *keys: bytes) -> list[bytes]:
    """Which of ``keys`` the cache holds (looking them up, so call it last)."""
    return [k for k in keys if cache.get(k) is not None]


# --- Entry ------------------------------------------------------------------


def test_entry_age_and_freshness():
    e = Entry(b"x", 100.0, 10)
    assert e.age(100.0) == 0.0
    assert e.age(104.5) == 4.5
    # A clock reading before the store time never gives a negative age.
    assert e.age(90.0) == 0.0
    assert e.fresh(109.999)
    assert not e.fresh(110.0)
    assert not e.fresh(500.0)


def test_an_entry_is_servable_when_fresh_and_young_enough():
    e = Entry(b"x", 100.0, 10)
    assert e.servable(104.5, FOREVER) == 4.5
    assert e.servable(104.5, 5) == 4.5
    assert e.servable(104.5, 4) is None  # older than the request accepts
    assert e.servable(110.0, FOREVER) is None  # past its lifetime
    assert e.servable(90.0, 1) == 0.0  # never a negative age
    forever = Entry(b"x", 100.0, FOREVER)
    assert forever.servable(100.0 + 10 * 365 * 86400, FOREVER) == 10 * 365 * 86400
    assert forever.servable(130.0, 30) is None


def test_forever_entry_is_always_fresh():
    e = Entry(b"x", 100.0, FOREVER)
    assert e.fresh(100.0 + 10 * 365 * 86400)


# --- store, look up, replace, delete ----------------------------------------


def test_empty_cache(clock):
    cache = MemoryCache(10_000, clock)
    assert cache.get(b"k") is None
    assert (cache.entries, cache.bytes, cache.evictions) == (0, 0, 0)


def test_put_then_get_returns_the_entry_and_counts_its_bytes(clock):
    cache = MemoryCache(10_000, clock)
    e = entry(clock, b"the answer")
    cache.put(b"key", e)
    assert cache.get(b"key") is e
    assert e.answer == b"the answer"
    assert cache.entries == 1
    assert cache.bytes == size_of(b"key", b"the answer")
    assert cache.evictions == 0


def test_put_replaces_an_older_entry_for_the_same_key(clock):
    cache = MemoryCache(10_000, clock)
    cache.put(b"key", entry(clock, b"old answer, long"))
    clock.advance(3)
    new = entry(clock, b"new")
    cache.put(b"key", new)
    assert cache.get(b"key") is new
    assert cache.entries == 1
    assert cache.bytes == size_of(b"key", b"new")
    # A replacement is not an eviction.
    assert cache.evictions == 0


def test_delete_forgets_the_entry_and_its_bytes(clock):
    cache = MemoryCache(10_000, clock)
    cache.put(b"a", entry(clock, b"1"))
    cache.put(b"b", entry(clock, b"22"))
    cache.delete(b"a")
    assert cache.get(b"a") is None
    assert cache.entries == 1
    assert cache.bytes == size_of(b"b", b"22")
    # Deleting what is not there changes nothing.
    cache.delete(b"a")
    cache.delete(b"never")
    assert cache.entries == 1
    assert cache.bytes == size_of(b"b", b"22")
    assert cache.evictions == 0


def test_clear_forgets_everything_and_says_how_many(clock):
    cache = MemoryCache(10_000, clock)
    cache.put(b"a", entry(clock, b"1"))
    cache.put(b"b", entry(clock, b"22"))
    assert cache.clear() == 2
    assert (cache.entries, cache.bytes, cache.evictions) == (0, 0, 0)
    assert stored(cache, b"a", b"b") == []
    assert cache.clear() == 0
    # Still usable afterwards, with a true byte count.
    cache.put(b"c", entry(clock, b"333"))
    assert cache.bytes == size_of(b"c", b"333")


def test_purge_forgets_the_given_keys_and_counts_those_stored(clock):
    cache = MemoryCache(10_000, clock)
    for key in (b"\x001 + 2", b"\x011 + 2", b"\x002 * 3"):
        cache.put(key, entry(clock, b"x"))
    assert cache.purge([b"\x001 + 2", b"\x011 + 2", b"\x00never"]) == 2
    assert cache.entries == 1
    assert cache.bytes == size_of(b"\x002 * 3", b"x")
    assert stored(cache, b"\x001 + 2", b"\x011 + 2", b"\x002 * 3") == [b"\x002 * 3"]
    assert cache.purge([b"\x001 + 2"]) == 0
    assert cache.evictions == 0


# --- the byte bound and LRU order --------------------------------------------


def test_byte_bound_evicts_least_recently_stored(clock):
    one = size_of(b"a", b"x" * 50)
    cache = MemoryCache(2 * one, clock)
    for k in (b"a", b"b", b"c"):
        cache.put(k, entry(clock, b"x" * 50))
    assert cache.entries == 2
    assert cache.bytes == 2 * one
    assert cache.evictions == 1
    assert stored(cache, b"a", b"b", b"c") == [b"b", b"c"]


def test_a_lookup_makes_an_entry_most_recently_used(clock):
    one = size_of(b"a", b"x" * 50)
    cache = MemoryCache(2 * one, clock)
    cache.put(b"a", entry(clock, b"x" * 50))
    cache.put(b"b", entry(clock, b"x" * 50))
    assert cache.get(b"a") is not None
    cache.put(b"c", entry(clock, b"x" * 50))
    assert cache.evictions == 1
    assert stored(cache, b"a", b"b", b"c") == [b"a", b"c"]


def test_replacing_makes_an_entry_most_recently_used(clock):
    one = size_of(b"a", b"x" * 50)
    cache = MemoryCache(2 * one, clock)
    cache.put(b"a", entry(clock, b"x" * 50))
    cache.put(b"b", entry(clock, b"x" * 50))
    cache.put(b"a", entry(clock, b"y" * 50))
    cache.put(b"c", entry(clock, b"x" * 50))
    assert cache.evictions == 1
    assert stored(cache, b"a", b"b", b"c") == [b"a", b"c"]
    assert cache.get(b"a").answer == b"y" * 50


def test_one_big_entry_evicts_as_many_as_needed(clock):
    small = size_of(b"k0", b"s")
    cache = MemoryCache(5 * small, clock)
    for i in range(5):
        cache.put(b"k%d" % i, entry(clock, b"s"))
    assert cache.bytes == 5 * small
    # Needs the room of three small entries (and a little more).
    big_answer = b"B" * (3 * small - len(b"big") - ENTRY_OVERHEAD + 1)
    cache.put(b"big", entry(clock, big_answer))
    assert cache.evictions == 4
    assert cache.bytes == small + size_of(b"big", big_answer)
    assert cache.bytes <= cache.max_bytes
    assert stored(cache, *(b"k%d" % i for i in range(5)), b"big") == [b"k4", b"big"]


def test_entry_exactly_at_the_bound_is_kept(clock):
    cache = MemoryCache(size_of(b"k", b"v" * 10), clock)
    cache.put(b"k", entry(clock, b"v" * 10))
    assert cache.entries == 1
    assert cache.bytes == cache.max_bytes


def test_entry_larger_than_the_whole_cache_is_not_stored_and_evicts_nothing(clock):
    """One huge answer must not empty the cache of everything else for nothing."""
    cache = MemoryCache(1000, clock)
    cache.put(b"small", entry(clock, b"s"))
    cache.put(b"huge", entry(clock, b"h" * 1000))
    assert cache.evictions == 0
    assert cache.bytes == size_of(b"small", b"s")
    assert stored(cache, b"small", b"huge") == [b"small"]


def test_oversized_replacement_drops_the_old_entry(clock):
    """The older answer for the key must not go on being served in place of the new one."""
    cache = MemoryCache(1000, clock)
    cache.put(b"k", entry(clock, b"old"))
    cache.put(b"k", entry(clock, b"h" * 1000))
    assert cache.get(b"k") is None
    assert (cache.entries, cache.bytes) == (0, 0)


def test_zero_byte_cache_stores_nothing(clock):
    cache = MemoryCache(0, clock)
    cache.put(b"k", entry(clock, b"v"))
    assert (cache.entries, cache.bytes, cache.evictions) == (0, 0, 0)


# --- expiry and grace, on the injected clock ---------------------------------


def test_entry_expires_at_its_lifetime_without_grace(clock):
    cache = MemoryCache(10_000, clock)
    cache.put(b"k", entry(clock, b"v", lifetime=10))
    clock.advance(9.999)
    assert cache.get(b"k") is not None
    clock.advance(0.001)
    assert cache.get(b"k") is None
    # The expired entry is gone, bytes and all; expiry is not an eviction.
    assert (cache.entries, cache.bytes, cache.evictions) == (0, 0, 0)


def test_grace_keeps_an_expired_entry_for_n_more_seconds(clock):
    cache = MemoryCache(10_000, clock, grace=30)
    e = entry(clock, b"v", lifetime=10)
    cache.put(b"k", e)
    clock.advance(39.999)
    got = cache.get(b"k")
    assert got is e
    # Returned, but not fresh: the caller decides whether it may serve it.
    assert not got.fresh(clock.seconds())
    clock.advance(0.001)
    assert cache.get(b"k") is None
    assert (cache.entries, cache.bytes) == (0, 0)


def test_forever_entries_never_expire(clock):
    cache = MemoryCache(10_000, clock)
    e = entry(clock, b"v", lifetime=FOREVER)
    cache.put(b"k", e)
    clock.advance(20 * 365 * 86400)
    assert cache.get(b"k") is e


def test_expiry_uses_the_store_time_in_the_entry_not_the_put_time(clock):
    """The proxy stores an answer with the time it sent the request."""
    cache = MemoryCache(10_000, clock)
    cache.put(b"k", Entry(b"v", clock.seconds() - 8, 10))
    clock.advance(1.999)
    assert cache.get(b"k") is not None
    clock.advance(0.001)
    assert cache.get(b"k") is None


def test_the_cache_reads_only_the_injected_clock(clock):
    cache = MemoryCache(10_000, clock)
    cache.put(b"k", entry(clock, b"v", lifetime=5))
    # No real time passes here; only the fake clock moves.
    assert cache.get(b"k") is not None
    clock.advance(5)
    assert cache.get(b"k") is None


# --- a model check: whatever happens, the bookkeeping adds up ----------------

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from([b"a", b"b", b"c", b"d", b"e"]),
            st.integers(0, 300),
            st.sampled_from([1, 5, 30, FOREVER]),
        ),
        st.tuples(st.just("get"), st.sampled_from([b"a", b"b", b"c", b"d", b"e"])),
        st.tuples(st.just("delete"), st.sampled_from([b"a", b"b", b"c", b"d", b"e"])),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 4, 10])),
    ),
    max_size=60,
)


@settings(max_examples=examples(150), deadline=None)
@given(ops=_ops, max_bytes=st.integers(0, 1500), grace=st.sampled_from([0, 3, 20]))
def test_cache_matches_an_lru_model(ops, max_bytes, grace):
    """Random puts, gets, deletes and clock moves, against a dict kept in LRU order."""
    clock = Clock()
    clock.advance(T0)
    cache = MemoryCache(max_bytes, clock, grace=grace)
    model: dict[bytes, tuple[bytes, float, int]] = {}  # insertion order = LRU order
    evictions = 0

    def expired(stored: float, lifetime: int) -> bool:
        return lifetime != FOREVER and clock.seconds() - stored >= lifetime + grace

    for op in ops:
        if op[0] == "put":
            _, key, n, lifetime = op
            answer = b"v" * n
            model.pop(key, None)
            if size_of(key, answer) <= max_bytes:
                model[key] = (answer, clock.seconds(), lifetime)
                while sum(size_of(k, v[0]) for k, v in model.items()) > max_bytes:
                    del model[next(iter(model))]
                    evictions += 1
            cache.put(key, Entry(answer, clock.seconds(), lifetime))
        elif op[0] == "get":
            key = op[1]
            got = cache.get(key)
            if key in model and not expired(model[key][1], model[key][2]):
                assert got is not None
                assert (got.answer, got.stored, got.lifetime) == model[key]
                model[key] = model.pop(key)
            else:
                model.pop(key, None)
                assert got is None
        elif op[0] == "delete":
            cache.delete(op[1])
            model.pop(op[1], None)
        else:
            clock.advance(op[1])
        assert cache.entries == len(model)
        assert cache.bytes == sum(size_of(k, v[0]) for k, v in model.items())
        assert cache.bytes <= max_bytes
        assert cache.evictions == evictions
    live = [k for k, v in model.items() if not expired(v[1], v[2])]
    assert stored(cache, *model) == live


def test_the_byte_bound_holds_for_the_memory_really_used(clock):
    """What the cache counts is what its entries really take (tracemalloc):
    100,000 distinct answers through an 8 MiB cache keep the memory it holds
    within 20 % of the bound, and use most of it."""
    import tracemalloc

    bound = 8 << 20
    cache = MemoryCache(bound, clock)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            key = b"\x00%d * 3 + 1" % i
            answer = b"\x65\x53\xf1\x00\x00\x2c\x10\xc8\xff\xff\x00\x03" + b'{"result": %d}' % i
            cache.put(key, Entry(answer, clock.seconds() + 0.5, FOREVER))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.evictions > 0
    assert 0.6 * bound < held < 1.2 * bound, (held, cache.entries)


def tiny(i: int) -> tuple[bytes, bytes]:
    """The key and stored answer of the text request ``i + 0`` with steps:
    the smallest answers a proxy stores, so the entries' overhead is most
    of what they take."""
    body = b'{"result": %d, "steps": ["%d + 0", "%d"]}' % (i, i, i)
    header = b"\x65\x53\xf1\x00" + (12 + len(body)).to_bytes(2, "big") + b"\x18\xc8\xff\xff\x00\x03"
    return b"\x01%d + 0" % i, header + body


def fill(cache: MemoryCache, first: int, count: int) -> None:
    """Store ``count`` distinct tiny answers, from ``tiny(first)`` on, with
    lifetimes of their own (not the one shared ``FOREVER``)."""
    for i in range(first, first + count):
        key, answer = tiny(i)
        cache.put(key, Entry(answer, T0 + i, 65534 - i % 2))


def allocated(size: int) -> int:
    """What an allocation of ``size`` bytes takes: a block of a multiple of
    16 from CPython's small-object allocator up to 512 bytes, past that a
    C allocator's chunk (an 8-byte header, rounded up to 16)."""
    return -(-size // 16) * 16 if size <= 512 else -(-(size + 8) // 16) * 16


@pytest.mark.parametrize("slots_per_entry", [6, 3], ids=["table-just-grown", "table-full"])
def test_the_byte_bound_holds_for_the_blocks_really_allocated(clock, slots_per_entry):
    """Tiny answers, each allocation counted as the block the allocator
    hands out (tracemalloc's sizes, rounded as the allocators round them),
    with the ``OrderedDict``'s table at its emptiest (about 6 slots an
    entry: the cache holds just over a sixth of a power of two) and at its
    fullest (3 slots an entry), after churn has rebuilt it: what the cache
    holds stays within its bound, and uses most of it."""
    import tracemalloc

    slots = 1 << 13
    count = slots // 6 + 10 if slots_per_entry == 6 else slots // 3 - 10
    key, answer = tiny(100_000)
    bound = count * (len(key) + len(answer) + ENTRY_OVERHEAD)
    tracemalloc.start()
    try:
        cache = MemoryCache(bound, clock)
        fill(cache, 100_000, 4 * count + slots)
        held = sum(allocated(t.size) for t in tracemalloc.take_snapshot().traces)
    finally:
        tracemalloc.stop()
    assert cache.entries == count
    # The premise: the table (with the nodes of its linked list) is as full as meant.
    table = sys.getsizeof(cache._entries) / count
    assert 26 * (slots_per_entry - 0.1) + 32 < table < 28 * slots_per_entry + 33
    assert 0.75 * bound < held <= bound, (held / bound, cache.entries)


def print_growth(bound: int, count: int) -> None:
    """Fill a cache of ``bound`` bytes with ``count`` tiny answers; print
    the growth of this process's RSS over the bound, the entries and the
    evictions."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cache = MemoryCache(bound, Clock())
    before = rss()
    fill(cache, 0, count)
    print((rss() - before) / bound, cache.entries, cache.evictions)


def test_the_process_grows_by_no_more_than_the_bound_after_eviction_churn():
    """The real allocators, in a fresh interpreter (its RSS, from /proc):
    300,000 distinct tiny answers through ``--cache-size 16M`` grow the
    process by less than 1.2 times the bound once the cache's table has
    been rebuilt many times as entries came and went (with the C allocator
    keeping each old copy in its heap, it grew by 1.3 times)."""
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import test_cache; test_cache.print_growth(16 << 20, 300_000)",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    ratio, entries, evictions = out.stdout.split()
    assert int(evictions) == 300_000 - int(entries) > 250_000
    assert float(ratio) < 1.2, out.stdout


def test_the_c_allocator_is_told_to_give_large_blocks_back():
    """On glibc (Linux), the threshold above which a block is mapped on its
    own is fixed, so a freed table is given back to the system."""
    from twisted_cacheproxy.proxy import allocator

    MemoryCache(1 << 20, Clock())
    assert allocator.unmap_large_blocks() is True
    assert allocator.MMAP_THRESHOLD == 128 << 10
