"""The Wireshark dissector ``contrib/wireshark/calcproto.lua``, read by tshark.

Two kinds of captures: pcap files written here byte by byte (Ethernet, IPv4
and TCP headers built by hand, so every odd case can be made on purpose), and
real traffic of our own ``twistd`` services on the loopback interface,
captured by ``tcpdump`` (which needs root). Every test asserts what tshark's
field output says, message by message. The colouring rules
``contrib/wireshark/calc.colorfilters`` are checked on both kinds: each
packet's first matching rule by ``tshark -Y``, and the colour Wireshark's own
colouring gives it.

Without tshark (or tcpdump, or root for capturing) the tests are skipped; with
``CI`` set they fail instead, so CI cannot pass without running them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import helpers
import pytest
from helpers import (
    ROOT,
    VECTORS,
    course_pickle,
    in_ci,
    make_api_module,
    make_course_module,
    vector_value,
)
from processes import Twistd, free_port, open_ends, script, tcp_states_to, wait_for

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.expression import format_node
from twisted_cacheproxy.calculator.parser import parse

pytestmark = pytest.mark.integration

DISSECTOR = ROOT / "contrib" / "wireshark" / "calcproto.lua"
WAIT = 10.0  # seconds: the most any single wait here may take
T0 = 1_780_000_000  # time stamp of the hand-made messages: 2026-05-28 20:26:40 UTC

# Flags words.
REQUEST = 0x1C00  # C, S, T
ANSWER = 0x1800  # C, S (add the status)
ANSWER_NO_STEPS = 0x1000
# Extension word bits.
L, H, G = 0x0001, 0x0002, 0x0004


def require_tool(name: str) -> str:
    """The path of tshark or tcpdump; skips the test without it, or fails it in CI."""
    return helpers.require_tool(name, "tshark tcpdump", "the Wireshark tests")


def require_root() -> None:
    """Live captures need root for tcpdump."""
    if os.geteuid() != 0:
        why = "capturing on the loopback interface needs root (tcpdump)"
        if in_ci():
            pytest.fail(f"{why}; CI must run the Wireshark tests")
        pytest.skip(why)


@pytest.fixture(scope="module")
def tshark() -> str:
    return require_tool("tshark")


# --- pcap files, by hand ------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Pcap:
    """A classic pcap file (Ethernet link type): a 24-byte header, then a
    16-byte record header before each frame."""

    def __init__(self, start: float = T0) -> None:
        self.clock = start
        self.frames: list[tuple[float, bytes]] = []

    def add(self, frame: bytes, after: float = 0.001) -> int:
        """Append a frame ``after`` seconds after the previous; its frame number."""
        self.clock += after
        self.frames.append((self.clock, frame))
        return len(self.frames)

    def write(self, path: pathlib.Path) -> pathlib.Path:
        out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
        for when, frame in self.frames:
            seconds = int(when)
            micros = round((when - seconds) * 1e6)
            out.append(struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame)
        path.write_bytes(b"".join(out))
        return path


class TcpFlow:
    """One TCP connection between 127.0.0.1 ports, with true sequence and
    acknowledgement numbers and checksums."""

    SYN, FIN, PSH_ACK, ACK, SYN_ACK = 0x02, 0x01, 0x18, 0x10, 0x12

    def __init__(self, pcap: Pcap, client_port: int, server_port: int) -> None:
        self.pcap = pcap
        self.ports = {True: client_port, False: server_port}
        self.seq = {True: 1000, False: 50000}

    def segment(self, from_client: bool, flags: int, payload: bytes = b"") -> int:
        address = bytes([127, 0, 0, 1])
        ack = self.seq[not from_client] if flags & self.ACK else 0
        tcp = struct.pack(
            "!HHIIBBHHH",
            self.ports[from_client],
            self.ports[not from_client],
            self.seq[from_client],
            ack,
            5 << 4,
            flags,
            65535,
            0,
            0,
        )
        pseudo = address + address + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + payload)) + tcp[18:]
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6, 0,
            address, address,
        )  # fmt: skip
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethernet = b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + b"\x08\x00"
        self.seq[from_client] += len(payload) + (1 if flags & (self.SYN | self.FIN) else 0)
        return self.pcap.add(ethernet + ip + tcp + payload)

    def open(self) -> None:
        self.segment(True, self.SYN)
        self.segment(False, self.SYN_ACK)
        self.segment(True, self.ACK)

    def send(self, from_client: bool, payload: bytes) -> int:
        return self.segment(from_client, self.PSH_ACK, payload)

    def request(self, payload: bytes) -> int:
        return self.send(True, payload)

    def answer(self, payload: bytes) -> int:
        return self.send(False, payload)


def message(
    flags: int, cache_control: int, data: bytes, ext: int = 0, *, length: int | None = None
) -> bytes:
    """One message; ``length`` overrides the total length field."""
    total = 12 + len(data) if length is None else length
    return struct.pack("!LHHHH", T0, total, flags, cache_control, ext) + data


def json_answer(result, steps: Sequence[str], ext: int = L, status: int = 200) -> bytes:
    data = json.dumps({"result": result, "steps": list(steps)}).encode()
    return message(ANSWER | status, 65535, data, ext)


# --- reading with tshark ------------------------------------------------------------------

FIELDS = (
    "frame.number",
    "tcp.srcport",
    "tcp.dstport",
    "calc.timestamp",
    "calc.total_length",
    "calc.flags.reserved",
    "calc.flags.cache",
    "calc.flags.steps",
    "calc.flags.request",
    "calc.status",
    "calc.cache_control",
    "calc.ext.framed",
    "calc.ext.from_cache",
    "calc.ext.grace",
    "calc.ext.tag",
    "calc.encoding",
    "calc.expression",
    "calc.result",
    "calc.steps",
    "calc.error",
    "calc.error.type",
    "calc.pickle",
    "calc.pickle.protocol",
    "calc.pickle.global",
    "calc.request_in",
    "calc.response_in",
    "calc.time",
    "_ws.expert.message",
    "_ws.col.Info",
)
SEP = "|"  # between the values of one field in one frame (steps hold commas)


def dissect(
    tshark: str, pcap: pathlib.Path, ports: Sequence[int], *args: str, config: str = ""
) -> str:
    """tshark's output for ``pcap`` with the dissector loaded (and Wireshark's
    configuration folder ``config``, if given); fails on any error."""
    command = [tshark, "-n", "-2", "-r", str(pcap), "-X", f"lua_script:{DISSECTOR}"]
    for port in ports:
        command += ["-d", f"tcp.port=={port},calc"]
    env = dict(os.environ, WIRESHARK_CONFIG_DIR=config) if config else None
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "Lua" not in done.stderr, done.stderr
    return done.stdout


def read(
    tshark: str,
    pcap: pathlib.Path,
    *,
    ports: Sequence[int] = (),
    options: Sequence[str] = (),
    display_filter: str = "calc",
) -> list[dict[str, str]]:
    """tshark's field output for every frame that holds calc messages, one
    dict per frame; a field that occurs more than once has its values joined
    by `SEP`, booleans read 1 or 0."""
    command = [*options, "-Y", display_filter, "-T", "fields"]
    command += ["-E", "separator=/t", "-E", f"aggregator={SEP}", "-E", "occurrence=a"]
    for field in FIELDS:
        command += ["-e", field]
    rows = []
    for line in dissect(tshark, pcap, ports, *command).splitlines():
        values = line.split("\t")
        assert len(values) == len(FIELDS), line
        row = dict(zip(FIELDS, values, strict=True))
        for key, value in row.items():
            if key.startswith(("calc.flags.", "calc.ext.")) and key != "calc.ext.tag":
                row[key] = SEP.join({"True": "1", "False": "0"}.get(v, v) for v in value.split(SEP))
        assert "Lua Error" not in row["_ws.col.Info"], row
        rows.append(row)
    return rows


def fields(row: dict[str, str], *names: str) -> tuple[str, ...]:
    return tuple(row[name] for name in names)


HEADER = (
    "calc.flags.request",
    "calc.flags.cache",
    "calc.flags.steps",
    "calc.status",
    "calc.cache_control",
)


# --- hand-made captures -------------------------------------------------------------------


def test_a_request_and_its_answer_every_field(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40001, 9999)
    flow.open()
    asked = flow.request(message(REQUEST, 65535, b"max(2, 3) + 3"))
    answered = flow.answer(json_answer(6, ["max(2, 3) + 3", "3 + 3", "6"]))
    rows = read(tshark, pcap.write(tmp_path / "one.pcap"))  # 9999: no -d needed
    assert [r["frame.number"] for r in rows] == [str(asked), str(answered)]
    request, answer = rows
    assert request["calc.timestamp"].startswith("May 28, 2026 20:26:40")
    assert fields(request, "calc.total_length", "calc.flags.reserved", *HEADER) == (
        "25", "0", "1", "1", "1", "0", "65535",
    )  # fmt: skip
    assert fields(request, "calc.ext.framed", "calc.ext.from_cache", "calc.ext.tag") == (
        "0", "0", "0",
    )  # fmt: skip
    assert request["calc.encoding"] == "text"
    assert request["calc.expression"] == "max(2, 3) + 3"
    assert request["calc.response_in"] == str(answered)
    assert request["_ws.col.Info"] == "Request: max(2, 3) + 3"
    assert fields(answer, *HEADER) == ("0", "1", "1", "200", "65535")
    assert fields(answer, "calc.ext.framed", "calc.ext.from_cache", "calc.ext.grace") == (
        "1", "0", "0",
    )  # fmt: skip
    assert answer["calc.encoding"] == "JSON"
    assert answer["calc.result"] == "6"
    assert answer["calc.steps"] == "max(2, 3) + 3|3 + 3|6"
    assert answer["calc.request_in"] == str(asked)
    assert answer["calc.time"] == "0.001000000"
    assert answer["_ws.col.Info"] == "Response 200 OK: 6"
    assert request["_ws.expert.message"] == answer["_ws.expert.message"] == ""


def test_cache_control_is_shown_by_meaning(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40001, 9999)
    flow.open()
    flow.request(message(REQUEST, 65535, b"1"))
    flow.answer(json_answer(1, []))
    flow.request(message(REQUEST, 0, b"2"))
    flow.answer(message(ANSWER | 200, 0, b'{"result": 2, "steps": []}', L))
    flow.request(message(REQUEST & ~0x1000, 0, b"3"))
    command = [tshark, "-n", "-r", str(pcap.write(tmp_path / "cc.pcap"))]
    command += ["-X", f"lua_script:{DISSECTOR}", "-V", "-O", "calc"]
    text = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    shown = [line.strip() for line in text.splitlines() if "Cache control:" in line]
    assert shown == [
        "Cache control: 65535 (any age)",
        "Cache control: 65535 (forever)",
        "Cache control: 0 (reload)",
        "Cache control: 0 (not cacheable)",
        "Cache control: 0 (ignored: C=0)",
    ]
    assert "Time stamp: May 28, 2026 20:26:40.000000000 UTC" in text


def test_a_message_sent_one_byte_at_a_time_is_reassembled(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40002, 9999)
    flow.open()
    whole = message(REQUEST, 65535, b"3 + ((4 * 2) / ((1 - 5) ** (2 ** 3)))")
    first = None
    for i in range(len(whole)):
        last = flow.request(whole[i : i + 1])
        first = first or last
    rows = read(tshark, pcap.write(tmp_path / "bytes.pcap"))
    assert len(rows) == 1
    (row,) = rows
    assert row["frame.number"] == str(last)  # shown where it completes
    assert row["calc.total_length"] == str(len(whole))
    assert row["calc.expression"] == "3 + ((4 * 2) / ((1 - 5) ** (2 ** 3)))"
    assert row["_ws.expert.message"] == ""


def test_three_messages_in_one_segment_are_three_messages(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40003, 9998)
    flow.open()
    texts = ["1 + 1", "2 * 3", "sqrt(16)"]
    batch = flow.request(b"".join(message(REQUEST, 65535, t.encode()) for t in texts))
    answers = [json_answer(2, []), json_answer(6, []), json_answer(4.0, [])]
    first = flow.answer(answers[0])
    both = flow.answer(answers[1] + answers[2])  # pipelined answers, in request order
    rows = read(tshark, pcap.write(tmp_path / "three.pcap"))
    assert [r["frame.number"] for r in rows] == [str(batch), str(first), str(both)]
    asked, one, two = rows
    assert asked["calc.total_length"] == "17|17|20"
    assert asked["calc.flags.request"] == "1|1|1"
    assert asked["calc.expression"] == "1 + 1|2 * 3|sqrt(16)"
    assert asked["calc.response_in"] == f"{first}|{both}|{both}"
    assert asked["_ws.col.Info"] == "Request: 1 + 1 ; Request: 2 * 3 ; Request: sqrt(16)"
    assert one["calc.result"] == "2" and one["calc.request_in"] == str(batch)
    assert two["calc.result"] == "6|4.0"
    assert two["calc.request_in"] == f"{batch}|{batch}"


def test_the_end_of_one_message_and_a_whole_one_in_one_segment(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40012, 9999)
    flow.open()
    first, second = message(REQUEST, 65535, b"pi * 2"), message(REQUEST, 0, b"tau / 2")
    flow.request(first[:7])
    both = flow.request(first[7:] + second)
    (row,) = read(tshark, pcap.write(tmp_path / "tail.pcap"))
    assert row["frame.number"] == str(both)
    assert row["calc.expression"] == "pi * 2|tau / 2"
    assert row["calc.cache_control"] == "65535|0"
    assert row["_ws.col.Info"] == "Request: pi * 2 ; Request: tau / 2"


def test_pipelined_answers_match_their_requests_in_order(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40004, 9999)
    other = TcpFlow(pcap, 40005, 9999)
    flow.open()
    other.open()
    a = flow.request(message(REQUEST, 65535, b"1 + 1", 1 << 3))
    b = flow.request(message(REQUEST, 65535, b"2 + 2", 2 << 3))
    c = other.request(message(REQUEST, 65535, b"3 + 3"))
    c_answer = other.answer(json_answer(6, []))
    a_answer = flow.answer(json_answer(2, [], L | 1 << 3))
    b_answer = flow.answer(json_answer(4, [], L | 3 << 3))  # the wrong tag
    rows = {r["frame.number"]: r for r in read(tshark, pcap.write(tmp_path / "pipe.pcap"))}
    assert rows[str(a)]["calc.response_in"] == str(a_answer)
    assert rows[str(b)]["calc.response_in"] == str(b_answer)
    assert rows[str(c)]["calc.response_in"] == str(c_answer)
    assert rows[str(a_answer)]["calc.request_in"] == str(a)
    assert rows[str(b_answer)]["calc.request_in"] == str(b)
    assert rows[str(c_answer)]["calc.request_in"] == str(c)
    assert rows[str(a_answer)]["calc.time"] == "0.004000000"
    assert rows[str(a_answer)]["_ws.expert.message"] == ""
    assert rows[str(b_answer)]["_ws.expert.message"] == "Tag 3 differs from its request's tag 2"


def test_an_answer_from_the_cache_with_grace_and_a_tag(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40006, 12345)
    flow.open()
    flow.request(message(REQUEST, 65535, b"max(2, 3) + 3", 77 << 3))
    flow.answer(message(200, 0, b'{"result": 6, "steps": []}', L | H | G | 77 << 3))
    flow.request(message(REQUEST, 65535, b"2", 8191 << 3))
    flow.answer(message(ANSWER | 200, 65535, b'{"result": 2, "steps": []}', H | G | 8191 << 3))
    path = pcap.write(tmp_path / "grace.pcap")
    # Port 12345 through the preference this time, not Decode As.
    rows = read(tshark, path, options=["-o", "calc.ports:12345"])
    request, stale, request2, wrong = rows
    assert request["calc.ext.tag"] == "77" and request["calc.ext.framed"] == "0"
    assert fields(stale, "calc.ext.framed", "calc.ext.from_cache", "calc.ext.grace") == (
        "1", "1", "1",
    )  # fmt: skip
    assert stale["calc.ext.tag"] == "77"
    assert fields(stale, *HEADER) == ("0", "0", "0", "200", "0")
    assert stale["_ws.col.Info"] == "Response 200 OK (from cache, grace): 6"
    assert stale["_ws.expert.message"] == ""
    assert request2["calc.ext.tag"] == "8191"
    assert fields(wrong, "calc.ext.framed", "calc.ext.from_cache", "calc.ext.grace") == (
        "0", "1", "1",
    )  # fmt: skip
    assert wrong["_ws.expert.message"] == "G set without H or with C=1"
    assert read(tshark, path) == []  # not a calc port without the preference


def test_a_broken_length_field(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40007, 9999)
    flow.open()
    good = flow.request(message(REQUEST, 65535, b"1 + 2"))
    flow.answer(json_answer(3, []))
    broken = flow.request(message(REQUEST, 65535, b"4 + 5", length=5) + b"rest")
    after = flow.request(b"more bytes that follow it")
    refusal = flow.answer(
        message(
            ANSWER_NO_STEPS | 400,
            0,
            b'{"error": "impossible message length 5 (must be 12..8192); closing the'
            b' connection", "type": "ValueError"}',
            L,
        )
    )
    rows = {r["frame.number"]: r for r in read(tshark, pcap.write(tmp_path / "broken.pcap"))}
    assert rows[str(good)]["_ws.expert.message"] == ""
    bad = rows[str(broken)]
    assert bad["calc.total_length"] == "5"
    assert bad["calc.expression"] == ""
    assert bad["_ws.expert.message"] == (
        "Total length 5 is below 12: the stream cannot be resynchronised"
        "|Bytes after an impossible total length (not parsed)"
    )
    assert bad["_ws.col.Info"] == "Request [impossible total length 5]"
    assert bad["calc.response_in"] == str(refusal)
    assert rows[str(after)]["_ws.expert.message"] == (
        "Bytes after an impossible total length (not parsed)"
    )
    answer = rows[str(refusal)]
    assert fields(answer, "calc.status", "calc.error.type") == ("400", "ValueError")
    assert answer["calc.error"].startswith("impossible message length 5")
    assert answer["calc.request_in"] == str(broken)


def test_a_length_beyond_the_data(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40008, 9999)
    flow.open()
    cut = flow.request(message(REQUEST, 65535, b"1 + 2", length=100))
    # Without reassembly tshark shows what it has; with it, it waits for more.
    rows = read(
        tshark, pcap.write(tmp_path / "cut.pcap"), options=["-o", "tcp.desegment_tcp_streams:FALSE"]
    )
    (row,) = rows
    assert row["frame.number"] == str(cut)
    assert row["_ws.expert.message"] == "Total length 100 is beyond the data (17 bytes here)"
    assert row["calc.expression"] == "1 + 2"


def test_what_is_wrong_in_a_header(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40009, 9999)
    flow.open()
    reserved = flow.request(message(REQUEST | 0xA000, 65535, b"1"))
    flow.answer(json_answer(1, []))
    to_server = flow.request(message(ANSWER | 200, 65535, b'{"result": 1, "steps": []}'))
    flow.answer(message(ANSWER_NO_STEPS | 400, 0, b'{"error": "a response", "type": "x"}', L))
    flow.request(message(REQUEST, 65535, b"2"))
    odd = flow.answer(message(ANSWER | 302, 65535, b'{"result": 2, "steps": []}', L))
    ext_in_request = flow.request(message(REQUEST, 65535, b"3", H))
    rows = {r["frame.number"]: r for r in read(tshark, pcap.write(tmp_path / "wrong.pcap"))}
    assert rows[str(reserved)]["calc.flags.reserved"] == "5"  # bits 15-13: 101
    assert rows[str(reserved)]["_ws.expert.message"] == "Reserved flag bits set"
    assert rows[str(to_server)]["_ws.expert.message"] == (
        "Response (T=0) sent to a server port: the server answers 400"
    )
    assert rows[str(odd)]["calc.status"] == "302"
    assert rows[str(odd)]["_ws.expert.message"] == "Status 302 is not 200, 400 or 500"
    assert rows[str(odd)]["_ws.col.Info"] == "Response 302 unknown: 2"
    assert rows[str(ext_in_request)]["_ws.expert.message"] == (
        "Answer-only extension bits (L, H, G) set in a request"
    )


@pytest.fixture
def course(monkeypatch):
    module = make_course_module()
    monkeypatch.setitem(sys.modules, "calculator", module)
    return module


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickled_requests_and_answers(tshark, tmp_path, course, monkeypatch, protocol):
    """The six standard expressions pickled as the course client does, and
    the answers pickled as our server sends them: each expression rendered
    as infix text (as the first step reads), each result and its steps."""
    pcap = Pcap()
    flow = TcpFlow(pcap, 40010, 9999)
    flow.open()
    for vector in VECTORS:
        flow.request(message(REQUEST, 65535, course.dumps(parse(vector["text"]), protocol)))
        data = codec.encode_result(codec.LEGACY, vector_value(vector), vector["steps"])
        flow.answer(message(ANSWER | 200, 65535, data, L))
    rand = course.dumps(parse("rand(1, 2) * -3 ** 2"), protocol)
    flow.request(message(REQUEST, 65535, rand))
    error = codec.encode_error(codec.LEGACY, "ZeroDivisionError", "division by zero")
    flow.answer(message(ANSWER_NO_STEPS | 400, 0, error, L))
    api = make_api_module()
    monkeypatch.setitem(sys.modules, "api", api)
    flow.request(message(REQUEST, 65535, course.dumps(parse("sqrt(-1)"), protocol)))
    course_error = api.CalculatorClientError("math domain error")
    flow.answer(message(ANSWER_NO_STEPS | 400, 0, course_pickle(course_error, 2)))
    rows = read(tshark, pcap.write(tmp_path / "pickles.pcap"))
    assert len(rows) == 2 * len(VECTORS) + 4
    for i, vector in enumerate(VECTORS):
        request, answer = rows[2 * i], rows[2 * i + 1]
        assert request["calc.encoding"] == "pickle"
        assert request["calc.pickle.protocol"] == str(protocol)
        assert request["calc.expression"] == vector["steps"][0]
        assert request["calc.expression"] == format_node(parse(vector["text"]))
        assert request["calc.pickle"].startswith(f"pickle, protocol {protocol}, ")
        assert "calculator.BinaryExpr" in request["calc.pickle.global"].split(SEP) or i == 5
        assert answer["calc.encoding"] == "pickle"
        assert answer["calc.result"] == vector["result_repr"]
        assert answer["calc.steps"] == SEP.join(vector["steps"])
        assert answer["calc.request_in"] == request["frame.number"]
    request, answer, request2, answer2 = rows[-4:]
    assert request["calc.expression"] == "rand(1, 2) * -(3 ** 2)"
    assert request["calc.pickle"] == f"pickle, protocol {protocol}, {len(rand)} bytes"
    globals_ = set(request["calc.pickle.global"].split(SEP))
    builtins = "__builtin__" if protocol == 2 else "builtins"
    assert {"calculator.FunctionCallExpr", f"{builtins}.getattr", "random.Random"} <= globals_
    assert {"_operator.mul", "_operator.neg", "_operator.pow"} <= globals_
    assert fields(answer, "calc.error.type", "calc.error") == (
        "builtins.ZeroDivisionError",
        "division by zero",
    )
    assert (
        answer["_ws.col.Info"] == "Response 400 Client error: ZeroDivisionError: division by zero"
    )
    assert request2["calc.expression"] == format_node(parse("sqrt(-1)")) == "sqrt(-(1))"
    assert fields(answer2, "calc.error.type", "calc.error") == (
        "api.CalculatorClientError",
        "math domain error",
    )


def test_a_pickle_that_is_not_an_expression_is_described_not_run(tshark, tmp_path):
    import pickle

    pcap = Pcap()
    flow = TcpFlow(pcap, 40011, 9999)
    flow.open()
    hostile = pickle.dumps(os.system, 4)[:-1] + b"\x8c\x04echo\x85R."  # os.system('echo')
    flow.request(message(REQUEST, 65535, hostile))
    flow.request(message(REQUEST, 65535, b"\x80\x04\x95\x00"))  # truncated
    rows = read(tshark, pcap.write(tmp_path / "hostile.pcap"))
    odd, cut = rows
    assert odd["calc.encoding"] == "pickle"
    assert "posix.system" in odd["calc.pickle.global"]
    assert odd["calc.expression"] == ""
    assert odd["_ws.expert.message"].startswith("Not a course expression: unexpected")
    assert cut["_ws.expert.message"] == "Pickle cannot be read: pickle data was truncated"


# --- live captures of our services --------------------------------------------------------


@pytest.fixture
def services(tmp_path) -> Iterator:
    """Starts ``twistd`` services; all are stopped when the test ends."""
    started: list[Twistd] = []

    def start(*args: str) -> Twistd:
        port = free_port()
        log = tmp_path / f"twistd-{args[0]}-{port}.log"
        started.append(Twistd([*args, "--port", str(port)], port, log, tmp_path).start())
        return started[-1]

    yield start
    for service in reversed(started):
        service.stop()


class Capture:
    """``tcpdump -i lo`` on some TCP ports, writing a pcap file, stopped by its PID."""

    def __init__(self, path: pathlib.Path, *ports: int) -> None:
        require_root()
        tcpdump = require_tool("tcpdump")
        self.path = path
        self.errors = path.with_suffix(".log")
        expression = " or ".join(f"tcp port {port}" for port in ports)
        with self.errors.open("w") as errors:
            self.proc = subprocess.Popen(
                [tcpdump, "-i", "lo", "-n", "-U", "--immediate-mode", "-w", str(path), expression],
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        deadline = time.monotonic() + WAIT
        while "listening on" not in self.errors.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"tcpdump did not start: {self.errors.read_text()}")
            time.sleep(0.05)

    def stop(self) -> pathlib.Path:
        if self.proc.poll() is None:
            # Every packet has been sent by now; let tcpdump write the last ones.
            size, deadline = -1, time.monotonic() + 3
            while time.monotonic() < deadline:
                time.sleep(0.3)
                if self.path.stat().st_size == size:
                    break
                size = self.path.stat().st_size
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        return self.path


@pytest.fixture
def capture(tmp_path) -> Iterator:
    """Starts tcpdump captures; each is stopped when the test ends if not before."""
    started: list[Capture] = []

    def start(name: str, *ports: int) -> Capture:
        started.append(Capture(tmp_path / name, *ports))
        return started[-1]

    yield start
    for c in started:
        c.stop()


def calc_client(port: int, text: str, *options: str, status: int = 0) -> None:
    """``calc-client --port PORT TEXT``; ``status`` is the exit code expected."""
    done = subprocess.run(
        [script("calc-client"), "--port", str(port), *options, text],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )
    assert done.returncode == status, done.stdout + done.stderr


def hop(row: dict[str, str], proxy: int, server: int) -> str:
    """Who sent a message to whom, from its ports (the proxy reaches the
    server from an ephemeral port of its own)."""
    names = {proxy: "proxy", server: "server"}
    source, destination = (names.get(int(row[f"tcp.{end}port"])) for end in ("src", "dst"))
    if source is None:
        source = "proxy" if destination == "server" else "client"
    if destination is None:
        destination = "proxy" if source == "server" else "client"
    return f"{source}>{destination}"


@pytest.fixture
def live(tshark):
    require_root()
    require_tool("tcpdump")
    return tshark


def test_client_to_server(live, services, capture):
    server = services("cacheserver")
    cap = capture("server.pcap", server.port)
    calc_client(server.port, "max(2, 3) + 3")
    calc_client(server.port, "max(2, 3) + 3", "--legacy")
    calc_client(server.port, "1 / 0", "--no-steps", status=1)
    rows = read(live, cap.stop(), ports=[server.port])
    assert len(rows) == 6
    assert [r["calc.total_length"].count(SEP) for r in rows] == [0] * 6  # one message each
    text, text_answer, pickled, pickled_answer, zero, zero_answer = rows
    for request in (text, pickled, zero):
        assert fields(request, "tcp.dstport", "calc.flags.reserved") == (str(server.port), "0")
    assert fields(text, *HEADER, "calc.encoding", "calc.expression") == (
        "1", "1", "1", "0", "65535", "text", "max(2, 3) + 3",
    )  # fmt: skip
    assert fields(text_answer, *HEADER, "calc.encoding", "calc.result", "calc.steps") == (
        "0", "1", "1", "200", "65535", "JSON", "6", "max(2, 3) + 3|3 + 3|6",
    )  # fmt: skip
    assert fields(pickled, *HEADER, "calc.encoding", "calc.expression") == (
        "1", "1", "1", "0", "65535", "pickle", "max(2, 3) + 3",
    )  # fmt: skip
    assert pickled["calc.pickle.protocol"] == str(codec.legacy.PROTOCOL)
    assert fields(pickled_answer, *HEADER, "calc.encoding", "calc.result", "calc.steps") == (
        "0", "1", "1", "200", "65535", "pickle", "6", "max(2, 3) + 3|3 + 3|6",
    )  # fmt: skip
    assert fields(zero, *HEADER, "calc.expression") == ("1", "1", "0", "0", "65535", "1 / 0")
    assert fields(zero_answer, "calc.flags.request", "calc.status") == ("0", "400")
    assert fields(zero_answer, "calc.error.type", "calc.error") == (
        "ZeroDivisionError",
        "division by zero",
    )
    for request, answer in zip(rows[::2], rows[1::2], strict=True):
        assert answer["calc.request_in"] == request["frame.number"]
        assert request["calc.response_in"] == answer["frame.number"]
        assert float(answer["calc.time"]) < WAIT
        assert request["_ws.expert.message"] == ""
        assert (answer["calc.ext.framed"], answer["calc.ext.from_cache"]) == ("1", "0")
        assert answer["calc.ext.tag"] == request["calc.ext.tag"]
    assert zero_answer["_ws.expert.message"] == "Error answer 400 (Client error)"


def test_client_to_proxy_miss_hit_and_another_miss(live, services, capture):
    server = services("cacheserver")
    proxy = services("cacheproxy", "--server-port", str(server.port))
    cap = capture("proxy.pcap", proxy.port, server.port)
    calc_client(proxy.port, "max(2, 3) + 3")
    calc_client(proxy.port, "max(2, 3) + 3")
    calc_client(proxy.port, "2 ** 10", "--no-steps")
    rows = read(live, cap.stop(), ports=[proxy.port, server.port])
    assert [
        (hop(r, proxy.port, server.port), r["calc.flags.request"], r["calc.expression"])
        for r in rows
    ] == [
        ("client>proxy", "1", "max(2, 3) + 3"),  # a miss
        ("proxy>server", "1", "max(2, 3) + 3"),
        ("server>proxy", "0", ""),
        ("proxy>client", "0", ""),
        ("client>proxy", "1", "max(2, 3) + 3"),  # a hit: the server sees nothing
        ("proxy>client", "0", ""),
        ("client>proxy", "1", "2 ** 10"),  # another miss
        ("proxy>server", "1", "2 ** 10"),
        ("server>proxy", "0", ""),
        ("proxy>client", "0", ""),
    ]
    for r in rows:
        assert r["calc.total_length"].count(SEP) == 0
        assert r["_ws.expert.message"] == ""
        if r["calc.flags.request"] == "1":
            assert fields(r, "calc.flags.cache", "calc.status", "calc.cache_control") == (
                "1", "0", "65535",
            )  # fmt: skip
        else:
            assert fields(r, "calc.flags.cache", "calc.status", "calc.cache_control") == (
                "1", "200", "65535",
            )  # fmt: skip
            assert r["calc.request_in"]
    assert [r["calc.result"] for r in rows if r["calc.flags.request"] == "0"] == [
        "6", "6", "6", "1024", "1024",
    ]  # fmt: skip
    assert rows[3]["calc.steps"] == rows[5]["calc.steps"] == "max(2, 3) + 3|3 + 3|6"
    assert rows[9]["calc.steps"] == "" and rows[9]["calc.flags.steps"] == "0"
    answers = [r for r in rows if r["calc.flags.request"] == "0"]
    assert [r["calc.ext.framed"] for r in answers] == ["1"] * 5
    assert [r["calc.ext.from_cache"] for r in answers] == ["0", "0", "1", "0", "0"]
    assert [r["calc.ext.grace"] for r in answers] == ["0"] * 5
    # Each answer echoes the tag of the request it is matched with.
    by_frame = {r["frame.number"]: r for r in rows}
    for r in answers:
        assert r["calc.ext.tag"] == by_frame[r["calc.request_in"]]["calc.ext.tag"]


def test_server_stopped_a_hit_is_served_and_a_miss_is_a_500(live, services, capture):
    server = services("cacheserver")
    proxy = services(
        "cacheproxy", "--server-port", str(server.port), "--retries", "2", "--retry-delay", "0.1"
    )
    calc_client(proxy.port, "max(2, 3) + 3")  # into the cache, before the capture
    server.stop()
    # The proxy closes its idle connection to the stopped server before the
    # capture starts: else it could send the miss on it first.
    assert wait_for(lambda: not open_ends(server.port), WAIT), tcp_states_to(server.port)
    cap = capture("down.pcap", proxy.port, server.port)
    calc_client(proxy.port, "max(2, 3) + 3")
    calc_client(proxy.port, "7 * 6", status=1)
    path = cap.stop()
    rows = read(live, path, ports=[proxy.port, server.port])
    assert [(hop(r, proxy.port, server.port), r["calc.flags.request"]) for r in rows] == [
        ("client>proxy", "1"),
        ("proxy>client", "0"),
        ("client>proxy", "1"),
        ("proxy>client", "0"),
    ]
    hit_request, hit, miss_request, failed = rows
    assert hit_request["calc.expression"] == "max(2, 3) + 3"
    assert fields(hit, *HEADER, "calc.result") == ("0", "1", "1", "200", "65535", "6")
    assert miss_request["calc.expression"] == "7 * 6"
    assert fields(failed, "calc.flags.request", "calc.status", "calc.result") == ("0", "500", "")
    assert failed["calc.error"], failed
    assert failed["_ws.expert.message"] == "Error answer 500 (Server error)"
    assert failed["_ws.col.Info"].startswith("Response 500 Server error: ")
    assert failed["calc.request_in"] == miss_request["frame.number"]
    # The retries: two connection attempts to the stopped server, no message.
    attempts = read(
        live,
        path,
        ports=[proxy.port],
        display_filter=f"tcp.flags.syn == 1 && tcp.dstport == {server.port}",
    )
    assert len(attempts) == 2
    assert fields(hit, "calc.ext.framed", "calc.ext.from_cache", "calc.ext.grace") == (
        "1", "1", "0",
    )  # fmt: skip
    assert fields(failed, "calc.ext.framed", "calc.ext.from_cache") == ("1", "0")


# --- colouring rules ----------------------------------------------------------------------

COLOURING = ROOT / "contrib" / "wireshark" / "calc.colorfilters"
TUTORIAL = ROOT / "docs" / "tutorial.md"
HANDSHAKE, REQUEST_RULE, ACK_RULE, TEARDOWN = (
    "calc handshake", "calc request", "calc ACK", "calc teardown",
)  # fmt: skip
ANSWER_200, ANSWER_HIT = "calc answer 200", "calc answer from a cache (H)"
ANSWER_400, ANSWER_500 = "calc answer 400", "calc answer 500"


class Rule(NamedTuple):
    name: str
    display_filter: str
    background: str  # "#rrggbb", as tshark's PSML output writes it


def colouring_rules() -> list[Rule]:
    """The rules of ``calc.colorfilters``, in order: ``@name@filter@[bg][fg]``
    with 16-bit colour components."""
    rules = []
    for line in COLOURING.read_text().splitlines():
        if line.startswith("@"):
            _, name, display_filter, colours = line.split("@")
            components = re.fullmatch(r"\[(\d+),(\d+),(\d+)\]\[\d+,\d+,\d+\]", colours)
            assert components, line
            background = "#" + "".join(f"{int(c) >> 8:02x}" for c in components.groups())
            rules.append(Rule(name, display_filter, background))
    return rules


def matched_by_filters(tshark: str, pcap: pathlib.Path, ports: Sequence[int] = ()) -> list[str]:
    """Each frame's first rule whose display filter matches it, evaluated by
    ``tshark -Y`` (which fails on a filter that does not compile)."""
    first: dict[int, str] = {}
    for rule in colouring_rules():
        out = dissect(
            tshark, pcap, ports, "-Y", rule.display_filter, "-T", "fields", "-e", "frame.number"
        )
        for number in out.split():
            first.setdefault(int(number), rule.name)
    return [first.get(n, "") for n in range(1, max(first, default=0) + 1)]


def coloured_by_wireshark(
    tshark: str, pcap: pathlib.Path, config: pathlib.Path, ports: Sequence[int] = ()
) -> list[str]:
    """Each frame's rule as Wireshark's own colouring picks it, with the file
    installed as the colouring rules of a profile named calc (PSML output
    carries each packet's colours)."""
    profile = config / "profiles" / "calc"
    profile.mkdir(parents=True, exist_ok=True)
    shutil.copy(COLOURING, profile / "colorfilters")
    by_colour = {rule.background: rule.name for rule in colouring_rules()}
    psml = dissect(tshark, pcap, ports, "-C", "calc", "--color", "-T", "psml", config=str(config))
    packets = re.findall(r"<packet [^>]*background='(#\w{6})'>\s*<section>(\d+)</section>", psml)
    assert [int(n) for _, n in packets] == list(range(1, len(packets) + 1)), psml[:2000]
    return [by_colour.get(colour, colour) for colour, _ in packets]


def test_the_colouring_rules_are_the_tutorials():
    rules = colouring_rules()
    legend = re.findall(r"^\| `(calc [^`]+)` \|", TUTORIAL.read_text(), re.MULTILINE)
    names = [HANDSHAKE, REQUEST_RULE, ANSWER_500, ANSWER_400, ANSWER_HIT, ANSWER_200]
    assert [r.name for r in rules] == [*names, TEARDOWN, ACK_RULE]
    assert legend[: len(rules)] == [r.name for r in rules]
    assert len({r.background for r in rules}) == len(rules)  # told apart by colour


def test_the_colouring_rules_mark_each_kind_of_packet(tshark, tmp_path):
    pcap = Pcap()
    flow = TcpFlow(pcap, 40020, 9998)
    flow.open()
    flow.request(message(REQUEST, 65535, b"max(2, 3) + 3"))
    flow.segment(False, TcpFlow.ACK)
    flow.answer(json_answer(6, ["max(2, 3) + 3", "3 + 3", "6"]))
    flow.segment(True, TcpFlow.ACK)
    flow.request(message(REQUEST, 65535, b"max(2, 3) + 3"))
    flow.answer(json_answer(6, ["max(2, 3) + 3", "3 + 3", "6"], L | H))
    flow.request(message(REQUEST, 65535, b"1 / 0"))
    zero = codec.encode_error(codec.TEXT, "ZeroDivisionError", "division by zero")
    flow.answer(message(ANSWER_NO_STEPS | 400, 65535, zero, L | H))  # a cached 400 is a 400
    flow.request(message(REQUEST, 65535, b"7 * 6"))
    down = codec.encode_error(codec.TEXT, "ConnectionError", "unreachable after 5 attempts")
    flow.answer(message(ANSWER_NO_STEPS | 500, 0, down, L))
    flow.segment(True, TcpFlow.FIN | TcpFlow.ACK)
    flow.segment(False, TcpFlow.FIN | TcpFlow.ACK)
    flow.segment(True, TcpFlow.ACK)
    refused = TcpFlow(pcap, 40021, 9999)
    refused.segment(True, TcpFlow.SYN)
    refused.segment(False, 0x14)  # RST, ACK
    path = pcap.write(tmp_path / "colours.pcap")
    expected = [HANDSHAKE] * 3 + [REQUEST_RULE, ACK_RULE, ANSWER_200, ACK_RULE]
    expected += [REQUEST_RULE, ANSWER_HIT, REQUEST_RULE, ANSWER_400, REQUEST_RULE, ANSWER_500]
    expected += [TEARDOWN, TEARDOWN, ACK_RULE, HANDSHAKE, TEARDOWN]
    assert matched_by_filters(tshark, path) == expected
    assert coloured_by_wireshark(tshark, path, tmp_path / "config") == expected


def test_the_colouring_rules_on_a_miss_and_a_hit(live, services, capture, tmp_path):
    server = services("cacheserver")
    proxy = services("cacheproxy", "--server-port", str(server.port))
    cap = capture("colours.pcap", proxy.port, server.port)
    calc_client(proxy.port, "max(2, 3) + 3")
    calc_client(proxy.port, "max(2, 3) + 3")
    path = cap.stop()
    ports = [proxy.port, server.port]
    rules = matched_by_filters(live, path, ports)
    assert coloured_by_wireshark(live, path, tmp_path / "config", ports) == rules
    names = ("tcp.stream", "tcp.flags", "tcp.len")
    out = dissect(live, path, ports, "-T", "fields", *(x for n in names for x in ("-e", n)))
    frames = [line.split("\t") for line in out.splitlines()]
    assert len(frames) == len(rules)
    streams: dict[str, list[str]] = {}
    for (stream, flags, length), rule in zip(frames, rules, strict=True):
        # Every packet without data and with ACK alone is a pure ACK, but the
        # one that completes the handshake (the third of its connection).
        pure_ack = int(flags, 16) == 0x010 and length == "0"
        third = len(streams.setdefault(stream, [])) == 2
        assert (rule == ACK_RULE) == (pure_ack and not third), (stream, flags, length, rule)
        streams[stream].append(rule)
    # Without the pure ACKs (how many depends on delayed acknowledgements),
    # each connection as the tutorial shows it: a miss (client to proxy, proxy
    # to server, which stays open) then a hit that never reaches the server.
    teardown = [TEARDOWN, TEARDOWN]
    assert [[r for r in s if r != ACK_RULE] for s in streams.values()] == [
        [HANDSHAKE] * 3 + [REQUEST_RULE, ANSWER_200] + teardown,
        [HANDSHAKE] * 3 + [REQUEST_RULE, ANSWER_200],
        [HANDSHAKE] * 3 + [REQUEST_RULE, ANSWER_HIT] + teardown,
    ]


# --- the picture of docs/wireshark.md -----------------------------------------------------


def test_the_wireshark_picture_of_the_docs_is_made_by_its_script(live, tmp_path):
    """docs/wireshark_image.py captures the walkthrough's miss, hit and miss
    and makes docs/wireshark.png of the hit in the real Wireshark."""
    for name, package in [
        ("wireshark", "wireshark-qt"),
        ("Xvfb", "xvfb"),
        ("xdotool", "xdotool"),
        ("import", "imagemagick"),
    ]:
        helpers.require_tool(name, package, "the Wireshark picture's script")
    out, pcap = tmp_path / "wireshark.png", tmp_path / "proxy.pcap"
    command = [sys.executable, str(ROOT / "docs" / "wireshark_image.py")]
    done = subprocess.run(
        [*command, "--out", str(out), "--pcap", str(pcap)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 860)
    # The ports the script's services listened on: those the SYNs went to.
    syns = dissect(live, pcap, (), "-Y", "tcp.flags == 0x002", "-T", "fields", "-e", "tcp.dstport")
    rows = read(live, pcap, ports=sorted({int(p) for p in syns.split()}))
    hits = [r for r in rows if r["calc.ext.from_cache"] == "1"]
    assert len(hits) == 1
    (hit,) = hits
    request = {r["frame.number"]: r for r in rows}[hit["calc.request_in"]]
    assert fields(hit, "calc.status", "calc.ext.framed", "calc.result", "calc.steps") == (
        "200", "1", "6", "max(2, 3) + 3|3 + 3|6",
    )  # fmt: skip
    assert fields(request, "calc.flags.request", "calc.expression") == ("1", "max(2, 3) + 3")
    assert request["calc.response_in"] == hit["frame.number"]
