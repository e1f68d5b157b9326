"""The shared cache tier, driven by fakes: the ketama ring, the entry format,
`SharedCache` over `StringTransport` connections to a fake memcached, and the
two-level rules of the proxy (L1, then L2, then the server) with `task.Clock`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re

import pytest
from helpers import T0, TS, answer, request_frame, scrape, with_max_age
from proxyharness import Harness, X, Y
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from twisted_cacheproxy.proxy.entry import Entry
from twisted_cacheproxy.proxy.ring import Ring
from twisted_cacheproxy.proxy.sharedcache import GENERATION_POLL, SharedCache
from twisted_cacheproxy.proxy.sharedentry import (
    ENTRY_HEADER,
    FLAGS,
    MAC_SIZE,
    BadEntryError,
    EntryCodec,
    UnverifiedEntryError,
    expiry,
)
from twisted_cacheproxy.proxy.sharednode import MAX_OUTSTANDING
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.addresses import parse_address
from twisted_cacheproxy.transport.wire import FOREVER

pytestmark = pytest.mark.usefixtures("proxy_log")

HIT = wire.EXT_FRAMED | wire.EXT_FROM_CACHE


# --- the ring -------------------------------------------------------------------------


def keys(n: int) -> list[bytes]:
    return [hashlib.sha256(b"%d" % i).hexdigest().encode() for i in range(n)]


def test_ring_places_keys_alike_whatever_order_the_nodes_come_in():
    names = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]
    a = Ring(names, names)
    b = Ring(names[::-1], names[::-1])
    assert all(a.node_for(k) == b.node_for(k) for k in keys(2000))


def test_ring_spreads_keys_over_every_node():
    names = [f"10.0.0.{i}:11211" for i in range(1, 5)]
    ring = Ring(names, names)
    share = dict.fromkeys(names, 0)
    for k in keys(8000):
        share[ring.node_for(k)] += 1
    # 160 points per node: each holds a quarter, give or take.
    assert all(1200 < n < 2800 for n in share.values()), share


def test_losing_a_node_moves_only_its_keys():
    names = [f"10.0.0.{i}:11211" for i in range(1, 5)]
    whole = Ring(names, names)
    without = Ring(names[:3], names[:3])
    for k in keys(4000):
        before = whole.node_for(k)
        if before != names[3]:
            assert without.node_for(k) == before


def test_ring_refuses_no_nodes_and_twice_the_same():
    with pytest.raises(ValueError):
        Ring([], [])
    with pytest.raises(ValueError):
        Ring([1, 2], ["a:1", "a:1"])


# --- the entry format -------------------------------------------------------------------

KEY = b"\x01" + X
STORED = wire.rewrite(answer(3, max_age=60), ext=HIT)
SECRET = b"a site's secret, 32 bytes long.."
OLD_SECRET = b"the secret before, also 32 bytes"
#: Entries as a proxy without a secret writes them (an unkeyed MAC).
UNSIGNED = EntryCodec()
SIGNED = EntryCodec([SECRET])


def encode_entry(key: bytes, entry: Entry) -> bytes:
    return UNSIGNED.encode(key, entry)


def decode_entry(key: bytes, value: bytes) -> Entry:
    return UNSIGNED.decode(key, value)


def test_entry_round_trip():
    entry = Entry(STORED, T0 + 0.25, 60)
    value = SIGNED.encode(KEY, entry)
    assert value[:5] == b"TCPX\x02"
    assert len(value) == ENTRY_HEADER.size + len(KEY) + len(STORED) + MAC_SIZE
    mac = hmac.digest(SECRET, value[:-MAC_SIZE], "sha256")
    assert value[-MAC_SIZE:] == mac
    back = SIGNED.decode(KEY, value)
    assert (back.answer, back.stored, back.lifetime) == (STORED, T0 + 0.25, 60)


def _field(value: bytes, **fields) -> bytes:
    """``value`` with header fields changed, signed again (unkeyed) over its new bytes."""
    names = ("magic", "version", "reserved", "lifetime", "stored", "key_length", "answer_length")
    parts = dict(zip(names, ENTRY_HEADER.unpack_from(value), strict=True))
    parts.update(fields)
    changed = ENTRY_HEADER.pack(*parts.values()) + value[ENTRY_HEADER.size : -MAC_SIZE]
    return changed + hmac.digest(b"", changed, "sha256")


GOOD = encode_entry(KEY, Entry(STORED, T0, 60))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        b"\x00" * 200,
        GOOD[:-1],  # truncated
        GOOD + b"\x00",  # padded
        GOOD[: ENTRY_HEADER.size + 3],
        _field(GOOD, answer_length=len(STORED) + 1),
        _field(GOOD, answer_length=len(STORED) - 1),
        _field(GOOD, key_length=len(KEY) - 1),
        _field(GOOD, magic=b"XXXX"),
        _field(GOOD, version=1),  # the unsigned format
        GOOD[:-MAC_SIZE],  # no MAC
        _field(GOOD, stored=math.nan),
        _field(GOOD, lifetime=61),  # disagrees with the answer's own
        # Another key of the same length (a colliding digest).
        encode_entry(b"\x01" + Y, Entry(STORED, T0, 60)),
        # The other S flag: steps are in the key.
        encode_entry(b"\x00" + X, Entry(STORED, T0, 60)),
        encode_entry(KEY, Entry(request_frame(X, max_age=60, ts=TS), T0, 60)),  # a request
        encode_entry(KEY, Entry(answer(3, max_age=60, status=500), T0, 60)),
        encode_entry(KEY, Entry(answer(3, max_age=0), T0, 0)),  # may not be cached
        encode_entry(KEY, Entry(answer(3, cache=False, max_age=60), T0, 60)),
        encode_entry(KEY, Entry(STORED[:-1], T0, 60)),  # the answer's own length wrong
    ],
)
def test_a_value_that_is_not_a_whole_entry_for_this_key_is_refused(value):
    with pytest.raises(BadEntryError) as info:
        decode_entry(KEY, value)
    assert not isinstance(info.value, UnverifiedEntryError)


def test_a_version_1_entry_as_the_format_was_before_signing_is_refused():
    header = ENTRY_HEADER.pack(b"TCPX", 1, 0, 60, T0, len(KEY), len(STORED))
    with pytest.raises(BadEntryError):
        SIGNED.decode(KEY, header + KEY + STORED)


def tampered(value: bytes, at: int) -> bytes:
    return value[:at] + bytes([value[at] ^ 1]) + value[at + 1 :]


def test_any_byte_changed_fails_the_mac():
    value = SIGNED.encode(KEY, Entry(STORED, T0, 60))
    size = ENTRY_HEADER.size
    # The lifetime, the stored time, the key, the answer's result, the MAC itself.
    for at in (7, 8, 15, size, size + len(KEY) + len(STORED) - 2, len(value) - 1):
        with pytest.raises(UnverifiedEntryError):
            SIGNED.decode(KEY, tampered(value, at))


def test_an_entry_signed_with_another_secret_or_none_fails_the_mac():
    entry = Entry(STORED, T0, 60)
    for other in (UNSIGNED, EntryCodec([OLD_SECRET])):
        with pytest.raises(UnverifiedEntryError):
            SIGNED.decode(KEY, other.encode(KEY, entry))
    with pytest.raises(UnverifiedEntryError):
        UNSIGNED.decode(KEY, SIGNED.encode(KEY, entry))


def test_during_a_rotation_the_first_secret_signs_and_every_one_verifies():
    rotating = EntryCodec([SECRET, OLD_SECRET])
    entry = Entry(STORED, T0, 60)
    assert rotating.encode(KEY, entry) == SIGNED.encode(KEY, entry)
    old = EntryCodec([OLD_SECRET]).encode(KEY, entry)
    assert rotating.decode(KEY, old).answer == STORED
    with pytest.raises(UnverifiedEntryError):
        SIGNED.decode(KEY, old)  # once the old secret is dropped


def test_expiry_is_never_longer_than_the_lifetime_left():
    """memcached drops an entry when its lifetime ends; for ever is 0, memcached's never."""
    assert expiry(Entry(STORED, T0, 60), T0) == 60
    assert expiry(Entry(STORED, T0, 60), T0 + 10.5) == 49
    assert expiry(Entry(STORED, T0, 60), T0 + 59.5) is None
    assert expiry(Entry(STORED, T0, FOREVER), T0 + 1e6) == 0


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:11211", ("127.0.0.1", 11211)), ("[::1]:7", ("::1", 7)), ("mc:1", ("mc", 1))],
)
def test_parse_address(text, parsed):  # the one parser, which --memcached uses
    assert parse_address(text) == parsed


