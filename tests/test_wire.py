"""The 12-byte header, `FrameReceiver` framing/timeout/backpressure, `FrameClient`."""

from __future__ import annotations

import struct

import pytest
from helpers import failure_of, request_frame, success_of
from twisted.internet import error, task
from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.endpoint import BatchedWrites
from twisted_cacheproxy.transport.frameclient import FrameClient, OutOfStepError, ProtocolError
from twisted_cacheproxy.transport.framing import FrameReceiver

# --- header ------------------------------------------------------------------


def test_header_layout_is_network_order_with_zero_padding():
    flags = wire.make_flags(request=True, cache=True, steps=True)
    frame = wire.encode(0x01020304, flags, 0x0506, b"xy")
    assert frame == b"\x01\x02\x03\x04" + b"\x00\x0e" + b"\x1c\x00" + b"\x05\x06" + b"\x00\x00xy"
    assert wire.HEADER_SIZE == 12


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"request": True}, 0x0400),
        ({"request": False, "status": 200}, 200),
        ({"request": False, "status": 400, "cache": True}, 0x1000 | 400),
        ({"request": False, "status": 500, "steps": True}, 0x0800 | 500),
        ({"request": True, "cache": True, "steps": True}, 0x1C00),
        ({"request": False, "status": 1023}, 0x03FF),
    ],
)
def test_make_flags_bit_positions(kwargs, word):
    assert wire.make_flags(**kwargs) == word


@pytest.mark.parametrize("status", [-1, 1024, 65535])
def test_make_flags_refuses_a_status_beyond_ten_bits(status):
    with pytest.raises(ValueError, match=f"status {status} does not fit in 10 bits"):
        wire.make_flags(request=False, status=status)


def test_decode_header_reads_every_field_and_flag():
    raw = struct.pack("!LHHHxx", 1_700_000_000, 99, 0x1000 | 0x0800 | 200, 300) + b"rest"
    h = wire.decode_header(raw)
    assert h == wire.Header(1_700_000_000, 99, 0x1000 | 0x0800 | 200, 300)
    assert (h.timestamp, h.length, h.max_age) == (1_700_000_000, 99, 300)
    assert (h.cache, h.steps, h.request, h.status) == (True, True, False, 200)


def test_decode_header_at_an_offset():
    raw = b"junk" + wire.encode(7, wire.make_flags(request=True), 65535, b"1+1")
    assert wire.decode_header(raw, 4) == wire.Header(7, 15, 0x0400, 65535)


def test_reserved_bits_and_padding_are_ignored_on_receipt():
    raw = struct.pack("!LHHH", 1, 12, 0xE000 | 0x0400 | 0, 5) + b"\xff\xff"
    h = wire.decode_header(raw)
    assert (h.request, h.cache, h.steps, h.status) == (True, False, False, 0)
    raw = struct.pack("!LHHH", 1, 12, 0xE000 | 0x1000 | 400, 5) + b"\x12\x34"
    h = wire.decode_header(raw)
    assert (h.request, h.cache, h.steps, h.status) == (False, True, False, 400)


def test_encode_length_and_timestamp_wrap():
    """The time stamp field is 32 bits: a later clock wraps rather than failing the answer."""
    frame = wire.encode(2**32 + 5, 0, 0, b"a" * 100)
    h = wire.decode_header(frame)
    assert (h.timestamp, h.length) == (5, 112)
    assert len(frame) == 112
    assert wire.decode_header(wire.encode(9, 0, 0, b"")).length == 12


def test_encode_refuses_more_than_the_length_field_holds():
    assert len(wire.encode(0, 0, 0, b"x" * (65535 - 12))) == 65535
    with pytest.raises(ValueError, match="65536 bytes exceeds the 65535-byte limit"):
        wire.encode(0, 0, 0, b"x" * (65536 - 12))


# --- FrameReceiver --------------------------------------------------------------


