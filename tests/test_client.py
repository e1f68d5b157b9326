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

from twisted_cacheproxy import client, codec, server, wire
from twisted_cacheproxy.client import EXAMPLES, Answer, Calculator, Menu, Settings, render
from twisted_cacheproxy.expression import CalculationError
from twisted_cacheproxy.parser import parse

# --- render ------------------------------------------------------------------------------


def test_render_aligns_the_steps_under_the_expression():
    answer = Answer(200, True, 65535, 6, ("max(2, 3) + 3", "3 + 3", "6"))
    assert render("max(2, 3) + 3", answer) == (
        "Expression: max(2, 3) + 3\n"
        "          = 3 + 3\n"
        "          = 6\n"
        "Result: 6  (cacheable for ever)\n"
    )
    lines = render("max(2, 3) + 3", answer).splitlines()
    assert lines[1].index("3 + 3") == lines[0].index("max(2, 3) + 3") == len("Expression: ")


def test_render_a_vector():
    v = VECTORS[2]
    answer = Answer(200, True, 30, vector_value(v), tuple(v["steps"]))
    out = render(v["text"], answer).splitlines()
    assert out[0] == "Expression: " + v["text"]
    assert out[1:-1] == ["          = " + s for s in v["steps"][1:]]
    assert out[-1] == "Result: 3.0001220703125  (cacheable for 30 s)"


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
    assert render("7", Answer(200, cache, max_age, 7)) == f"Expression: 7\nResult: 7  ({note})\n"


def test_render_float_uses_repr():
    answer = Answer(200, False, 0, 0.1 + 0.2, ("0.1 + 0.2", "0.30000000000000004"))
    assert render("0.1 + 0.2", answer).splitlines()[-1] == (
        "Result: 0.30000000000000004  (not cacheable)"
    )


def test_render_error_is_one_line():
    answer = Answer(
        400, True, 65535, error=codec.RemoteError("ZeroDivisionError", "division by zero")
    )
    assert render("1 / 0", answer) == "Error 400 (ZeroDivisionError): division by zero\n"
    answer = Answer(500, False, 0, error=codec.RemoteError("RuntimeError", "internal server error"))
    assert render("x", answer) == "Error 500 (RuntimeError): internal server error\n"


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            CalculationError("empty expression", "SyntaxError"),
            "Error (local, SyntaxError): empty expression\n",
        ),
        (error.ConnectionDone(), "Error: the connection was closed before the answer came\n"),
        (error.ConnectionLost(), "Error: the connection was closed before the answer came\n"),
        (
            wire.ProtocolError("peer sent a request (T=1) instead of an answer"),
            "Error: peer sent a request (T=1) instead of an answer\n",
        ),
    ],
)
def test_describe_failure(exc, text):
    assert client.describe_failure(exc) == text


def test_describe_connect_failure():
    text = client.describe_failure(error.ConnectionRefusedError("111: Connection refused"))
    assert text.startswith("Error: cannot connect: ")
    assert "Connection refused" in text
    assert text.endswith("\n") and text.count("\n") == 1


# --- Calculator: the request it sends ------------------------------------------------------


def sent_by(settings: Settings, text: str, now: float = 1_700_000_123.7) -> bytes:
    clock = task.Clock()
    clock.advance(now)
    connection = wire.FrameClient()
    connection.makeConnection(StringTransport())
    d = Calculator(connection, clock, settings).calculate(text)
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
    connection = wire.FrameClient()
    connection.makeConnection(StringTransport())
    calculator = Calculator(connection, task.Clock(), Settings(legacy=True))
    with pytest.raises(CalculationError, match="unexpected end of expression"):
        calculator.calculate("1 +")
    assert connection.transport.value() == b""


# --- Calculator against a server, in memory -------------------------------------------------


