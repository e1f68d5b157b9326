"""calc-check without a network: the catalogue, the answer readers, the
probe and the scripted upstream on StringTransport, the runner's time
limits on a task.Clock, the three reports, and the docs page's list."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from helpers import HERE
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from twisted_cacheproxy.calculator import codec
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.check import catalogue, messages, report
from twisted_cacheproxy.check.case import (
    DEFAULT_LIMIT,
    EXT,
    LEVELS,
    PROXY,
    SERVER,
    case,
)
from twisted_cacheproxy.check.context import Session
from twisted_cacheproxy.check.main import parse_args
from twisted_cacheproxy.check.probe import MAX_UNREAD, Closed, Probe, Transcript, split_frames
from twisted_cacheproxy.check.runner import FAIL, PASS, SKIP, Result, run_case, run_cases
from twisted_cacheproxy.check.scripted import CLOSE, SILENT, Reply, ScriptedUpstream
from twisted_cacheproxy.check.verdicts import Failed
from twisted_cacheproxy.transport import wire

ROOT = HERE.resolve().parent
CASES = catalogue.CATALOGUE
IDS = [c.id for c in CASES]


def frame(data: bytes, *, flags: int | None = None, max_age: int = 0, ext: int = 0) -> bytes:
    if flags is None:
        flags = wire.make_flags(request=False, status=wire.OK, cache=True)
    return wire.encode(1_700_000_000, flags, max_age, data, ext)


# --- the catalogue ------------------------------------------------------------------


def test_every_case_is_declared_once_with_everything_a_report_needs():
    assert len(IDS) == len(set(IDS)) == 64
    for c in CASES:
        group, _, name = c.id.partition(".")
        assert group in catalogue.GROUPS and re.fullmatch(r"[a-z0-9-]+", name), c.id
        assert c.level in LEVELS and c.kinds <= {SERVER, PROXY} and c.kinds
        assert c.title and c.hint and c.section and c.limit > 0, c.id
    # The extension word (section 6) is EXT, and only it.
    assert {c.id for c in CASES if c.level == EXT} == {c.id for c in CASES if c.group == "ext"}
    assert all(c.section == "6" for c in CASES if c.level == EXT)


def test_every_group_has_cases_for_its_kinds():
    for group in catalogue.GROUPS:
        assert any(c.group == group for c in catalogue.select(PROXY)), group
    server_groups = {c.group for c in catalogue.select(SERVER)}
    assert server_groups == set(catalogue.GROUPS) - {"cache"}


def test_select_by_kind_id_and_group():
    server = catalogue.select(SERVER)
    assert all(SERVER in c.kinds for c in server) and len(server) == 39
    assert len(catalogue.select(PROXY)) == 64
    chosen = catalogue.select(SERVER, ["errors", "header.length", "cache.reload"])
    assert [c.id for c in chosen] == ["header.length"] + [
        c.id for c in server if c.group == "errors"
    ]
    with pytest.raises(ValueError, match=r"no case or group named header\.nope"):
        catalogue.select(SERVER, ["header.nope"])


def test_a_target_that_never_answers_is_judged_in_a_few_minutes():
    """After one case has run out of time in silence, the next ones get at
    most the default limit (runner.run_cases)."""
    for kind, bound in ((SERVER, 120), (PROXY, 200)):
        cases = catalogue.select(kind)
        silent_run = cases[0].limit + sum(min(c.limit, DEFAULT_LIMIT) for c in cases[1:])
        assert silent_run <= bound, (kind, silent_run)


def test_the_vectors_are_the_protocols():
    shipped = json.loads((ROOT / "twisted_cacheproxy/check/vectors.json").read_text())
    assert shipped == json.loads((HERE / "data/protocol-vectors.json").read_text())
    vectors = messages.vectors()
    assert [type(v.result) for v in vectors] == [float, int, float, float, float, int]
    assert vectors[1].steps == ["max(2, 3) + 3", "3 + 3", "6"]


# --- requests and answers ------------------------------------------------------------


def test_requests_are_built_as_the_course_client_sends_them():
    req = messages.request("max(2, 3) + 3", legacy=True, steps=True, max_age=5)
    h = req.header
    assert h.request and h.steps and h.cache and h.max_age == 5 and h.status == 0
    assert req.data == codec.encode_request(parse("max(2, 3) + 3"), codec.LEGACY)
    assert req.expected == 6 and req.encoding == codec.LEGACY
    assert req.label == "'max(2, 3) + 3' (pickled, S=1, C=1, max-age 5)"
    odd = messages.request("1 + 1", flags=wire.RESERVED_MASK, ext=8)
    assert odd.header.flags & wire.RESERVED_MASK == wire.RESERVED_MASK and odd.header.ext == 8


def _frame(data: bytes, status: int = wire.OK, steps: bool = False):
    (f,), rest = split_frames(
        frame(data, flags=wire.make_flags(request=False, status=status, steps=steps))
    )
    assert rest == b""
    return f


def test_results_must_match_in_value_and_type():
    req = messages.request("max(2, 3) + 3")
    assert messages.expect_result(_frame(b'{"result": 6, "steps": []}'), req).value == 6
    with pytest.raises(Failed, match=r"must give 6 \(int\), not 6.0 \(float\)"):
        messages.expect_result(_frame(b'{"result": 6.0, "steps": []}'), req)
    with pytest.raises(Failed, match=r"got status 400 .* with the error ValueError: no"):
        messages.expect_result(_frame(b'{"error": "no", "type": "ValueError"}', 400), req)
    with pytest.raises(Failed, match="not of the documented shape"):
        messages.expect_result(_frame(b'{"result": 6}'), req)
    with pytest.raises(Failed, match="not UTF-8 JSON"):
        messages.expect_result(_frame(b"six"), req)


def test_steps_are_compared_one_by_one():
    vector = messages.vectors()[1]
    req = messages.vector_request(vector, steps=True)
    good = json.dumps({"result": 6, "steps": vector.steps}).encode()
    messages.expect_result(_frame(good, steps=True), req)
    with pytest.raises(Failed, match="must have S=1"):
        messages.expect_result(_frame(good), req)
    bad = json.dumps({"result": 6, "steps": ["max(2, 3) + 3", "(3 + 3)", "6"]}).encode()
    with pytest.raises(Failed, match=r"step 2 of .* must be '3 \+ 3', not '\(3 \+ 3\)'"):
        messages.expect_result(_frame(bad, steps=True), req)


def test_a_pickled_request_needs_a_pickled_answer():
    req = messages.request("1 + 1", legacy=True)
    ok = codec.encode_result(codec.LEGACY, 2, [])
    assert messages.read(_frame(ok), req).value == 2
    with pytest.raises(Failed, match="is not a pickle: an answer uses the encoding of its request"):
        messages.read(_frame(b'{"result": 2, "steps": []}'), req)
    error = codec.encode_error(codec.LEGACY, "ZeroDivisionError", "division by zero")
    reading = messages.expect_error(_frame(error, 400), req, "wrong")
    assert reading.error == "ZeroDivisionError: division by zero"
    with pytest.raises(Failed, match=r"must get status 400 .*, not 200"):
        messages.expect_error(_frame(error), req, "wrong")


def test_split_frames_keeps_what_is_not_a_whole_message():
    one, two = frame(b"a"), frame(b"bc")
    frames, rest = split_frames(one + two + two[:5])
    assert [f.data for f in frames] == [b"a", b"bc"] and rest == two[:5]
    assert frames[1].raw == two
    assert split_frames(wire.HEADER.pack(0, 5, 0, 0, 0)) == ([], wire.HEADER.pack(0, 5, 0, 0, 0))


# --- the probe ----------------------------------------------------------------------


def _probe(clock=None):
    transcript = Transcript(clock or task.Clock())
    probe = Probe(transcript, "1")
    transport = StringTransport()
    transport.setTcpNoDelay = lambda on: None
    probe.makeConnection(transport)
    return probe, transport, transcript


def test_probe_reassembles_answers_and_records_both_ways():
    probe, transport, transcript = _probe()
    probe.send(b"ask")
    assert transport.value() == b"ask"
    d = probe.answer("the answer")
    answer = frame(b"12345")
    probe.dataReceived(answer[:7])
    assert not d.called
    assert probe.waiting == [
        "the answer on connection 1 (7 bytes received, not yet a whole header)"
    ]
    probe.dataReceived(answer[7:] + b"more")
    assert d.result.data == b"12345" and probe.buffer == b"more"
    assert [e.what for e in transcript.events] == ["connected", "sent", "received", "received"]


def test_probe_reports_a_close_before_the_answer_and_an_impossible_length():
    probe, _, _ = _probe()
    d = probe.answer()
    probe.dataReceived(frame(b"x")[:4])
    probe.readConnectionLost()
    with pytest.raises(
        Closed,
        match=r"closed connection 1 after 4 bytes of an answer instead of answering \(0 whole",
    ):
        d.result.raiseException()
    d.addErrback(lambda f: None)
    closed = probe.closed()
    assert closed.result == frame(b"x")[:4]
    probe, _, _ = _probe()
    d = probe.answer()
    probe.dataReceived(wire.HEADER.pack(0, 3, 0, 0, 0))
    with pytest.raises(Failed, match="total length of 3, less than its own 12-byte header"):
        d.result.raiseException()
    d.addErrback(lambda f: None)


def test_a_target_that_floods_a_probe_is_cut_off():
    probe, transport, transcript = _probe()
    d = probe.answer()
    probe.dataReceived(wire.HEADER.pack(0, 65535, 0, 0, 0) + b"x" * MAX_UNREAD)
    assert probe.flooded and transport.disconnecting
    probe.dataReceived(b"y" * 100)
    assert sum(len(e.data) for e in transcript.events) == MAX_UNREAD + 12
    with pytest.raises(Failed, match="sent over 1048576 bytes on connection 1"):
        d.result.raiseException()
    d.addErrback(lambda f: None)


# --- the scripted upstream -----------------------------------------------------------


def _upstream(clock):
    up = ScriptedUpstream(clock, 0)
    conn = up.buildProtocol(None)
    transport = StringTransport()
    conn.makeConnection(transport)
    return up, conn, transport


def _request(text: str, *, steps: bool = False, tag: int = 0) -> bytes:
    return messages.request(text, steps=steps, ext=wire.tag_bits(tag), known=False).frame


def test_upstream_answers_exactly_unless_scripted():
    clock = task.Clock()
    up, conn, transport = _upstream(clock)
    conn.dataReceived(_request("max(2, 3) + 3", steps=True, tag=9))
    (answer,), _ = split_frames(transport.value())
    h = answer.header
    assert (h.status, h.cache, h.max_age, h.steps, h.tag, h.framed) == (
        200,
        True,
        65535,
        True,
        9,
        True,
    )
    assert codec.decode_response(answer.data) == (6, ["max(2, 3) + 3", "3 + 3", "6"])
    transport.clear()
    conn.dataReceived(_request("rand(1, 2)") + _request("1 / 0"))
    frames, _ = split_frames(transport.value())
    assert [(f.header.status, f.header.cache, f.header.max_age) for f in frames] == [
        (200, False, 0),
        (400, False, 0),
    ]
    assert up.count(b"rand(1, 2)") == 1 and up.count(b"1 / 0") == 1


def test_upstream_follows_its_script_in_order():
    clock = task.Clock()
    clock.advance(1000)
    up, conn, transport = _upstream(clock)
    up.script(
        b"7 + 1",
        Reply(value=1111, delay=1.0, cache=False, max_age=3600),
        Reply(value=2222, age=5),
    )
    conn.dataReceived(_request("7 + 1") + _request("7 + 1"))
    assert transport.value() == b"" and up.overlaps == 1
    clock.advance(1.0)
    frames, _ = split_frames(transport.value())
    assert [codec.decode_response(f.data)[0] for f in frames] == [1111, 2222]
    assert (frames[0].header.cache, frames[0].header.max_age) == (False, 3600)
    assert [f.header.timestamp for f in frames] == [1000, 995]
    assert up.count(b"7 + 1") == 2 and len(up.arrivals[b"7 + 1"]) == 2


def test_upstream_closes_or_stays_silent_when_told():
    clock = task.Clock()
    up, conn, transport = _upstream(clock)
    up.script(b"1 + 1", Reply(action=SILENT))
    up.script(b"2 + 2", Reply(action=CLOSE))
    conn.dataReceived(_request("1 + 1"))
    assert transport.value() == b"" and not transport.disconnecting
    conn.dataReceived(_request("2 + 2"))
    assert transport.disconnecting and transport.value() == b""


# --- the runner ---------------------------------------------------------------------


@case("header.never", "Waits for something that never comes", section="1", limit=4)
def _waits_forever(ctx):
    """A hint."""
    yield defer.Deferred()


@case("header.fails", "Fails at once", section="1", limit=9)
def _fails(ctx):
    """Another hint."""
    raise Failed("it broke")
    yield


def test_a_case_that_runs_out_of_time_fails_and_says_what_it_waited_for():
    clock = task.Clock()
    session = Session(clock, SERVER, "127.0.0.1", 9)
    d = run_case(_waits_forever, session, 4)
    clock.advance(3.9)
    assert not d.called
    clock.advance(0.1)
    result = d.result
    assert result.outcome == FAIL and result.silent
    assert result.detail == (
        "no progress within the case's limit of 4 s: waiting for (nothing the target could send)"
    )


def test_after_a_silent_case_the_next_ones_get_the_default_limit():
    clock = task.Clock()
    session = Session(clock, SERVER, "127.0.0.1", 9)
    seen = []
    d = run_cases([_waits_forever, _fails, _waits_forever, _waits_forever], session, seen.append)
    clock.advance(4)
    assert [r.case.id for r in seen] == ["header.never", "header.fails"]
    clock.advance(4)  # the third had the full limit again: the second was no silence
    assert len(seen) == 3
    clock.advance(DEFAULT_LIMIT)
    assert [r.outcome for r in d.result] == [FAIL] * 4
    assert "limit cut from 4 s" in d.result[3].detail and d.result[1].detail == "it broke"


# --- the reports --------------------------------------------------------------------


def _results() -> list[Result]:
    clock = task.Clock()
    transcript = Transcript(clock)
    sent = messages.request("1 + 1", legacy=True).frame
    transcript.record("1", "sent", sent + b"<x>")
    clock.advance(0.5)
    transcript.record("1", "received", frame(b'{"error": "<bad> & more", "type": "ValueError"}'))
    transcript.record("upstream 1", "received", sent)
    outcomes = {"header.length": FAIL, "payload.rand": SKIP}
    return [
        Result(
            c,
            outcomes.get(c.id, PASS),
            "<script>alert(1)</script>" if c.id == "header.length" else "",
            0.25,
            transcript if c.id == "header.length" else None,
        )
        for c in catalogue.select(PROXY)
    ]


def test_terminal_lines_are_grouped_with_a_summary():
    lines = []
    terminal = report.Terminal(lines.append)
    results = _results()
    for r in results:
        terminal(r)
    terminal.finish(results)
    text = "".join(lines)
    assert text.startswith("\nheader\n  pass  MUST    header.answer-type ")
    assert "  FAIL  MUST    header.length" in text and "hint: The total length field" in text
    assert "\next\n" in text
    assert text.endswith(
        "\nMUST 50/51 passed, SHOULD 7/7 passed, EXT 5/5 passed, 1 skipped: FAIL, "
        "1 MUST case(s) failed (header.length)\n"
    )


def test_json_report_has_every_case():
    results = _results()
    document = json.loads(report.as_json("127.0.0.1:9998", PROXY, results))
    assert document["target"] == "127.0.0.1:9998" and document["kind"] == PROXY
    assert [c["id"] for c in document["cases"]] == [r.case.id for r in results]
    first = document["cases"][2]
    assert {"id", "title", "level", "outcome", "detail"} <= set(first)
    assert first["outcome"] == "fail" and first["detail"] == "<script>alert(1)</script>"
    assert document["summary"]["MUST"] == {"pass": 50, "fail": 1, "skip": 1}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.links.extend(v for k, v in attrs.items() if k in ("href", "src"))

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_one_page_with_every_case_and_the_bytes_of_failures():
    results = _results()
    html = report.as_html("127.0.0.1:9998", PROXY, results)
    page = _Page()
    page.feed(html)
    assert page.ids == [r.case.id for r in results]
    assert all(link.startswith("#") for link in page.links)
    assert "script" not in page.tags and "<script>alert" not in html
    text = "".join(page.text)
    assert "<script>alert(1)</script>" in text
    # The failure shows the bytes both ways, in hex and decoded.
    assert "pickle of '1 + 1'" in text and "3 bytes that are not a whole message" in text
    assert 'data: \'{"error": "<bad> & more"' in text
    assert "upstream 1 (scripted upstream)" in text
    assert re.search(r"0000  [0-9a-f]{2}( [0-9a-f]{2}){15}  ", text)
    assert text.count("message 1:") == 3  # sent, received, and the upstream's received


def test_listing_is_a_table_of_the_catalogue():
    lines = report.listing(CASES).splitlines()
    assert lines[0].split() == ["ID", "LEVEL", "FOR", "SECTION", "LIMIT", "TITLE"]
    assert [line.split()[0] for line in lines[1:]] == IDS
    assert lines[1].split()[:5] == ["header.answer-type", "MUST", "server,proxy", "2", "3s"]


def test_the_docs_page_lists_the_catalogue_as_calc_check_list_prints_it():
    page = (ROOT / "docs" / "calc-check.md").read_text()
    assert report.listing(CASES) in page
    for case_id in IDS:
        assert f"`{case_id}`" in page or case_id in page


# --- the command line ----------------------------------------------------------------


def test_command_line_errors_exit_2(capsys):
    for argv, message in (
        ([], "say what to check"),
        (["server"], "HOST:PORT"),
        (["server", "localhost"], "not HOST:PORT"),
        (["proxy", "127.0.0.1:9998"], "--upstream-port"),
        (["server", "127.0.0.1:1", "--only", "nope"], "no case or group named nope"),
    ):
        with pytest.raises(SystemExit) as exit:
            parse_args(argv)
        assert exit.value.code == 2
        assert message in capsys.readouterr().err
    args = parse_args(["proxy", "[::1]:9998", "--upstream-port", "9", "--only", "cache"])
    assert (args.host, args.port) == ("::1", 9998)
    assert {c.group for c in args.cases} == {"cache"}