class Recorder(FrameReceiver):
    """Records frames; answers an impossible header with one 400 message."""

    def __init__(self, pause_on=None):
        self.frames = []
        self.invalid = []
        self.pause_on = pause_on

    def frameReceived(self, header, data):
        self.frames.append((header, data))
        if data == self.pause_on:
            self.pauseProducing()

    def invalidFrame(self, reason, first):
        self.invalid.append((reason, first))
        flags = wire.make_flags(request=False, status=wire.BAD_REQUEST)
        self.transport.write(wire.encode(0, flags, 0, reason.encode()))
        self.transport.loseConnection()


@pytest.fixture
def clock():
    return task.Clock()


def connect(proto, clock=None):
    t = StringTransport()
    if clock is not None:
        proto.clock = clock  # the idle timer and the turns run on it
    proto.makeConnection(t)
    return t


def datas(proto):
    return [data for _, data in proto.frames]


def test_connection_registers_the_protocol_as_a_streaming_producer():
    """So that a peer that stops reading pauses the protocol instead of answers piling up."""
    p = Recorder()
    t = connect(p)
    assert t.producer is p
    assert t.streaming is True


def test_one_whole_frame():
    p = Recorder()
    connect(p)
    p.dataReceived(request_frame(b"1 + 2", cache=False, max_age=65535, ts=42))
    assert p.frames == [(wire.Header(42, 17, 0x0400, 65535), b"1 + 2")]


def test_frame_split_across_reads():
    p = Recorder()
    connect(p)
    frame = request_frame(b"max(2, 3) + 3", cache=False, max_age=65535, ts=1)
    p.dataReceived(frame[:5])  # not even a whole header
    p.dataReceived(frame[5:14])  # header and two data bytes
    assert p.frames == []
    p.dataReceived(frame[14:])
    assert datas(p) == [b"max(2, 3) + 3"]


def test_coalesced_frames_and_a_trailing_partial_one():
    p = Recorder()
    connect(p)
    frames = [
        request_frame(b"1", cache=False, max_age=65535, ts=1),
        request_frame(b"", cache=False, max_age=65535, ts=1),
        request_frame(b"22" * 50, cache=False, max_age=65535, ts=1),
        request_frame(b"333", cache=False, max_age=65535, ts=1),
    ]
    stream = b"".join(frames)
    p.dataReceived(stream[:-2])
    assert datas(p) == [b"1", b"", b"22" * 50]
    p.dataReceived(stream[-2:])
    assert datas(p) == [b"1", b"", b"22" * 50, b"333"]


def test_byte_by_byte_delivery():
    p = Recorder()
    connect(p)
    payloads = [b"sin(1)", b"", b"2 ** 10", b"x" * 300]
    stream = b"".join(request_frame(d, cache=False, max_age=65535, ts=1) for d in payloads)
    for i in range(len(stream)):
        p.dataReceived(stream[i : i + 1])
    assert datas(p) == payloads
    assert [h.length for h, _ in p.frames] == [18, 12, 19, 312]


def test_largest_allowed_frame_is_accepted():
    p = Recorder()
    t = connect(p)
    p.dataReceived(request_frame(b"z" * (8192 - 12), cache=False, max_age=65535, ts=1))
    assert datas(p) == [b"z" * 8180]
    assert p.invalid == []
    assert not t.disconnecting


def test_configured_limit_is_used():
    p = Recorder()
    p.maxMessageSize = 20
    t = connect(p)
    p.dataReceived(request_frame(b"12345678", cache=False, max_age=65535, ts=1))
    assert datas(p) == [b"12345678"]
    p.dataReceived(request_frame(b"123456789", cache=False, max_age=65535, ts=1))
    assert len(p.invalid) == 1
    assert p.invalid[0][0] == (
        "impossible message length 21 (must be 12..20); closing the connection"
    )
    assert t.disconnecting


def answers(raw: bytes):
    out = []
    while raw:
        h = wire.decode_header(raw)
        out.append((h, raw[12 : h.length]))
        raw = raw[h.length :]
    return out