@pytest.mark.parametrize("text", ["11211", ":11211", "host:", "host:x", "h:0", "::1:11211"])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


# --- a fake memcached over StringTransport -----------------------------------------


class FakeMemcached:
    """A memcached's store and its connections: the nodes connect through
    `reactor` (a `MemoryReactor`), `connect` accepts a node's attempt, and
    `pump` reads what the clients wrote and answers (unless `stalled`)."""

    def __init__(self) -> None:
        self.store: dict[bytes, tuple[int, int, bytes]] = {}  # key: flags, expiry, value
        self.commands: list[bytes] = []
        self.conns: list[tuple[object, StringTransport]] = []
        self.stalled = False
        self.reactor = MemoryReactor()
        self._taken: set[int] = set()  # the attempts accepted or refused

    def attempt(self, node):
        """The factory of ``node``'s connection attempt, starting the node
        if it is not yet (a test of the tier alone starts no poll)."""
        if node.service is None:
            node.start(self.reactor)
        pending = [
            i
            for i, (host, port, *_) in enumerate(self.reactor.tcpClients)
            if (host, port) == (node.host, node.port) and i not in self._taken
        ]
        assert pending, "no connection attempt is waiting"
        self._taken.add(pending[-1])
        return self.reactor.tcpClients[pending[-1]][2]

    def connect(self, node, *, answer_version: bool = True):
        """Accept ``node``'s connection attempt; the connection (as the
        reactor would give it) and its transport."""
        proto = self.attempt(node).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.conns.append((proto, transport))
        if answer_version:
            self.pump()
        return proto, transport

    def refuse(self, node) -> None:
        """Refuse ``node``'s connection attempt."""
        self.attempt(node).clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def pump(self) -> None:
        """Answer until no open connection has anything more to say."""
        busy = True
        while busy and not self.stalled:
            busy = False
            for proto, transport in self.conns:
                written = transport.value()
                if written and not transport.disconnecting:
                    transport.clear()
                    busy = True
                    proto.dataReceived(self._answer(written))

    def _answer(self, data: bytes) -> bytes:
        out = []
        while data:
            line, _, data = data.partition(b"\r\n")
            words = line.split()
            self.commands.append(words[0])
            if words[0] == b"version":
                out.append(b"VERSION 1.6.18")
            elif words[0] == b"get":
                for k in words[1:]:
                    if k in self.store:
                        flags, _, value = self.store[k]
                        out.append(b"VALUE %s %d %d\r\n%s" % (k, flags, len(value), value))
                out.append(b"END")
            elif words[0] in (b"set", b"add"):
                k, flags, exp, size = words[1], int(words[2]), int(words[3]), int(words[4])
                value, data = data[:size], data[size + 2 :]
                if words[0] == b"add" and k in self.store:
                    out.append(b"NOT_STORED")
                else:
                    self.store[k] = (flags, exp, value)
                    out.append(b"STORED")
            elif words[0] == b"delete":
                out.append(b"DELETED" if self.store.pop(words[1], None) else b"NOT_FOUND")
            elif words[0] == b"incr":
                if words[1] not in self.store:
                    out.append(b"NOT_FOUND")
                else:
                    flags, exp, value = self.store[words[1]]
                    new = int(value) + int(words[2])
                    self.store[words[1]] = (flags, exp, b"%d" % new)
                    out.append(b"%d" % new)
            else:
                out.append(b"ERROR")
        return b"".join(o + b"\r\n" for o in out)

    def put_raw(self, key: bytes, value: bytes, flags: int = FLAGS) -> None:
        self.store[key] = (flags, 0, value)

    def data_keys(self) -> list[bytes]:
        return [k for k in self.store if not k.endswith(b"gen")]


def tier(clock, n: int = 1, **options) -> SharedCache:
    return SharedCache([("127.0.0.1", 11211 + i) for i in range(n)], clock, **options)


def fired(d):
    box = []
    d.addBoth(box.append)
    return box


@pytest.fixture
def clock():
    from twisted.internet import task

    c = task.Clock()
    c.advance(T0)
    return c


def test_a_node_is_up_once_it_answers_and_creates_the_generation(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock)
    (node,) = shared.nodes
    mc.connect(node)
    assert node.protocol is not None
    assert mc.commands == [b"version", b"get", b"add", b"get"]
    assert mc.store[b"cacheproxy:gen"] == (0, 0, b"%d" % TS)
    assert node.generation == b"%d" % TS
    ups = [e for e in proxy_log if "connected" in e.get("log_format", "")]
    assert len(ups) == 1


def test_miss_store_and_hit_under_a_fixed_length_key(clock):
    """memcached keys are short and spaceless: the key is the request's SHA-256."""
    mc = FakeMemcached()
    shared = tier(clock)
    mc.connect(shared.nodes[0])
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]
    clock.advance(10)
    shared.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    (mkey,) = mc.data_keys()
    digest = hashlib.sha256(KEY).hexdigest().encode()
    assert mkey == b"cacheproxy:%d:%s" % (TS, digest)
    flags, exp, _ = mc.store[mkey]
    assert (flags, exp) == (FLAGS, 50)  # what is left of the 60 s lifetime
    d = fired(shared.get(KEY))
    mc.pump()
    (entry,) = d
    assert (entry.answer, entry.stored, entry.lifetime) == (STORED, T0, 60)
    assert shared.counters()["l2_hits"] == 1
    assert clock.getDelayedCalls() == []  # the lookup's timer is gone


