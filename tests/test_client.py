"""`calc-client`: rendering, the menu, `Calculator` and `run` without real sockets."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from helpers import VECTORS, failure_of, success_of, vector_value
from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from twisted_cacheproxy import client
from twisted_cacheproxy.calculator import codec, server
from twisted_cacheproxy.calculator.expression import CalculationError
from twisted_cacheproxy.calculator.parser import parse
from twisted_cacheproxy.client import EXAMPLES, Answer, Calculator, Settings, render
from twisted_cacheproxy.transport import wire
from twisted_cacheproxy.transport.frameclient import FrameClient, ProtocolError

# --- render ------------------------------------------------------------------------------


def test_render_aligns_the_steps_under_the_expression():
    answer = Answer(200, True, 65535, 6, ("max(2, 3) + 3", "3 + 3", "6"))
    assert render("max(2, 3) + 3", answer) == (
        "Expression: max(2, 3) + 3\n"
        "          = 3 + 3\n"
        "          = 6\n"
        "Result: 6  (computed by the server, cacheable for ever)\n"
    )
    lines = render("max(2, 3) + 3", answer).splitlines()
    assert lines[1].index("3 + 3") == lines[0].index("max(2, 3) + 3") == len("Expression: ")


def test_render_a_vector():
    v = VECTORS[2]
    answer = Answer(200, True, 30, vector_value(v), tuple(v["steps"]))
    out = render(v["text"], answer).splitlines()
    assert out[0] == "Expression: " + v["text"]
    assert out[1:-1] == ["          = " + s for s in v["steps"][1:]]
    assert out[-1] == "Result: 3.0001220703125  (computed by the server, cacheable for 30 s)"


@pytest.mark.parametrize(
    ("cache", "max_age", "note"),
    [
        (True, 65535, "cacheable for ever"),
        (True, 1, "cacheable for 1 s"),
        (True, 0, "not cacheable"),
        (False, 65535, "not cacheable"),
        (False, 0, "not cacheable"),
    ],
)
def test_render_cacheability(cache, max_age, note):
    assert render("7", Answer(200, cache, max_age, 7)) == (
        f"Expression: 7\nResult: 7  (computed by the server, {note})\n"
    )


def test_render_float_uses_repr():
    """repr is the shortest text that reads back as the same float: 0.1 + 0.2 is not 0.3."""
    answer = Answer(200, False, 0, 0.1 + 0.2, ("0.1 + 0.2", "0.30000000000000004"))
    assert render("0.1 + 0.2", answer).splitlines()[-1] == (
        "Result: 0.30000000000000004  (computed by the server, not cacheable)"
    )


def test_render_error_is_one_line():
    answer = Answer(
        400, True, 65535, error=codec.RemoteError("ZeroDivisionError", "division by zero")
    )
    assert render("1 / 0", answer) == "Error 400 (ZeroDivisionError): division by zero\n"
    answer = Answer(500, False, 0, error=codec.RemoteError("RuntimeError", "internal server error"))
    assert render("x", answer) == "Error 500 (RuntimeError): internal server error\n"


def test_render_says_when_an_error_answer_came_from_the_proxys_cache():
    """A cacheable 400 served by the proxy is marked H: the user learns it
    was not computed again."""
    error = codec.RemoteError("ZeroDivisionError", "division by zero")
    answer = Answer(400, True, 65535, error=error, from_cache=True)
    assert render("1 / 0", answer) == (
        "Error 400 (ZeroDivisionError): division by zero  (from the proxy's cache)\n"
    )


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            CalculationError("empty expression", "SyntaxError"),
            "Error (local, SyntaxError): empty expression\n",
        ),
        (error.ConnectionDone(), "Error: h:1 closed the connection before the answer came\n"),
        (error.ConnectionLost(), "Error: h:1 closed the connection before the answer came\n"),
        (
            ProtocolError("peer sent a request (T=1) instead of an answer"),
            "Error: peer sent a request (T=1) instead of an answer\n",
        ),
    ],
)
def test_describe_failure(exc, text):
    assert client.describe_failure(exc, "h:1") == text


def test_describe_connect_failure_names_host_and_port():
    text = client.describe_failure(error.ConnectionRefusedError("111: Connection refused"), "h:1")
    assert text.startswith("Error: cannot connect to h:1: ")
    assert "Connection refused" in text
    assert text.endswith("\n") and text.count("\n") == 1


# --- Calculator: the request it sends ------------------------------------------------------


def sent_by(settings: Settings, text: str, now: float = 1_700_000_123.7) -> bytes:
    clock = task.Clock()
    clock.advance(now)
    connection = FrameClient()
    connection.makeConnection(StringTransport())
    d = Calculator(clock, "h", 1, settings, connection=connection).calculate(text)
    assert not d.called
    return connection.transport.value()


def test_default_request_frame():
    frame = sent_by(Settings(), "max(2, 3) + 3")
    assert frame == wire.encode(1_700_000_123, 0x1C00, 65535, b"max(2, 3) + 3")


@pytest.mark.parametrize(
    ("settings", "flags", "max_age"),
    [
        (Settings(steps=False), 0x1400, 65535),
        (Settings(max_age=0), 0x1C00, 0),
        (Settings(max_age=30), 0x1C00, 30),
        (Settings(cache=False), 0x0C00, 0),
        (Settings(cache=False, max_age=30, steps=False), 0x0400, 0),
    ],
)
def test_request_flags_follow_the_settings(settings, flags, max_age):
    assert sent_by(settings, "1") == wire.encode(1_700_000_123, flags, max_age, b"1")


def test_legacy_request_is_the_course_pickle(course):
    frame = sent_by(Settings(legacy=True), "max(2, 3 * 4)")
    assert frame[12:] == course.dumps(parse("max(2, 3 * 4)"), 4)
    assert wire.decode_header(frame).length == len(frame)


def test_legacy_request_with_a_syntax_error_fails_locally():
    """With --legacy the client pickles a parsed tree, so a syntax error is never sent."""
    connection = FrameClient()
    connection.makeConnection(StringTransport())
    calculator = Calculator(task.Clock(), "h", 1, Settings(legacy=True), connection=connection)
    failure = failure_of(calculator.calculate("1 +"), CalculationError)
    assert "unexpected end of expression" in str(failure.value)
    assert connection.transport.value() == b""


# --- Calculator against a server, in memory -------------------------------------------------


@pytest.fixture
def wired():
    """A FrameClient and a server protocol connected by an in-memory pump."""
    clock = task.Clock()
    clock.advance(1_700_000_000)
    factory = server.CalculatorServerFactory(clock=clock)
    server_side = factory.buildProtocol(None)
    connection = FrameClient()
    pump = iosim.connect(
        server_side,
        iosim.makeFakeServer(server_side),
        connection,
        iosim.makeFakeClient(connection),
    )

    def calc(text, **settings):
        d = Calculator(clock, "h", 1, Settings(**settings), connection=connection).calculate(text)
        pump.flush()
        return success_of(d)

    return SimpleNamespace(calc=calc, connection=connection, pump=pump)


@pytest.mark.parametrize("legacy", [False, True], ids=["text", "legacy"])
def test_calculate_vectors(wired, vector, legacy):
    answer = wired.calc(vector["text"], legacy=legacy)
    assert answer == Answer(200, True, 65535, vector_value(vector), tuple(vector["steps"]))
    assert type(answer.value).__name__ == vector["result_type"]


@pytest.mark.parametrize("legacy", [False, True], ids=["text", "legacy"])
def test_calculate_without_steps(wired, legacy):
    assert wired.calc("2 ** 10", legacy=legacy, steps=False) == Answer(200, True, 65535, 1024, ())


@pytest.mark.parametrize("legacy", [False, True], ids=["text", "legacy"])
def test_calculate_error_answer(wired, legacy):
    answer = wired.calc("sqrt(-1)", legacy=legacy)
    assert (answer.status, answer.value, answer.steps) == (400, None, ())
    assert (answer.error.kind, answer.error.message) == ("ValueError", "math domain error")


def test_calculate_rand_is_not_cacheable(wired):
    answer = wired.calc("rand(5, 6)", steps=False)
    assert (answer.status, answer.cache, answer.max_age) == (200, False, 0)
    assert 5 <= answer.value <= 6


def test_calculate_many_on_one_connection(wired):
    results = [wired.calc(f"{i} * {i}", steps=False).value for i in range(5)]
    assert results == [0, 1, 4, 9, 16]
    assert wired.connection.pending == 0


def test_answer_with_a_result_but_an_error_status():
    """The status decides: a 500 that carries a result pickle is still shown as an error."""
    header = wire.Header(0, 0, 500, 0)
    answer = client._answer((header, pickle.dumps((1, []), 4)))
    assert answer.status == 500
    assert (answer.error.kind, answer.error.message) == ("Error", "1")


# --- answers: where they came from (the H and G bits) -----------------------------------------


def answer_from(ext: int, *, cache=True, max_age=65535, no_cache=False) -> Answer:
    """An answer read from a hand-built frame with extension word ``ext``."""
    flags = wire.make_flags(request=False, status=200, cache=cache, steps=True)
    frame = wire.encode(0, flags, max_age, b'{"result": 6, "steps": ["3 + 3", "6"]}', ext=ext)
    return client._answer((wire.decode_header(frame), frame[12:]), no_cache=no_cache)


@pytest.mark.parametrize(
    ("ext", "cache", "max_age", "no_cache", "note"),
    [
        (
            wire.EXT_FROM_CACHE | wire.EXT_FRAMED,
            True,
            65535,
            False,
            "from the proxy's cache, cacheable for ever",
        ),
        (wire.EXT_FROM_CACHE, True, 42, False, "from the proxy's cache, cacheable for 42 s"),
        (wire.EXT_FRAMED, True, 65535, False, "computed by the server, cacheable for ever"),
        (
            wire.EXT_FRAMED | wire.tag_bits(77),
            True,
            60,
            False,
            "computed by the server, cacheable for 60 s",
        ),
        (0, True, 65535, False, "computed by the server, cacheable for ever"),  # a course server
        (wire.EXT_FRAMED, False, 0, False, "computed by the server, not cacheable"),
        (wire.EXT_FRAMED, True, 0, False, "computed by the server, not cacheable"),
        (
            wire.EXT_FRAMED,
            True,
            65535,
            True,
            "computed by the server, not stored: asked with --no-cache",
        ),
        (
            wire.EXT_FROM_CACHE | wire.EXT_GRACE | wire.EXT_FRAMED,
            False,
            0,
            False,
            "from the proxy's cache, stale: served past its lifetime "
            "because the server is unreachable",
        ),
    ],
)
def test_render_says_where_the_answer_came_from(ext, cache, max_age, no_cache, note):
    answer = answer_from(ext, cache=cache, max_age=max_age, no_cache=no_cache)
    assert render("3 + 3", answer).splitlines()[-1] == f"Result: 6  ({note})"


def test_no_cache_never_says_cacheable_for_ever():
    answer = answer_from(wire.EXT_FRAMED, no_cache=True)
    assert "for ever" not in render("3 + 3", answer)


# --- the waiting line --------------------------------------------------------------------------


def test_waiting_line_after_a_second_replaced_then_wiped():
    clock = task.Clock()
    screen: list[str] = []
    d = defer.Deferred()
    watched = client.WaitingLine(clock, screen.append, "h:1").watch(d)
    clock.advance(0.9)
    assert screen == []
    clock.advance(0.1)
    assert screen == ["\rwaiting for an answer from h:1... 1 s"]
    clock.advance(1)
    clock.advance(1)
    assert screen[1:] == [
        "\rwaiting for an answer from h:1... 2 s",
        "\rwaiting for an answer from h:1... 3 s",
    ]
    d.callback("answer")
    assert screen[-1] == "\r" + " " * len("waiting for an answer from h:1... 3 s") + "\r"
    assert success_of(watched) == "answer"
    assert clock.getDelayedCalls() == []


def test_waiting_line_silent_for_a_quick_answer():
    clock = task.Clock()
    screen: list[str] = []
    d = defer.Deferred()
    client.WaitingLine(clock, screen.append, "h:1").watch(d)
    clock.advance(0.5)
    d.callback(None)
    clock.advance(5)
    assert screen == []


# --- Calculator: one connection, opened again after the far end closed it ----------------------


class Far:
    """The far end of the connections a `Calculator` opens on a memory reactor."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.notes: list[str] = []
        self.calculator = Calculator(
            self.reactor, "h", 1, Settings(steps=False), notify=self.notes.append
        )
        self.connections: list[tuple[FrameClient, StringTransport]] = []

    def accept(self):
        """Complete the latest connection attempt."""
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.reactor.advance(0)
        self.connections.append((proto, transport))
        return proto, transport

    def refuse(self):
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.reactor.advance(0)

    @staticmethod
    def answer(proto, transport):
        proto.dataReceived(serve(transport.value()))
        transport.clear()