@pytest.mark.parametrize(
    ("length", "tail", "first"),
    [
        (0, b"", b"\x00"),  # the first byte after the header, whatever it is
        (11, b"\x80rest", b"\x80"),
        (8193, b"abc", b"a"),
        (65535, b"", b"\x00"),
    ],
)
def test_impossible_header_gets_one_answer_then_close(length, tail, first):
    p = Recorder()
    t = connect(p)
    good = request_frame(b"1+1", cache=False, max_age=65535, ts=1)
    bad = struct.pack("!LHHHxx", 1, length, 0x0400, 0) + tail
    # A good frame, then the impossible header, then more that must be ignored.
    p.dataReceived(
        good
        + bad
        + request_frame(b"2+2", cache=False, max_age=65535, ts=1)
        + request_frame(b"3+3", cache=False, max_age=65535, ts=1)
    )
    assert datas(p) == [b"1+1"]
    reason = f"impossible message length {length} (must be 12..8192); closing the connection"
    assert p.invalid == [(reason, first)]
    sent = answers(t.value())
    assert len(sent) == 1
    assert sent[0][0].status == 400
    assert sent[0][1] == reason.encode()
    assert t.disconnecting


# --- idle timeout ---------------------------------------------------------------


def timed(clock, seconds=10.0):
    p = Recorder()
    p.idleTimeout = seconds
    t = connect(p, clock)
    return p, t


def test_idle_timeout_closes_a_silent_connection_in_order(clock):
    _, t = timed(clock)
    clock.advance(9.999)
    assert not t.disconnecting
    clock.advance(0.001)
    assert t.disconnecting
    assert not t.disconnected  # a FIN (loseConnection), not an abort


def test_idle_timeout_aborts_a_connection_whose_peer_stopped_reading(clock):
    """A clean close would wait for ever for the unread answers to leave."""
    p, t = timed(clock)
    p.pauseProducing()  # the transport's buffer is full of unread answers
    clock.advance(10)
    assert t.disconnecting and t.disconnected  # StringTransport's mark of abortConnection


def test_messages_do_not_move_the_idle_timer_they_are_noted(clock):
    """Moving the timer per message costs; it notes the last one and reschedules itself once."""
    p, t = timed(clock)
    (timer,) = clock.getDelayedCalls()
    for _ in range(3):
        clock.advance(2)
        p.dataReceived(request_frame(b"1 + 1", cache=False, max_age=65535, ts=1))
    assert clock.getDelayedCalls() == [timer] and timer.getTime() == 10  # untouched
    clock.advance(4)  # at 10 it finds the last message 4 s old: 6 s more
    assert not t.disconnecting
    clock.advance(5.5)
    assert not t.disconnecting
    clock.advance(0.5)
    assert t.disconnecting and len(p.frames) == 3


def test_half_sent_frame_does_not_reset_the_idle_timeout(clock):
    p, t = timed(clock)
    frame = request_frame(b"1 + 1", cache=False, max_age=65535, ts=1)
    clock.advance(6)
    p.dataReceived(frame[:13])
    clock.advance(3.5)
    p.dataReceived(frame[13:16])
    clock.advance(0.5)
    assert p.frames == []
    assert t.disconnecting and t.disconnected


def test_complete_frame_resets_the_idle_timeout(clock):
    p, t = timed(clock)
    frame = request_frame(b"1 + 1", cache=False, max_age=65535, ts=1)
    clock.advance(6)
    p.dataReceived(frame[:3])
    clock.advance(2)
    p.dataReceived(frame[3:])  # completes at t=8: deadline moves to 18
    assert datas(p) == [b"1 + 1"]
    clock.advance(9.9)
    assert not t.disconnecting
    clock.advance(0.1)
    assert t.disconnecting and not t.disconnected


def test_no_idle_timeout_when_not_configured(clock):
    p = Recorder()
    t = connect(p, clock)
    assert clock.getDelayedCalls() == []
    clock.advance(10**6)
    assert not t.disconnecting


def test_connection_lost_cancels_the_idle_timeout(clock):
    p, t = timed(clock)
    assert len(clock.getDelayedCalls()) == 1
    p.connectionLost(Failure(error.ConnectionDone()))
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert not t.disconnecting