@pytest.fixture
def wired():
    """A FrameClient and a server protocol connected by an in-memory pump."""
    clock = task.Clock()
    clock.advance(1_700_000_000)
    factory = server.CalculatorServerFactory(clock=clock)
    server_side = factory.buildProtocol(None)
    connection = wire.FrameClient()
    pump = iosim.connect(
        server_side,
        iosim.makeFakeServer(server_side),
        connection,
        iosim.makeFakeClient(connection),
    )

    def calc(text, **settings):
        d = Calculator(connection, clock, Settings(**settings)).calculate(text)
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
    header = wire.Header(0, 0, 500, 0)
    answer = client._answer((header, pickle.dumps((1, []), 4)))
    assert answer.status == 500
    assert (answer.error.kind, answer.error.message) == ("Error", "1")


# --- Menu ------------------------------------------------------------------------------------

MENU = (
    "\nChoose an expression to calculate:\n"
    + "".join(f"  {i}) {t}\n" for i, t in enumerate(EXAMPLES, 1))
    + "  7) type your own\n  q) quit\nchoice> "
)
AGAIN = "Please answer 1-7 or q.\nchoice> "
SIX = Answer(200, True, 65535, 6, ("max(2, 3) + 3", "3 + 3", "6"))


class FakeCalculator:
    def __init__(self):
        self.texts = []
        self.pending = []
        self.connection = SimpleNamespace(connected=True)

    def calculate(self, text):
        if text == "raise":
            raise CalculationError("empty expression", "SyntaxError")
        self.texts.append(text)
        d = defer.Deferred()
        self.pending.append(d)
        return d


class Screen(StringTransport):
    def take(self) -> str:
        out = self.value().decode()
        self.clear()
        return out


@pytest.fixture
def menu():
    calculator = FakeCalculator()
    done = defer.Deferred()
    m = Menu(calculator, done)
    screen = Screen()
    m.makeConnection(screen)
    return SimpleNamespace(menu=m, calc=calculator, screen=screen, done=done)


def test_menu_is_shown_on_start(menu):
    assert menu.screen.take() == MENU
    assert "  1) (sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13\n" in MENU


@pytest.mark.parametrize("choice", range(1, 7))
def test_menu_choices_send_the_examples(menu, choice):
    menu.screen.take()
    menu.menu.dataReceived(f"{choice}\n".encode())
    assert menu.calc.texts == [EXAMPLES[choice - 1]]
    assert menu.screen.take() == "\n"
    menu.calc.pending[0].callback(SIX)
    assert menu.screen.take() == render(EXAMPLES[choice - 1], SIX) + MENU


def test_menu_type_your_own(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"7\n")
    assert menu.screen.take() == "expression> "
    menu.menu.dataReceived(b"  2 ** 10 \r\n")
    assert menu.calc.texts == ["2 ** 10"]
    menu.calc.pending[0].callback(Answer(200, True, 65535, 1024, ("2 ** 10", "1024")))
    assert menu.screen.take() == (
        "\nExpression: 2 ** 10\n          = 1024\nResult: 1024  (cacheable for ever)\n" + MENU
    )


def test_menu_type_your_own_empty_goes_back(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"7\n\n")
    assert menu.screen.take() == "expression> " + MENU
    assert menu.calc.texts == []


@pytest.mark.parametrize("line", [b"0", b"8", b"abc", b"", b"1 2", b"-1", b"77"])
def test_menu_bad_input_reprompts(menu, line):
    menu.screen.take()
    menu.menu.dataReceived(line + b"\n")
    assert menu.screen.take() == AGAIN
    assert menu.calc.texts == []
    assert not menu.screen.disconnecting


@pytest.mark.parametrize("word", [b"q", b"Q", b"quit", b"exit"])
def test_menu_quit(menu, word):
    menu.screen.take()
    menu.menu.dataReceived(word + b"\n")
    assert menu.screen.disconnecting
    assert menu.calc.texts == []
    menu.menu.connectionLost(Failure(error.ConnectionDone()))
    assert success_of(menu.done) is None


def test_menu_error_answer_then_menu(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"7\n1/0\n")
    menu.screen.take()
    err = codec.RemoteError("ZeroDivisionError", "division by zero")
    menu.calc.pending[0].callback(Answer(400, True, 65535, error=err))
    assert menu.screen.take() == "Error 400 (ZeroDivisionError): division by zero\n" + MENU
    assert not menu.screen.disconnecting