def test_calculator_reuses_its_connection():
    far = Far()
    d = far.calculator.calculate("1 + 1")
    proto, transport = far.accept()
    far.answer(proto, transport)
    assert success_of(d).value == 2
    d = far.calculator.calculate("2 + 2")
    far.answer(proto, transport)
    assert success_of(d).value == 4
    assert len(far.reactor.tcpClients) == 1
    assert far.notes == []


def test_calculator_reconnects_after_the_far_end_closed_and_says_so():
    far = Far()
    d = far.calculator.calculate("1 + 1")
    proto, transport = far.accept()
    far.answer(proto, transport)
    success_of(d)
    proto.connectionLost(Failure(error.ConnectionDone()))  # the idle timeout, say
    d = far.calculator.calculate("2 + 2")
    assert not d.called and len(far.reactor.tcpClients) == 2
    proto2, transport2 = far.accept()
    assert far.notes == ["(connection closed by h:1; reconnected)\n"]
    far.answer(proto2, transport2)
    assert success_of(d).value == 4


def test_calculator_sends_again_a_request_lost_with_a_used_connection():
    """A kept connection may be closed as a request leaves: that request is sent once more."""
    far = Far()
    d = far.calculator.calculate("1 + 1")
    proto, transport = far.accept()
    far.answer(proto, transport)
    success_of(d)
    d = far.calculator.calculate("3 + 3")
    assert transport.value().endswith(b"3 + 3")
    proto.connectionLost(Failure(error.ConnectionLost()))  # closed as we sent
    proto2, transport2 = far.accept()
    assert transport2.value().endswith(b"3 + 3")
    far.answer(proto2, transport2)
    assert success_of(d).value == 6
    assert far.notes == ["(connection closed by h:1; reconnected)\n"]