# --- backpressure -------------------------------------------------------------------


def test_paused_protocol_stops_reading_and_buffers_frames():
    p = Recorder()
    t = connect(p)
    p.pauseProducing()
    assert t.producerState == "paused"
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"b", cache=False, max_age=65535, ts=1)
        + request_frame(b"c", cache=False, max_age=65535, ts=1)[:7]
    )
    assert p.frames == []
    p.resumeProducing()
    assert t.producerState == "producing"
    assert datas(p) == [b"a", b"b"]
    p.dataReceived(request_frame(b"c", cache=False, max_age=65535, ts=1)[7:])
    assert datas(p) == [b"a", b"b", b"c"]


def test_pause_while_handling_a_frame_holds_back_the_rest():
    p = Recorder(pause_on=b"b")
    t = connect(p)
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"b", cache=False, max_age=65535, ts=1)
        + request_frame(b"c", cache=False, max_age=65535, ts=1)
        + request_frame(b"d", cache=False, max_age=65535, ts=1)
    )
    assert datas(p) == [b"a", b"b"]
    assert t.producerState == "paused"
    p.dataReceived(request_frame(b"e", cache=False, max_age=65535, ts=1))
    assert datas(p) == [b"a", b"b"]
    p.resumeProducing()
    assert datas(p) == [b"a", b"b", b"c", b"d", b"e"]
    assert t.producerState == "producing"


def test_stop_producing_stops_handing_frames():
    p = Recorder()
    connect(p)
    p.stopProducing()
    p.dataReceived(request_frame(b"a", cache=False, max_age=65535, ts=1))
    assert p.frames == []


# --- FrameClient -------------------------------------------------------------------


def answer(data: bytes, status: int = 200, timestamp: int = 3) -> bytes:
    return wire.encode(timestamp, wire.make_flags(request=False, status=status), 0, data)


@pytest.fixture
def client():
    c = FrameClient()
    c.makeConnection(StringTransport())
    return c


def test_send_request_writes_the_frame_and_waits(client):
    frame = request_frame(b"1+1", cache=False, max_age=65535, ts=1)
    d = client.sendRequest(frame)
    assert client.transport.value() == frame
    assert client.pending == 1
    assert not d.called


def test_answers_fire_deferreds_in_order(client):
    ds = [
        client.sendRequest(request_frame(str(i).encode(), cache=False, max_age=65535, ts=1))
        for i in range(3)
    ]
    raw = answer(b"zero", timestamp=10) + answer(b"one", 400) + answer(b"two", 500)
    client.dataReceived(raw[:20])
    assert [d.called for d in ds] == [True, False, False]
    client.dataReceived(raw[20:])
    results = [success_of(d) for d in ds]
    assert [data for _, data in results] == [b"zero", b"one", b"two"]
    assert [h.status for h, _ in results] == [200, 400, 500]
    assert results[0][0] == wire.Header(10, 16, 200, 0)
    assert client.pending == 0
    assert not client.transport.disconnecting


def test_request_message_from_the_peer_fails_every_pending_request(client):
    ds = [
        client.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1)) for _ in range(3)
    ]
    client.dataReceived(
        answer(b"ok")
        + request_frame(b"I am a request", cache=False, max_age=65535, ts=1)
        + answer(b"late")
    )
    assert success_of(ds[0])[1] == b"ok"
    for d in ds[1:]:
        f = failure_of(d, ProtocolError)
        assert str(f.value) == "peer sent a request (T=1) instead of an answer"
    assert client.pending == 0
    assert client.transport.disconnected  # aborted


def test_unsolicited_answer_aborts(client):
    """An answer nobody asked for puts the peer out of step: later answers could go astray."""
    d = client.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1))
    client.dataReceived(answer(b"one") + answer(b"extra") + answer(b"more"))
    assert success_of(d)[1] == b"one"
    assert client.transport.disconnected
    assert client.pending == 0


def test_unsolicited_answer_before_any_request_aborts(client):
    client.dataReceived(answer(b"surprise"))
    assert client.transport.disconnected