def test_prefix_keeps_sites_apart(clock):
    """Sites sharing one memcached keep apart by --memcached-prefix."""
    mc = FakeMemcached()
    a, b = tier(clock), tier(clock, prefix="site-b:")
    mc.connect(a.nodes[0])
    mc.connect(b.nodes[0])
    a.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    d = fired(b.get(KEY))
    mc.pump()
    assert d == [None]
    assert sorted(mc.store)[-1].startswith(b"site-b:")


@pytest.mark.parametrize(
    "value",
    [
        b"not ours at all",
        GOOD[:-5],
        GOOD + b"!",
        encode_entry(b"\x01" + Y, Entry(STORED, T0, 60)),
    ],
)
def test_a_value_that_is_not_ours_is_a_miss(clock, value):
    mc = FakeMemcached()
    shared = tier(clock)
    node = shared.nodes[0]
    mc.connect(node)
    mc.put_raw(shared.memcached_key(node, KEY), value)
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]
    assert shared.counters()["l2_rejected"] == 1


def test_a_value_with_other_flags_is_a_miss(clock):
    """Another program's value under our key carries its own flags: never read as an answer."""
    mc = FakeMemcached()
    shared = tier(clock)
    node = shared.nodes[0]
    mc.connect(node)
    mc.put_raw(shared.memcached_key(node, KEY), GOOD, flags=0)
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]


def test_a_stalled_node_is_a_miss_after_the_timeout_and_its_late_answer_is_dropped(clock):
    mc = FakeMemcached()
    shared = tier(clock, timeout=0.05)
    mc.connect(shared.nodes[0])
    shared.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    mc.stalled = True
    d = fired(shared.get(KEY))
    clock.advance(0.049)
    assert d == []
    clock.advance(0.001)
    assert d == [None]
    assert shared.counters()["l2_timeouts"] == 1
    mc.stalled = False
    mc.pump()  # the answer comes late: nobody gets it twice
    assert d == [None]


def test_a_stalled_node_gets_no_more_than_a_bounded_number_of_commands(clock):
    """Past MAX_OUTSTANDING lookups on a stalled node, a lookup is a miss at once."""
    mc = FakeMemcached()
    shared = tier(clock, timeout=0.05)
    node = shared.nodes[0]
    _, transport = mc.connect(node)
    mc.stalled = True
    for _ in range(MAX_OUTSTANDING + 10):
        shared.get(KEY)
    assert transport.value().count(b"get ") == MAX_OUTSTANDING
    d = fired(shared.get(KEY))
    assert d == [None]  # at once, without a timer


def test_a_connection_silent_too_long_is_closed_and_the_node_is_down(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock, timeout=0.05)
    node = shared.nodes[0]
    proto, transport = mc.connect(node)
    mc.stalled = True
    shared.get(KEY)
    clock.advance(node.command_timeout)
    assert transport.disconnecting
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert node.protocol is None
    assert fired(shared.get(KEY)) == [None]
    downs = [e for e in proxy_log if e.get("log_level") == LogLevel.warn]
    assert len(downs) == 1
    assert "lost" in downs[0]["log_format"]


#: The longest first wait before reconnecting: 0.2 s and up to 0.1 s of jitter.
FIRST_RETRY = 0.3


def warnings(log: list[dict]) -> list[str]:
    return [e["log_format"] for e in log if e.get("log_level") == LogLevel.warn]


def ups(log: list[dict]) -> int:
    return sum("connected: shared cache tier on" in e.get("log_format", "") for e in log)


class CutOffTransport(StringTransport):
    """A link to a node that was cut off with bytes still queued for it: a
    clean close waits for them to leave, which never happens; an abort drops
    them and the connection is lost at once, as TCP's does."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol

    def abortConnection(self) -> None:
        super().abortConnection()
        self.protocol.connectionLost(Failure(error.ConnectionAborted()))


def test_a_node_cut_off_with_bytes_queued_is_down_after_the_command_timeout(clock, proxy_log):
    """Its lookups then miss at once instead of each waiting for the lookup
    timeout for as long as the cut lasts."""
    mc = FakeMemcached()
    shared = tier(clock, timeout=0.05)
    node = shared.nodes[0]
    proto = mc.attempt(node).buildProtocol(None)
    proto.makeConnection(CutOffTransport(proto))
    mc.conns.append((proto, proto.transport))
    mc.pump()
    assert node.available() is not None
    mc.stalled = True
    shared.get(KEY)
    clock.advance(node.command_timeout)
    assert node.protocol is None
    assert fired(shared.get(KEY)) == [None]
    assert shared.counters()["l2_unavailable"] == 1
    assert ["lost" in w for w in warnings(proxy_log)] == [True]


def test_unreachable_node_is_logged_once_and_retried_with_backoff(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock)
    node = shared.nodes[0]
    waits = []
    for _ in range(8):
        mc.refuse(node)
        (call,) = clock.getDelayedCalls()
        waits.append(call.getTime() - clock.seconds())
        clock.advance(waits[-1])
    assert isinstance(node.service, ClientService)
    assert len(mc.reactor.tcpClients) == 9  # the first attempt and eight retries
    # 0.2 s, doubling up to 5 s, each plus up to 0.1 s of jitter.
    for wait, least in zip(waits, [0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5], strict=True):
        assert least <= wait < least + 0.1
    (warning,) = warnings(proxy_log)
    assert "unreachable" in warning
    assert node.state == "down"
    # It comes back: one line says so.
    proto, _ = mc.connect(node)
    assert node.protocol is not None and node.state == "up"
    assert ups(proxy_log) == 1
    # Lost: one line, and the backoff starts again from the beginning.
    proto.connectionLost(Failure(error.ConnectionLost()))
    assert node.protocol is None and node.state == "down"
    (call,) = clock.getDelayedCalls()
    assert 0.2 <= call.getTime() - clock.seconds() < FIRST_RETRY
    assert ["lost" in w for w in warnings(proxy_log)] == [False, True]
    clock.advance(FIRST_RETRY)
    mc.connect(node)
    assert node.state == "up" and ups(proxy_log) == 2


def test_a_node_is_up_only_once_it_answers_version_on_the_new_connection(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock)
    node = shared.nodes[0]
    _, transport = mc.connect(node, answer_version=False)
    assert transport.value() == b"version\r\n"
    assert (node.protocol, node.state, ups(proxy_log)) == (None, "starting", 0)
    assert fired(shared.get(KEY)) == [None]  # not up: a miss at once
    # Never answered: the connection is closed after the command timeout, and retried.
    clock.advance(node.command_timeout)
    assert transport.disconnecting
    mc.conns[0][0].connectionLost(Failure(error.ConnectionDone()))
    assert node.state == "down" and ups(proxy_log) == 0
    clock.advance(FIRST_RETRY)
    mc.connect(node)
    assert node.state == "up" and ups(proxy_log) == 1


def test_purge_hides_every_entry_and_other_proxies_notice(clock):
    mc = FakeMemcached()
    a, b = tier(clock), tier(clock)
    mc.connect(a.nodes[0])
    mc.connect(b.nodes[0])
    a.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    d = fired(b.get(KEY))
    mc.pump()
    assert d[0] is not None
    purged = fired(a.purge())
    mc.pump()
    assert purged == [1]
    assert a.nodes[0].generation == b"%d" % (TS + 1)
    # b still believes in the old generation: its next lookup reads the new one, and misses.
    d = fired(b.get(KEY))
    mc.pump()
    assert d == [None]
    assert b.nodes[0].generation == b"%d" % (TS + 1)
    # Entries stored from now on are found again.
    b.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    d = fired(a.get(KEY))
    mc.pump()
    assert d[0] is not None


def test_a_purge_by_hand_with_incr_is_noticed(clock):
    mc = FakeMemcached()
    shared = tier(clock)
    mc.connect(shared.nodes[0])
    shared.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    mc._answer(b"incr cacheproxy:gen 1\r\n")  # printf 'incr cacheproxy:gen 1\r\n' | nc
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]


def test_a_lost_generation_is_recreated_newer(clock):
    """The generation is wall-clock seconds: a new one never brings an older one's entries back."""
    mc = FakeMemcached()
    shared = tier(clock)
    mc.connect(shared.nodes[0])
    shared.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    del mc.store[b"cacheproxy:gen"]  # evicted, or memcached restarted
    clock.advance(5)
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]
    assert shared.nodes[0].generation == b"%d" % (TS + 5)