def test_calculator_does_not_resend_on_a_fresh_connection():
    """A request lost on a connection just opened is a real failure, not an idle close."""
    far = Far()
    d = far.calculator.calculate("1 + 1")
    proto, _ = far.accept()
    proto.connectionLost(Failure(error.ConnectionDone()))
    failure_of(d, error.ConnectionDone)
    assert len(far.reactor.tcpClients) == 1


def test_calculator_cannot_reconnect_fails_and_tries_again_next_time():
    far = Far()
    d = far.calculator.calculate("1")
    proto, transport = far.accept()
    far.answer(proto, transport)
    proto.connectionLost(Failure(error.ConnectionDone()))
    d = far.calculator.calculate("2")
    far.refuse()
    f = failure_of(d, error.ConnectionRefusedError)
    assert client.describe_failure(f.value, "h:1").startswith("Error: cannot connect to h:1: ")
    d = far.calculator.calculate("3")
    proto3, transport3 = far.accept()
    far.answer(proto3, transport3)
    assert success_of(d).value == 3


# --- Menu ------------------------------------------------------------------------------------

MENU = client.menu_text()
SIX = Answer(200, True, 65535, 6, ("max(2, 3) + 3", "3 + 3", "6"))


class FakeCalculator:
    where = "h:1"

    def __init__(self):
        self.texts = []
        self.pending = []

    def calculate(self, text):
        if text == "raise":
            raise CalculationError("empty expression", "SyntaxError")
        self.texts.append(text)
        d = defer.Deferred()
        self.pending.append(d)
        return d