def test_impossible_header_from_the_peer_fails_pending_requests(client):
    ds = [
        client.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1)) for _ in range(2)
    ]
    client.dataReceived(struct.pack("!LHHHxx", 0, 5, 0, 0))
    for d in ds:
        f = failure_of(d, ProtocolError)
        assert str(f.value) == (
            "peer sent an impossible message length 5 (must be 12..65535); closing the connection"
        )
    assert client.transport.disconnecting


def test_connection_loss_fails_pending_requests(client):
    ds = [
        client.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1)) for _ in range(2)
    ]
    client.dataReceived(answer(b"first")[:15])
    client.connectionLost(Failure(error.ConnectionLost("gone")))
    for d in ds:
        failure_of(d, error.ConnectionLost)
    assert client.pending == 0


def test_cancelling_a_pending_request_closes_the_connection(client):
    d1 = client.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1))
    d2 = client.sendRequest(request_frame(b"2", cache=False, max_age=65535, ts=1))
    d1.cancel()
    failure_of(d1, CancelledError)
    assert client.pending == 1
    assert client.transport.disconnected
    client.connectionLost(Failure(error.ConnectionDone()))
    failure_of(d2, error.ConnectionDone)


def test_impossible_header_alone_reports_no_first_byte():
    p = Recorder()
    t = connect(p)
    p.dataReceived(struct.pack("!LHHHxx", 1, 9000, 0x0400, 0))
    assert p.invalid == [
        ("impossible message length 9000 (must be 12..8192); closing the connection", b"")
    ]
    assert t.disconnecting


def test_a_long_pipelined_batch_yields_to_the_reactor_between_turns():
    """Past its turn budget a connection lets the reactor serve others, then
    goes on with what it has buffered, in order."""
    seen = []

    class Slow(FrameReceiver):
        turnBudget = 0.0  # every frame uses up the turn

        def frameReceived(self, header, data):
            seen.append(data)

    clock = task.Clock()
    turns = []
    schedule = clock.callLater
    clock.callLater = lambda delay, f, *a: turns.append(delay) or schedule(delay, f, *a)
    p = Slow()
    p.clock = clock
    p.makeConnection(StringTransport())
    frames = [wire.encode(0, wire.make_flags(request=True), 0, b"%d" % i) for i in range(3)]
    p.dataReceived(b"".join(frames))
    assert seen == [b"0"] and len(clock.getDelayedCalls()) == 1
    p.dataReceived(wire.encode(0, wire.make_flags(request=True), 0, b"3"))
    assert seen == [b"0"] and len(clock.getDelayedCalls()) == 1  # new data waits its turn too
    clock.advance(0)  # the reactor's next iterations: one frame per turn
    assert seen == [b"0", b"1", b"2", b"3"] and clock.getDelayedCalls() == []
    assert turns == [0, 0, 0]
    p.dataReceived(frames[0] + frames[1])
    (turn,) = clock.getDelayedCalls()
    p.connectionLost(None)
    assert turn.cancelled and clock.getDelayedCalls() == []


class Writes(StringTransport):
    """A StringTransport that also keeps each write call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Echo(BatchedWrites, FrameReceiver):
    """Sends each frame's data back as a message, and closes on ``b"bye"``."""

    def frameReceived(self, header, data):
        self.sendMessage(data)
        if data == b"bye":
            self.closeAfterSending()


def test_messages_sent_for_frames_of_one_read_leave_in_one_write():
    """With writes sent at once, answers to one read must be joined or each costs a system call."""
    p, t = Echo(), Writes()
    p.makeConnection(t)
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"b", cache=False, max_age=65535, ts=1)
        + request_frame(b"c", cache=False, max_age=65535, ts=1)[:5]
    )
    assert t.writes == [b"ab"]
    p.dataReceived(request_frame(b"c", cache=False, max_age=65535, ts=1)[5:])
    assert t.writes == [b"ab", b"c"]


def test_a_message_sent_outside_frame_handling_is_written_at_once():
    p, t = Echo(), Writes()
    p.makeConnection(t)
    p.sendMessage(b"later")
    assert t.writes == [b"later"]