def test_one_node_down_its_keys_miss_and_the_others_still_hit(clock):
    mc = FakeMemcached()
    shared = tier(clock, n=2)
    up, down = shared.nodes
    mc.connect(up)
    mine = [k for k in (b"\x01%d" % i for i in range(50)) if shared.node_for(k) is up]
    theirs = [k for k in (b"\x01%d" % i for i in range(50)) if shared.node_for(k) is down]
    assert mine and theirs
    for k in mine + theirs:
        shared.put(k, Entry(STORED, T0, 60))
    mc.pump()
    assert len(mc.data_keys()) == len(mine)  # nothing sent for the node that is down
    hits = [fired(shared.get(k)) for k in mine]
    misses = [fired(shared.get(k)) for k in theirs]  # at once: no connection
    assert all(m == [None] for m in misses)
    mc.pump()
    assert all(h[0] is not None for h in hits)


# --- the two levels in the proxy ---------------------------------------------------------


class Site:
    """Proxies sharing one fake memcached, each with its own L1 and server."""

    def __init__(self, *, secrets: tuple[bytes, ...] = (), **options) -> None:
        self.mc = FakeMemcached()
        self.secrets = secrets
        self.options = options

    def proxy(self, *, poll: bool = False, **options) -> Harness:
        """A proxy of the site; with ``poll``, reading the generation every
        `GENERATION_POLL` as a started tier does."""
        h = Harness(**{**self.options, **options})
        h.shared = SharedCache(
            [("127.0.0.1", 11211)],
            h.reactor,
            timeout=0.05,
            reactor=self.mc.reactor,
            secrets=self.secrets,
        )
        h.factory.shared = h.shared
        h.shared.purged = h.factory._purgedElsewhere
        if poll:
            h.shared.start()
        self.mc.connect(h.shared.nodes[0])
        return h


def upstream_miss(h: Harness, c, frame: bytes, reply: bytes, site: Site):
    """``frame`` misses L1 and L2 and is answered by the server."""
    c.send(frame)
    assert h.attempts == 0  # L2 first
    site.mc.pump()
    up = h.accept()
    assert up.take() == frame
    up.reply(reply)
    site.mc.pump()
    return up


def test_l2_miss_goes_to_the_server_and_the_answer_is_stored_in_both():
    site = Site()
    h = site.proxy()
    c = h.client()
    reply = answer(3, max_age=60)
    upstream_miss(h, c, request_frame(X, ts=TS), reply, site)
    assert c.take() == reply
    assert h.counters()["entries"] == 1
    (mkey,) = site.mc.data_keys()
    assert site.mc.store[mkey][:2] == (FLAGS, 60)
    assert (h.counters()["shared"], h.counters()["miss"]) == (0, 1)


def test_a_second_proxy_serves_the_shared_answer_with_its_age_and_keeps_it():
    site = Site()
    a, b = site.proxy(), site.proxy()
    reply = answer(3, max_age=60)
    upstream_miss(a, a.client(), request_frame(X, ts=TS), reply, site)
    a.advance(10)
    b.advance(10)
    c = b.client()
    c.send(request_frame(X, ts=TS))
    assert c.take() == b""
    site.mc.pump()
    assert c.take() == with_max_age(reply, 50)
    assert c.marks == [wire.EXT_FROM_CACHE]  # H, as every cache hit
    assert b.attempts == 0  # the server never saw it
    assert b.counters()["shared"] == 1
    # Copied into L1: the next one is an L1 hit, with no memcached command.
    before = len(site.mc.commands)
    c.send(request_frame(X, ts=TS))
    assert c.take() == with_max_age(reply, 50)
    assert len(site.mc.commands) == before
    assert b.counters()["hit"] == 1


def both_hold_x() -> tuple[Site, Harness, Harness, object, bytes]:
    """Two polling proxies: ``a`` fetched X from the server, ``b`` (with its
    client) read it from the shared tier; both hold it in memory."""
    site = Site()
    a, b = site.proxy(poll=True), site.proxy(poll=True)
    reply = answer(3, max_age=60)
    upstream_miss(a, a.client(), request_frame(X, ts=TS), reply, site)
    c = b.client()
    c.send(request_frame(X, ts=TS))
    site.mc.pump()
    assert c.take() == reply and b.counters()["entries"] == 1
    return site, a, b, c, reply


def test_a_purge_through_one_proxy_empties_every_proxys_memory_within_a_poll(proxy_log):
    site, a, b, c, reply = both_hold_x()
    purged = fired(a.factory.purge())
    site.mc.pump()
    assert purged == [{"purged": 1, "shared": 1}]
    assert b.counters()["entries"] == 1  # b has not looked yet
    b.advance(GENERATION_POLL)
    site.mc.pump()
    assert b.counters()["entries"] == 0
    assert any("shared cache was purged" in e.get("log_format", "") for e in proxy_log)
    # Neither level has it now: the server is asked again.
    upstream_miss(b, c, request_frame(X, ts=TS), reply, site)
    assert c.take() == reply
    # a's own purge does not empty a twice when its poll reads the new generation.
    a.advance(GENERATION_POLL)
    site.mc.pump()
    assert a.counters()["entries"] == 0
    assert sum("shared cache was purged" in e.get("log_format", "") for e in proxy_log) == 1