class Keyboard:
    """What `Menu` reads: each prompt waits for `type`."""

    def __init__(self):
        self.prompts: list[str] = []
        self.waiting: defer.Deferred | None = None

    def __call__(self, prompt: str) -> defer.Deferred:
        assert self.waiting is None, "asked for two lines at once"
        self.prompts.append(prompt)
        self.waiting = defer.Deferred()
        return self.waiting

    def type(self, *lines):
        for line in lines:
            d, self.waiting = self.waiting, None
            assert d is not None, f"nobody reads {line!r}"
            d.callback(line)


class Screen(list):
    def take(self) -> str:
        out = "".join(self)
        self.clear()
        return out


@pytest.fixture
def menu():
    calculator = FakeCalculator()
    keyboard = Keyboard()
    screen = Screen()
    done = client.Menu(calculator, keyboard, screen.append).run()
    return SimpleNamespace(calc=calculator, keys=keyboard, screen=screen, done=done)


def test_menu_is_shown_once_at_start(menu):
    assert menu.screen.take() == MENU
    assert "  1) (sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13\n" in MENU
    assert "  m) show this menu again\n" in MENU
    assert menu.keys.prompts == ["choice> "]


@pytest.mark.parametrize("choice", range(1, 7))
def test_menu_choices_send_the_examples_and_the_menu_is_not_reprinted(menu, choice):
    menu.screen.take()
    menu.keys.type(str(choice))
    assert menu.calc.texts == [EXAMPLES[choice - 1]]
    assert menu.keys.waiting is None  # no prompt until the answer is shown
    menu.calc.pending[0].callback(SIX)
    assert menu.screen.take() == render(EXAMPLES[choice - 1], SIX) + "\n"
    assert menu.keys.prompts == ["choice> ", "choice> "]


@pytest.mark.parametrize("word", ["m", "M", "?", "help", "menu"])
def test_menu_again_on_request(menu, word):
    menu.screen.take()
    menu.keys.type(word)
    assert menu.screen.take() == MENU
    assert menu.calc.texts == []


def test_menu_type_your_own(menu):
    menu.screen.take()
    menu.keys.type("7")
    assert menu.keys.prompts[-1] == "expression> "
    menu.keys.type("  2 ** 10 ")
    assert menu.calc.texts == ["2 ** 10"]
    menu.calc.pending[0].callback(Answer(200, True, 65535, 1024, ("2 ** 10", "1024")))
    assert menu.screen.take() == (
        "Expression: 2 ** 10\n          = 1024\n"
        "Result: 1024  (computed by the server, cacheable for ever)\n\n"
    )
    assert menu.keys.prompts[-1] == "choice> "