def test_close_after_sending_writes_the_batch_before_closing():
    p = Echo()
    t = Writes()
    closed_with = []
    t.loseConnection = lambda: closed_with.append(list(t.writes))
    p.makeConnection(t)
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"bye", cache=False, max_age=65535, ts=1)
        + request_frame(b"ignored", cache=False, max_age=65535, ts=1)
    )
    assert closed_with == [[b"abye"]]


class FillsUp(Writes):
    """Pauses its producer once more than ``room`` bytes were written to it."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.room and self.producer is not None:
            self.room = float("inf")  # once
            self.producer.pauseProducing()


def test_a_long_batch_goes_out_in_parts_so_a_full_transport_can_pause_it():
    p, t = Echo(), FillsUp(room=100_000)
    p.makeConnection(t)
    big = [b"%05d" % n + b"x" * 8_000 for n in range(40)]
    p.dataReceived(b"".join(request_frame(m, cache=False, max_age=65535, ts=1) for m in big))
    # Parts of at most one batch limit plus a message; then the pause stops it.
    assert max(map(len, t.writes)) < p.batchLimit + 8_100
    sent = b"".join(t.writes)
    assert 100_000 < len(sent) < 100_000 + p.batchLimit + 8_100
    p.resumeProducing()
    assert b"".join(t.writes) == b"".join(big)


# --- never a wrong answer: aborts, tags ---------------------------------------------


def tagged_answer(data: bytes, tag: int, framed: bool = True) -> bytes:
    flags = wire.make_flags(request=False, status=200)
    ext = (wire.EXT_FRAMED if framed else 0) | wire.tag_bits(tag)
    return wire.encode(3, flags, 0, data, ext)


def test_an_aborted_connection_delivers_none_of_its_buffered_answers(clock):
    """A request given up (its timeout) between two turns of a batch aborts
    the connection: the answers still buffered must not be matched against
    the requests behind it."""
    c = FrameClient()
    c.turnBudget = 0.0  # every answer uses up the turn
    c.callLater = clock.callLater
    c.makeConnection(StringTransport())
    ds = [
        c.sendRequest(request_frame(b"%d" % n, cache=False, max_age=65535, ts=1)) for n in range(3)
    ]
    got: list[bytes] = []
    for d in ds:
        d.addCallbacks(lambda m: got.append(m[1]), lambda f: None)
    c.dataReceived(answer(b"0") + answer(b"1") + answer(b"2"))
    assert got == [b"0"] and len(clock.getDelayedCalls()) == 1
    ds[1].cancel()  # as the pool's timeout does
    assert c.transport.disconnected
    clock.advance(0)  # the next turn
    assert got == [b"0"]
    c.dataReceived(answer(b"3"))
    assert got == [b"0"]


def test_a_tagged_client_numbers_its_requests():
    c = FrameClient()
    c.tagged = True
    c.makeConnection(StringTransport())
    c._lastTag = 0  # tags start at random: here, where tests can read them
    for n in range(3):
        c.sendRequest(request_frame(b"%d" % n, cache=False, max_age=65535, ts=1))
    sent = c.transport.value()
    tags = [wire.decode_header(sent, offset).tag for offset in (0, 13, 26)]
    assert tags == [1, 2, 3]
    c._lastTag = wire.MAX_TAG
    c.sendRequest(request_frame(b"x", cache=False, max_age=65535, ts=1))
    assert wire.decode_header(c.transport.value(), 39).tag == 1  # 8191 wraps to 1, never 0


def test_an_answer_with_another_requests_tag_is_never_delivered():
    c = FrameClient()
    c.tagged = True
    c.makeConnection(StringTransport())
    c._lastTag = 0
    d1, d2 = (
        c.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1)),
        c.sendRequest(request_frame(b"2", cache=False, max_age=65535, ts=1)),
    )
    c.dataReceived(tagged_answer(b"two", 2))
    for d in (d1, d2):
        f = failure_of(d, OutOfStepError)
        assert str(f.value) == "answer tagged 2 for the request tagged 1"
    assert c.transport.disconnected


@pytest.mark.parametrize("framed", [True, False], ids=["L-tag-0", "no-L"])
def test_an_answer_that_cannot_be_matched_is_delivered_as_it_comes(framed):
    """Tag 0 with L (a middlebox zeroed the tag) or no L at all: nothing to
    check against; the caller decides what the connection is worth."""
    c = FrameClient()
    c.tagged = True
    c.makeConnection(StringTransport())
    d = c.sendRequest(request_frame(b"1", cache=False, max_age=65535, ts=1))
    c.dataReceived(tagged_answer(b"one", 0, framed=framed))
    assert success_of(d)[1] == b"one"


# --- bounded input ------------------------------------------------------------------


def test_input_waiting_for_a_turn_stops_reading_past_the_bound(clock):
    p = Recorder()
    p.turnBudget = 0.0
    t = connect(p, clock)
    frame = request_frame(b"x" * 1000, cache=False, max_age=65535, ts=1)  # 1,012 bytes
    p.dataReceived(frame * 10)
    assert len(p.frames) == 1 and t.producerState == "producing"
    while t.producerState == "producing":
        p.dataReceived(frame * 10)
    assert p._size > p.inputLimit == 65536
    waiting = p._size // len(frame)
    while clock.getDelayedCalls():
        clock.advance(0)
    assert len(p.frames) == waiting + 1
    assert t.producerState == "producing"  # drained: reading again


def test_a_frame_sent_a_byte_at_a_time_is_joined_once():
    """Joining the pieces on every read would cost time quadratic in the message's length."""
    p = Recorder()
    connect(p)
    frame = request_frame(b"y" * 5000, cache=False, max_age=65535, ts=1)
    for i in range(len(frame) - 1):
        p.dataReceived(frame[i : i + 1])
    # The header was joined once, to learn the length; the rest waits unjoined.
    assert p.frames == [] and len(p._pieces) == 1 + len(frame) - 1 - 12
    p.dataReceived(frame[-1:])
    assert datas(p) == [b"y" * 5000] and p._pieces == []