def test_a_purge_of_one_expression_deletes_its_shared_entries():
    site = Site()
    a, b, c = site.proxy(), site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    upstream_miss(b, b.client(), request_frame(Y, ts=TS), answer(6), site)
    assert len(site.mc.data_keys()) == 2
    purged = fired(a.factory.purge([X]))
    site.mc.pump()
    assert purged == [{"purged": 1, "shared": 1}]
    assert len(site.mc.data_keys()) == 1
    # A third proxy finds Y shared, and X in neither level.
    client = c.client()
    client.send(request_frame(Y, ts=TS))
    site.mc.pump()
    assert client.take() == answer(6) and c.attempts == 0
    upstream_miss(c, client, request_frame(X, ts=TS), answer(3), site)
    assert client.take() == answer(3)


def test_an_l2_entry_the_request_finds_too_old_goes_to_the_server_and_is_replaced():
    site = Site()
    a, b = site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    for h in (a, b):
        h.advance(10)
    c = b.client()
    newer = answer(3, ts=TS + 10)
    upstream_miss(b, c, request_frame(X, max_age=5, ts=TS), newer, site)
    assert c.take() == newer
    (mkey,) = site.mc.data_keys()
    assert decode_entry(KEY[:0] + b"\x00" + X, site.mc.store[mkey][2]).stored == TS + 10


def test_reload_skips_the_l2_lookup_and_replaces_the_shared_entry():
    site = Site()
    a, b = site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    c = b.client()
    before = site.mc.commands.count(b"get")
    c.send(request_frame(X, max_age=0, ts=TS))
    assert b.attempts == 1  # straight to the server
    up = b.accept()
    assert up.take() == request_frame(X, max_age=0, ts=TS)
    newer = answer(3, ts=TS + 1)
    up.reply(newer)
    site.mc.pump()
    assert c.take() == newer
    assert site.mc.commands.count(b"get") == before
    (mkey,) = site.mc.data_keys()
    assert site.mc.store[mkey][2][:-MAC_SIZE].endswith(wire.rewrite(newer, ext=HIT))


def test_c0_requests_never_touch_the_shared_tier():
    site = Site()
    h = site.proxy()
    before = list(site.mc.commands)
    c = h.client()
    c.send(request_frame(X, cache=False, max_age=0, ts=TS))
    up = h.accept()
    up.reply(answer(3))
    site.mc.pump()
    assert site.mc.commands == before
    assert site.mc.data_keys() == []


def test_uncacheable_answers_are_not_shared():
    site = Site()
    h = site.proxy()
    upstream_miss(h, h.client(), request_frame(X, ts=TS), answer(0.5, cache=False, max_age=0), site)
    assert site.mc.data_keys() == []


def test_steps_are_in_the_shared_key():
    site = Site()
    a, b = site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    c = b.client()
    with_steps = answer(3, steps=["1 + 2", "3"])
    upstream_miss(b, c, request_frame(X, steps=True, ts=TS), with_steps, site)
    assert c.take() == with_steps
    assert len(site.mc.data_keys()) == 2


def test_l1_hits_never_wait_for_a_stalled_shared_tier():
    site = Site()
    h = site.proxy()
    c = h.client()
    upstream_miss(h, c, request_frame(X, ts=TS), answer(3), site)
    c.take()
    site.mc.stalled = True
    c.send(request_frame(X, ts=TS))
    assert c.take() == answer(3)


def test_a_stalled_tier_is_an_l2_miss_after_the_timeout():
    site = Site()
    h = site.proxy()
    site.mc.stalled = True
    c = h.client()
    c.send(request_frame(X, ts=TS))
    h.advance(0.049)
    assert h.attempts == 0
    h.advance(0.001)
    up = h.accept()
    up.reply(answer(3))
    assert c.take() == answer(3)
    assert h.counters()["failures"] == 0


def test_identical_misses_wait_for_one_l2_lookup_and_one_server_request():
    site = Site()
    h = site.proxy()
    c1, c2, c3 = h.client(), h.client(), h.client()
    for c in (c1, c2, c3):
        c.send(request_frame(X, ts=TS))
    gets = site.mc.commands.count(b"get")
    site.mc.pump()
    assert site.mc.commands.count(b"get") == gets + 1
    up = h.accept()
    up.reply(answer(3))
    assert [c.take() for c in (c1, c2, c3)] == [answer(3)] * 3
    assert h.attempts == 1
    assert (h.counters()["miss"], h.counters()["coalesced"]) == (1, 2)


def test_waiters_on_an_l2_hit_get_it_unless_they_want_a_younger_answer():
    site = Site()
    a, b = site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    b.advance(10)
    c1, c2, c3 = b.client(), b.client(), b.client()
    c1.send(request_frame(X, ts=TS))
    c2.send(request_frame(X, max_age=5, ts=TS))  # too old for this one
    c3.send(request_frame(X, max_age=20, ts=TS))
    site.mc.pump()
    assert c1.take() == answer(3)
    assert c3.take() == answer(3)
    assert c2.take() == b""
    up = b.accept()
    assert up.take() == request_frame(X, max_age=5, ts=TS)
    newer = answer(3, ts=TS + 10)
    up.reply(newer)
    assert c2.take() == newer


def test_node_down_means_misses_go_to_the_server_at_once():
    site = Site()
    h = site.proxy()
    proto, _ = site.mc.conns[0]
    proto.connectionLost(Failure(error.ConnectionLost()))
    c = h.client()
    c.send(request_frame(X, ts=TS))
    assert h.attempts == 1  # no wait for the tier
    up = h.accept()
    up.reply(answer(3))
    assert c.take() == answer(3)


def test_settings_line_mentions_the_tier():
    from helpers import built

    from twisted_cacheproxy.application import options, settings

    config = options.ProxyOptions()
    config.parseOptions(["--memcached", "127.0.0.1:11211", "--memcached", "[::1]:11212"])
    assert config["memcached"] == [("127.0.0.1", 11211), ("::1", 11212)]
    line = settings.proxy_settings(config)
    assert re.search(
        r"cache 64M, stale-if-error off, shared tier on memcached 127.0.0.1:11211, "
        r"\[::1\]:11212 \(prefix 'cacheproxy:', lookup timeout 50 ms, unsigned entries\);",
        line,
    ), line
    factory = built(config).factory
    assert factory.shared is not None
    assert factory.shared.timeout == 0.05


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memcached", "nohost"], "--memcached: not HOST:PORT: 'nohost'"),
        (["--memcached", "a:1", "--memcached", "a:1"], "--memcached: the same node is given twice"),
        (["--memcached-timeout", "0"], "--memcached-timeout must be at least 1 (ms)"),
        (["--memcached-prefix", "a b"], "--memcached-prefix: no spaces"),
    ],
)
def test_memcached_options_are_checked(argv, message):
    from twisted.python import usage

    from twisted_cacheproxy.application import options

    with pytest.raises(usage.UsageError) as info:
        options.ProxyOptions().parseOptions(argv)
    assert str(info.value).startswith(message)