def test_menu_local_error_then_menu(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"7\nraise\n")
    assert (
        menu.screen.take() == "expression> \nError (local, SyntaxError): empty expression\n" + MENU
    )
    assert not menu.screen.disconnecting


def test_menu_quits_when_the_connection_is_gone(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"2\n")
    menu.calc.connection.connected = False
    menu.calc.pending[0].errback(error.ConnectionDone())
    out = menu.screen.take()
    assert out.startswith("\nError: the connection was closed before the answer came\n")
    assert "choice> " not in out
    assert menu.screen.disconnecting


def test_menu_lines_typed_while_waiting_are_kept(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"2\n9\n3\nq\n")
    assert menu.calc.texts == [EXAMPLES[1]]
    menu.calc.pending[0].callback(SIX)
    # the answer, the menu, the re-prompt for "9", then "3" is sent
    assert menu.calc.texts == [EXAMPLES[1], EXAMPLES[2]]
    assert not menu.screen.disconnecting
    menu.calc.pending[1].callback(SIX)
    assert menu.screen.disconnecting  # "q" came last


def test_menu_end_of_input_waits_for_the_answer(menu):
    menu.screen.take()
    menu.menu.dataReceived(b"2\n")
    menu.menu.readConnectionLost()
    assert not menu.screen.disconnecting
    menu.calc.pending[0].callback(SIX)
    assert render(EXAMPLES[1], SIX) in menu.screen.take()
    assert menu.screen.disconnecting


class StdioLike:
    """The attributes `twisted.internet.stdio.StandardIO` really has (no
    ``connected``): the menu must not rely on more."""

    disconnecting = False
    disconnected = False

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)

    def loseConnection(self):
        self.disconnecting = True


def test_menu_on_a_standard_io_transport():
    calculator = FakeCalculator()
    m = Menu(calculator, defer.Deferred())
    transport = StdioLike()
    m.makeConnection(transport)
    m.dataReceived(b"2\n")
    d = calculator.pending[0]
    d.callback(SIX)
    assert b"".join(transport.written).decode().count("choice> ") == 2
    assert d.result is None  # the menu's chain ended cleanly, no error left in it


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
    assert where == ("127.0.0.1", 4321, 10.0)
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
    assert capsys.readouterr().out == "Expression: 7/2\nResult: 3.5  (cacheable for ever)\n"


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
    assert capsys.readouterr().err.startswith("Error: cannot connect: ")


def test_run_connection_lost_before_the_answer_exits_2(capsys):
    reactor, d, _, factory = start(["1"])
    proto, _ = connected(reactor, factory)
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert success_of(d) == 2
    assert capsys.readouterr().err == "Error: the connection was closed before the answer came\n"


def test_run_local_syntax_error_with_legacy_exits_2(capsys):
    reactor, d, _, factory = start(["--legacy", "1 +"])
    _, transport = connected(reactor, factory)
    assert success_of(d) == 2
    assert capsys.readouterr().err == (
        "Error (local, SyntaxError): unexpected end of expression: expected a number, "
        "a name or '('\n"
    )
    assert transport.value() == b""


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
    assert (args.max_age, args.legacy, args.timeout) == (65535, False, 10.0)


def test_pending_request_fails_on_connection_loss():
    connection = wire.FrameClient()
    connection.makeConnection(StringTransport())
    d = Calculator(connection, task.Clock(), Settings()).calculate("1")
    connection.connectionLost(Failure(error.ConnectionLost()))
    failure_of(d, error.ConnectionLost)


def test_render_describes_integers_too_long_to_print():
    from twisted_cacheproxy.client import Answer, render

    answer = Answer(status=200, cache=True, max_age=65535, value=2**20000, steps=())
    assert render("2 ** 20000", answer).splitlines()[-1] == (
        "Result: <an integer of 20001 bits, too long to print>  (cacheable for ever)"
    )