def test_menu_type_your_own_empty_goes_back(menu):
    menu.screen.take()
    menu.keys.type("7", "")
    assert menu.keys.prompts == ["choice> ", "expression> ", "choice> "]
    assert menu.calc.texts == []


def test_menu_ctrl_d_at_the_expression_prompt_goes_back_to_the_menu(menu):
    menu.screen.take()
    menu.keys.type("7", None)
    assert menu.keys.prompts == ["choice> ", "expression> ", "choice> "]
    assert menu.screen.take() == "\n"
    assert not menu.done.called


def test_menu_ctrl_d_at_the_menu_quits(menu):
    menu.screen.take()
    menu.keys.type(None)
    assert success_of(menu.done) is None
    assert menu.screen.take() == "\n"


@pytest.mark.parametrize("line", ["sin(pi/2)", "8", "0", "-1", "77", "1 2", "abc"])
def test_menu_anything_else_is_an_expression(menu, line):
    menu.screen.take()
    menu.keys.type(line)
    assert menu.calc.texts == [line]


def test_menu_empty_line_asks_again(menu):
    menu.screen.take()
    menu.keys.type("", "  ")
    assert menu.keys.prompts == ["choice> "] * 3
    assert menu.screen.take() == ""


@pytest.mark.parametrize("word", ["q", "Q", "quit", "exit", " q "])
def test_menu_quit(menu, word):
    menu.screen.take()
    menu.keys.type(word)
    assert success_of(menu.done) is None
    assert menu.calc.texts == []


def test_menu_error_answer_then_the_prompt(menu):
    menu.screen.take()
    menu.keys.type("1/0")
    err = codec.RemoteError("ZeroDivisionError", "division by zero")
    menu.calc.pending[0].callback(Answer(400, True, 65535, error=err))
    assert menu.screen.take() == "Error 400 (ZeroDivisionError): division by zero\n\n"
    assert menu.keys.prompts[-1] == "choice> "


def test_menu_local_error_then_the_prompt(menu):
    menu.screen.take()
    menu.keys.type("raise")
    assert menu.screen.take() == "Error (local, SyntaxError): empty expression\n\n"
    assert menu.keys.prompts[-1] == "choice> "


def test_menu_stays_when_the_connection_is_gone(menu):
    """One line naming host:port, then the prompt again: the next choice
    reconnects (the old menu quit, or hung)."""
    menu.screen.take()
    menu.keys.type("2")
    menu.calc.pending[0].errback(error.ConnectionRefusedError())
    out = menu.screen.take()
    assert out.startswith("Error: cannot connect to h:1: ")
    assert out.count("\n") == 2
    assert menu.keys.prompts[-1] == "choice> "
    assert not menu.done.called


def test_menu_shows_the_waiting_line():
    clock = task.Clock()
    calculator = FakeCalculator()
    keyboard = Keyboard()
    screen = Screen()
    waiting = client.WaitingLine(clock, screen.append, "h:1")
    client.Menu(calculator, keyboard, screen.append, waiting).run()
    screen.take()
    keyboard.type("2")
    clock.advance(1)
    assert screen.take() == "\rwaiting for an answer from h:1... 1 s"
    calculator.pending[0].callback(SIX)
    out = screen.take()
    wipe = "\r" + " " * len("waiting for an answer from h:1... 1 s") + "\r"
    assert out.startswith(wipe + "Expression: max(2, 3) + 3")


