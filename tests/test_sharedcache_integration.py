"""The shared cache tier against real memcached processes on 127.0.0.1:
two ``twistd cacheproxy`` processes sharing one memcached, and proxies in
this process put through memcached's faults (not running, stopped,
restarted, stalled with SIGSTOP, one of two nodes down, values that are not
ours). Every memcached runs on a port of its own and is stopped by its PID.

Without memcached installed the tests are skipped; with ``CI`` set they fail.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import socket
import struct
import subprocess
import time

import pytest
import pytest_twisted
from helpers import request_frame
from processes import HOST, Memcached, deferLater, exchange, free_port, raw, script, start_proxy
from standins import CountingServer
from twisted.internet import defer

from twisted_cacheproxy.proxy.cache import MemoryCache
from twisted_cacheproxy.proxy.factory import CacheProxyFactory
from twisted_cacheproxy.proxy.sharedcache import SharedCache
from twisted_cacheproxy.proxy.upstream import TCPConnector, UpstreamPool
from twisted_cacheproxy.transport import wire

pytestmark = pytest.mark.integration

WAIT = 10.0


# --- proxies in this process ------------------------------------------------------------


def in_process_proxy(server_port: int, nodes: list[Memcached], *, timeout: float = 0.1, **kw):
    """A proxy as ``twistd cacheproxy --memcached ...`` builds it, in this process."""
    from twisted.internet import reactor

    shared = SharedCache([(HOST, m.port) for m in nodes], reactor, timeout=timeout)
    pool = UpstreamPool(TCPConnector(reactor, HOST, server_port), reactor, retry_delay=0.05)
    factory = CacheProxyFactory(
        MemoryCache(kw.pop("cache_size", 64 << 20), reactor), pool, shared=shared
    )
    port = reactor.listenTCP(0, factory, interface=HOST)  # starts the factory: connects
    return factory, port


def plain(text: str) -> bytes:
    """A cacheable request without steps (its key: ``b"\\x00" + text``)."""
    return request_frame(text, steps=False)


@defer.inlineCallbacks
def until(condition, what: str, seconds: float = WAIT):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        yield deferLater(0.02)


def up(factory) -> bool:
    return all(n.protocol is not None and n.generation for n in factory.shared.nodes)


@defer.inlineCallbacks
def ask_one(port: int, frame: bytes):
    ((header, data),) = yield exchange(port, frame)
    return header, data


@pytest_twisted.inlineCallbacks
def test_memcached_down_at_start_stopped_and_restarted_never_fails_a_request(memcached, proxy_log):
    server = CountingServer()
    server_port = server.listen()
    node = memcached(start=False)
    factory, listening = in_process_proxy(server_port, [node])
    port = listening.getHost().port
    try:
        # Not running: every request is answered, from the server.
        for k in range(3):
            header, _ = yield ask_one(port, plain(f"{k} + 1"))
            assert header.status == wire.OK
        assert len(server.requests) == 3
        node.start()
        yield until(lambda: up(factory), "the proxy to connect to memcached")
        header, _ = yield ask_one(port, plain("10 + 1"))  # stored in both
        yield until(lambda: node.keys_stored() == 2, "the entry in memcached")  # and gen
        node.stop()
        for k in range(3):
            header, _ = yield ask_one(port, plain(f"{k} + 20"))
            assert header.status == wire.OK
        yield until(lambda: not up(factory), "the proxy to notice")
        header, _ = yield ask_one(port, plain("10 + 1"))  # from L1 meanwhile
        assert header.from_cache
        node.start()  # same port, empty
        yield until(lambda: up(factory), "the proxy to reconnect by itself")
        header, _ = yield ask_one(port, plain("30 + 1"))
        assert header.status == wire.OK
        yield until(lambda: node.keys_stored() == 2, "the new entry in memcached")
        texts = [e.get("log_format", "") for e in proxy_log if "node" in e]
        kinds = [t.split(" ")[0] for t in texts]
        assert kinds == ["{node}"] * 4, texts
        assert ["unreachable" in texts[0], "connected" in texts[1], "lost" in texts[2]] == [
            True
        ] * 3
        assert "connected" in texts[3]
    finally:
        yield listening.stopListening()
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_a_stalled_memcached_costs_a_miss_its_timeout_and_never_delays_l1_hits(memcached):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    factory, listening = in_process_proxy(server_port, [node], timeout=0.1)
    port = listening.getHost().port
    try:
        yield until(lambda: up(factory), "the proxy to connect")
        yield ask_one(port, plain("1 + 2"))
        node.pause()
        try:
            lookups = factory.shared.counters()["l2_lookups"]
            header, _ = yield ask_one(port, plain("1 + 2"))
            assert header.from_cache
            # L1: memcached is not even asked, so nothing waits for it.
            assert factory.shared.counters()["l2_lookups"] == lookups
            for k in range(3):
                before, asked = factory.shared.counters(), len(server.requests)
                header, data = yield ask_one(port, plain(f"{k} * 7"))
                assert (header.status, data) == (wire.OK, b'{"result": %d, "steps": []}' % (k * 7))
                after = factory.shared.counters()
                went = {name: after[name] - before[name] for name in after}
                # One lookup, ended by its timeout (or, once the connection was
                # given up, not even asked): a miss, answered by the server.
                assert (went["l2_lookups"], went["l2_hits"], len(server.requests)) == (
                    1,
                    0,
                    asked + 1,
                )
                assert went["l2_timeouts"] + went["l2_unavailable"] == 1, went
            assert factory.shared.counters()["l2_timeouts"] >= 1
        finally:
            node.resume()
        yield until(lambda: up(factory), "the proxy to be back on memcached")
        hits = factory.shared.counters()["l2_hits"]
        # A second proxy with an empty L1 reads what the first stored after the stall.
        yield ask_one(port, plain("5 * 7"))
        other, other_port = in_process_proxy(server_port, [node])
        try:
            yield until(lambda: up(other), "the second proxy to connect")
            yield until(lambda: node.keys_stored() >= 3, "the entries to be stored")
            before = len(server.requests)
            header, _ = yield ask_one(other_port.getHost().port, plain("5 * 7"))
            assert header.from_cache and len(server.requests) == before
            assert other.shared.counters()["l2_hits"] == 1
        finally:
            yield other_port.stopListening()
        assert factory.shared.counters()["l2_hits"] == hits
    finally:
        yield listening.stopListening()
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_values_that_are_not_ours_are_misses_never_answers(memcached):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    factory, listening = in_process_proxy(server_port, [node])
    port = listening.getHost().port
    shared = factory.shared
    try:
        yield until(lambda: up(factory), "the proxy to connect")
        # An honest entry for "2 + 2", to copy under other keys.
        yield ask_one(port, plain("2 + 2"))
        yield until(lambda: node.keys_stored() == 2, "the entry in memcached")
        honest_key = shared.memcached_key(shared.nodes[0], b"\x00" + b"2 + 2")
        reply = node.command(b"get " + honest_key + b"\r\n")
        honest = reply.split(b"\r\n", 1)[1][: -len(b"\r\nEND\r\n")]
        values = {
            "1 + 1": (0x7443, b"garbage"),
            "1 + 3": (0x7443, honest[:-3]),  # truncated
            "1 + 4": (0x7443, honest + b"xx"),  # wrong length
            "1 + 5": (0x7443, honest),  # another key's entry under this digest
            "1 + 6": (0, honest),  # not our flags
        }
        for text, (flags, value) in values.items():
            mkey = shared.memcached_key(shared.nodes[0], b"\x00" + text.encode())
            line = b"set %s %d 0 %d\r\n%s\r\n" % (mkey, flags, len(value), value)
            assert node.command(line) == b"STORED\r\n"
        before = len(server.requests)
        for text in values:
            header, data = yield ask_one(port, plain(text))
            expected = int(text[0]) + int(text[-1])
            assert (header.status, header.from_cache) == (wire.OK, False)
            assert data == b'{"result": %d, "steps": []}' % expected
        assert len(server.requests) == before + len(values)
        assert shared.counters()["l2_rejected"] == len(values)
    finally:
        yield listening.stopListening()
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_one_of_two_nodes_down_its_keys_go_to_the_server_the_others_still_hit(memcached):
    server = CountingServer()
    server_port = server.listen()
    first, second = memcached(), memcached()
    a, a_port = in_process_proxy(server_port, [first, second])
    try:
        yield until(lambda: up(a), "the proxy to connect to both")
        texts = [f"{k} + 100" for k in range(16)]
        for text in texts:
            yield ask_one(a_port.getHost().port, plain(text))
        on_second = {
            t for t in texts if a.shared.node_for(b"\x00" + t.encode()).port == second.port
        }
        assert 0 < len(on_second) < len(texts)
        yield until(lambda: first.keys_stored() + second.keys_stored() == 18, "the entries")
        second.stop()
        yield until(lambda: a.shared.nodes[1].protocol is None, "the proxy to notice")
        # A second proxy (empty L1) on the same two nodes, one of them down.
        b, b_port = in_process_proxy(server_port, [first, second])
        try:
            yield until(lambda: b.shared.nodes[0].generation is not None, "b to connect")
            before = len(server.requests)
            for text in texts:
                header, _ = yield ask_one(b_port.getHost().port, plain(text))
                assert header.status == wire.OK
                assert header.from_cache == (text not in on_second)
            assert len(server.requests) == before + len(on_second)
        finally:
            yield b_port.stopListening()
    finally:
        yield a_port.stopListening()
        yield server.close()


# --- two twistd proxies sharing one memcached ---------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_two_twistd_proxies_share_answers_and_a_restarted_one_keeps_serving_them(memcached, twistd):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    try:
        options = ("--memcached", node.address, "--memcached-timeout", "200")
        a = start_proxy(twistd, server_port, *options)
        b = start_proxy(twistd, server_port, *options)
        for p in (a, b):
            yield until(lambda p=p: "connected" in p.text(), "the proxies to connect")
        frame = request_frame("max(2, 3) + 3", steps=True)
        ((first, first_data),) = yield exchange(a.port, frame)
        assert (first.status, first.from_cache) == (wire.OK, False)
        assert len(server.requests) == 1
        yield until(lambda: node.keys_stored() == 2, "the shared entry")
        ((second, second_data),) = yield exchange(b.port, frame)
        assert second.from_cache and second_data == first_data
        assert len(server.requests) == 1  # B answered without the server
        assert raw((second, second_data)) == raw((first, first_data))
        connected = b.text().count("connected: shared cache tier on")
        b.stop()
        b.start()
        yield until(
            lambda: b.text().count("connected: shared cache tier on") > connected,
            "the restarted proxy to connect",
        )
        ((third, third_data),) = yield exchange(b.port, frame)
        assert third.from_cache and third_data == first_data
        assert len(server.requests) == 1
        assert "shared tier on memcached " + node.address in b.text()
    finally:
        yield server.close()


@pytest.mark.parametrize(("lock_wait", "per_key"), [(0, 2), (2000, 1)])
@pytest.mark.usefixtures("proxy_log")
@pytest_twisted.inlineCallbacks
def test_identical_misses_at_two_proxies_reach_the_server_once_with_the_lock(
    memcached, twistd, lock_wait, per_key
):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    try:
        # A lookup that times out goes to the server without the lock: on a
        # busy machine the default 50 ms would let a sixth request through.
        options = ("--memcached", node.address, "--memcached-lock-wait", str(lock_wait))
        options += ("--memcached-timeout", "2000")
        a = start_proxy(twistd, server_port, *options)
        b = start_proxy(twistd, server_port, *options)
        for p in (a, b):
            yield until(lambda p=p: "connected" in p.text(), "the proxies to connect")
        frames = [plain(f"{k} + 1000") for k in range(5)]
        # No answer (so nothing stored in memcached) until the server has as
        # many requests as expected: a proxy that reached memcached late
        # cannot find the other's answer there, whatever the machine's load;
        # with the lock, a sixth request still gets through if it is broken.
        server.hold(per_key * len(frames))
        answers = yield defer.gatherResults([exchange(p.port, f) for f in frames for p in (a, b)])
        for k, ((header, data),) in enumerate(answers):
            assert header.status == wire.OK
            assert data == b'{"result": %d, "steps": []}' % (k // 2 + 1000)
        assert len(server.requests) == per_key * len(frames)
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_twistd_proxy_without_its_memcached_answers_and_says_so_once(memcached, twistd):
    server = CountingServer()
    server_port = server.listen()
    node = memcached(start=False)
    try:
        p = start_proxy(twistd, server_port, "--memcached", node.address)
        for k in range(5):
            ((header, _),) = yield exchange(p.port, plain(f"{k} + 2"))
            assert header.status == wire.OK
        yield deferLater(0.5)  # a few reconnection attempts
        assert p.text().count("unreachable") == 1
        node.start()
        yield until(lambda: "connected" in p.text(), "the proxy to connect by itself")
        ((header, _),) = yield exchange(p.port, plain("0 + 2"))
        assert header.from_cache  # from L1 meanwhile
    finally:
        yield server.close()


# --- signed entries ------------------------------------------------------------------------------

#: The entry header as docs/shared-tier.md documents it (what anyone may write).
DOCUMENTED = struct.Struct("!4sBBHdHI")
#: A cacheable answer with the L and H marks, as proxies store them.
HIT = wire.EXT_FRAMED | wire.EXT_FROM_CACHE


def secret_file(directory: pathlib.Path, name: str) -> tuple[str, bytes]:
    """A new secret in a file readable by its owner only: its path and the secret."""
    secret = os.urandom(32).hex().encode()
    path = directory / name
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return str(path), secret


def value_of(node: Memcached, key: bytes) -> bytes | None:
    """What memcached holds under ``key`` (None: nothing)."""
    with socket.create_connection((HOST, node.port), timeout=WAIT) as s:
        s.sendall(b"get " + key + b"\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += s.recv(65536)
        if reply == b"END\r\n":
            return None
        first, _, rest = reply.partition(b"\r\n")  # VALUE <key> <flags> <bytes>
        size = int(first.split()[3])
        while len(rest) < size + len(b"\r\nEND\r\n"):
            chunk = s.recv(65536)
            assert chunk, "memcached closed the connection"
            rest += chunk
        return rest[:size]


def store(node: Memcached, key: bytes, value: bytes) -> None:
    """Write ``value`` under ``key`` with our flags word, as anyone may."""
    line = b"set %s %d 0 %d\r\n%s\r\n" % (key, 0x7443, len(value), value)
    assert node.command(line) == b"STORED\r\n"


def entry_key(node: Memcached, text: str) -> bytes:
    """The memcached key of the plain request ``text`` (default prefix)."""
    generation = value_of(node, b"cacheproxy:gen")
    assert generation is not None
    digest = hashlib.sha256(b"\x00" + text.encode()).hexdigest().encode()
    return b"cacheproxy:" + generation + b":" + digest


def forged(text: str, payload: bytes, version: int) -> bytes:
    """An entry claiming ``payload`` answers ``text``, written from the
    documented format: version 1 unsigned, version 2 with an unkeyed MAC."""
    key = b"\x00" + text.encode()
    flags = wire.make_flags(request=False, status=wire.OK, cache=True)
    answer = wire.encode(int(time.time()), flags, wire.FOREVER, payload, HIT)
    fields = DOCUMENTED.pack(b"TCPX", version, 0, wire.FOREVER, time.time(), len(key), len(answer))
    entry = fields + key + answer
    return entry if version == 1 else entry + hmac.digest(b"", entry, "sha256")


def signed_with(secret: bytes, value: bytes) -> bool:
    return hmac.compare_digest(hmac.digest(secret, value[:-32], "sha256"), value[-32:])


@defer.inlineCallbacks
def signed_proxies(twistd, server_port: int, node: Memcached, *secret_files: tuple[str, ...]):
    """A ``twistd cacheproxy`` on ``node`` per tuple of secret files, once all have connected."""
    proxies = []
    for files in secret_files:
        signed = [arg for path in files for arg in ("--memcached-secret-file", path)]
        # A generous lookup timeout: a busy machine must not turn a hit into a miss.
        options = ("--memcached", node.address, "--memcached-timeout", "2000", *signed)
        proxies.append(start_proxy(twistd, server_port, *options))
    for p in proxies:
        yield until(lambda p=p: "connected" in p.text(), "the proxies to connect")
    return proxies


@pytest_twisted.inlineCallbacks
def test_forged_and_tampered_entries_are_misses_while_a_genuine_one_is_shared(
    memcached, twistd, tmp_path
):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    path, secret = secret_file(tmp_path, "secret")
    try:
        a, b = yield signed_proxies(twistd, server_port, node, (path,), (path,))
        # Through a: a genuine entry, and one the test then alters.
        for text in ("2 + 2", "3 + 3"):
            yield ask_one(a.port, plain(text))
        yield until(lambda: node.keys_stored() == 3, "the entries in memcached")
        assert signed_with(secret, value_of(node, entry_key(node, "2 + 2")))
        six = value_of(node, entry_key(node, "3 + 3"))
        assert b'{"result": 6,' in six
        store(node, entry_key(node, "3 + 3"), six.replace(b'"result": 6', b'"result": 7'))
        # Forged by someone who read the format: unsigned, and with a MAC keyed by nothing.
        store(node, entry_key(node, "6 * 9"), forged("6 * 9", b'{"result": 42, "steps": []}', 1))
        store(node, entry_key(node, "5 * 9"), forged("5 * 9", b'{"result": 42, "steps": []}', 2))
        asked = len(server.requests)
        header, data = yield ask_one(b.port, plain("2 + 2"))
        assert (header.from_cache, data) == (True, b'{"result": 4, "steps": []}')
        assert len(server.requests) == asked  # shared: b never asked the server
        for text, result in [("3 + 3", 6), ("6 * 9", 54), ("5 * 9", 45)]:
            header, data = yield ask_one(b.port, plain(text))
            assert (header.status, header.from_cache) == (wire.OK, False)
            assert data == b'{"result": %d, "steps": []}' % result
        assert len(server.requests) == asked + 3
        # The altered entry and the one with an unkeyed MAC failed their MAC: said once.
        assert b.text().count("signature does not verify") == 1
        assert "signature does not verify" not in a.text()
        # b's answer replaced the altered entry, signed.
        yield until(
            lambda: b'"result": 6' in (value_of(node, entry_key(node, "3 + 3")) or b""),
            "the altered entry to be replaced",
        )
        assert signed_with(secret, value_of(node, entry_key(node, "3 + 3")))
    finally:
        yield server.close()


@pytest_twisted.inlineCallbacks
def test_a_secret_rotation_reads_old_entries_and_signs_new_ones_with_the_first(
    memcached, twistd, tmp_path
):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    old, old_secret = secret_file(tmp_path, "old")
    new, new_secret = secret_file(tmp_path, "new")
    try:
        before, rotating = yield signed_proxies(twistd, server_port, node, (old,), (new, old))
        yield ask_one(before.port, plain("4 + 4"))
        yield until(lambda: node.keys_stored() == 2, "the old-secret entry")
        assert signed_with(old_secret, value_of(node, entry_key(node, "4 + 4")))
        asked = len(server.requests)
        header, _ = yield ask_one(rotating.port, plain("4 + 4"))
        assert header.from_cache and len(server.requests) == asked  # verified with the old one
        yield ask_one(rotating.port, plain("5 + 5"))
        yield until(lambda: node.keys_stored() == 3, "the new-secret entry")
        value = value_of(node, entry_key(node, "5 + 5"))
        assert signed_with(new_secret, value) and not signed_with(old_secret, value)
        # A proxy still on the old secret alone cannot read it: a miss, never a wrong answer.
        header, data = yield ask_one(before.port, plain("5 + 5"))
        assert (header.from_cache, data) == (False, b'{"result": 10, "steps": []}')
        assert len(server.requests) == asked + 2
        assert before.text().count("signature does not verify") == 1
    finally:
        yield server.close()


def command_lines(pid: int) -> dict[int, bytes]:
    """The command lines of ``pid`` and of its children, by PID."""
    lines = {pid: pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                child = int(stat.parent.name)
                lines[child] = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # a process that ended meanwhile
    return lines


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest_twisted.inlineCallbacks
def test_workers_read_the_secret_file_themselves_and_no_command_line_holds_it(
    memcached, twistd, tmp_path, signed
):
    server = CountingServer()
    server_port = server.listen()
    node = memcached()
    path, secret = secret_file(tmp_path, "secret")
    try:
        extra = ("--memcached-secret-file", path) if signed else ()
        p = start_proxy(twistd, server_port, "--workers", "2", "--memcached", node.address, *extra)
        yield until(lambda: p.text().count("connected: shared") == 2, "both workers to connect")
        lines = command_lines(p.pid)
        assert len(lines) == 3  # the parent and its two workers
        assert not any(secret in line for line in lines.values())
        handed = [line for line in lines.values() if b"application.worker" in line]
        assert len(handed) == 2 and all((path.encode() in line) == signed for line in handed)
        yield ask_one(p.port, plain("6 + 6"))
        yield until(lambda: node.keys_stored() == 2, "the entry")
        assert signed_with(secret, value_of(node, entry_key(node, "6 + 6"))) == signed
        # Without a secret: one warning, from the parent, not one per worker.
        assert p.text().count("entries are not signed") == (0 if signed else 1)
    finally:
        yield server.close()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--memcached", "192.0.2.9:11211"],
            "memcached 192.0.2.9:11211 is beyond this host's loopback: give "
            "--memcached-secret-file so that its entries are signed (or --memcached-insecure "
            "to run without, trusting everyone who can reach it)",
        ),
        (
            ["--memcached", "127.0.0.1:11211", "--memcached-secret-file", "{open}"],
            "--memcached-secret-file: {open} is open to others (mode 0644): make it "
            "the owner's alone (chmod 600 {open})",
        ),
    ],
    ids=["unsigned-beyond-loopback", "open-secret-file"],
)
def test_twistd_refuses_with_one_line(tmp_path, argv, line):
    open_file = tmp_path / "open"
    open_file.write_bytes(os.urandom(32).hex().encode())
    open_file.chmod(0o644)
    argv = [a.replace("{open}", str(open_file)) for a in argv]
    command = [script("twistd"), "-n", "--pidfile=", "cacheproxy", "--port", str(free_port())]
    proc = subprocess.run(
        command + argv, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "cacheproxy: " + line.replace("{open}", str(open_file)) + "\n"