# --- the secret files, and the tier without one ---------------------------------------------


def secret_file(directory, name: str = "secret", secret: bytes = SECRET, mode: int = 0o600) -> str:
    path = directory / name
    path.write_bytes(secret + b"\n")  # as `openssl rand -hex 32 > file` leaves it
    path.chmod(mode)
    return str(path)


def proxy_options(*argv: str):
    from twisted_cacheproxy.application import options

    config = options.ProxyOptions()
    config.parseOptions(list(argv))
    return config


def build(config):
    from helpers import built

    return built(config)


def start_up_warnings(log: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in log if e.get("log_namespace") == "cacheproxy"]


def test_the_secret_files_sign_the_tier_the_first_one_signing(tmp_path, proxy_log):
    from twisted_cacheproxy.application import settings

    new, old = secret_file(tmp_path, "new"), secret_file(tmp_path, "old", OLD_SECRET)
    config = proxy_options(
        "--memcached", "192.0.2.7:11211",
        "--memcached-secret-file", new,
        "--memcached-secret-file", old,
    )  # fmt: skip
    shared = build(config).factory.shared
    assert (shared.codec.keys, shared.codec.signed) == ([SECRET, OLD_SECRET], True)
    assert start_up_warnings(proxy_log) == []
    assert "lookup timeout 50 ms, signed entries)" in settings.proxy_settings(config)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660])
def test_a_secret_file_other_users_may_open_is_refused_with_one_line(tmp_path, mode):
    path = secret_file(tmp_path, mode=mode)
    config = proxy_options("--memcached", "127.0.0.1:11211", "--memcached-secret-file", path)
    with pytest.raises(SystemExit) as info:
        build(config)
    assert str(info.value) == (
        f"cacheproxy: --memcached-secret-file: {path} is open to others (mode {mode:04o}): "
        f"make it the owner's alone (chmod 600 {path})"
    )


def test_a_missing_or_short_secret_file_is_refused_with_one_line(tmp_path):
    short = secret_file(tmp_path, secret=b"15 bytes secret")
    for path, why in [
        (str(tmp_path / "nothing"), f"--memcached-secret-file: cannot read {tmp_path}/nothing: "
         "No such file or directory"),
        (short, f"--memcached-secret-file: {short} holds fewer than 16 bytes"),
    ]:  # fmt: skip
        config = proxy_options("--memcached", "127.0.0.1:11211", "--memcached-secret-file", path)
        with pytest.raises(SystemExit) as info:
            build(config)
        assert str(info.value) == f"cacheproxy: {why}"


def test_a_secret_file_needs_memcached():
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="--memcached-secret-file needs --memcached"):
        proxy_options("--memcached-secret-file", "/etc/passwd")


def test_without_a_secret_a_node_beyond_loopback_is_refused_with_one_line(proxy_log):
    config = proxy_options(
        "--memcached", "127.0.0.1:11211", "--memcached", "[2001:db8::5]:11211",
        "--memcached", "mc.example:11211",
    )  # fmt: skip
    with pytest.raises(SystemExit) as info:
        build(config)
    assert str(info.value) == (
        "cacheproxy: memcached [2001:db8::5]:11211, mc.example:11211 is beyond this host's "
        "loopback: give --memcached-secret-file so that its entries are signed "
        "(or --memcached-insecure to run without, trusting everyone who can reach it)"
    )


def test_memcached_insecure_runs_unsigned_beyond_loopback_and_says_so_once(proxy_log):
    config = proxy_options("--memcached", "192.0.2.7:11211", "--memcached-insecure")
    assert build(config).factory.shared.codec.signed is False
    assert start_up_warnings(proxy_log) == [
        "shared-tier entries are not signed (no --memcached-secret-file): anyone who can "
        "reach it can make every proxy of the site serve wrong answers by writing to "
        "memcached 192.0.2.7:11211"
    ]


@pytest.mark.parametrize("node", ["127.0.0.1:11211", "127.0.0.2:11211", "[::1]:1", "localhost:1"])
def test_without_a_secret_loopback_nodes_run_unsigned_with_one_warning(proxy_log, node):
    config = proxy_options("--memcached", node)
    assert build(config).factory.shared.codec.signed is False
    (warning,) = start_up_warnings(proxy_log)
    assert "not signed (no --memcached-secret-file): any local user can make" in warning


def test_a_worker_is_handed_the_secret_files_path_and_reads_it_itself(tmp_path, proxy_log):
    import json

    from twisted_cacheproxy.application import options

    path = secret_file(tmp_path)
    config = proxy_options(
        "--workers", "2", "--memcached", "127.0.0.1:11211", "--memcached-secret-file", path
    )
    parent = build(config)  # the parent checks the file, and keeps no secret
    (handed,) = [a for a in parent.arguments if a.startswith("{")]
    assert json.loads(handed)["memcached-secret-file"] == [path]
    assert SECRET.decode() not in "".join(parent.arguments)
    worker = options.ProxyOptions.restore(json.loads(handed), 1)
    assert build(worker).factory.shared.codec.keys == [SECRET]
    # Without a secret, the parent warns, not each worker again.
    del proxy_log[:]
    build(options.ProxyOptions.restore({**json.loads(handed), "memcached-secret-file": []}, 1))
    assert start_up_warnings(proxy_log) == []


# --- the lock across proxies (--memcached-lock-wait) ---------------------------------------


def test_with_the_lock_one_proxy_asks_the_server_and_the_other_waits_for_its_answer(clock):
    mc = FakeMemcached()
    a, b = tier(clock, lock_wait=0.5), tier(clock, lock_wait=0.5)
    mc.connect(a.nodes[0])
    mc.connect(b.nodes[0])
    first, second = fired(a.get(KEY)), fired(b.get(KEY))
    mc.pump()
    assert first == [None]  # a took the lock: it asks the server
    assert second == []  # b found the lock taken: it waits
    assert (a.locks, b.lock_waits) == (1, 1)
    clock.advance(0.02)
    mc.pump()
    assert second == []
    a.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    clock.advance(0.005)
    mc.pump()
    (entry,) = second
    assert entry.answer == STORED
    assert b.counters()["l2_lock_hits"] == 1


