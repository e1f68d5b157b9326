"""``calc-client``: the calculator client, one-shot or with the exercise's menu.

All of it runs on the reactor: the wire code is `wire.FrameClient`, the menu
is a `LineReceiver` on standard input, and every choice travels over one
persistent connection until the user quits.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer, error, protocol, stdio, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from . import codec, wire
from .expression import CalculationError, Real
from .parser import parse

#: The exercise's six standard example expressions.
EXAMPLES = (
    "(sin(max(2, 3 * 4, 5, 6 * ((7 * 8) / 9), 10 / 11)) / 12) * 13",
    "max(2, 3) + 3",
    "3 + ((4 * 2) / ((1 - 5) ** (2 ** 3)))",
    "((1 + 2) ** (3 * 4)) / (5 * 6)",
    "-(-((1 + (2 + 3)) ** -(4 + 5)))",
    "max(2, 3 * 4, log(e), 6 * 7, 9 / 8)",
)


@dataclass(frozen=True)
class Answer:
    """One answer as the user sees it."""

    status: int
    cache: bool
    max_age: int
    value: Real | None = None
    steps: tuple[str, ...] = ()
    error: codec.RemoteError | None = None


@dataclass(frozen=True)
class Settings:
    """How requests are sent: flags, cache control and payload encoding."""

    steps: bool = True
    cache: bool = True
    max_age: int = wire.FOREVER
    legacy: bool = False


class Calculator:
    """Sends expressions over one connection and reads their answers."""

    def __init__(self, connection: wire.FrameClient, clock, settings: Settings) -> None:
        self.connection = connection
        self.clock = clock
        self.settings = settings

    def request_data(self, text: str) -> bytes:
        """Request data for ``text``: the text itself, or the course client's
        pickle of its parsed tree (so a parse error stops it here)."""
        if self.settings.legacy:
            return codec.encode_request(parse(text), codec.LEGACY)
        return text.encode()

    def calculate(self, text: str) -> defer.Deferred:
        """Send ``text``; the Deferred fires with an `Answer`."""
        s = self.settings
        flags = wire.make_flags(request=True, cache=s.cache, steps=s.steps)
        frame = wire.encode(
            int(self.clock.seconds()), flags, s.max_age if s.cache else 0, self.request_data(text)
        )
        return self.connection.sendRequest(frame).addCallback(_answer)


def _answer(message: tuple[wire.Header, bytes]) -> Answer:
    header, data = message
    kwargs = {"status": header.status, "cache": header.cache, "max_age": header.max_age}
    try:
        value, steps = codec.decode_response(data)
    except codec.RemoteError as e:
        return Answer(error=e, **kwargs)
    if header.status != wire.OK:
        return Answer(error=codec.RemoteError("Error", show(value)), **kwargs)
    return Answer(value=value, steps=tuple(steps), **kwargs)


def show(value: object) -> str:
    """``repr`` of a result; integers past Python's 4,300-digit limit for
    decimal text (a course server sends them) are described instead."""
    try:
        return repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits, too long to print>"  # type: ignore[attr-defined]


def render(text: str, answer: Answer) -> str:
    """The answer as printed: steps aligned under the expression, or one
    line for an error."""
    if answer.error is not None:
        e = answer.error
        return f"Error {answer.status} ({e.kind}): {e.message}\n"
    label = "Expression: "
    lines = [f"{label}{text}"]
    lines += [f"{' ' * (len(label) - 2)}= {step}" for step in answer.steps[1:]]
    cached = (
        f"cacheable for {'ever' if answer.max_age == wire.FOREVER else f'{answer.max_age} s'}"
        if answer.cache and answer.max_age
        else "not cacheable"
    )
    lines.append(f"Result: {show(answer.value)}  ({cached})")
    return "\n".join(lines) + "\n"


def describe_failure(e: BaseException) -> str:
    """A one-line message for a failed connection or request."""
    if isinstance(e, CalculationError):
        return f"Error (local, {e.kind}): {e}\n"
    if isinstance(e, error.ConnectError):
        return f"Error: cannot connect: {e}\n"
    if isinstance(e, error.ConnectionDone | error.ConnectionLost):
        return "Error: the connection was closed before the answer came\n"
    return f"Error: {e}\n"


@implementer(IHalfCloseableProtocol)
class Menu(LineReceiver):
    """The interactive menu on standard input. Lines typed (or piped) while
    an answer is awaited wait their turn; the end of input quits once every
    answer has been shown."""

    delimiter = b"\n"

    def __init__(self, calculator: Calculator, done: defer.Deferred) -> None:
        self.calculator = calculator
        self.done = done
        self.lines: deque[str] = deque()
        self.typing = False
        self.busy = False
        self.eof = False
        self.closing = False

    def connectionMade(self) -> None:
        self.showMenu()

    def say(self, text: str) -> None:
        self.transport.write(text.encode())

    def showMenu(self) -> None:
        lines = ["", "Choose an expression to calculate:"]
        lines += [f"  {i}) {text}" for i, text in enumerate(EXAMPLES, 1)]
        lines += [f"  {len(EXAMPLES) + 1}) type your own", "  q) quit", "choice> "]
        self.say("\n".join(lines))

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.decode(errors="replace").strip())
        self.next()

    def readConnectionLost(self) -> None:
        self.eof = True
        self.next()

    def writeConnectionLost(self) -> None:
        self.quit()

    def next(self) -> None:
        """Handle waiting lines until one needs an answer from the server."""
        while self.lines and not self.busy and not self.closing:
            self.handle(self.lines.popleft())
        if self.eof and not self.busy:
            self.quit()

    def handle(self, text: str) -> None:
        if self.typing:
            self.typing = False
            if text:
                self.send(text)
            else:
                self.showMenu()
        elif text.lower() in ("q", "quit", "exit"):
            self.quit()
        elif text.isdigit() and 1 <= int(text) <= len(EXAMPLES):
            self.send(EXAMPLES[int(text) - 1])
        elif text == str(len(EXAMPLES) + 1):
            self.typing = True
            self.say("expression> ")
        else:
            self.say(f"Please answer 1-{len(EXAMPLES) + 1} or q.\nchoice> ")

    def send(self, text: str) -> None:
        self.busy = True
        self.say("\n")
        d = defer.maybeDeferred(self.calculator.calculate, text)
        d.addCallbacks(lambda answer: self.say(render(text, answer)), self.failed)
        d.addBoth(self.ready)

    def failed(self, reason) -> None:
        self.say(describe_failure(reason.value))
        if not self.calculator.connection.connected:
            self.quit()

    def ready(self, _) -> None:
        self.busy = False
        if not self.closing:
            self.showMenu()
        self.next()

    def quit(self) -> None:
        if not self.closing:
            self.closing = True
            self.say("\n")
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.closing = True
        if not self.done.called:
            self.done.callback(None)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="calc-client",
        description="Calculator client: one expression from the command line, "
        "or the exercise's menu when none is given.",
    )
    p.add_argument("expression", nargs="?", help="calculate this and exit (quote it)")
    p.add_argument("--host", default="127.0.0.1", help="server or proxy host (127.0.0.1)")
    p.add_argument("--port", type=int, default=9999, help="9999 server (default), 9998 proxy")
    p.add_argument(
        "--steps", action=argparse.BooleanOptionalAction, default=True, help="ask for the steps"
    )
    p.add_argument("--no-cache", action="store_true", help="C=0: no cache may serve or store it")
    p.add_argument(
        "--max-age",
        type=int,
        default=wire.FOREVER,
        metavar="N",
        help="oldest cached answer accepted, seconds (65535: any; 0: reload)",
    )
    p.add_argument("--legacy", action="store_true", help="send pickles, as the course client does")
    p.add_argument("--timeout", type=float, default=10.0, help="connect timeout in seconds")
    args = p.parse_args(argv)
    if not 0 <= args.max_age <= wire.FOREVER:
        p.error("--max-age must be 0..65535")
    return args


@defer.inlineCallbacks
def run(reactor, argv: list[str]):
    """The client's main: returns the process exit code."""
    args = parse_args(argv)
    settings = Settings(
        steps=args.steps, cache=not args.no_cache, max_age=args.max_age, legacy=args.legacy
    )
    try:
        connection = yield protocol.ClientCreator(reactor, wire.FrameClient).connectTCP(
            args.host, args.port, timeout=args.timeout
        )
    except Exception as e:
        sys.stderr.write(describe_failure(e))
        return 2
    calculator = Calculator(connection, reactor, settings)
    try:
        if args.expression is not None:
            try:
                answer = yield calculator.calculate(args.expression)
            except Exception as e:
                sys.stderr.write(describe_failure(e))
                return 2
            (sys.stdout if answer.error is None else sys.stderr).write(
                render(args.expression, answer)
            )
            return 0 if answer.error is None else 1
        sys.stdout.write(f"Connected to {args.host}:{args.port}.\n")
        done = defer.Deferred()
        stdio.StandardIO(Menu(calculator, done), reactor=reactor)
        yield done
        return 0
    finally:
        connection.transport.loseConnection()


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console-script entry point; exits 1 on an error answer, 2 when no
    answer could be had."""
    task.react(lambda reactor: run(reactor, sys.argv[1:]).addCallback(_exit))