def test_console_reader_reads_lines_then_none(monkeypatch):
    """`ConsoleReader` on piped input: one line per prompt, echoed after it
    so the screen reads as a session; None at the end of input."""
    import io
    import queue

    monkeypatch.setattr("sys.stdin", io.StringIO("2\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    handed: queue.Queue = queue.Queue()
    reactor = SimpleNamespace(callFromThread=lambda f, *a: handed.put((f, a)))
    reader = client.ConsoleReader(reactor, echo=True)
    got: list = []
    for _ in range(2):
        reader("choice> ").addCallback(got.append)
        f, args = handed.get(timeout=5)
        f(*args)
    assert got == ["2", None]
    assert out.getvalue() == "choice> 2\nchoice> "


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --port: port must be 1..65535, not 0"),
        ("65536", "argument --port: port must be 1..65535, not 65536"),
        ("http", "argument --port: not a port number: 'http'"),
        ("٩٩٩٨", "argument --port: not a port number: '٩٩٩٨'"),
        (" 9998", "argument --port: not a port number: ' 9998'"),
        ("9_998", "argument --port: not a port number: '9_998'"),
    ],
)
def test_parse_args_refuses_a_port_out_of_range(value, message, capsys):
    with pytest.raises(SystemExit) as info:
        client.parse_args(["--port", value, "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"calc-client: error: {message}\n")


def test_parse_args_joins_the_words_of_an_expression():
    assert client.parse_args(["sin", "(pi/2)"]).expression == "sin (pi/2)"
    assert client.parse_args(["--port", "9998", "1", "+", "2"]).expression == "1 + 2"
    assert client.parse_args(["max(2, 3) + 3"]).expression == "max(2, 3) + 3"


def test_help_shows_every_default_and_what_the_calculator_knows(capsys):
    with pytest.raises(SystemExit):
        client.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: 127.0.0.1)",
        "(default: 9999)",
        "(default: True)",
        "(default: 65535)",
        "(default: 15.0)",
    ):
        assert default in text, default
    from twisted_cacheproxy.calculator.expression import CONSTANTS, FUNCTIONS

    for name in [*FUNCTIONS, *(c.lower() for c in CONSTANTS)]:
        assert f" {name}," in text or f" {name} " in text or f" {name}(" in text, name
    # How each function is called, the number of its arguments included.
    assert "rand(a, b) (a uniform random number between a and b)" in text
    assert "log(x[, base])" in text and "max(x, ...)" in text and "pow(x, y[, mod])" in text


def test_version_is_ours(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        client.parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"calc-client {version('twisted-cacheproxy')}\n"


# --- run: the command's main, on a memory reactor ------------------------------------------


def start(argv):
    reactor = MemoryReactorClock()
    d = client.run(reactor, argv)
    assert len(reactor.tcpClients) == 1
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    return reactor, d, (host, port, timeout), factory


def connected(reactor, factory):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    reactor.advance(0)
    return proto, transport


def serve(frame: bytes) -> bytes:
    clock = task.Clock()
    p = server.CalculatorServerFactory(clock=clock).buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(frame)
    return t.value()


def test_run_one_shot_result(capsys):
    reactor, d, where, factory = start(["--port", "4321", "max(2, 3) + 3"])
    assert where == ("127.0.0.1", 4321, 15.0)
    proto, transport = connected(reactor, factory)
    request = transport.value()
    assert request[6:] == b"\x1c\x00\xff\xff\x00\x00max(2, 3) + 3"
    proto.dataReceived(serve(request))
    assert success_of(d) == 0
    out = capsys.readouterr()
    assert out.out == render("max(2, 3) + 3", SIX)
    assert out.err == ""
    assert transport.disconnecting


def test_run_one_shot_options(capsys):
    argv = ["--host", "10.1.2.3", "--no-steps", "--no-cache", "--legacy", "--timeout", "2", "7/2"]
    reactor, d, where, factory = start(argv)
    assert where == ("10.1.2.3", 9999, 2.0)
    proto, transport = connected(reactor, factory)
    request = transport.value()
    assert wire.decode_header(request).flags == 0x0400
    assert request[12:14] == b"\x80\x04"
    proto.dataReceived(serve(request))
    assert success_of(d) == 0
    assert capsys.readouterr().out == (
        "Expression: 7/2\n"
        "Result: 3.5  (computed by the server, not stored: asked with --no-cache)\n"
    )


def test_run_one_shot_error_answer_exits_1(capsys):
    reactor, d, _, factory = start(["1 / 0"])
    proto, transport = connected(reactor, factory)
    proto.dataReceived(serve(transport.value()))
    assert success_of(d) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "Error 400 (ZeroDivisionError): division by zero\n"


def test_run_connection_refused_exits_2(capsys):
    reactor, d, _, factory = start(["1"])
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError("refused")))
    reactor.advance(0)
    assert success_of(d) == 2
    assert capsys.readouterr().err.startswith("Error: cannot connect to 127.0.0.1:9999: ")


def test_run_connection_lost_before_the_answer_exits_2(capsys):
    reactor, d, _, factory = start(["1"])
    proto, _ = connected(reactor, factory)
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert success_of(d) == 2
    assert capsys.readouterr().err == (
        "Error: 127.0.0.1:9999 closed the connection before the answer came\n"
    )


def test_run_local_syntax_error_with_legacy_exits_2(capsys):
    reactor = MemoryReactorClock()
    d = client.run(reactor, ["--legacy", "1 +"])
    assert success_of(d) == 2
    assert capsys.readouterr().err == (
        "Error (local, SyntaxError): unexpected end of expression: expected a number, "
        "a name or '('\n"
    )
    assert reactor.tcpClients == []  # refused before connecting