def test_a_lock_whose_holder_never_answers_is_waited_for_no_longer_than_lock_wait(clock):
    mc = FakeMemcached()
    a, b = tier(clock, lock_wait=0.2), tier(clock, lock_wait=0.2)
    mc.connect(a.nodes[0])
    mc.connect(b.nodes[0])
    fired(a.get(KEY))
    mc.pump()
    second = fired(b.get(KEY))
    mc.pump()
    for _ in range(39):
        clock.advance(0.005)
        mc.pump()
    assert second == []
    clock.advance(0.005)
    assert second == [None]  # b asks the server itself


def test_without_lock_wait_a_miss_takes_no_lock(clock):
    mc = FakeMemcached()
    shared = tier(clock)
    mc.connect(shared.nodes[0])
    fired(shared.get(KEY))
    mc.pump()
    assert b"add" not in mc.commands[4:]


# --- one lookup's state, whichever way it ends -------------------------------------------


def two_tiers(clock, **options) -> tuple[FakeMemcached, SharedCache, SharedCache]:
    mc = FakeMemcached()
    a, b = tier(clock, **options), tier(clock, **options)
    mc.connect(a.nodes[0])
    mc.connect(b.nodes[0])
    return mc, a, b


def lookup_ending(clock, how: str):
    """What a lookup of KEY fires with when it ends ``how``; every timer it
    set is gone afterwards."""
    mc, a, b = two_tiers(clock, lock_wait=0.2)
    proto, transport = mc.conns[1]
    if how == "hit":
        a.put(KEY, Entry(STORED, T0, 60))
        mc.pump()
    elif how == "waited for the lock holder":
        fired(a.get(KEY))  # a takes the lock
        mc.pump()
    elif how == "gave up waiting for the lock holder":
        fired(a.get(KEY))
        mc.pump()
    d = fired(b.get(KEY))
    if how == "timed out":
        clock.advance(b.timeout)
    elif how == "connection lost":
        mc.conns.remove((proto, transport))
        proto.connectionLost(Failure(error.ConnectionLost()))
    mc.pump()
    if how == "waited for the lock holder":
        clock.advance(0.05)
        mc.pump()
        a.put(KEY, Entry(STORED, T0, 60))
        mc.pump()
        clock.advance(0.005)
        mc.pump()
    elif how == "gave up waiting for the lock holder":
        for _ in range(40):
            clock.advance(0.005)
            mc.pump()
    retrying = 1 if how == "connection lost" else 0  # the node's reconnection
    assert len(clock.getDelayedCalls()) == retrying
    late = len(d)
    mc.pump()  # anything answered late changes nothing
    assert len(d) == late
    return d, b.counters()


@pytest.mark.parametrize(
    ("how", "result", "counted"),
    [
        ("hit", STORED, {"l2_hits": 1}),
        ("took the lock", None, {"l2_locks": 1}),
        ("timed out", None, {"l2_timeouts": 1}),
        ("connection lost", None, {"l2_unavailable": 1}),
        ("waited for the lock holder", STORED, {"l2_lock_waits": 1, "l2_hits": 1}),
        ("gave up waiting for the lock holder", None, {"l2_lock_waits": 1}),
    ],
)
def test_a_lookup_fires_once_counted_once_and_leaves_no_timer(clock, how, result, counted):
    d, counters = lookup_ending(clock, how)
    assert len(d) == 1
    assert (d[0] if d[0] is None else d[0].answer) == result
    if how == "waited for the lock holder":
        counted["l2_lock_hits"] = 1
    assert {k: v for k, v in counters.items() if v and k not in ("l2_lookups", "l2_stores")} == (
        counted
    )


# --- signed entries ---------------------------------------------------------------------------


def stored_under(shared: SharedCache, mc: FakeMemcached, value: bytes) -> None:
    mc.put_raw(shared.memcached_key(shared.nodes[0], KEY), value)


def unverified_lines(log: list[dict]) -> list[dict]:
    return [e for e in log if "signature does not verify" in e.get("log_format", "")]


@pytest.mark.parametrize(
    "value",
    [
        UNSIGNED.encode(KEY, Entry(STORED, T0, 60)),  # forged: the format is no secret
        tampered(SIGNED.encode(KEY, Entry(STORED, T0, 60)), -MAC_SIZE - 2),  # the result changed
        EntryCodec([OLD_SECRET]).encode(KEY, Entry(STORED, T0, 60)),  # another site's, or stale
    ],
    ids=["forged", "tampered", "another-secret"],
)
def test_an_entry_that_is_not_signed_by_the_site_is_a_miss_counted_and_logged(
    clock, proxy_log, value
):
    mc = FakeMemcached()
    shared = tier(clock, secrets=[SECRET])
    mc.connect(shared.nodes[0])
    stored_under(shared, mc, value)
    d = fired(shared.get(KEY))
    mc.pump()
    assert d == [None]
    counters = shared.counters()
    assert (counters["l2_unverified"], counters["l2_rejected"], counters["l2_hits"]) == (1, 0, 0)
    (line,) = unverified_lines(proxy_log)
    assert line["node"] == "memcached 127.0.0.1:11211" and line["count"] == 1
    assert line["log_level"] == LogLevel.warn


def test_unverified_entries_are_logged_at_most_once_a_minute(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock, secrets=[SECRET])
    mc.connect(shared.nodes[0])
    stored_under(shared, mc, UNSIGNED.encode(KEY, Entry(STORED, T0, 60)))
    for _ in range(5):
        fired(shared.get(KEY))
        mc.pump()
        clock.advance(10)
    assert [e["count"] for e in unverified_lines(proxy_log)] == [1]
    clock.advance(10)  # a minute after the first line
    fired(shared.get(KEY))
    mc.pump()
    assert [e["count"] for e in unverified_lines(proxy_log)] == [1, 6]
    assert shared.counters()["l2_unverified"] == 6


def test_a_signed_entry_is_shared_and_a_proxy_with_another_secret_cannot_read_it(clock):
    mc = FakeMemcached()
    a, b = tier(clock, secrets=[SECRET]), tier(clock, secrets=[SECRET])
    stranger = tier(clock, secrets=[OLD_SECRET])
    for shared in (a, b, stranger):
        mc.connect(shared.nodes[0])
    a.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    (mkey,) = mc.data_keys()
    assert SIGNED.decode(KEY, mc.store[mkey][2]).answer == STORED
    d, other = fired(b.get(KEY)), fired(stranger.get(KEY))
    mc.pump()
    assert d[0].answer == STORED
    assert other == [None] and stranger.counters()["l2_unverified"] == 1


def test_a_rotation_reads_old_entries_and_writes_new_ones(clock):
    mc = FakeMemcached()
    old = tier(clock, secrets=[OLD_SECRET])  # not yet given the new secret
    rotating = tier(clock, secrets=[SECRET, OLD_SECRET])
    new = tier(clock, secrets=[SECRET])  # the old secret dropped
    for shared in (old, rotating, new):
        mc.connect(shared.nodes[0])
    old.put(KEY, Entry(STORED, T0, 60))
    mc.pump()
    d = fired(rotating.get(KEY))
    mc.pump()
    assert d[0].answer == STORED
    rotating.put(KEY, Entry(STORED, T0 + 1, 60))
    mc.pump()
    (mkey,) = mc.data_keys()
    assert SIGNED.decode(KEY, mc.store[mkey][2]).stored == T0 + 1  # signed with the first
    d = fired(new.get(KEY))
    mc.pump()
    assert d[0].stored == T0 + 1