# --- half-close ---------------------------------------------------------------------


def test_end_of_file_after_requests_handles_them_then_closes():
    p = Recorder()
    t = connect(p)
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"b", cache=False, max_age=65535, ts=1)
        + request_frame(b"c", cache=False, max_age=65535, ts=1)[:5]
    )
    p.readConnectionLost()
    assert datas(p) == [b"a", b"b"]
    assert t.disconnecting and not t.disconnected  # an orderly close


def test_end_of_file_while_paused_waits_for_the_frames_to_be_handled():
    p = Recorder()
    t = connect(p)
    p.pauseProducing()
    p.dataReceived(
        request_frame(b"a", cache=False, max_age=65535, ts=1)
        + request_frame(b"b", cache=False, max_age=65535, ts=1)
    )
    p.readConnectionLost()
    assert p.frames == [] and not t.disconnecting
    p.resumeProducing()
    assert datas(p) == [b"a", b"b"] and t.disconnecting


def test_the_services_protocols_are_half_closeable():
    """A client may shut its sending side after its requests and still read every answer."""
    from twisted.internet.interfaces import IHalfCloseableProtocol

    from twisted_cacheproxy.calculator.server import CalculatorServerProtocol
    from twisted_cacheproxy.proxy.factory import CacheProxyProtocol

    assert IHalfCloseableProtocol.implementedBy(CalculatorServerProtocol)
    assert IHalfCloseableProtocol.implementedBy(CacheProxyProtocol)


# --- the send-at-once endpoint's string ------------------------------------------------


def test_the_sendatonce_endpoint_string_names_our_endpoint():
    """Any program that takes endpoint strings can listen the way the
    services do (the plugin is installed with the package)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from twisted_cacheproxy.transport.endpoint import TCPServerEndpoint, description

    endpoint = serverFromString(reactor, description(9999, "::1", 77))
    assert isinstance(endpoint, TCPServerEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (9999, "::1", 77)