@pytest.mark.parametrize("argv", [["--max-age", "65536", "1"], ["--max-age", "-1", "1"]])
def test_parse_args_refuses_a_bad_max_age(argv, capsys):
    with pytest.raises(SystemExit) as info:
        client.parse_args(argv)
    assert info.value.code == 2
    assert "--max-age must be 0..65535" in capsys.readouterr().err


def test_parse_args_defaults():
    args = client.parse_args([])
    assert (args.expression, args.host, args.port, args.steps, args.no_cache) == (
        None,
        "127.0.0.1",
        9999,
        True,
        False,
    )
    assert (args.max_age, args.legacy, args.timeout) == (65535, False, 15.0)


def test_render_describes_integers_too_long_to_print():
    """Python refuses str() of an integer over 4300 digits: the client says what it got."""
    from twisted_cacheproxy.client import Answer, render

    answer = Answer(status=200, cache=True, max_age=65535, value=2**20000, steps=())
    assert render("2 ** 20000", answer).splitlines()[-1] == (
        "Result: <an integer of 20001 bits, too long to print>  "
        "(computed by the server, cacheable for ever)"
    )


# --- numbers in ASCII digits only ------------------------------------------------------------


@pytest.mark.parametrize("choice", ["\uff13", "٣", " 3x"])
def test_menu_choices_are_ascii_digits(menu, choice):
    """A fullwidth or Arabic-Indic 3 is not menu entry 3: it goes to the
    server as typed, which says what is wrong with it."""
    menu.screen.take()
    menu.keys.type(choice)
    assert menu.calc.texts == [choice.strip()]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-age", "٣٠"], "argument --max-age: not a number: '٣٠'"),
        (["--max-age", "3_0"], "argument --max-age: not a number: '3_0'"),
        (["--timeout", "nan"], "argument --timeout: not a number: 'nan'"),
        (["--timeout", "inf"], "argument --timeout: not a number: 'inf'"),
        (["--timeout", "\uff15"], "argument --timeout: not a number: '\uff15'"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--timeout", "-1"], "--timeout must be positive"),
    ],
)
def test_parse_args_takes_numbers_in_ascii_digits_only(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        client.parse_args([*argv, "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith(f"calc-client: error: {message}\n")


def test_parse_args_takes_plain_numbers():
    args = client.parse_args(["--max-age", "30", "--timeout", "0.5", "--port", "9998"])
    assert (args.max_age, args.timeout, args.port) == (30, 0.5, 9998)


# --- giving up: --timeout bounds connecting and each answer; Ctrl-C --------------------------


def test_run_gives_up_on_a_peer_that_never_answers(capsys):
    """A listener that accepts and never answers (or an HTTP port by
    mistake): after --timeout seconds one line saying how long and for
    what, exit 2, and the connection closed."""
    reactor, d, _, factory = start(["--port", "9998", "1 + 1"])
    _, transport = connected(reactor, factory)
    assert transport.value().endswith(b"1 + 1")
    reactor.advance(client.TIMEOUT - 0.1)
    assert not d.called
    reactor.advance(0.1)
    assert success_of(d) == 2
    assert capsys.readouterr().err == "Error: no answer from 127.0.0.1:9998 within 15 s\n"
    assert transport.disconnecting
    assert reactor.getDelayedCalls() == []


def test_run_timeout_option_bounds_the_answer(capsys):
    reactor, d, where, factory = start(["--timeout", "0.5", "1 + 1"])
    assert where[2] == 0.5
    connected(reactor, factory)
    reactor.advance(0.5)
    assert success_of(d) == 2
    assert capsys.readouterr().err == "Error: no answer from 127.0.0.1:9999 within 0.5 s\n"


def test_run_an_answer_in_time_cancels_the_timeout(capsys):
    reactor, d, _, factory = start(["--timeout", "1", "max(2, 3) + 3"])
    proto, transport = connected(reactor, factory)
    reactor.advance(0.9)
    proto.dataReceived(serve(transport.value()))
    assert success_of(d) == 0
    assert reactor.getDelayedCalls() == []
    assert capsys.readouterr().out == render("max(2, 3) + 3", SIX)


def test_run_says_how_long_connecting_was_given(capsys):
    reactor, d, where, factory = start(["--timeout", "2", "1"])
    assert where[2] == 2.0  # the connector's own timeout
    factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
    reactor.advance(0)
    assert success_of(d) == 2
    assert capsys.readouterr().err == "Error: cannot connect to 127.0.0.1:9999 within 2 s\n"


def test_each_answer_has_the_whole_timeout_and_a_new_connection_follows_one_that_gave_up():
    far = Far()
    far.calculator.timeout = 3.0
    d = far.calculator.calculate("1 + 1")
    proto, transport = far.accept()
    far.reactor.advance(2)
    far.answer(proto, transport)
    assert success_of(d).value == 2
    d = far.calculator.calculate("2 + 2")
    far.reactor.advance(2.9)
    assert not d.called  # 4.9 s since the first request: each answer has its own 3 s
    far.reactor.advance(0.1)
    f = failure_of(d, client.GaveUpError)
    assert (f.value.seconds, f.value.connecting) == (3.0, False)
    assert transport.disconnecting  # a late answer would be taken for the next one
    assert proto.pending == 0
    d = far.calculator.calculate("3 + 3")
    assert len(far.reactor.tcpClients) == 2
    proto2, transport2 = far.accept()
    far.answer(proto2, transport2)
    assert success_of(d).value == 6
    assert far.notes == []  # we closed it: no "closed by h:1" note


def test_menu_says_no_answer_came_and_goes_on():
    far = Far()
    keyboard = Keyboard()
    screen = Screen()
    done = client.Menu(far.calculator, keyboard, screen.append).run()
    screen.take()
    keyboard.type("1 + 1")
    far.accept()
    far.reactor.advance(client.TIMEOUT)
    assert screen.take() == "Error: no answer from h:1 within 15 s\n\n"
    assert keyboard.prompts == ["choice> ", "choice> "]
    assert not done.called


def test_describe_failure_gave_up():
    assert client.describe_failure(client.GaveUpError(15.0), "h:1") == (
        "Error: no answer from h:1 within 15 s\n"
    )
    assert client.describe_failure(client.GaveUpError(0.5, connecting=True), "[::1]:9") == (
        "Error: cannot connect to [::1]:9 within 0.5 s\n"
    )


def test_the_default_timeout_outlasts_the_proxys_own():
    """A miss through a proxy with its default options ends in the proxy's
    500 (its --timeout covers the server's answer and its retries) before
    calc-client gives up."""
    from twisted_cacheproxy.application.options import ProxyOptions

    proxy = ProxyOptions()
    proxy.parseOptions([])
    assert client.parse_args([]).timeout == client.TIMEOUT > proxy["timeout"] + 1


class SignalledReactor(MemoryReactorClock):
    """A memory reactor that runs what a signal handler hands it at once."""

    def callFromThread(self, f, *args):
        f(*args)


@pytest.fixture
def ctrl_c():
    """Runs a reactor's when-running hooks (which install the client's
    SIGINT handler) and gives a function that presses Ctrl-C; the test
    process's own handler is put back afterwards."""
    import signal

    saved = signal.getsignal(signal.SIGINT)

    def press(reactor):
        for f, args, kwargs in reactor.whenRunningHooks:
            f(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)

    yield press
    signal.signal(signal.SIGINT, saved)


def test_ctrl_c_while_waiting_says_the_user_stopped_it(ctrl_c, capsys):
    reactor = SignalledReactor()
    d = client.run(reactor, ["1 + 1"])
    _, _, factory, _, _ = reactor.tcpClients[0]
    _, transport = connected(reactor, factory)
    reactor.advance(3)
    ctrl_c(reactor)
    assert success_of(d) == client.INTERRUPTED == 130
    assert capsys.readouterr().err == "Stopped by Ctrl-C.\n"  # not "closed the connection"
    assert transport.disconnecting
    assert reactor.getDelayedCalls() == []


def test_ctrl_c_while_connecting(ctrl_c, capsys):
    reactor = SignalledReactor()
    d = client.run(reactor, ["1 + 1"])
    ctrl_c(reactor)
    assert success_of(d) == 130
    assert capsys.readouterr().err == "Stopped by Ctrl-C.\n"


def test_ctrl_c_in_the_menu_while_waiting_for_an_answer(ctrl_c, capsys):
    reactor = SignalledReactor()
    calculator = Calculator(reactor, "h", 1, Settings())
    keyboard = Keyboard()
    screen = Screen()
    session = client.Menu(calculator, keyboard, screen.append).run()
    client.cancel_on_ctrl_c(reactor, session)
    keyboard.type("1 + 1")
    _, _, factory, _, _ = reactor.tcpClients[0]
    connected(reactor, factory)
    ctrl_c(reactor)
    failure_of(session, defer.CancelledError)
    assert "Error" not in "".join(screen)
    assert keyboard.prompts == ["choice> "]  # the menu ends: no prompt again


def test_ctrl_c_at_the_menu_prompt(ctrl_c):
    reactor = SignalledReactor()
    keyboard = Keyboard()
    session = client.Menu(FakeCalculator(), keyboard, Screen().append).run()
    client.cancel_on_ctrl_c(reactor, session)
    ctrl_c(reactor)
    failure_of(session, defer.CancelledError)