def test_a_lock_waiter_never_takes_a_forged_entry_for_the_holders_answer(clock):
    mc, a, b = two_tiers(clock, lock_wait=0.1, secrets=[SECRET])
    fired(a.get(KEY))
    mc.pump()
    d = fired(b.get(KEY))
    mc.pump()
    stored_under(b, mc, UNSIGNED.encode(KEY, Entry(STORED, T0, 60)))
    for _ in range(20):
        clock.advance(0.005)
        mc.pump()
    assert d == [None]
    assert b.counters()["l2_unverified"] >= 1 and b.counters()["l2_lock_hits"] == 0


def test_stopping_the_tier_logs_nothing_and_stops_reconnecting(clock, proxy_log):
    mc = FakeMemcached()
    shared = tier(clock, n=2)
    up, down = shared.nodes
    proto, transport = mc.connect(up)
    mc.refuse(down)  # waiting to retry
    warned = len(warnings(proxy_log))
    shared.stop()
    assert transport.disconnecting
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert clock.getDelayedCalls() == []  # no retry for either
    assert len(warnings(proxy_log)) == warned
    assert len(mc.reactor.tcpClients) == 2


def test_the_tier_is_in_the_metrics_stats_and_status_page():
    from helpers import scrape, success_of
    from twisted.web.template import flattenString

    from twisted_cacheproxy.operations.metrics import ProxyMetrics
    from twisted_cacheproxy.operations.statuspage import ProxyStatus

    site = Site()
    a, b = site.proxy(), site.proxy()
    metrics = ProxyMetrics(b.factory)
    b.factory.observer = metrics
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    c = b.client()
    c.send(request_frame(X, ts=TS))  # an L2 hit
    site.mc.pump()
    c.send(request_frame(Y, ts=TS))  # an L2 miss, answered by b's server and stored
    site.mc.pump()
    up = b.accept()
    up.reply(answer(6))
    site.mc.pump()
    assert c.take() == answer(3) + answer(6)
    m = scrape(metrics)
    totals = {name: m[f"cacheproxy_shared_{name}_total", ()] for name in ("lookups", "hits")}
    assert totals == {"lookups": 2, "hits": 1}
    assert m["cacheproxy_shared_stores_total", ()] == 1
    assert m["cacheproxy_shared_node_up", (("node", "127.0.0.1:11211"),)] == 1
    assert (metrics.requests["shared"], metrics.requests["miss"]) == (1, 1)
    shared = metrics.figures()["shared"]
    assert (shared["lookups"], shared["hits"], shared["nodes"]) == (2, 1, {"127.0.0.1:11211": "up"})
    page = success_of(flattenString(None, ProxyStatus(metrics, "t"))).decode()
    assert '<td class="n" id="shared-hit-ratio">50.0%</td>' in page
    assert Harness().factory.shared is None
    assert ProxyMetrics(Harness().factory).figures()["shared"] is None


def test_a_forged_entry_is_never_an_answer_and_is_counted_in_the_metrics():
    from twisted_cacheproxy.operations.metrics import ProxyMetrics

    site = Site(secrets=(SECRET,))
    h = site.proxy()
    metrics = ProxyMetrics(h.factory)
    h.factory.observer = metrics
    key = b"\x00" + X
    lie = answer(42, max_age=60)
    site.mc.put_raw(
        h.shared.memcached_key(h.shared.nodes[0], key), UNSIGNED.encode(key, Entry(lie, T0, 60))
    )
    c = h.client()
    upstream_miss(h, c, request_frame(X, ts=TS), answer(3), site)
    assert c.take() == answer(3)
    m = scrape(metrics)
    assert (m["cacheproxy_shared_unverified_total", ()], m["cacheproxy_shared_hits_total", ()]) == (
        1,
        0,
    )
    assert metrics.figures()["shared"]["unverified"] == 1
    # The server's answer replaced it, signed.
    (mkey,) = site.mc.data_keys()
    assert SIGNED.decode(key, site.mc.store[mkey][2]).answer == wire.rewrite(answer(3), ext=HIT)


def test_a_lookup_answered_before_the_purge_does_not_bring_a_purged_answer_back():
    site = Site()
    a, b = site.proxy(poll=True), site.proxy(poll=True)
    reply = answer(3, max_age=60)
    upstream_miss(b, b.client(), request_frame(X, ts=TS), reply, site)  # X shared
    c = a.client()
    c.send(request_frame(X, ts=TS))  # a's lookup is on its way...
    purged = fired(a.factory.purge())  # ...when a purges: the lookup is answered first
    site.mc.pump()
    assert c.take() == reply  # served, as it was asked for before the purge
    assert purged == [{"purged": 1, "shared": 1}]
    assert a.counters()["entries"] == 0  # but not kept
    for _ in range(2):
        a.advance(GENERATION_POLL)
        site.mc.pump()
    assert a.counters()["entries"] == 0


def test_a_purge_made_while_a_proxy_was_cut_off_is_noticed_once_it_is_back():
    site, a, b, c, _ = both_hold_x()
    proto, transport = site.mc.conns[1]  # b's connection to the node drops
    site.mc.conns.remove((proto, transport))
    proto.connectionLost(Failure(error.ConnectionLost()))
    fired(a.factory.purge())
    site.mc.pump()
    b.advance(FIRST_RETRY)
    site.mc.connect(b.shared.nodes[0])  # b is back: it reads the generation at once
    site.mc.pump()
    assert b.counters()["entries"] == 0
    c.send(request_frame(X, ts=TS))
    site.mc.pump()
    assert c.take() == b"" and b.counters()["hit"] == 0  # asked of the server again


def test_a_node_down_at_the_purge_is_purged_once_it_is_back(proxy_log):
    site = Site()
    a, b = site.proxy(), site.proxy()
    upstream_miss(a, a.client(), request_frame(X, ts=TS), answer(3), site)
    proto, transport = site.mc.conns[0]  # a is cut off from the node
    site.mc.conns.remove((proto, transport))
    proto.connectionLost(Failure(error.ConnectionLost()))
    purged = fired(a.factory.purge())
    assert purged == [{"purged": 1, "shared": 0}]
    assert any("purged once it is back" in e.get("log_format", "") for e in proxy_log)
    a.advance(FIRST_RETRY)
    site.mc.connect(a.shared.nodes[0])
    site.mc.pump()
    # b, which never saw the purge, finds X gone from the shared tier.
    c = b.client()
    upstream_miss(b, c, request_frame(X, ts=TS), answer(3), site)
    assert c.take() == answer(3)
